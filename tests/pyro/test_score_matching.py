"""``ppl_score.pyro``: ``ScoreMatching`` as a Pyro SVI loss and ``Unnormalized``.

Closed forms (float64, shared in ``tests/helpers/score_matching.py``): for
``x ~ N(mu, P^{-1})`` the exact score-matching objective of a data point is
``-tr P + 1/2 ||P (x - mu)||^2``; for ``x ~ Gamma(a, b)`` matched in ``u = log x``
(log-abs-det-Jacobian ``u`` added) it is ``-b x + 1/2 (a - b x)^2``, whose minimizer is the
method-of-moments estimate ``a = m^2 / v``, ``b = m / v``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import multivariate_normal

torch = pytest.importorskip("torch")
pyro = pytest.importorskip("pyro")
import pyro.distributions as dist  # noqa: E402
from pyro import poutine  # noqa: E402
from pyro.distributions import constraints  # noqa: E402
from pyro.infer import SVI  # noqa: E402
from pyro.infer.autoguide import AutoDelta, AutoMultivariateNormal, AutoNormal  # noqa: E402
from pyro.nn import PyroModule  # noqa: E402
from pyro.optim import Adam, ClippedAdam  # noqa: E402

from ppl_score.pyro import ScoreMatching, Unnormalized  # noqa: E402
from ppl_score.spec import OBJECTIVES, UNCONDITIONAL_METHODS  # noqa: E402
from ppl_score.torch import score_matching_loss  # noqa: E402
from ppl_score.torch.nets import MLPEnergy  # noqa: E402
from tests.helpers.score_matching import BETA_GB, TAU, _mask, esm_gamma, esm_gaussian, gb_target, mvn_case
from tests.helpers.shared import empty_guide

pytestmark = pytest.mark.usefixtures("one_torch_thread", "fresh_pyro")


F64 = torch.float64


def t(a):
    return torch.as_tensor(np.asarray(a), dtype=F64)


def mvn_model(mu, prec):
    def model(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.MultivariateNormal(t(mu), precision_matrix=t(prec)), obs=x)

    return model


# ---------------------------------------------------------------------------------------
# Values against closed forms
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("beta", [1.0, 0.25])
def test_esm_value_mvn_closed_form(rng, beta):
    mu, prec, x = mvn_case(rng)
    model = mvn_model(mu, prec)
    expected = beta * esm_gaussian(mu, prec, x).sum()
    elbo = ScoreMatching("esm", beta=beta)
    value = elbo.loss(model, empty_guide, t(x))
    assert isinstance(value, float)
    assert value == pytest.approx(expected, rel=1e-10)
    diff = elbo.differentiable_loss(model, empty_guide, t(x))
    assert isinstance(diff, torch.Tensor) and diff.item() == pytest.approx(expected, rel=1e-10)


def test_subsample_scales_by_n_over_b(rng):
    mu, prec, x = mvn_case(rng, n=30)
    idx = torch.tensor([3, 7, 8, 20, 29])

    def model(x):
        with pyro.plate("data", x.shape[0], subsample=idx) as i:
            pyro.sample("x", dist.MultivariateNormal(t(mu), precision_matrix=t(prec)), obs=x[i])

    value = ScoreMatching("esm").loss(model, empty_guide, t(x))
    expected = 30 / 5 * esm_gaussian(mu, prec, x[idx.numpy()]).sum()
    assert value == pytest.approx(expected, rel=1e-10)


def test_gamma_matched_in_log_space_closed_form(rng):
    a, b = 2.5, 1.5
    x = rng.gamma(3.0, 1 / 2.0, size=25)

    def model(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Gamma(t(a), t(b)), obs=x)

    value = ScoreMatching("esm").loss(model, empty_guide, t(x))
    assert value == pytest.approx(esm_gamma(a, b, x).sum(), rel=1e-10)
    # an Unnormalized density equal up to a constant (and with positive support) gives the same
    unnorm = Unnormalized(lambda y: (a - 1) * torch.log(y[:, 0]) - b * y[:, 0], (1,), constraints.positive)

    def model_u(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", unnorm, obs=x[:, None])

    assert ScoreMatching("esm").loss(model_u, empty_guide, t(x)) == pytest.approx(value, rel=1e-10)


@pytest.mark.parametrize("method", sorted(UNCONDITIONAL_METHODS))
def test_every_method_steps_and_matches_the_backend(rng, method):
    """One SVI step per method; the loss equals the backend function on the same draws."""
    mu, prec, x = mvn_case(rng, n=16)
    opts = {"sigma": 0.5} if "dsm" in method else {}
    if OBJECTIVES[method].uses_projections:
        opts["n_projections"] = 2
    if method in ("ssm", "ssm_vr"):
        opts["projection"] = "gaussian"

    def model(x):
        loc = pyro.param("loc", torch.zeros(3, dtype=F64))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.MultivariateNormal(loc, precision_matrix=t(prec)), obs=x)

    elbo = ScoreMatching(method, **opts)
    pyro.set_rng_seed(3)
    value = elbo.loss(model, empty_guide, t(x))
    log_p = lambda y: dist.MultivariateNormal(torch.zeros(3, dtype=F64), precision_matrix=t(prec)).log_prob(y)
    pyro.set_rng_seed(3)
    direct = score_matching_loss(log_p, t(x), method, reduction="sum", **opts)
    assert value == pytest.approx(direct.item(), rel=1e-10)

    svi = SVI(model, empty_guide, Adam({"lr": 0.1}), loss=elbo)
    step = svi.step(t(x))
    assert math.isfinite(step)
    assert not torch.equal(pyro.param("loc").detach(), torch.zeros(3, dtype=F64))
    assert math.isfinite(svi.evaluate_loss(t(x)))


def test_svi_updates_a_pyro_module_energy_reached_only_through_the_loss(rng):
    """An ``Unnormalized(PyroModule)`` energy's parameters appear in no trace (its forward
    runs inside the loss): SVI must still update them and decrease the loss."""
    energy = PyroModule[MLPEnergy](2, hidden=(16,), quadratic=1.0).double()
    x = t(rng.normal(size=(64, 2)) * 0.5 + 1.0)

    def model(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", Unnormalized(energy, event_shape=(2,)), obs=x)

    w0 = energy.net[0].weight.detach().clone()
    svi = SVI(model, empty_guide, Adam({"lr": 1e-2}), loss=ScoreMatching("esm"))
    first = svi.evaluate_loss(x)
    for _ in range(30):
        svi.step(x)
    assert not torch.equal(energy.net[0].weight.detach(), w0)
    assert svi.evaluate_loss(x) < first


# ---------------------------------------------------------------------------------------
# Fitting
# ---------------------------------------------------------------------------------------


def test_svi_recovers_mvn_precision_as_the_mle(rng):
    """Score matching equals the MLE for a Gaussian: ``mu = mean``, ``P = S^{-1}`` with the
    (1/N) sample covariance ``S``. The model is the unnormalized Gaussian energy
    ``-1/2 (x - mu)^T L L^T (x - mu)``: score matching never needs ``det P``."""
    d, n = 3, 300
    cov = np.array([[1.0, 0.5, 0.1], [0.5, 2.0, -0.3], [0.1, -0.3, 0.7]])
    x = rng.multivariate_normal([1.0, -1.0, 0.5], cov, size=n)
    mean = x.mean(0)
    mle_prec = np.linalg.inv(np.cov(x.T, bias=True))

    def model(x):
        loc = pyro.param("loc", torch.zeros(d, dtype=F64))
        chol = pyro.param("chol", torch.eye(d, dtype=F64), constraint=constraints.lower_cholesky)

        def log_density(y):
            r = (y - loc) @ chol
            return -0.5 * (r * r).sum(-1)

        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", Unnormalized(log_density, (d,)), obs=x)

    svi = SVI(model, empty_guide, ClippedAdam({"lr": 0.1, "lrd": 0.99}), loss=ScoreMatching("esm"))
    for _ in range(300):
        svi.step(t(x))
    chol = pyro.param("chol").detach().numpy()
    np.testing.assert_allclose(pyro.param("loc").detach().numpy(), mean, atol=2e-3)
    np.testing.assert_allclose(chol @ chol.T, mle_prec, atol=5e-3 * np.abs(mle_prec).max())


def test_svi_recovers_gamma_through_the_log_transform(rng):
    """Default ``ssm_vr``; in one dimension a Rademacher ``v`` has ``v^2 = 1``, so it is exact
    and the fit converges to the method-of-moments estimate (and near the truth)."""
    x = rng.gamma(3.0, 1 / 2.0, size=2000)
    m, v = x.mean(), x.var()

    def model(x):
        a = pyro.param("a", torch.tensor(1.0, dtype=F64), constraint=constraints.positive)
        b = pyro.param("b", torch.tensor(1.0, dtype=F64), constraint=constraints.positive)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Gamma(a, b), obs=x)

    svi = SVI(model, empty_guide, ClippedAdam({"lr": 0.1, "lrd": 0.99}), loss=ScoreMatching())
    for _ in range(300):
        svi.step(t(x))
    a, b = pyro.param("a").item(), pyro.param("b").item()
    assert a == pytest.approx(m * m / v, rel=2e-3)
    assert b == pytest.approx(m / v, rel=2e-3)
    assert a == pytest.approx(3.0, rel=0.15) and b == pytest.approx(2.0, rel=0.15)


def gb_model(x):
    mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=F64), TAU))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("x", dist.Normal(mu, 1.0), obs=x)


def test_generalized_bayes_value_and_gradient_per_particle(rng):
    x = rng.normal(1.0, 1.0, size=12)

    def guide(x):
        m = pyro.param("m", torch.tensor(0.3, dtype=F64))
        s = pyro.param("s", torch.tensor(0.7, dtype=F64), constraint=constraints.positive)
        pyro.sample("mu", dist.Normal(m, s))

    elbo = ScoreMatching("esm", beta=BETA_GB)
    pyro.set_rng_seed(5)
    loss = elbo.differentiable_loss(gb_model, guide, t(x))
    pyro.set_rng_seed(5)
    mu = poutine.trace(guide).get_trace(t(x)).nodes["mu"]["value"].item()
    m, s = 0.3, 0.7
    eps = (mu - m) / s
    sm = BETA_GB * (-1 + 0.5 * (x - mu) ** 2).sum()
    log_q = -0.5 * eps**2 - math.log(s) - 0.5 * math.log(2 * math.pi)
    log_p = -0.5 * (mu / TAU) ** 2 - math.log(TAU) - 0.5 * math.log(2 * math.pi)
    assert loss.item() == pytest.approx(sm + log_q - log_p, rel=1e-10)
    # d/dmu of the integrand, chained through mu = m + s eps (log q's gradient is -1/s in s)
    dmu = -BETA_GB * (x - mu).sum() + mu / TAU**2
    g_m, g_s = torch.autograd.grad(loss, [pyro.param("m").unconstrained(), pyro.param("s").unconstrained()])
    assert g_m.item() == pytest.approx(dmu, rel=1e-9)
    assert g_s.item() == pytest.approx((dmu * eps - 1 / s) * s, rel=1e-9)  # d s / d log s = s


def test_generalized_bayes_autodelta_finds_the_mode(rng):
    x = rng.normal(1.0, 1.0, size=20)
    guide = AutoDelta(gb_model)
    svi = SVI(gb_model, guide, ClippedAdam({"lr": 0.1, "lrd": 0.99}), loss=ScoreMatching("esm", beta=BETA_GB))
    for _ in range(300):
        svi.step(t(x))
    mode, _ = gb_target(x)
    assert guide.median()["mu"].item() == pytest.approx(mode, abs=1e-3)


@pytest.mark.parametrize("autoguide", [AutoNormal, AutoMultivariateNormal])
def test_autoguides_run(rng, autoguide):
    """The fit of AutoNormal to the generalized-Bayes target is checked in the NumPyro suite
    (jit makes long SVI runs cheap there); the estimator itself is checked per particle
    above, and the two front ends agree (tests/parity/test_frontends.py)."""
    x = rng.normal(1.0, 1.0, size=10)
    elbo = ScoreMatching(beta=BETA_GB, num_particles=2)
    svi = SVI(gb_model, autoguide(gb_model), Adam({"lr": 0.01}), loss=elbo)
    assert all(math.isfinite(svi.step(t(x))) for _ in range(3))


@pytest.mark.parametrize("how", ["poutine.mask", "fn.mask"])
def test_masked_data_points_contribute_nothing(rng, how):
    mu, prec, x = mvn_case(rng, n=12)
    keep = _mask(12)
    x_bad = x.copy()
    x_bad[~keep] = np.nan  # masked data points may hold anything

    def model(x):
        d = dist.MultivariateNormal(t(mu), precision_matrix=t(prec))
        with pyro.plate("data", x.shape[0]):
            if how == "poutine.mask":
                with poutine.mask(mask=torch.as_tensor(keep)):
                    pyro.sample("x", d, obs=x)
            else:
                pyro.sample("x", d.mask(torch.as_tensor(keep)), obs=x)

    for method in ("esm", "dsm"):
        value = ScoreMatching(method).loss(model, empty_guide, t(x_bad))
        assert math.isfinite(value)
    assert ScoreMatching("esm").loss(model, empty_guide, t(x_bad)) == pytest.approx(
        esm_gaussian(mu, prec, x[keep]).sum(), rel=1e-10
    )


def test_obs_mask_with_a_guide_for_the_missing_values(rng):
    mu, prec, x = mvn_case(rng, n=9)
    keep = _mask(9)
    x_bad = x.copy()
    x_bad[~keep] = np.nan
    fill = rng.normal(size=(9, 3))

    def model(x):
        with pyro.plate("data", x.shape[0]):
            d = dist.MultivariateNormal(t(mu), precision_matrix=t(prec))
            pyro.sample("x", d, obs=x, obs_mask=torch.as_tensor(keep))

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x_unobserved", dist.Delta(t(fill), event_dim=1))

    value = ScoreMatching("esm").loss(model, guide, t(x_bad))
    log_p_missing = multivariate_normal(mu, np.linalg.inv(prec)).logpdf(fill)[~keep].sum()
    expected = esm_gaussian(mu, prec, x[keep]).sum() - log_p_missing
    assert value == pytest.approx(expected, rel=1e-10)


def _two_site_model(mu, prec, a, b, dep=False):
    def model(x, y):
        with pyro.plate("data", x.shape[0]):
            xs = pyro.sample("x", dist.MultivariateNormal(t(mu), precision_matrix=t(prec)), obs=x)
            rate = t(b) + (xs.sum(-1) ** 2 if dep else 0.0)
            pyro.sample("y", dist.Gamma(t(a), rate), obs=y)

    return model


def test_several_sites_are_matched_jointly(rng):
    mu, prec, x = mvn_case(rng, n=10, d=2)
    a, b = 2.0, 3.0
    y = rng.gamma(2.0, 0.5, size=10)
    model = _two_site_model(mu, prec, a, b)
    joint = ScoreMatching("esm").loss(model, empty_guide, t(x), t(y))
    only_x = ScoreMatching("esm", sites=["x"]).loss(model, empty_guide, t(x), t(y))
    only_y = ScoreMatching("esm", sites="y").loss(model, empty_guide, t(x), t(y))
    # the joint log density is separable, so exact score matching adds up
    assert only_x == pytest.approx(esm_gaussian(mu, prec, x).sum(), rel=1e-10)
    assert only_y == pytest.approx(esm_gamma(a, b, y).sum(), rel=1e-10)
    assert joint == pytest.approx(only_x + only_y, rel=1e-10)


def test_a_site_depending_on_a_matched_value_is_matched_jointly(rng):
    """``y | x ~ Gamma(a, b + (x_1 + x_2)^2)``: matching both is score matching of the joint
    density of ``(x, log y)`` (SPEC.md section 3), here against the backend on it."""
    mu, prec, x = mvn_case(rng, n=6, d=2)
    y = rng.gamma(2.0, 0.5, size=6)
    model = _two_site_model(mu, prec, 2.0, 3.0, dep=True)

    def joint(rows):
        xs, u = rows[:, :2], rows[:, 2]
        rate = t(3.0) + xs.sum(-1) ** 2
        lp = dist.MultivariateNormal(t(mu), precision_matrix=t(prec)).log_prob(xs)
        return lp + dist.Gamma(t(2.0), rate).log_prob(u.exp()) + u

    rows = torch.cat([t(x), t(np.log(y))[:, None]], 1)
    expected = score_matching_loss(joint, rows, "esm", reduction="sum").item()
    assert ScoreMatching("esm").loss(model, empty_guide, t(x), t(y)) == pytest.approx(expected, rel=1e-10)
    # conditioning on x (matching only y): y's distribution given x is what it is
    assert math.isfinite(ScoreMatching("esm", sites=["y"]).loss(model, empty_guide, t(x), t(y)))


def test_evaluate_loss_under_no_grad_and_the_elbo_module_route(rng):
    mu, prec, x = mvn_case(rng, n=8)
    energy = PyroModule[MLPEnergy](3, hidden=(8,), quadratic=1.0).double()

    def model(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", Unnormalized(energy, (3,)), obs=x)

    direct = score_matching_loss(energy, t(x), "esm", reduction="sum").item()
    svi = SVI(model, empty_guide, Adam({"lr": 1e-3}), loss=ScoreMatching("esm"))
    assert svi.evaluate_loss(t(x)) == pytest.approx(direct, rel=1e-10)
    module = ScoreMatching("esm")(model, empty_guide)
    assert isinstance(module, torch.nn.Module)
    value = module(t(x))
    assert value.item() == pytest.approx(direct, rel=1e-10)
    value.backward()
    # every parameter reaches the score: MLPEnergy has no last bias (a constant shift of
    # log p that score matching cannot see, and that DDP would report as unused)
    assert all(p.grad is not None for p in energy.parameters())
    before = svi.evaluate_loss(t(x))
    for _ in range(5):
        svi.step(t(x))
    assert svi.evaluate_loss(t(x)) < before


def test_user_tensors_are_not_modified(rng):
    mu, prec, x = mvn_case(rng, n=5)
    xt = t(x)
    copy = xt.clone()
    ScoreMatching("esm").loss(mvn_model(mu, prec), empty_guide, xt)
    assert torch.equal(xt, copy) and not xt.requires_grad


# ---------------------------------------------------------------------------------------
# Unnormalized
# ---------------------------------------------------------------------------------------


def test_unnormalized_log_prob_and_sample_error():
    f = lambda y: -0.5 * (y**2).sum((-2, -1))
    d = Unnormalized(f, (2, 3))
    value = torch.randn(4, 5, 2, 3, dtype=F64)
    np.testing.assert_allclose(d.log_prob(value).numpy(), f(value).numpy())
    assert d.expand((5,)).log_prob(value).shape == (4, 5)
    with pytest.raises(NotImplementedError, match=r"ppl_score\.pyro\.langevin.*NUTS"):
        d.sample()
    with pytest.raises(NotImplementedError, match="langevin"):
        d.rsample((2,))
    with pytest.raises(ValueError, match="log_density_fn"):
        Unnormalized(lambda y: y, (2,)).log_prob(torch.zeros(3, 2))
    with pytest.raises(ValueError, match="event_shape"):
        Unnormalized(f, (0, 2))
    with pytest.raises(TypeError, match="log_density_fn"):
        Unnormalized(3.0, (2,))


# ---------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(method="nope"), ValueError, "method"),
        (dict(method="esm", sigma=0.1), ValueError, "unknown option"),
        (dict(method="dsm", sigma=-1.0), ValueError, "sigma"),
        (dict(method="ssm", projection="cauchy"), ValueError, "projection"),
        (dict(beta=0.0), ValueError, "beta"),
        (dict(beta=float("nan")), ValueError, "beta"),
        (dict(beta="1"), TypeError, "beta"),
        (dict(num_particles=0), ValueError, "num_particles"),
        (dict(num_particles=1.5), TypeError, "num_particles"),
        (dict(sites=[]), ValueError, "sites"),
        (dict(sites=[1]), TypeError, "sites"),
    ],
)
def test_bad_constructor_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        ScoreMatching(**kwargs)


def test_model_errors_name_the_site(rng):
    x = t(rng.normal(size=(5, 2)))

    def discrete(x):
        with pyro.plate("data", 5):
            pyro.sample("flips", dist.Bernoulli(0.5 * torch.ones(5, dtype=F64)), obs=(x[:, 0] > 0).double())

    with pytest.raises(ValueError, match="'flips'.*discrete"):
        ScoreMatching().loss(discrete, empty_guide, x)

    def latent(x):
        z = pyro.sample("z", dist.Normal(torch.tensor(0.0, dtype=F64), 1.0))
        with pyro.plate("data", 5):
            pyro.sample("x", dist.Normal(z, 1.0).expand([5, 2]).to_event(1), obs=x)

    with pytest.raises(ValueError, match="'z'.*not provided by the guide"):
        ScoreMatching().loss(latent, empty_guide, x)
    with pytest.raises(ValueError, match="'nope'.*not an observed"):
        ScoreMatching(sites=["nope"]).loss(latent, AutoNormal(latent), x)
    with pytest.raises(ValueError, match="'z', a latent site"):
        ScoreMatching(sites=["z"]).loss(latent, AutoNormal(latent), x)

    def nonreparam_guide(x):
        pyro.sample("z", dist.Normal(torch.tensor(0.0, dtype=F64), 1.0).expand([]), infer={})
        pyro.sample("k", dist.Categorical(torch.ones(3, dtype=F64) / 3), infer={"is_auxiliary": True})

    with pytest.raises(ValueError, match="'k'.*reparameterized"):
        ScoreMatching().loss(latent, nonreparam_guide, x)

    def no_obs(x):
        pyro.sample("z", dist.Normal(torch.tensor(0.0, dtype=F64), 1.0))

    with pytest.raises(ValueError, match="no observed sample sites"):
        ScoreMatching().loss(no_obs, AutoNormal(no_obs), x)

    def mismatched(x):
        with pyro.plate("a", 5):
            pyro.sample("x", dist.Normal(torch.zeros(5, 2, dtype=F64), 1.0).to_event(1), obs=x)
        with pyro.plate("b", 2):
            pyro.sample("y", dist.Normal(torch.zeros(2, dtype=F64), 1.0), obs=x[0])

    # sites in different plates are matched as one data point: exact score matching adds up
    joint = ScoreMatching("esm").loss(mismatched, empty_guide, x)
    parts = [ScoreMatching("esm", sites=[s]).loss(mismatched, empty_guide, x) for s in ("x", "y")]
    assert joint == pytest.approx(sum(parts), rel=1e-10)

    def rescaled(x):
        with pyro.plate("data", 5):
            pyro.sample("x", dist.Normal(torch.zeros(5, 2, dtype=F64), 1.0).to_event(1), obs=x)
            with poutine.scale(scale=2.0):
                pyro.sample("y", dist.Normal(torch.zeros(5, dtype=F64), 1.0), obs=x[:, 0])

    with pytest.raises(ValueError, match=r"\['x', 'y'\] have different scales"):
        ScoreMatching().loss(rescaled, empty_guide, x)
