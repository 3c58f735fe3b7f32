"""``ScoreMatching("ms_dsm")`` on ``NoiseConditional`` models and the annealed mode of
``langevin`` (NumPyro front end); mirrors ``tests/pyro/test_ms_dsm.py``."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
numpyro = pytest.importorskip("numpyro")
optax = pytest.importorskip("optax")

import jax.numpy as jnp  # noqa: E402
from numpyro.distributions import constraints  # noqa: E402
from numpyro.infer import SVI  # noqa: E402

from ppl_score.numpyro import NoiseConditional, ScoreMatching, Unnormalized, langevin, noise_level  # noqa: E402

SIGMAS = (1.0, 0.5, 0.1)


def _model(x):
    mu = numpyro.param("mu", jnp.zeros(2))
    log_t = numpyro.param("log_t", jnp.zeros(()))
    fn = lambda z, s: -0.5 * ((z - mu) ** 2).sum(-1) / (jnp.exp(2 * log_t) + s**2)  # noqa: E731
    with numpyro.plate("data", len(x)):
        numpyro.sample("x", NoiseConditional(fn, event_shape=(2,)), obs=x)


def test_fit_recovers_the_gaussian():
    x = jnp.asarray(np.random.default_rng(0).normal(0.3, 0.7, (400, 2)))
    svi = SVI(_model, lambda x: None, optax.adam(0.05), loss=ScoreMatching("ms_dsm", sigmas=SIGMAS))
    result = svi.run(jax.random.PRNGKey(0), 300, x, progress_bar=False)
    np.testing.assert_allclose(np.asarray(result.params["mu"]), np.asarray(x.mean(0)), atol=0.1)
    assert abs(float(jnp.exp(result.params["log_t"])) - 0.7) < 0.1


def test_constrained_site_is_matched_unconstrained():
    def model(y):
        fn = lambda z, s: (-0.5 * jnp.log(z) ** 2 / (1 + s**2) - jnp.log(z)).sum(-1)  # noqa: E731
        with numpyro.plate("data", len(y)):
            numpyro.sample("y", NoiseConditional(fn, event_shape=(1,), support=constraints.positive), obs=y)

    y = jnp.asarray(np.random.default_rng(1).uniform(0.5, 1.5, (5, 1)))
    assert np.isfinite(float(ScoreMatching("ms_dsm").loss(jax.random.PRNGKey(0), {}, model, lambda y: None, y)))


def test_noise_level_sources_and_errors():
    d = NoiseConditional(lambda z, s: -(z**2).sum(-1) / s**2, event_shape=(2,))
    x = jnp.ones((3, 2))
    with pytest.raises(ValueError, match="needs a noise level"):
        d.log_prob(x)
    with noise_level(2.0):
        np.testing.assert_allclose(d.log_prob(x), np.full(3, -0.5))
    with noise_level(jnp.array([1.0, 2.0, 1.0])):
        np.testing.assert_allclose(d.log_prob(x), [-2.0, -0.5, -2.0])
    with noise_level(jnp.array([1.0, 2.0])), pytest.raises(ValueError, match="cannot be evaluated at 2 noise levels"):
        d.log_prob(x)
    fixed = NoiseConditional(lambda z, s: -(z**2).sum(-1) / s**2, event_shape=(2,), sigma=2.0)
    expanded = fixed.expand((3,))
    assert isinstance(expanded, NoiseConditional) and expanded.sigma == 2.0
    np.testing.assert_allclose(expanded.log_prob(x), np.full(3, -0.5))
    assert repr(fixed).startswith("NoiseConditional(log_density_fn=")


def test_ms_dsm_needs_a_noise_conditional_site():
    def model(x):
        with numpyro.plate("data", len(x)):
            numpyro.sample("x", Unnormalized(lambda z: -(z**2).sum(-1), event_shape=(2,)), obs=x)

    with pytest.raises(ValueError, match="method 'ms_dsm' needs a noise-conditional model"):
        ScoreMatching("ms_dsm").loss(jax.random.PRNGKey(0), {}, model, lambda x: None, jnp.zeros((3, 2)))


W = jnp.array([0.8, 0.2])
MUS = jnp.array([[-4.0, -4.0], [4.0, 4.0]])


def _mixture(z, s):
    var = 0.25 + s**2
    comps = [jnp.log(W[k]) - ((z - MUS[k]) ** 2).sum(-1) / (2 * var) - jnp.log(var) for k in range(2)]
    return jax.scipy.special.logsumexp(jnp.stack(comps, -1), -1)


def test_annealed_langevin_mode_recovers_the_weights():
    def model():
        numpyro.sample("x", NoiseConditional(_mixture, event_shape=(2,)), obs=jnp.zeros(2))

    init = np.random.default_rng(0).uniform(-8, 8, (600, 2))
    sigmas = tuple(np.geomspace(8.0, 0.1, 8))
    key = jax.random.PRNGKey(0)
    out = langevin(model, "x", key=key, num_chains=600, sigmas=sigmas, n_steps_each=40, step_lr=2e-3, init=init)
    assert out.samples.shape == (1, 600, 2)
    assert abs(float((out.samples[0, :, 0] < 0).mean()) - 0.8) < 0.03 + 3 * (0.16 / 600) ** 0.5
    with pytest.raises(ValueError, match="'num_samples' / 'num_steps' do not apply"):
        langevin(model, "x", key=key, num_chains=2, sigmas=sigmas, num_samples=5)
    with pytest.raises(ValueError, match="'step_size', 'thin' do not apply with 'sigmas'"):
        langevin(model, "x", key=key, num_chains=2, sigmas=sigmas, thin=5, step_size=0.3)
    with pytest.raises(ValueError, match="'num_warmup', 'adjusted' do not apply"):
        langevin(model, "x", key=key, num_chains=2, sigmas=sigmas, num_warmup=7, adjusted=False)
