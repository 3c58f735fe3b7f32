"""NumPyro idioms a user tries first with ``ppl_score.numpyro.ScoreMatching`` (issue #11
item 3).

A generalized-Bayes fit: ``mu ~ N(0, tau^2 I_2)``, ``x_i ~ N(mu, I_2)`` (an ordinary
``Normal`` site, or the same density as an ``Unnormalized`` energy), fitted by
``SVI(model, guide, optax..., loss=ScoreMatching("esm", beta=beta))``. With ``esm`` the
per-example objective is ``SM_i(mu) = -2 + 1/2 ||x_i - mu||^2``, so the target
``p(mu) exp(-beta sum_i SM_i(mu))`` is Gaussian: each coordinate ``N(m*_k, s*^2)`` with
``1/s*^2 = 1/tau^2 + beta N`` and ``m* = beta sum_i x_i s*^2``. The posterior summaries
(``median``, ``quantiles``, ``sample_posterior``, ``Predictive``) are checked against it;
the other idioms against exact values (scales, particles, round trips) or closed forms
(fitted energies). JAX compiles are slow on a loaded machine: each test compiles at most one
SVI update; the rest runs eagerly.
"""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
from scipy.stats import norm

jax = pytest.importorskip("jax")
numpyro = pytest.importorskip("numpyro")
optax = pytest.importorskip("optax")
import jax.numpy as jnp  # noqa: E402
import numpyro.distributions as dist  # noqa: E402
from jax import random  # noqa: E402
from numpyro import handlers  # noqa: E402
from numpyro.distributions import constraints  # noqa: E402
from numpyro.infer import SVI, Predictive  # noqa: E402
from numpyro.infer.autoguide import (  # noqa: E402
    AutoDelta,
    AutoLowRankMultivariateNormal,
    AutoMultivariateNormal,
    AutoNormal,
)
from numpyro.infer.initialization import init_to_value  # noqa: E402

from ppl_score.numpyro import ScoreMatching, Unnormalized  # noqa: E402
from tests.helpers.idioms import BETA, TAU, D, esm, log_prior, message_says, target
from tests.helpers.shared import empty_guide

KEY = random.PRNGKey(0)


def data(rng, n=10):
    return jnp.asarray(rng.normal(1.0, 1.0, size=(n, D)))


def model(x, n=None):
    """``x=None`` (with ``n``): the posterior predictive draws ``x``."""
    n = x.shape[0] if x is not None else n
    mu = numpyro.sample("mu", dist.Normal(jnp.zeros(D), TAU).to_event(1))
    with numpyro.plate("data", n):
        numpyro.sample("x", dist.Normal(mu, 1.0).to_event(1), obs=x)


def unnormalized_model(x, n=None):
    """The same density as ``model`` with an energy: identical ``esm`` values."""
    n = x.shape[0] if x is not None else n
    mu = numpyro.sample("mu", dist.Normal(jnp.zeros(D), TAU).to_event(1))
    with numpyro.plate("data", n):
        numpyro.sample("x", Unnormalized(lambda y: -0.5 * jnp.sum((y - mu) ** 2, -1), (D,)), obs=x)


def delta_guide(x, *args, **kwargs):
    """A deterministic guide (``log q = 0``): the loss is exact, not a Monte Carlo draw."""
    m = numpyro.param("m", jnp.full((D,), 0.3))
    numpyro.sample("mu", dist.Delta(m, event_dim=1))


GUIDE_M, GUIDE_S = np.array([0.3, -0.2]), np.array([0.7, 0.4])


def normal_guide(x, *args, **kwargs):
    m = numpyro.param("m", jnp.asarray(GUIDE_M))
    s = numpyro.param("s", jnp.asarray(GUIDE_S), constraint=constraints.positive)
    numpyro.sample("mu", dist.Normal(m, s).to_event(1))


NORMAL_PARAMS = {"m": jnp.asarray(GUIDE_M), "s": jnp.asarray(GUIDE_S)}


def fit(model_, guide, x, steps, lr=0.05, decay=0.998, num_particles=1):
    """``svi.run`` (one compiled scan) with a decaying step size."""
    elbo = ScoreMatching("esm", beta=BETA, num_particles=num_particles)
    svi = SVI(model_, guide, optax.adam(optax.exponential_decay(lr, 1, decay)), loss=elbo)
    result = svi.run(random.PRNGKey(1), steps, x, progress_bar=False)
    assert np.isfinite(np.asarray(result.losses)).all()
    return svi, result


# ---------------------------------------------------------------------------------------
# AutoGuides, sample_posterior / median / quantiles, Predictive after a generalized-Bayes fit
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "autoguide", [AutoNormal, AutoMultivariateNormal, AutoLowRankMultivariateNormal], ids=lambda g: g.__name__
)
def test_gaussian_autoguide_fit_sample_posterior_and_predictive(rng, autoguide):
    x = data(rng)
    m_star, s_star = target(x)
    guide = autoguide(model, init_loc_fn=init_to_value(values={"mu": jnp.zeros(D)}))
    _, result = fit(model, guide, x, steps=3000)
    params = result.params

    # the fit: the target (Adam with a decaying step on reparameterized gradients)
    median = np.asarray(guide.median(params)["mu"])
    np.testing.assert_allclose(median, m_star, atol=0.06)
    probs = [0.1, 0.5, 0.9]
    quantiles = np.asarray(guide.quantiles(params, probs)["mu"])
    assert quantiles.shape == (3, D)
    np.testing.assert_allclose(quantiles[1], median, atol=1e-10)
    spread = (quantiles[2] - quantiles[0]) / (norm.ppf(0.9) - norm.ppf(0.1))
    np.testing.assert_allclose(spread, [s_star] * D, rtol=0.1)  # beta ignored would give -29%

    # sample_posterior: the fitted guide's draws
    s = 4000
    draws = guide.sample_posterior(random.PRNGKey(2), params, sample_shape=(s,))["mu"]
    assert draws.shape == (s, D) and draws.dtype == jnp.float64
    np.testing.assert_allclose(np.mean(draws, 0), median, atol=5 * s_star / math.sqrt(s))
    np.testing.assert_allclose(np.std(draws, 0), spread, rtol=0.08)

    # Predictive with the guide: the latents come from the guide, the observed site is the data
    samples = Predictive(model, guide=guide, params=params, num_samples=10)(random.PRNGKey(3), x)
    assert set(samples) == {"x"}  # NumPyro's default: the sites not drawn from the guide
    assert samples["x"].shape == (10, len(x), D)
    assert bool(jnp.all(samples["x"] == x))
    both = Predictive(model, guide=guide, params=params, num_samples=s, return_sites=["mu", "x"])
    new = both(random.PRNGKey(4), None, n=3)
    assert new["mu"].shape == (s, D) and new["x"].shape == (s, 3, D)
    np.testing.assert_allclose(np.std(new["mu"], 0), spread, rtol=0.08)
    resid = np.asarray(new["x"] - new["mu"][:, None, :])  # N(0, I): each draw's data follow its mu
    assert abs(resid.mean()) < 5 / math.sqrt(resid.size)
    assert resid.var() == pytest.approx(1.0, rel=0.05)


def test_autodelta_on_an_unnormalized_site_finds_the_mode_and_predictive_refuses_to_sample_it(rng):
    x = data(rng)
    m_star, _ = target(x)
    guide = AutoDelta(unnormalized_model, init_loc_fn=init_to_value(values={"mu": jnp.zeros(D)}))
    _, result = fit(unnormalized_model, guide, x, steps=600, decay=0.997)  # deterministic
    params = result.params
    median = np.asarray(guide.median(params)["mu"])
    np.testing.assert_allclose(median, m_star, atol=1e-3)
    draws = guide.sample_posterior(random.PRNGKey(2), params, sample_shape=(5,))["mu"]
    assert draws.shape == (5, D) and bool(jnp.all(draws == median))
    samples = Predictive(unnormalized_model, guide=guide, params=params, num_samples=5, return_sites=["mu"])(
        random.PRNGKey(3), x
    )
    assert set(samples) == {"mu"} and bool(jnp.all(samples["mu"] == median))
    # new data from an energy model: the error points to the samplers
    with pytest.raises(NotImplementedError, match="langevin"):
        Predictive(unnormalized_model, guide=guide, params=params, num_samples=5)(random.PRNGKey(4), None, n=3)


# ---------------------------------------------------------------------------------------
# num_particles, handlers.scale, subsampling
# ---------------------------------------------------------------------------------------


def test_num_particles_average_the_particles_with_split_keys(rng):
    """esm draws nothing: ``num_particles=3`` is the mean of the one-particle losses at
    ``random.split(key, 3)``, vectorized (``vmap``, the default) or not."""
    x = data(rng)
    one = ScoreMatching("esm", beta=BETA)
    singles = [float(one.loss(k, NORMAL_PARAMS, model, normal_guide, x)) for k in random.split(KEY, 3)]
    assert len(set(singles)) == 3  # three different draws
    for kw in ({}, {"vectorize_particles": False}):
        three = ScoreMatching("esm", beta=BETA, num_particles=3, **kw)
        value = jax.jit(lambda key, three=three: three.loss(key, NORMAL_PARAMS, model, normal_guide, x))(KEY)
        assert float(value) == pytest.approx(np.mean(singles), rel=1e-12)


def test_many_particles_estimate_the_expected_loss(rng):
    x = data(rng)
    x_np = np.asarray(x)
    n = 4000
    elbo = ScoreMatching("esm", beta=BETA, num_particles=n)
    value = float(jax.jit(lambda key: elbo.loss(key, NORMAL_PARAMS, model, normal_guide, x))(KEY))
    m, s = GUIDE_M, GUIDE_S
    expected = (
        BETA * (-D + 0.5 * (((x_np - m) ** 2).sum(-1) + (s**2).sum())).sum()
        + (-0.5 - np.log(s) - 0.5 * math.log(2 * math.pi)).sum()
        - (-(m**2 + s**2) / (2 * TAU**2) - math.log(TAU) - 0.5 * math.log(2 * math.pi)).sum()
    )
    # Monte Carlo error of the mean of n particles, from the same integrand in numpy
    mu = m + s * np.random.default_rng(0).normal(size=(20000, D))
    per = (
        BETA * esm(x_np[None], mu[:, None]).sum(-1) + norm.logpdf(mu, m, s).sum(-1) - norm.logpdf(mu, 0.0, TAU).sum(-1)
    )
    assert per.mean() == pytest.approx(expected, abs=6 * per.std() / math.sqrt(20000))
    assert value == pytest.approx(expected, abs=6 * per.std() / math.sqrt(n))


def test_handlers_scale_scales_the_loss_and_its_gradient(rng):
    x = data(rng)
    x_np = np.asarray(x)
    m = np.full(D, 0.3)
    exact = BETA * esm(x_np, m).sum() - log_prior(m)  # Delta guide: log q = 0
    elbo = ScoreMatching("esm", beta=BETA)
    params = {"m": jnp.asarray(m)}

    def loss(model_, p=params):
        return elbo.loss(KEY, p, model_, delta_guide, x)

    assert float(loss(model)) == pytest.approx(exact, rel=1e-12)
    scaled = handlers.scale(model, scale=0.25)
    assert float(loss(scaled)) == pytest.approx(0.25 * exact, rel=1e-12)
    g, g_scaled = (jax.grad(lambda p, f=f: loss(f, p))(params)["m"] for f in (model, scaled))
    np.testing.assert_allclose(g_scaled, 0.25 * g, rtol=1e-12)
    # d/dm of beta sum_i SM_i - log p(m): -beta sum_i (x_i - m) + m / tau^2
    np.testing.assert_allclose(g, -BETA * (x_np - m).sum(0) + m / TAU**2, rtol=1e-12)

    # per-datum weights on the observed site: sum_i w_i SM_i
    w = rng.uniform(0.5, 2.0, size=len(x_np))

    def weighted(x):
        mu = numpyro.sample("mu", dist.Normal(jnp.zeros(D), TAU).to_event(1))
        with numpyro.plate("data", x.shape[0]), handlers.scale(scale=jnp.asarray(w)):
            numpyro.sample("x", dist.Normal(mu, 1.0).to_event(1), obs=x)

    assert float(loss(weighted)) == pytest.approx(BETA * (w * esm(x_np, m)).sum() - log_prior(m), rel=1e-12)


N_DATA, BATCH = 40, 10


def test_plate_drawn_subsample_is_scaled_by_n_over_b(rng):
    """``numpyro.plate("data", N, subsample_size=B) as i`` draws the batch from the model's
    key (the first of the particle key's ``(model, guide, objective)`` split): the loss is
    ``beta N / B sum_{i in batch} SM_i - log p(m)`` on that batch, a different batch per key."""
    x = data(rng, N_DATA)
    x_np = np.asarray(x)

    def drawn(x):
        mu = numpyro.sample("mu", dist.Normal(jnp.zeros(D), TAU).to_event(1))
        with numpyro.plate("data", N_DATA, subsample_size=BATCH) as i:
            numpyro.sample("x", dist.Normal(mu, 1.0).to_event(1), obs=x[i])

    m = np.full(D, 0.3)
    elbo = ScoreMatching("esm", beta=BETA)
    batches = []
    for key in random.split(KEY, 2):
        model_key = random.split(key, 3)[0]
        idx = np.asarray(handlers.trace(handlers.seed(drawn, model_key)).get_trace(x)["data"]["value"])
        assert idx.shape == (BATCH,)
        batches.append(set(idx.tolist()))
        exact = BETA * N_DATA / BATCH * esm(x_np[idx], m).sum() - log_prior(m)
        assert float(elbo.loss(key, {"m": jnp.asarray(m)}, drawn, delta_guide, x)) == pytest.approx(exact, rel=1e-12)
    assert batches[0] != batches[1]


def minibatch_model(x, idx):
    """A python minibatch loop hands the indices in; the plate scales by N / B."""
    mu = numpyro.sample("mu", dist.Normal(jnp.zeros(D), TAU).to_event(1))
    with numpyro.plate("data", N_DATA, subsample_size=idx.shape[0]):
        numpyro.sample("x", Unnormalized(lambda y: -0.5 * jnp.sum((y - mu) ** 2, -1), (D,)), obs=x[idx])


def test_minibatch_loop_value_and_fit(rng):
    x = data(rng, N_DATA)
    x_np = np.asarray(x)
    idx = jnp.asarray(rng.permutation(N_DATA)[:BATCH])
    m = np.full(D, 0.3)
    exact = BETA * N_DATA / BATCH * esm(x_np[np.asarray(idx)], m).sum() - log_prior(m)
    value = ScoreMatching("esm", beta=BETA).loss(KEY, {"m": jnp.asarray(m)}, minibatch_model, delta_guide, x, idx)
    assert float(value) == pytest.approx(exact, rel=1e-12)

    m_star, s_star = target(x_np)
    guide = AutoNormal(minibatch_model, init_loc_fn=init_to_value(values={"mu": jnp.zeros(D)}))
    elbo = ScoreMatching("esm", beta=BETA, num_particles=4)
    svi = SVI(minibatch_model, guide, optax.adam(optax.exponential_decay(0.05, 1, 0.995)), loss=elbo)
    state = svi.init(random.PRNGKey(1), x, idx)
    update = jax.jit(svi.update)
    order = np.random.default_rng(0)
    for _ in range(60):  # epochs
        perm = order.permutation(N_DATA)
        for j in range(0, N_DATA, BATCH):
            state, loss = update(state, x, jnp.asarray(perm[j : j + BATCH]))
            assert np.isfinite(float(loss))
    params = svi.get_params(state)
    # the full-data target, up to the noise of subsampled reparameterized gradients
    np.testing.assert_allclose(guide.median(params)["mu"], m_star, atol=0.06)
    np.testing.assert_allclose(params["mu_auto_scale"], [s_star] * D, rtol=0.25)


# ---------------------------------------------------------------------------------------
# Energies: numpyro.param and equinox (numpyro.contrib.module); save / restore
# ---------------------------------------------------------------------------------------


def param_energy_model(x):
    """A diagonal Gaussian energy ``-1/2 sum_k p_k (x_k - l_k)^2`` from ``numpyro.param``:
    its esm minimizer is ``l = mean``, ``p = 1 / var`` (the MLE)."""
    loc = numpyro.param("loc", jnp.zeros(D))
    prec = numpyro.param("prec", jnp.ones(D), constraint=constraints.positive)
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("x", Unnormalized(lambda y: -0.5 * jnp.sum(prec * (y - loc) ** 2, -1), (D,)), obs=x)


def energy_data(rng, n=200):
    return jnp.asarray(rng.normal([1.0, -0.5], [0.7, 1.5], size=(n, D)))


def test_numpyro_param_energy_fit_and_state_round_trips(rng):
    x = energy_data(rng)
    x_np = np.asarray(x)
    # ssm_vr (the default) draws projections from the state's key: resuming must reuse it
    svi = SVI(param_energy_model, empty_guide, optax.adam(optax.exponential_decay(0.1, 1, 0.99)), loss=ScoreMatching())
    state = svi.init(KEY, x)
    update = jax.jit(svi.update)
    for _ in range(400):
        state, _ = update(state, x)
    params = svi.get_params(state)
    np.testing.assert_allclose(params["loc"], x_np.mean(0), atol=0.02)
    np.testing.assert_allclose(params["prec"], 1 / x_np.var(0), rtol=0.03)

    # the whole SVIState through pickle: training resumes to identical values
    restored = pickle.loads(pickle.dumps(state))
    run_a, run_b = [], []
    for out, st in ((run_a, state), (run_b, restored)):
        for _ in range(3):
            st, loss = update(st, x)
            out.append(float(loss))
        out.append(svi.get_params(st))
    assert run_a[:3] == run_b[:3]
    for name in ("loc", "prec"):
        assert bool(jnp.all(run_a[3][name] == run_b[3][name])), name
        assert run_b[3][name].dtype == jnp.float64

    # get_params -> init_params: the same parameters (through the positive bijection) and loss
    fresh = SVI(param_energy_model, empty_guide, optax.adam(1e-3), loss=ScoreMatching("esm"))
    again = fresh.get_params(fresh.init(KEY, x, init_params=params))
    for name in ("loc", "prec"):
        np.testing.assert_allclose(again[name], params[name], rtol=1e-13, atol=0)
    esm_loss = ScoreMatching("esm")
    assert float(esm_loss.loss(KEY, again, param_energy_model, empty_guide, x)) == pytest.approx(
        float(esm_loss.loss(KEY, params, param_energy_model, empty_guide, x)), rel=1e-12
    )


def test_equinox_energy_through_eqx_module(rng):
    """``numpyro.contrib.module.eqx_module``: an ``eqx.nn.Linear`` energy
    ``-1/2 ||W y + b||^2``, a Gaussian with precision ``W^T W`` and mean ``-W^{-1} b``,
    fitted by esm to the MLE (the sample mean and the inverse (1/N) covariance)."""
    eqx = pytest.importorskip("equinox")
    from numpyro.contrib.module import eqx_module

    linear = eqx.nn.Linear(D, D, key=random.PRNGKey(5))

    def eqx_model(x):
        net = eqx_module("energy", linear)
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("x", Unnormalized(lambda y: -0.5 * jnp.sum(jax.vmap(net)(y) ** 2, -1), (D,)), obs=x)

    cov = np.array([[1.0, 0.4], [0.4, 0.8]])
    x_np = rng.multivariate_normal([1.0, -0.5], cov, size=200)
    x = jnp.asarray(x_np)
    svi = SVI(eqx_model, empty_guide, optax.adam(optax.exponential_decay(0.05, 1, 0.995)), loss=ScoreMatching("esm"))
    result = svi.run(KEY, 800, x, progress_bar=False)
    assert float(result.losses[-1]) < float(result.losses[0])
    fitted = result.params["energy$params"]
    w, b = np.asarray(fitted.weight), np.asarray(fitted.bias)
    assert w.dtype == np.float64
    mle_prec = np.linalg.inv(np.cov(x_np.T, bias=True))
    np.testing.assert_allclose(w.T @ w, mle_prec, atol=0.02 * np.abs(mle_prec).max())
    np.testing.assert_allclose(-np.linalg.solve(w, b), x_np.mean(0), atol=0.02)


# ---------------------------------------------------------------------------------------
# dtype and device
# ---------------------------------------------------------------------------------------


def test_float64_and_cpu_are_kept(rng):
    x = data(rng)
    x_np = np.asarray(x)
    guide = AutoNormal(model)
    elbo = ScoreMatching("esm", beta=BETA)
    svi = SVI(model, guide, optax.adam(0.01), loss=elbo)
    state = svi.init(KEY, x)
    state, loss = svi.update(state, x)  # eagerly
    assert loss.dtype == jnp.float64 and {d.platform for d in loss.devices()} == {"cpu"}
    for name, p in svi.get_params(state).items():
        assert p.dtype == jnp.float64 and {d.platform for d in p.devices()} == {"cpu"}, name
    # float64 precision all the way: the exact value to 1e-13 (float32 would give ~1e-7)
    m = np.full(D, 0.3)
    exact = BETA * esm(x_np, m).sum() - log_prior(m)
    value = elbo.loss(KEY, {"m": jnp.asarray(m)}, model, delta_guide, x)
    assert value.dtype == jnp.float64 and float(value) == pytest.approx(exact, rel=1e-13)


@pytest.mark.parametrize("method", ["esm", "ssm_vr", "fd_dsm"])
def test_float32_is_kept(rng, method):
    """A float32 energy model under ``jax_enable_x64``: the loss and its gradient stay
    float32, with no implicit promotion anywhere (``jax_numpy_dtype_promotion="strict"``).
    (NumPyro's own distributions with Python-float arguments, ``Normal(mu, 1.0)``, compute
    in float64 under x64, so the model here is an ``Unnormalized`` energy.)"""
    x = data(rng).astype(jnp.float32)

    def model32(x):
        loc = numpyro.param("loc", jnp.zeros(D, jnp.float32))
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("x", Unnormalized(lambda y: -0.5 * jnp.sum((y - loc) ** 2, -1), (D,)), obs=x)

    elbo = ScoreMatching(method, **({"sigma": 0.5} if "dsm" in method else {}))
    params = {"loc": jnp.asarray([0.3, -0.2], jnp.float32)}
    with jax.numpy_dtype_promotion("strict"):
        value, grads = jax.value_and_grad(lambda p: elbo.loss(KEY, p, model32, empty_guide, x))(params)
    assert value.dtype == jnp.float32 and grads["loc"].dtype == jnp.float32
    assert np.isfinite(float(value)) and bool(jnp.all(grads["loc"] != 0))


# ---------------------------------------------------------------------------------------
# Discrete sites
# ---------------------------------------------------------------------------------------


def discrete_latent_model(x, enumerate_z=False):
    infer = {"enumerate": "parallel"} if enumerate_z else {}
    z = numpyro.sample("z", dist.Bernoulli(0.5), infer=infer)
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("x", dist.Normal(z, 1.0).expand([x.shape[0], D]).to_event(1), obs=x)


def test_discrete_observed_site_is_an_error_naming_it(rng):
    x = data(rng)

    def discrete_obs(x):
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("flips", dist.Bernoulli(0.5), obs=(x[:, 0] > 0).astype(jnp.int32))

    with pytest.raises(ValueError, match="'flips'") as excinfo:
        ScoreMatching().loss(KEY, {}, discrete_obs, empty_guide, x)
    message_says(excinfo, "discrete", "continuous")


def test_discrete_latent_site_error_says_what_is_supported(rng):
    x = data(rng)

    def bernoulli_guide(x, *args):
        numpyro.sample("z", dist.Bernoulli(0.3))

    with pytest.raises(ValueError, match="'z'") as excinfo:
        ScoreMatching().loss(KEY, {}, discrete_latent_model, bernoulli_guide, x)
    message_says(excinfo, "discrete", "continuous")


def test_enumerated_discrete_latent_site_error(rng):
    x = data(rng)
    with pytest.raises(ValueError, match="'z'") as excinfo:
        ScoreMatching().loss(KEY, {}, discrete_latent_model, lambda x, *a: None, x, True)
    message_says(excinfo, "discrete", "enumerat", "continuous")
