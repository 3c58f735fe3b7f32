"""``ppl_score.numpyro.ImplicitELBO`` survives ``pickle`` and ``copy.deepcopy`` (issue 10, item 5)."""

from __future__ import annotations

import copy
import pickle

import pytest

jax = pytest.importorskip("jax")
numpyro = pytest.importorskip("numpyro")
import jax.numpy as jnp  # noqa: E402
import numpyro.distributions as ndist  # noqa: E402

from ppl_score.numpyro.implicit import ImplicitELBO as NImplicitELBO  # noqa: E402


def test_numpyro_implicit_elbo_roundtrips():
    def model():
        numpyro.sample("z", ndist.Normal(jnp.zeros(2), 1.0).to_event(1))

    def guide():
        eps = jax.random.normal(numpyro.prng_key(), (2,))
        numpyro.sample("z", ndist.Delta(numpyro.param("m", jnp.zeros(2)) + eps, event_dim=1))

    params = {"m": jnp.zeros(2)}
    elbo = NImplicitELBO("stein", num_particles=3, estimator_options={"eta": 0.1})
    want = float(elbo.loss(jax.random.PRNGKey(0), params, model, guide))
    for other in (pickle.loads(pickle.dumps(elbo)), copy.deepcopy(elbo)):
        assert float(other.loss(jax.random.PRNGKey(0), params, model, guide)) == want
