"""``ppl_score.numpyro``: ``ScoreMatching`` as a NumPyro SVI loss and ``Unnormalized``.

The same closed forms as ``tests/pyro/test_score_matching.py`` (float64, ``jax_enable_x64``
from conftest, shared in ``tests/helpers/score_matching.py``):
``-tr P + 1/2 ||P (x - mu)||^2`` per data point for ``N(mu, P^{-1})``, and
``-b x + 1/2 (a - b x)^2`` for ``Gamma(a, b)`` matched in ``u = log x``.
"""

from __future__ import annotations

import math
from functools import partial

import numpy as np
import pytest
from scipy.stats import multivariate_normal

jax = pytest.importorskip("jax")
numpyro = pytest.importorskip("numpyro")
optax = pytest.importorskip("optax")
import jax.numpy as jnp  # noqa: E402
import numpyro.distributions as dist  # noqa: E402
from jax import random  # noqa: E402
from numpyro import handlers  # noqa: E402
from numpyro.distributions import constraints  # noqa: E402
from numpyro.infer import SVI  # noqa: E402
from numpyro.infer.autoguide import AutoDelta, AutoMultivariateNormal, AutoNormal  # noqa: E402

from ppl_score.jax import score_matching_loss  # noqa: E402
from ppl_score.jax.nets import energy_apply, energy_init  # noqa: E402
from ppl_score.numpyro import ScoreMatching, Unnormalized  # noqa: E402
from ppl_score.spec import OBJECTIVES, UNCONDITIONAL_METHODS  # noqa: E402
from tests.helpers.score_matching import BETA_GB, TAU, _mask, esm_gamma, esm_gaussian, gb_target, mvn_case
from tests.helpers.shared import empty_guide

KEY = random.PRNGKey(0)


def mvn_model(mu, prec):
    def model(x):
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("x", dist.MultivariateNormal(mu, precision_matrix=prec), obs=x)

    return model


def loss_of(elbo, model, guide, *args, params=None, key=KEY):
    """The loss under ``jit`` (eager JAX compiles every small op on first use: slower)."""
    loss = jax.jit(lambda k, p, *a: elbo.loss(k, p, model, guide, *a))
    return float(loss(key, params or {}, *args))


def fit(model, guide, elbo, steps, *args, lr=0.1, decay=0.99, seed=0):
    """``svi.run`` (jitted), with an exponentially decaying Adam step."""
    sched = optax.exponential_decay(lr, 1, decay)
    svi = SVI(model, guide, optax.adam(sched), loss=elbo)
    result = svi.run(random.PRNGKey(seed), steps, *args, progress_bar=False)
    return result.params


# ---------------------------------------------------------------------------------------
# Values against closed forms
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("beta", [1.0, 0.25])
def test_esm_value_mvn_closed_form(rng, beta):
    mu, prec, x = mvn_case(rng)
    model = mvn_model(mu, prec)
    expected = beta * esm_gaussian(mu, prec, x).sum()
    elbo = ScoreMatching("esm", beta=beta)
    assert loss_of(elbo, model, empty_guide, jnp.asarray(x)) == pytest.approx(expected, rel=1e-10)


def test_subsample_scales_by_n_over_b(rng):
    mu, prec, x = mvn_case(rng, n=30)
    idx = jnp.array([3, 7, 8, 20, 29])

    def model(x):
        with numpyro.plate("data", x.shape[0], subsample_size=5) as i:
            numpyro.sample("x", dist.MultivariateNormal(mu, precision_matrix=prec), obs=x[i])

    fixed = handlers.substitute(model, data={"data": idx})
    value = loss_of(ScoreMatching("esm"), fixed, empty_guide, jnp.asarray(x))
    assert value == pytest.approx(30 / 5 * esm_gaussian(mu, prec, x[np.asarray(idx)]).sum(), rel=1e-10)


def test_gamma_matched_in_log_space_closed_form(rng):
    a, b = 2.5, 1.5
    x = rng.gamma(3.0, 1 / 2.0, size=25)

    def model(x):
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("x", dist.Gamma(a, b), obs=x)

    value = loss_of(ScoreMatching("esm"), model, empty_guide, jnp.asarray(x))
    assert value == pytest.approx(esm_gamma(a, b, x).sum(), rel=1e-10)
    unnorm = Unnormalized(lambda y: (a - 1) * jnp.log(y[:, 0]) - b * y[:, 0], (1,), constraints.positive)

    def model_u(x):
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("x", unnorm, obs=x[:, None])

    assert loss_of(ScoreMatching("esm"), model_u, empty_guide, jnp.asarray(x)) == pytest.approx(value, rel=1e-10)


@pytest.mark.parametrize("method", sorted(UNCONDITIONAL_METHODS))
def test_every_method_matches_the_backend_and_differentiates_under_jit(rng, method):
    """The loss equals the backend function with the objective's key (the third of the
    particle key's split), and has a gradient in the model's parameters under ``jit``."""
    mu, prec, x = mvn_case(rng, n=16)
    opts = {"sigma": 0.5} if "dsm" in method else {}
    if OBJECTIVES[method].uses_projections:
        opts["n_projections"] = 2
    if method in ("ssm", "ssm_vr"):
        opts["projection"] = "gaussian"

    scale = jnp.asarray(np.diag(prec) ** -0.5)

    def model(x):
        loc = numpyro.param("loc", jnp.zeros(3))
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("x", dist.Normal(loc, scale).to_event(1), obs=x)

    elbo = ScoreMatching(method, **opts)
    params = {"loc": jnp.zeros(3)}
    value, grads = jax.jit(jax.value_and_grad(lambda p, x: elbo.loss(KEY, p, model, empty_guide, x)))(
        params, jnp.asarray(x)
    )
    log_p = dist.Normal(jnp.zeros(3), scale).to_event(1).log_prob
    sm_key = random.split(KEY, 3)[2]
    direct = jax.jit(lambda x, k: score_matching_loss(log_p, x, method, key=k, reduction="sum", **opts))(
        jnp.asarray(x), sm_key
    )
    assert float(value) == pytest.approx(float(direct), rel=1e-10)
    assert np.isfinite(grads["loc"]).all() and np.abs(grads["loc"]).max() > 0


def test_update_under_jit_stable_update_and_svi_run(rng):
    mu, prec, x = mvn_case(rng, n=8)

    def model(x):
        loc = numpyro.param("loc", jnp.zeros(3))
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("x", dist.MultivariateNormal(loc, precision_matrix=prec), obs=x)

    xs = jnp.asarray(x)
    svi = SVI(model, empty_guide, optax.adam(0.05), loss=ScoreMatching("esm"))
    state = svi.init(KEY, xs)
    update = jax.jit(svi.update)
    losses = []
    for _ in range(3):
        state, loss = update(state, xs)
        losses.append(float(loss))
    assert losses[0] == pytest.approx(esm_gaussian(np.zeros(3), prec, x).sum(), rel=1e-10)
    assert losses[2] < losses[0]
    state, loss = jax.jit(svi.stable_update)(state, xs)
    assert math.isfinite(float(loss))
    for progress_bar in (True, False):
        svi = SVI(model, empty_guide, optax.adam(0.05), loss=ScoreMatching(num_particles=3))
        result = svi.run(KEY, 20, xs, progress_bar=progress_bar)
        assert result.losses.shape == (20,) and np.isfinite(result.losses).all()


# ---------------------------------------------------------------------------------------
# Fitting
# ---------------------------------------------------------------------------------------


def test_svi_recovers_mvn_precision_as_the_mle(rng):
    """Score matching equals the MLE for a Gaussian (unnormalized energy: no ``det P``)."""
    d, n = 3, 300
    cov = np.array([[1.0, 0.5, 0.1], [0.5, 2.0, -0.3], [0.1, -0.3, 0.7]])
    x = rng.multivariate_normal([1.0, -1.0, 0.5], cov, size=n)
    mle_prec = np.linalg.inv(np.cov(x.T, bias=True))

    def model(x):
        loc = numpyro.param("loc", jnp.zeros(d))
        chol = numpyro.param("chol", jnp.eye(d), constraint=constraints.lower_cholesky)

        def log_density(y):
            r = (y - loc) @ chol
            return -0.5 * (r * r).sum(-1)

        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("x", Unnormalized(log_density, (d,)), obs=x)

    params = fit(model, empty_guide, ScoreMatching("esm"), 300, jnp.asarray(x))
    chol = np.asarray(params["chol"])
    np.testing.assert_allclose(params["loc"], x.mean(0), atol=2e-3)
    np.testing.assert_allclose(chol @ chol.T, mle_prec, atol=5e-3 * np.abs(mle_prec).max())


def test_svi_recovers_gamma_through_the_log_transform(rng):
    """Default ``ssm_vr`` (exact in one dimension): the method-of-moments estimate."""
    x = rng.gamma(3.0, 1 / 2.0, size=2000)
    m, v = x.mean(), x.var()

    def model(x):
        a = numpyro.param("a", 1.0, constraint=constraints.positive)
        b = numpyro.param("b", 1.0, constraint=constraints.positive)
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("x", dist.Gamma(a, b), obs=x)

    params = fit(model, empty_guide, ScoreMatching(), 300, jnp.asarray(x))
    a, b = float(params["a"]), float(params["b"])
    assert a == pytest.approx(m * m / v, rel=2e-3)
    assert b == pytest.approx(m / v, rel=2e-3)
    assert a == pytest.approx(3.0, rel=0.15) and b == pytest.approx(2.0, rel=0.15)


def gb_model(x):
    mu = numpyro.sample("mu", dist.Normal(0.0, TAU))
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("x", dist.Normal(mu, 1.0), obs=x)


def test_generalized_bayes_value_and_gradient_per_particle(rng):
    x = rng.normal(1.0, 1.0, size=12)

    def guide(x):
        m = numpyro.param("m", 0.3)
        s = numpyro.param("s", 0.7, constraint=constraints.positive)
        numpyro.sample("mu", dist.Normal(m, s))

    elbo = ScoreMatching("esm", beta=BETA_GB)
    m, s = 0.3, 0.7
    params = {"m": jnp.asarray(m), "s": jnp.asarray(s)}
    loss, grads = jax.jit(jax.value_and_grad(lambda p: elbo.loss(KEY, p, gb_model, guide, jnp.asarray(x))))(params)
    guide_key = random.split(KEY, 3)[1]
    tr = handlers.trace(handlers.substitute(handlers.seed(guide, guide_key), data=params)).get_trace(x)
    mu = float(tr["mu"]["value"])
    eps = (mu - m) / s
    sm = BETA_GB * (-1 + 0.5 * (x - mu) ** 2).sum()
    log_q = -0.5 * eps**2 - math.log(s) - 0.5 * math.log(2 * math.pi)
    log_p = -0.5 * (mu / TAU) ** 2 - math.log(TAU) - 0.5 * math.log(2 * math.pi)
    assert float(loss) == pytest.approx(sm + log_q - log_p, rel=1e-10)
    dmu = -BETA_GB * (x - mu).sum() + mu / TAU**2
    assert float(grads["m"]) == pytest.approx(dmu, rel=1e-9)
    assert float(grads["s"]) == pytest.approx(dmu * eps - 1 / s, rel=1e-9)


@pytest.mark.parametrize("autoguide", [AutoNormal, AutoMultivariateNormal])
def test_generalized_bayes_gaussian_guides_fit_the_target(rng, autoguide):
    x = rng.normal(1.0, 1.0, size=20)
    guide = autoguide(gb_model, init_scale=0.3)
    elbo = ScoreMatching("esm", beta=BETA_GB, num_particles=8)
    params = fit(gb_model, guide, elbo, 2000, jnp.asarray(x), lr=0.05, decay=0.998)
    lower, median = (float(q) for q in guide.quantiles(params, [0.5 * math.erfc(1 / math.sqrt(2)), 0.5])["mu"])
    mean, std = gb_target(x)
    # optimizer noise at the final step size: a few percent of std
    assert median == pytest.approx(mean, abs=0.05 * std)
    assert median - lower == pytest.approx(std, rel=0.05)


def test_generalized_bayes_autodelta_finds_the_mode(rng):
    x = rng.normal(1.0, 1.0, size=20)
    guide = AutoDelta(gb_model)
    params = fit(gb_model, guide, ScoreMatching("esm", beta=BETA_GB), 300, jnp.asarray(x))
    assert float(params["mu_auto_loc"]) == pytest.approx(gb_target(x)[0], abs=1e-3)


@pytest.mark.parametrize("how", ["handlers.mask", "fn.mask"])
def test_masked_data_points_contribute_nothing(rng, how):
    mu, prec, x = mvn_case(rng, n=12)
    keep = _mask(12)
    x_bad = x.copy()
    x_bad[~keep] = np.nan

    def model(x):
        d = dist.MultivariateNormal(mu, precision_matrix=prec)
        with numpyro.plate("data", x.shape[0]):
            if how == "handlers.mask":
                with handlers.mask(mask=keep):
                    numpyro.sample("x", d, obs=x)
            else:
                numpyro.sample("x", d.mask(keep), obs=x)

    for method in ("esm", "dsm"):
        assert math.isfinite(loss_of(ScoreMatching(method), model, empty_guide, jnp.asarray(x_bad)))
    value = loss_of(ScoreMatching("esm"), model, empty_guide, jnp.asarray(x_bad))
    assert value == pytest.approx(esm_gaussian(mu, prec, x[keep]).sum(), rel=1e-10)


def test_obs_mask_with_a_guide_for_the_missing_values(rng):
    mu, prec, x = mvn_case(rng, n=9)
    keep = _mask(9)
    x_bad = x.copy()
    x_bad[~keep] = np.nan
    fill = rng.normal(size=(9, 3))

    def model(x):
        with numpyro.plate("data", x.shape[0]):
            d = dist.MultivariateNormal(mu, precision_matrix=prec)
            numpyro.sample("x", d, obs=x, obs_mask=keep)

    def guide(x):
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("x_unobserved", dist.Delta(fill, event_dim=1))

    value = loss_of(ScoreMatching("esm"), model, guide, jnp.asarray(x_bad))
    log_p_missing = multivariate_normal(mu, np.linalg.inv(prec)).logpdf(fill)[~keep].sum()
    expected = esm_gaussian(mu, prec, x[keep]).sum() - log_p_missing
    assert value == pytest.approx(expected, rel=1e-10)


def _two_site_model(mu, prec, a, b, dep=False):
    def model(x, y):
        with numpyro.plate("data", x.shape[0]):
            xs = numpyro.sample("x", dist.MultivariateNormal(mu, precision_matrix=prec), obs=x)
            rate = b + (xs.sum(-1) ** 2 if dep else 0.0)
            numpyro.sample("y", dist.Gamma(a, rate), obs=y)

    return model


def test_several_sites_are_matched_jointly(rng):
    mu, prec, x = mvn_case(rng, n=10, d=2)
    a, b = 2.0, 3.0
    y = rng.gamma(2.0, 0.5, size=10)
    model = _two_site_model(mu, prec, a, b)
    args = (jnp.asarray(x), jnp.asarray(y))
    joint = loss_of(ScoreMatching("esm"), model, empty_guide, *args)
    only_x = loss_of(ScoreMatching("esm", sites=["x"]), model, empty_guide, *args)
    only_y = loss_of(ScoreMatching("esm", sites="y"), model, empty_guide, *args)
    assert only_x == pytest.approx(esm_gaussian(mu, prec, x).sum(), rel=1e-10)
    assert only_y == pytest.approx(esm_gamma(a, b, y).sum(), rel=1e-10)
    assert joint == pytest.approx(only_x + only_y, rel=1e-10)


def test_a_site_depending_on_a_matched_value_is_matched_jointly(rng):
    """``y | x ~ Gamma(a, b + (x_1 + x_2)^2)``: matching both is score matching of the joint
    density of ``(x, log y)`` (SPEC.md section 3), under jit and eagerly."""
    mu, prec, x = mvn_case(rng, n=6, d=2)
    y = rng.gamma(2.0, 0.5, size=6)
    model = _two_site_model(mu, prec, 2.0, 3.0, dep=True)
    args = (jnp.asarray(x), jnp.asarray(y))

    def joint(rows):
        xs, u = rows[:, :2], rows[:, 2]
        lp = dist.MultivariateNormal(mu, precision_matrix=prec).log_prob(xs)
        return lp + dist.Gamma(2.0, 3.0 + xs.sum(-1) ** 2).log_prob(jnp.exp(u)) + u

    rows = jnp.concatenate([args[0], jnp.log(args[1])[:, None]], 1)
    expected = float(score_matching_loss(joint, rows, "esm", reduction="sum"))
    assert loss_of(ScoreMatching("esm"), model, empty_guide, *args) == pytest.approx(expected, rel=1e-10)
    assert float(ScoreMatching("esm").loss(KEY, {}, model, empty_guide, *args)) == pytest.approx(expected, rel=1e-10)
    assert math.isfinite(loss_of(ScoreMatching("esm", sites=["y"]), model, empty_guide, *args))


def test_mlp_energy_matches_the_backend(rng):
    x = jnp.asarray(rng.normal(size=(8, 3)))
    init = energy_init(random.PRNGKey(1), 3, hidden=(8,), dtype=jnp.float64)

    def model(x):
        params = numpyro.param("energy", init)
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("x", Unnormalized(partial(energy_apply, params, quadratic=1.0), (3,)), obs=x)

    energy = partial(energy_apply, init, quadratic=1.0)
    direct = jax.jit(lambda x: score_matching_loss(energy, x, "esm", reduction="sum"))(x)
    assert loss_of(ScoreMatching("esm"), model, empty_guide, x, params={"energy": init}) == pytest.approx(
        float(direct), rel=1e-10
    )
    svi = SVI(model, empty_guide, optax.adam(1e-2), loss=ScoreMatching("esm"))
    result = svi.run(KEY, 10, x, progress_bar=False)
    assert result.losses[-1] < result.losses[0]


# ---------------------------------------------------------------------------------------
# Unnormalized
# ---------------------------------------------------------------------------------------


def test_unnormalized_log_prob_sample_error_and_pytree():
    f = lambda y: -0.5 * (y**2).sum((-2, -1))
    d = Unnormalized(f, (2, 3))
    value = random.normal(KEY, (4, 5, 2, 3))
    np.testing.assert_allclose(d.log_prob(value), f(value.reshape(20, 2, 3)).reshape(4, 5))
    assert d.expand((5,)).log_prob(value).shape == (4, 5)
    with pytest.raises(NotImplementedError, match=r"ppl_score\.numpyro\.langevin.*NUTS"):
        d.sample(KEY)
    with pytest.raises(NotImplementedError, match="langevin"):
        d(rng_key=KEY)
    leaves, tree = jax.tree.flatten(d)
    back = jax.tree.unflatten(tree, leaves)
    assert back.log_density_fn is f and back.event_shape == (2, 3)
    with pytest.raises(ValueError, match="log_density_fn"):
        Unnormalized(lambda y: y, (2,)).log_prob(jnp.zeros((3, 2)))
    with pytest.raises(ValueError, match="event_shape"):
        Unnormalized(f, (0, 2))


# ---------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(method="nope"), ValueError, "method"),
        (dict(method="esm", sigma=0.1), ValueError, "unknown option"),
        (dict(method="dsm", sigma=-1.0), ValueError, "sigma"),
        (dict(method="fd_ssm", projection="gaussian"), ValueError, "unknown option"),
        (dict(beta=-1.0), ValueError, "beta"),
        (dict(num_particles=0), ValueError, "num_particles"),
        (dict(sites="x", num_particles=True), TypeError, "num_particles"),
    ],
)
def test_bad_constructor_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        ScoreMatching(**kwargs)


def test_model_errors_name_the_site(rng):
    x = jnp.asarray(rng.normal(size=(5, 2)))

    def discrete(x):
        with numpyro.plate("data", 5):
            numpyro.sample("flips", dist.Bernoulli(0.5), obs=(x[:, 0] > 0).astype(jnp.int32))

    with pytest.raises(ValueError, match="'flips'.*discrete"):
        loss_of(ScoreMatching(), discrete, empty_guide, x)

    def latent(x):
        z = numpyro.sample("z", dist.Normal(0.0, 1.0))
        with numpyro.plate("data", 5):
            numpyro.sample("x", dist.Normal(z, 1.0).expand([5, 2]).to_event(1), obs=x)

    with pytest.raises(ValueError, match="'z'.*not provided by the guide"):
        loss_of(ScoreMatching(), latent, empty_guide, x)

    def point_guide(x):
        numpyro.sample("z", dist.Delta(0.0))

    with pytest.raises(ValueError, match="'nope'.*not an observed"):
        loss_of(ScoreMatching(sites=["nope"]), latent, point_guide, x)
    with pytest.raises(ValueError, match="'z', a latent site"):
        loss_of(ScoreMatching(sites=["z"]), latent, point_guide, x)

    def nonreparam_guide(x):
        numpyro.sample("z", dist.Delta(0.0))
        numpyro.sample("k", dist.Categorical(jnp.ones(3) / 3), infer={"is_auxiliary": True})

    with pytest.raises(ValueError, match="'k'.*reparameterized"):
        loss_of(ScoreMatching(), latent, nonreparam_guide, x)

    def no_obs(x):
        numpyro.sample("z", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="no observed sample sites"):
        loss_of(ScoreMatching(), no_obs, point_guide, x)

    def mismatched(x):
        with numpyro.plate("a", 5):
            numpyro.sample("x", dist.Normal(jnp.zeros((5, 2)), 1.0).to_event(1), obs=x)
        with numpyro.plate("b", 2):
            numpyro.sample("y", dist.Normal(jnp.zeros(2), 1.0), obs=x[0])

    # sites in different plates are matched as one data point: exact score matching adds up
    joint = loss_of(ScoreMatching("esm"), mismatched, empty_guide, x)
    parts = [loss_of(ScoreMatching("esm", sites=[s]), mismatched, empty_guide, x) for s in ("x", "y")]
    assert joint == pytest.approx(sum(parts), rel=1e-10)

    def rescaled(x):
        with numpyro.plate("data", 5):
            numpyro.sample("x", dist.Normal(jnp.zeros((5, 2)), 1.0).to_event(1), obs=x)
            with handlers.scale(scale=2.0):
                numpyro.sample("y", dist.Normal(jnp.zeros(5), 1.0), obs=x[:, 0])

    with pytest.raises(ValueError, match=r"\['x', 'y'\] have different scales"):
        loss_of(ScoreMatching(), rescaled, empty_guide, x)
