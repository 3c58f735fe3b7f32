"""``ppl_score.numpyro.deq``: the registered DEQ energy module inside NumPyro's ``SVI``."""

from __future__ import annotations

import numpy as np
import pytest

from tests.helpers.deq import TIGHT, D, H


def test_numpyro_module_in_svi(jdeq, data):
    pytest.importorskip("numpyro")
    import jax
    import jax.numpy as jnp
    import numpyro
    import optax

    from ppl_score.numpyro import ScoreMatching, Unnormalized
    from ppl_score.numpyro.deq import deq_energy_module

    x = jnp.asarray(data[0])

    def model(x):
        energy = deq_energy_module("energy", D, H, quadratic=0.5, **{**TIGHT, "tol": 1e-8})
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("x", Unnormalized(energy, event_shape=(D,)), obs=x)

    svi = numpyro.infer.SVI(model, lambda x: None, optax.adam(1e-2), loss=ScoreMatching("dsm", sigma=0.5))
    state = svi.init(jax.random.PRNGKey(0), x)
    p0 = svi.get_params(state)["energy$params"]
    assert p0["weight"].shape == (H, H) and p0["weight"].dtype == jnp.float64
    state, loss = jax.jit(svi.update)(state, x)
    p1 = svi.get_params(state)["energy$params"]
    assert np.isfinite(float(loss)) and not np.allclose(p0["weight"], p1["weight"])
    # the registered module is the plain JAX energy with those params
    with numpyro.handlers.seed(rng_seed=0), numpyro.handlers.substitute(data={"energy$params": p1}):
        fn = deq_energy_module("energy", D, H, quadratic=0.5, **{**TIGHT, "tol": 1e-8})
    config = jdeq.deq_config(**{**TIGHT, "tol": 1e-8})
    both = jax.jit(lambda y: (fn(y), jdeq.deq_energy_apply(p1, y, config, quadratic=0.5)))(x)
    assert np.allclose(*both)
