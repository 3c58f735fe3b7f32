"""``ppl_score.pyro.goodness_of_fit`` and ``ScoreMatching.datum_scores``: the points and
scores handed to the KSD test are the matched data in unconstrained coordinates and the score
of the model's joint density there; the true model is not rejected and a wrong one is, for an
``Unnormalized``, a ``Normal`` and a constrained (``LogNormal``) site; masked points are left
out, latent sites come from a guide, and bad arguments fail before the model runs."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pyro = pytest.importorskip("pyro")
import pyro.distributions as dist  # noqa: E402
from pyro import poutine  # noqa: E402

from ppl_score.pyro import ScoreMatching, Unnormalized, goodness_of_fit  # noqa: E402
from ppl_score.torch import KSDTest, ksd  # noqa: E402
from tests.helpers.shared import empty_guide

pytestmark = pytest.mark.usefixtures("one_torch_thread", "fresh_pyro")

F64 = torch.float64


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def gaussian_model(x, mu=0.0):
    with pyro.plate("data", x.shape[0]):
        pyro.sample("x", Unnormalized(lambda v: -0.5 * ((v - mu) ** 2).sum(-1), event_shape=(2,)), obs=x)


def normal_model(x, scale=1.0):
    with pyro.plate("data", x.shape[0]):
        pyro.sample("x", dist.Normal(torch.zeros(2, dtype=F64), scale).to_event(1), obs=x)


def lognormal_model(y, loc=0.0):
    with pyro.plate("data", y.shape[0]):
        pyro.sample("y", dist.LogNormal(torch.tensor(loc, dtype=F64), 1.0), obs=y)


@pytest.fixture(scope="module")
def data():
    g = gen(0)
    return torch.randn(300, 2, generator=g, dtype=F64), torch.randn(300, generator=g, dtype=F64).exp()


def test_true_model_accepted_wrong_rejected(data):
    x, y = data
    out = goodness_of_fit(gaussian_model, "x", x, generator=gen())
    assert isinstance(out, KSDTest) and out.p_value > 0.05
    np.testing.assert_allclose(float(out.statistic), float(ksd(x, -x)), rtol=1e-12)
    assert goodness_of_fit(gaussian_model, "x", x, mu=0.5, generator=gen()).p_value < 0.01
    assert goodness_of_fit(normal_model, "x", x, kernel="rbf", generator=gen()).p_value > 0.05
    assert goodness_of_fit(normal_model, "x", x, scale=1.5, kernel="rbf", generator=gen()).p_value < 0.01


def test_constrained_site_in_unconstrained_space(data):
    _, y = data
    # u = log y ~ N(0, 1) under LogNormal(0, 1): the score in u (Jacobian included) is -u
    out = goodness_of_fit(lognormal_model, "y", y, generator=gen())
    u = y.log()[:, None]
    np.testing.assert_allclose(float(out.statistic), float(ksd(u, -u)), rtol=1e-10)
    assert out.p_value > 0.05
    assert goodness_of_fit(lognormal_model, "y", y, loc=0.4, generator=gen()).p_value < 0.01


def test_datum_scores_joint_density():
    # x ~ Unnormalized(-||x||^2 / 2), y | x ~ N(x, I) observed: s(x) = y - 2x (the spec, section 5)
    x = torch.randn(5, 2, dtype=F64)
    y = torch.randn(5, 2, dtype=F64)

    def model(x, y):
        with pyro.plate("data", 5):
            xv = pyro.sample("x", Unnormalized(lambda v: -0.5 * (v * v).sum(-1), event_shape=(2,)), obs=x)
            pyro.sample("y", dist.Normal(xv, 1.0).to_event(1), obs=y)

    rows, scores, weights = ScoreMatching(sites=["x"]).datum_scores(model, empty_guide, x, y)
    assert weights is None
    torch.testing.assert_close(rows, x)
    torch.testing.assert_close(scores, y - 2 * x)


def test_masked_points_left_out(data):
    x, _ = data
    keep = torch.arange(300) % 3 != 0

    def model(x):
        with pyro.plate("data", x.shape[0]), poutine.mask(mask=keep):
            pyro.sample("x", Unnormalized(lambda v: -0.5 * (v * v).sum(-1), event_shape=(2,)), obs=x)

    out = goodness_of_fit(model, "x", x, n_bootstrap=10, generator=gen())
    np.testing.assert_allclose(float(out.statistic), float(ksd(x[keep], -x[keep])), rtol=1e-12)


def test_latent_sites_from_a_guide(data):
    x, _ = data

    def model(x):
        mu = pyro.sample("mu", dist.Normal(torch.zeros(2, dtype=F64), 1.0).to_event(1))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(mu, 1.0).to_event(1), obs=x)

    def guide(x):
        pyro.sample("mu", dist.Delta(torch.full((2,), 0.5, dtype=F64)).to_event(1))

    out = goodness_of_fit(model, "x", x, guide=guide, n_bootstrap=10, generator=gen())
    np.testing.assert_allclose(float(out.statistic), float(ksd(x, 0.5 - x)), rtol=1e-12)
    with pytest.raises(ValueError, match="mu"):
        goodness_of_fit(model, "x", x)


def test_no_grad_and_inference_mode(data):
    x, _ = data
    ref = goodness_of_fit(gaussian_model, "x", x, n_bootstrap=10, generator=gen())
    with torch.no_grad():
        assert goodness_of_fit(gaussian_model, "x", x, n_bootstrap=10, generator=gen()) == ref
    with torch.inference_mode(), pytest.raises(RuntimeError, match="goodness_of_fit.*no_grad"):
        goodness_of_fit(gaussian_model, "x", x)


def test_errors(data):
    x, _ = data

    def never(*args, **kwargs):
        raise AssertionError("the model ran")

    with pytest.raises(TypeError, match="'site'"):
        goodness_of_fit(never, 1, x)
    with pytest.raises(ValueError, match="'kernel'"):
        goodness_of_fit(never, "x", x, kernel="gauss")
    with pytest.raises(ValueError, match="'beta'"):
        goodness_of_fit(never, "x", x, beta=-2.0)
    with pytest.raises(ValueError, match="'n_bootstrap'"):
        goodness_of_fit(never, "x", x, n_bootstrap=0)
    with pytest.raises(ValueError, match="'chunk_size'"):
        goodness_of_fit(never, "x", x, chunk_size=0)
    with pytest.raises(TypeError, match="'generator'"):
        goodness_of_fit(never, "x", x, generator=1)
    with pytest.raises(TypeError, match="'guide'"):
        goodness_of_fit(never, "x", x, guide=1)
    with pytest.raises(ValueError, match="'z'"):
        goodness_of_fit(gaussian_model, "z", x)
    with pytest.raises(ValueError, match="site 'x'.*at least 2 data points, got 1"):
        goodness_of_fit(gaussian_model, "x", x[:1])
    with pytest.raises(ValueError, match="observed site 'x'.*non-finite"):
        goodness_of_fit(gaussian_model, "x", x.clone().index_fill_(0, torch.tensor([0]), float("nan")))
    with pytest.raises(ValueError, match="'weights'"):
        goodness_of_fit(gaussian_model, "x", x, n_bootstrap=5, weights=torch.ones(5, 7))


def test_nonfinite_scores_name_the_site(data):
    """Finite data where the model's score overflows: the error names the site, not the
    internal argument of ``ksd_test``."""
    x, _ = data
    with pytest.raises(ValueError, match="site 'x': the model's score is not finite.*at 300 of 300"):
        goodness_of_fit(gaussian_model, "x", x, mu=float("inf"))
