"""Score estimators under faults (issue 10), the same in both backends and both front ends:
a numerically singular Stein system, tiny bandwidths, and a non-finite estimator output
naming the site."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
pyro = pytest.importorskip("pyro")
numpyro = pytest.importorskip("numpyro")
import jax.numpy as jnp  # noqa: E402
import numpyro.distributions as ndist  # noqa: E402
import pyro.distributions as pdist  # noqa: E402

from ppl_score.jax import estimators as je  # noqa: E402
from ppl_score.numpyro.implicit import ImplicitELBO as NImplicitELBO  # noqa: E402
from ppl_score.pyro.implicit import ImplicitELBO as PImplicitELBO  # noqa: E402
from ppl_score.torch import estimators as te  # noqa: E402
from tests.helpers.estimators import DUP

AT = DUP[:2] + 0.1


def _both(dtype=np.float64, **kw):
    """``stein_scores`` of both backends on ``DUP``: in-sample and at ``AT``."""
    out = []
    for at in (None, AT):
        t = te.stein_scores(
            torch.as_tensor(DUP.astype(dtype)), None if at is None else torch.as_tensor(at.astype(dtype)), **kw
        )
        j = je.stein_scores(jnp.asarray(DUP.astype(dtype)), None if at is None else jnp.asarray(at.astype(dtype)), **kw)
        out.append((t.numpy(), np.asarray(j)))
    return out


# --------------------------------------------------------------------------------------
# item 10: stein_scores, duplicate samples with a tiny eta, and a tiny bandwidth


@pytest.mark.parametrize("dtype,eta", [(np.float64, 1e-30), (np.float32, 1e-12), (np.float32, 1e-30)])
def test_stein_numerically_singular_is_the_same_error_in_both_backends(dtype, eta):
    for at in (None, AT):
        with pytest.raises(ValueError, match=r"'eta'.*'bandwidth'"):
            te.stein_scores(
                torch.as_tensor(DUP.astype(dtype)), None if at is None else torch.as_tensor(at.astype(dtype)), eta=eta
            )
        with pytest.raises(ValueError, match=r"'eta'.*'bandwidth'"):
            je.stein_scores(
                jnp.asarray(DUP.astype(dtype)), None if at is None else jnp.asarray(at.astype(dtype)), eta=eta
            )


def test_stein_small_eta_resolvable_gives_close_finite_numbers():
    """eta = 1e-12 is above float64's round-off of the solve: finite, and the backends agree
    to the conditioning (eps / eta ~ 1e-4)."""
    for t, j in _both(eta=1e-12):
        assert np.isfinite(t).all() and np.isfinite(j).all()
        np.testing.assert_allclose(t, j, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("bandwidth", [1e-3, 1e-12, 1e-160, 1e-200])
def test_stein_tiny_bandwidth_finite_and_equal(bandwidth):
    """K -> I and every kernel gradient -> 0: the limit 0, with no 0 / 0 from h^2 underflowing."""
    for t, j in _both(bandwidth=bandwidth):
        np.testing.assert_array_equal(t, 0.0)
        np.testing.assert_array_equal(j, 0.0)
    samples = np.random.default_rng(0).normal(size=(5, 2))
    t = te.spectral_scores(torch.as_tensor(samples), bandwidth=1e-200).numpy()
    j = np.asarray(je.spectral_scores(jnp.asarray(samples), bandwidth=1e-200))
    assert np.isfinite(t).all() and np.isfinite(j).all()


def test_stein_bandwidth_zero_in_dtype_names_bandwidth():
    with pytest.raises(ValueError, match="'bandwidth'.*float32"):
        te.stein_scores(torch.as_tensor(DUP, dtype=torch.float32), bandwidth=1e-200)
    with pytest.raises(ValueError, match="'bandwidth'.*float32"):
        je.stein_scores(jnp.asarray(DUP, jnp.float32), bandwidth=1e-200)


# --------------------------------------------------------------------------------------
# item 11: a callable estimator that returns NaN names the site in both front ends


def test_nonfinite_callable_estimator_names_the_site():
    def pmodel():
        pyro.sample("z", pdist.Normal(torch.zeros(2), 1.0).to_event(1))

    def pguide():
        pyro.sample("z", pdist.Delta(pyro.param("m", torch.zeros(2)) + torch.randn(2), event_dim=1))

    elbo = PImplicitELBO(lambda z, c: torch.full_like(z, float("nan")), num_particles=2)
    with pytest.raises(ValueError, match="site 'z'.*non-finite"):
        elbo.loss_and_grads(pmodel, pguide)

    def nmodel():
        numpyro.sample("z", ndist.Normal(jnp.zeros(2), 1.0).to_event(1))

    def nguide():
        eps = jax.random.normal(numpyro.prng_key(), (2,))
        numpyro.sample("z", ndist.Delta(numpyro.param("m", jnp.zeros(2)) + eps, event_dim=1))

    nelbo = NImplicitELBO(lambda z, c: jnp.full_like(z, jnp.nan), num_particles=2)
    with pytest.raises(ValueError, match="site 'z'.*non-finite"):
        nelbo.loss(jax.random.PRNGKey(0), {"m": jnp.zeros(2)}, nmodel, nguide)
    # under tracing nothing can raise (the loss is then NaN, as the estimator's output)
    loss = jax.jit(lambda p: nelbo.loss(jax.random.PRNGKey(0), p, nmodel, nguide))({"m": jnp.zeros(2)})
    assert np.isnan(float(loss)) or np.isfinite(float(loss))
