"""Langevin samplers under faults (issue 10), the same in both backends and both front ends:
MALA that accepts nothing warns, NUTS run lengths are validated, and the result objects
pickle."""

from __future__ import annotations

import copy
import io
import pickle

import numpy as np
import pytest

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
numpyro = pytest.importorskip("numpyro")
import jax.numpy as jnp  # noqa: E402

from ppl_score.jax import langevin as jl  # noqa: E402
from ppl_score.numpyro import mcmc as nmcmc  # noqa: E402
from ppl_score.pyro import mcmc as pmcmc  # noqa: E402
from ppl_score.torch import langevin as tl  # noqa: E402
from tests.helpers.mcmc import X0, _jax_energy, _pyro_model, _torch_gauss


def _numpyro_model(x):
    import numpyro.distributions as ndist

    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("x", ndist.Normal(0.0, 1.0).expand([2]).to_event(1), obs=x)


# --------------------------------------------------------------------------------------
# item 12: MALA that accepts nothing warns; ULA divergence first; NUTS run length


def test_mala_accepting_nothing_warns_with_the_rate():
    with pytest.warns(RuntimeWarning, match=r"acceptance rate 0\b.*step_size"):
        out = tl.mala(_torch_gauss, torch.as_tensor(X0), 1e4, 3, generator=torch.Generator().manual_seed(0))
    assert float(out.accept_rate.max()) < 1e-3
    with pytest.warns(RuntimeWarning, match=r"acceptance rate 0\b.*step_size"):
        jl.mala(jax.tree_util.Partial(_jax_energy, jnp.ones(2)), jnp.asarray(X0), 1e4, 3, key=jax.random.PRNGKey(0))


def test_front_end_mala_accepting_nothing_warns():
    with pytest.warns(RuntimeWarning, match="acceptance rate"):
        pmcmc.langevin(_pyro_model, "x", torch.zeros(1, 2), num_chains=2, num_steps=3, step_size=1e4)
    with pytest.warns(RuntimeWarning, match="acceptance rate"):
        nmcmc.langevin(
            _numpyro_model, "x", jnp.zeros((1, 2)), key=jax.random.PRNGKey(0), num_chains=2, num_steps=3, step_size=1e4
        )


@pytest.mark.parametrize("bad", [0, -1])
def test_nuts_num_samples_validated(bad):
    with pytest.raises(ValueError, match="num_samples"):
        pmcmc.nuts(_pyro_model, "x", torch.zeros(1, 2), num_samples=bad, warmup_steps=2)
    with pytest.raises(ValueError, match="num_samples"):
        nmcmc.nuts(_numpyro_model, "x", jnp.zeros((1, 2)), key=jax.random.PRNGKey(0), num_samples=bad, num_warmup=2)
    with pytest.raises(ValueError, match="warmup_steps"):
        pmcmc.nuts(_pyro_model, "x", torch.zeros(1, 2), num_samples=2, warmup_steps=-1)
    with pytest.raises(TypeError, match="num_warmup"):
        nmcmc.nuts(_numpyro_model, "x", jnp.zeros((1, 2)), key=jax.random.PRNGKey(0), num_samples=2, num_warmup=1.5)


# --------------------------------------------------------------------------------------
# item 5: result objects survive pickle, deepcopy and torch.save


def _roundtrips(obj):
    yield pickle.loads(pickle.dumps(obj))
    yield copy.deepcopy(obj)


def test_result_objects_pickle():
    t = tl.mala(_torch_gauss, torch.as_tensor(X0), 0.3, 2, generator=torch.Generator().manual_seed(0))
    for other in [*_roundtrips(t)]:
        assert type(other) is type(t)
        torch.testing.assert_close(other.samples, t.samples, rtol=0, atol=0)
    buf = io.BytesIO()
    torch.save(t, buf)
    buf.seek(0)
    other = torch.load(buf, weights_only=False)
    torch.testing.assert_close(other.samples, t.samples, rtol=0, atol=0)
    j = jl.mala(jax.tree_util.Partial(_jax_energy, jnp.ones(2)), jnp.asarray(X0), 0.3, 2, key=jax.random.PRNGKey(0))
    for other in _roundtrips(j):
        np.testing.assert_array_equal(np.asarray(other.samples), np.asarray(j.samples))
    s = pmcmc.langevin(_pyro_model, "x", torch.zeros(1, 2), num_chains=2, num_steps=2, step_size=0.3)
    for other in _roundtrips(s):
        torch.testing.assert_close(other.accept_rate, s.accept_rate, rtol=0, atol=0)
    state = tl.init(_torch_gauss, torch.as_tensor(X0))
    for other in _roundtrips(state):
        torch.testing.assert_close(other.score, state.score, rtol=0, atol=0)
