"""``ImplicitELBO`` and ``WAE`` across implementations: both PPLs validate alike, the torch
and JAX IMQ MMD agree with the closed form, and the prior variance is analytic or from draws
in both front ends."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pyro = pytest.importorskip("pyro")
jax = pytest.importorskip("jax")
numpyro = pytest.importorskip("numpyro")
import jax.numpy as jnp  # noqa: E402
import numpyro.distributions as ndist  # noqa: E402
import pyro.distributions as pdist  # noqa: E402

from ppl_score.jax.estimators import learned_score_estimator  # noqa: E402
from ppl_score.numpyro.implicit import ImplicitELBO as NImplicitELBO  # noqa: E402
from ppl_score.numpyro.wae import WAE as NWAE  # noqa: E402
from ppl_score.numpyro.wae import imq_mmd2 as n_imq_mmd2  # noqa: E402
from ppl_score.pyro.implicit import ImplicitELBO as PImplicitELBO  # noqa: E402
from ppl_score.pyro.wae import WAE as PWAE  # noqa: E402
from ppl_score.pyro.wae import imq_mmd2 as p_imq_mmd2  # noqa: E402
from ppl_score.torch.estimators import LearnedScoreEstimator  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread", "pyro_param_store")


# --------------------------------------------------------------------------------------
# validation


def test_implicit_validation():
    with pytest.raises(ValueError, match="'num_particles'.*>= 2"):
        PImplicitELBO("stein")
    with pytest.raises(ValueError, match="'num_particles'.*>= 2"):
        NImplicitELBO("spectral", num_particles=1)
    with pytest.raises(ValueError, match="'estimator'"):
        PImplicitELBO("ksd", num_particles=4)
    with pytest.raises(TypeError, match="'estimator'"):
        NImplicitELBO(3.0)
    with pytest.raises(ValueError, match="'num_particles'"):
        PImplicitELBO("stein", num_particles=0)
    with pytest.raises(TypeError, match="'context'"):
        NImplicitELBO("stein", num_particles=4, context=3)

    def model():
        pyro.sample("z", pdist.Normal(0.0, 1.0))

    def guide():
        pyro.sample("z", pdist.Normal(pyro.param("m", torch.tensor(0.0)), 1.0))

    with pytest.raises(ValueError, match="'sites'.*'z' is not implicit"):
        PImplicitELBO("stein", num_particles=2, sites=["z"]).loss(model, guide)

    est = learned_score_estimator(1, hidden=(4,))

    def nmodel():
        numpyro.sample("z", ndist.Normal(0.0, 1.0).expand([1]).to_event(1))

    def nguide():
        numpyro.sample("z", ndist.Delta(numpyro.param("m", jnp.zeros(1)), event_dim=1))

    with pytest.raises(ValueError, match="z_score_state.*score_state"):
        NImplicitELBO(est).loss(jax.random.PRNGKey(0), {"m": jnp.zeros(1)}, nmodel, nguide)


def test_imq_mmd_backend_parity_and_value():
    r = np.random.default_rng(9)
    x, y = r.normal(size=(20, 3)), r.normal(size=(15, 3)) + 0.5
    t = float(p_imq_mmd2(torch.as_tensor(x), torch.as_tensor(y), 6.0))
    j = float(n_imq_mmd2(jnp.asarray(x), jnp.asarray(y), 6.0))
    c = 6.0 * np.array([0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0])
    k = lambda a, b: (c / (c + ((a[:, None, :, None] - b[None, :, :, None]) ** 2).sum(2))).sum(-1)
    kxx, kyy = k(x, x), k(y, y)
    want = (kxx.sum() - np.trace(kxx)) / 380 + (kyy.sum() - np.trace(kyy)) / 210 - 2 * k(x, y).mean()
    np.testing.assert_allclose(t, want, rtol=1e-10)
    np.testing.assert_allclose(j, want, rtol=1e-10)


def test_wae_prior_variance_analytic_or_from_draws():
    """The IMQ scale uses the prior's variance where the distribution has one and the variance
    of the prior draws where it has none (a log-normal built by a transform), both front ends."""
    import numpyro.distributions as ndist
    import pyro.distributions as pdist
    from torch.distributions.transforms import ExpTransform

    from ppl_score.jax.mmd import prior_variance as n_var
    from ppl_score.torch.mmd import prior_variance as p_var

    draws = np.random.default_rng(2).lognormal(size=(50, 2))
    from_draws = float(draws.var(axis=0).mean())
    td, jd = torch.as_tensor(draws), jnp.asarray(draws)
    assert p_var(pdist.Normal(torch.zeros(2), 2.0 * torch.ones(2)), td) == pytest.approx(4.0)
    assert float(n_var(ndist.Normal(jnp.zeros(2), 2.0), jd)) == pytest.approx(4.0)
    p_lognormal = pdist.TransformedDistribution(pdist.Normal(torch.zeros(2), 1.0), [ExpTransform()])
    n_lognormal = ndist.TransformedDistribution(ndist.Normal(jnp.zeros(2), 1.0), [ndist.transforms.ExpTransform()])
    assert p_var(p_lognormal, td) == pytest.approx(from_draws, rel=1e-6)
    assert float(n_var(n_lognormal, jd)) == pytest.approx(from_draws, rel=1e-6)


def test_wae_validation():
    with pytest.raises(ValueError, match="'regularizer'"):
        PWAE("kl")
    with pytest.raises(ValueError, match="'lam'"):
        NWAE("mmd", lam=0.0)
    with pytest.raises(ValueError, match="'reconstruction'"):
        PWAE("mmd", reconstruction="l1")
    with pytest.raises(ValueError, match="context"):
        PWAE("score", estimator=LearnedScoreEstimator(2, context_dim=1, hidden=(4,)))
    with pytest.raises(ValueError, match="context"):
        NWAE("score", estimator=learned_score_estimator(2, context_dim=1, hidden=(4,)))
