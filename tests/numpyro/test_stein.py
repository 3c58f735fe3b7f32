"""``ppl_score.numpyro.goodness_of_fit`` and ``ScoreMatching.datum_scores``: the same
checks as ``tests/pyro/test_stein.py`` through NumPyro (float64): the true model is not
rejected and a wrong one is, for an ``Unnormalized``, a ``Normal`` and a constrained
(``LogNormal``) site; the fitted ``params`` are used, masked points are left out, latent
sites come from a guide, and bad arguments fail before the model runs."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
numpyro = pytest.importorskip("numpyro")
import jax.numpy as jnp  # noqa: E402
import numpyro.distributions as dist  # noqa: E402
from numpyro import handlers  # noqa: E402

from ppl_score.jax import KSDTest, ksd  # noqa: E402
from ppl_score.numpyro import ScoreMatching, Unnormalized, goodness_of_fit  # noqa: E402
from tests.helpers.shared import empty_guide

KEY = jax.random.key(0)
B = 200  # one bootstrap size throughout: one compilation per data shape


def gaussian_model(x):
    mu = numpyro.param("mu", jnp.zeros(2))
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("x", Unnormalized(lambda v: -0.5 * ((v - mu) ** 2).sum(-1), event_shape=(2,)), obs=x)


def normal_model(x, scale=1.0):
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("x", dist.Normal(jnp.zeros(2), scale).to_event(1), obs=x)


def lognormal_model(y, loc=0.0):
    with numpyro.plate("data", y.shape[0]):
        numpyro.sample("y", dist.LogNormal(loc, 1.0), obs=y)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    return jnp.asarray(rng.normal(size=(300, 2))), jnp.asarray(np.exp(rng.normal(size=300)))


def test_true_model_accepted_wrong_rejected(data):
    x, _ = data
    out = goodness_of_fit(gaussian_model, "x", x, rng_key=KEY, n_bootstrap=B)
    assert isinstance(out, KSDTest) and out.p_value > 0.05
    np.testing.assert_allclose(float(out.statistic), float(ksd(x, -x)), rtol=1e-12)
    # the fitted parameters come from params
    wrong = goodness_of_fit(gaussian_model, "x", x, rng_key=KEY, n_bootstrap=B, params={"mu": jnp.full(2, 0.5)})
    assert wrong.p_value < 0.01
    assert goodness_of_fit(normal_model, "x", x, rng_key=KEY, n_bootstrap=B).p_value > 0.05
    assert goodness_of_fit(normal_model, "x", x, scale=1.5, rng_key=KEY, n_bootstrap=B).p_value < 0.01


def test_constrained_site_in_unconstrained_space(data):
    _, y = data
    out = goodness_of_fit(lognormal_model, "y", y, rng_key=KEY, n_bootstrap=B)
    u = jnp.log(y)[:, None]
    np.testing.assert_allclose(float(out.statistic), float(ksd(u, -u)), rtol=1e-10)
    assert out.p_value > 0.05
    assert goodness_of_fit(lognormal_model, "y", y, loc=0.4, rng_key=KEY, n_bootstrap=B).p_value < 0.01


def test_datum_scores_joint_density():
    rng = np.random.default_rng(1)
    x, y = jnp.asarray(rng.normal(size=(5, 2))), jnp.asarray(rng.normal(size=(5, 2)))

    def model(x, y):
        with numpyro.plate("data", 5):
            xv = numpyro.sample("x", Unnormalized(lambda v: -0.5 * (v * v).sum(-1), event_shape=(2,)), obs=x)
            numpyro.sample("y", dist.Normal(xv, 1.0).to_event(1), obs=y)

    loss = ScoreMatching(sites=["x"])
    rows, scores, weights = jax.jit(lambda x, y: loss.datum_scores(KEY, {}, model, empty_guide, x, y))(x, y)
    assert weights is None
    np.testing.assert_allclose(rows, x)
    np.testing.assert_allclose(scores, y - 2 * x, rtol=1e-12)


def test_masked_points_left_out_and_latents_from_a_guide(data):
    x, _ = data
    keep = np.arange(300) % 3 != 0

    def masked(x):
        with numpyro.plate("data", x.shape[0]), handlers.mask(mask=keep):
            numpyro.sample("x", Unnormalized(lambda v: -0.5 * (v * v).sum(-1), event_shape=(2,)), obs=x)

    out = goodness_of_fit(masked, "x", x, rng_key=KEY, n_bootstrap=B)
    np.testing.assert_allclose(float(out.statistic), float(ksd(x[keep], -x[keep])), rtol=1e-12)

    def model(x):
        mu = numpyro.sample("mu", dist.Normal(jnp.zeros(2), 1.0).to_event(1))
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("x", dist.Normal(mu, 1.0).to_event(1), obs=x)

    def guide(x):
        numpyro.sample("mu", dist.Delta(jnp.full(2, 0.5)).to_event(1))

    out = goodness_of_fit(model, "x", x, rng_key=KEY, guide=guide, n_bootstrap=B)
    np.testing.assert_allclose(float(out.statistic), float(ksd(x, 0.5 - x)), rtol=1e-12)
    with pytest.raises(ValueError, match="mu"):
        goodness_of_fit(model, "x", x, rng_key=KEY)


def test_errors(data):
    x, _ = data

    def never(*args, **kwargs):
        raise AssertionError("the model ran")

    with pytest.raises(TypeError, match="'site'"):
        goodness_of_fit(never, 1, x, rng_key=KEY)
    with pytest.raises(TypeError, match="'rng_key'"):
        goodness_of_fit(never, "x", x, rng_key=0)
    with pytest.raises(TypeError, match="rng_key"):
        goodness_of_fit(never, "x", x)
    with pytest.raises(ValueError, match="'statistic'"):
        goodness_of_fit(never, "x", x, rng_key=KEY, statistic="w")
    with pytest.raises(ValueError, match="'bandwidth'.*rbf"):
        goodness_of_fit(never, "x", x, rng_key=KEY, bandwidth=1.0)
    with pytest.raises(TypeError, match="'params'"):
        goodness_of_fit(never, "x", x, rng_key=KEY, params=[1])
    with pytest.raises(ValueError, match="site 'x'.*at least 2 data points, got 1"):
        goodness_of_fit(gaussian_model, "x", x[:1], rng_key=KEY)
    # the compiled scores are rerun eagerly on non-finite data, so that the site's check names it
    with pytest.raises(ValueError, match="observed site 'y'.*outside"):
        goodness_of_fit(lognormal_model, "y", -jnp.ones(5), rng_key=KEY)


def test_nonfinite_scores_name_the_site(data):
    """Finite data where the model's score overflows: the error names the site."""
    x, _ = data
    with pytest.raises(ValueError, match="site 'x': the model's score is not finite.*at 300 of 300"):
        goodness_of_fit(gaussian_model, "x", x, params={"mu": jnp.full(2, jnp.inf)}, rng_key=KEY, n_bootstrap=B)


def test_a_model_that_converts_its_data_to_numpy_runs_eagerly():
    """A model that calls ``np.asarray`` on its data cannot be traced: it runs eagerly, as
    ``ScoreMatching.datum_scores`` does, with the same numbers as a traceable model."""

    def numpy_model(x):
        xs = np.asarray(x)
        with numpyro.plate("data", len(xs)):
            numpyro.sample("x", Unnormalized(lambda v: -0.5 * (v**2).sum(-1), event_shape=(2,)), obs=xs)

    x = jnp.asarray(np.random.default_rng(3).normal(size=(40, 2)))
    got = goodness_of_fit(numpy_model, "x", x, rng_key=KEY, n_bootstrap=B)
    want = goodness_of_fit(normal_model, "x", x, rng_key=KEY, n_bootstrap=B)
    np.testing.assert_allclose(float(got.statistic), float(want.statistic), rtol=1e-10)
    assert float(got.p_value) == float(want.p_value)
