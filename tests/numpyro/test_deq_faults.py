"""``ppl_score.numpyro.deq`` and the JAX DEQ objects under faults (issue 10): a NaN weight
follows ``on_nonconvergence`` in float32, and every object survives ``pickle`` and
``copy.deepcopy``."""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

from ppl_score.jax import deq as jdeq  # noqa: E402


def test_jax_objects_pickle_and_deepcopy():
    from ppl_score.numpyro import deq as ndeq

    cfg = jdeq.deq_config(gamma=0.7, solver="iteration", tol=1e-5)
    x = jnp.ones((2, 3))
    pairs = {"energy": ndeq.deq_energy(4, quadratic=0.5), "score": ndeq.deq_score(4)}
    inits = {k: pair[0](jax.random.PRNGKey(1), (2, 3)) for k, pair in pairs.items()}
    params = inits["energy"][1]  # = deq_energy_init(key, 3, 4)
    energy = jax.jit(jdeq.deq_energy_apply, static_argnums=(2, 3, 4))  # one compilation for all copies
    out, info = energy(params, x, cfg, 0.0, True)
    for copy_of in (lambda o: pickle.loads(pickle.dumps(o)), copy.deepcopy):
        assert copy_of(cfg) == cfg and copy_of(jdeq.SolverConfig()) == jdeq.SolverConfig()
        c_params, c_cfg, c_info = copy_of((params, cfg, info))
        np.testing.assert_array_equal(np.asarray(energy(c_params, x, c_cfg, 0.0, False)), np.asarray(out))
        assert int(c_info.iterations) == int(info.iterations)
        # the stax-style pairs of the NumPyro front end (closures before)
        for kind, pair in pairs.items():
            init_fn, apply_fn = copy_of(pair)
            p = inits[kind][1]
            if copy_of is copy.deepcopy:  # eager inits and solves are slow: one of each per copy kind
                np.testing.assert_array_equal(np.asarray(apply_fn(p, x)), np.asarray(pair[1](p, x)))
            else:
                out_shape, c_p = init_fn(jax.random.PRNGKey(1), (2, 3))
                assert tuple(out_shape) == tuple(inits[kind][0])
                jax.tree_util.tree_map(np.testing.assert_array_equal, c_p, p)


def test_numpyro_front_end_nan_weight_and_float32():
    from ppl_score.numpyro import deq as ndeq

    init_fn, apply_fn = ndeq.deq_energy(
        2, dtype=jnp.float32, gamma=0.9, solver="anderson", tol=1e-6, on_nonconvergence="raise"
    )
    _, params = init_fn(jax.random.PRNGKey(0), (16, 3))
    x = jax.random.normal(jax.random.PRNGKey(1), (16, 3), jnp.float32) * 2
    assert np.isfinite(np.asarray(apply_fn(params, x))).all()
    params["weight"] = params["weight"].at[0, 0].set(jnp.nan)
    with pytest.raises(jdeq.FixedPointError, match="non-finite"):
        apply_fn(params, x)
