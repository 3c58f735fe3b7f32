"""``ScoreMatching("ms_dsm")`` on ``NoiseConditional`` models and the annealed mode of
``langevin`` (Pyro front end); the NumPyro twin is ``tests/numpyro/test_ms_dsm.py``."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pyro = pytest.importorskip("pyro")

from pyro.distributions import constraints  # noqa: E402
from pyro.infer import SVI  # noqa: E402
from pyro.optim import Adam  # noqa: E402

from ppl_score.pyro import NoiseConditional, ScoreMatching, Unnormalized, langevin, noise_level  # noqa: E402
from ppl_score.torch import score_matching_loss  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SIGMAS = (1.0, 0.5, 0.1)


def _gauss(mu, log_t):
    return lambda z, s: -0.5 * ((z - mu) ** 2).sum(-1) / (torch.exp(2 * log_t) + s**2)


def _model(x):
    mu = pyro.param("mu", torch.zeros(2, dtype=x.dtype))
    log_t = pyro.param("log_t", torch.zeros((), dtype=x.dtype))
    with pyro.plate("data", len(x)):
        pyro.sample("x", NoiseConditional(_gauss(mu, log_t), event_shape=(2,)), obs=x)


def test_loss_is_the_backend_objective_summed_over_the_data():
    pyro.clear_param_store()
    x = torch.randn(7, 2, dtype=torch.float64)
    loss = ScoreMatching("ms_dsm", sigmas=SIGMAS, generator=torch.Generator().manual_seed(3))
    value = loss.loss(_model, lambda x: None, x)
    fn = _gauss(pyro.param("mu"), pyro.param("log_t"))
    expected = score_matching_loss(
        fn, x, "ms_dsm", sigmas=SIGMAS, generator=torch.Generator().manual_seed(3), reduction="sum"
    )
    assert value == pytest.approx(expected.item(), rel=1e-12)


def test_fit_recovers_the_gaussian():
    pyro.clear_param_store()
    torch.manual_seed(0)
    x = torch.randn(400, 2, dtype=torch.float64) * 0.7 + 0.3
    svi = SVI(_model, lambda x: None, Adam({"lr": 0.05}), loss=ScoreMatching("ms_dsm", sigmas=SIGMAS))
    for _ in range(300):
        svi.step(x)
    # the sample's mean and std differ from (0.3, 0.7) by ~0.7/sqrt(400) = 0.035; the SGD noise adds a little
    np.testing.assert_allclose(pyro.param("mu").detach().numpy(), x.mean(0).numpy(), atol=0.1)
    assert abs(pyro.param("log_t").exp().item() - 0.7) < 0.1


def test_constrained_site_is_matched_unconstrained():
    pyro.clear_param_store()

    def model(y):
        with pyro.plate("data", len(y)):
            fn = lambda z, s: (-0.5 * torch.log(z) ** 2 / (1 + s**2) - torch.log(z)).sum(-1)  # noqa: E731
            pyro.sample("y", NoiseConditional(fn, event_shape=(1,), support=constraints.positive), obs=y)

    value = ScoreMatching("ms_dsm").loss(model, lambda y: None, torch.rand(5, 1, dtype=torch.float64) + 0.5)
    assert np.isfinite(value)


def test_noise_level_sources_and_errors():
    d = NoiseConditional(lambda z, s: -(z**2).sum(-1) / s**2, event_shape=(2,))
    x = torch.ones(3, 2)
    with pytest.raises(ValueError, match="needs a noise level"):
        d.log_prob(x)
    with noise_level(2.0):
        torch.testing.assert_close(d.log_prob(x), torch.full((3,), -0.5))
    with noise_level(torch.tensor([1.0, 2.0, 1.0])):  # one level per point
        torch.testing.assert_close(d.log_prob(x), torch.tensor([-2.0, -0.5, -2.0]))
    with (
        noise_level(torch.tensor([1.0, 2.0])),
        pytest.raises(ValueError, match="cannot be evaluated at 2 noise levels"),
    ):
        d.log_prob(x)
    fixed = NoiseConditional(lambda z, s: -(z**2).sum(-1) / s**2, event_shape=(2,), sigma=2.0)
    torch.testing.assert_close(fixed.expand((3,)).log_prob(x), torch.full((3,), -0.5))
    assert isinstance(fixed.expand((3,)), NoiseConditional) and fixed.expand((3,)).sigma == 2.0
    assert repr(fixed).startswith("NoiseConditional(log_density_fn=")
    with pytest.raises(ValueError, match="argument 'sigma'"):
        NoiseConditional(lambda z, s: z.sum(-1), 2, sigma=-1.0)
    with pytest.raises(ValueError, match="argument 'sigma'"), noise_level(0.0):
        pass


def test_ms_dsm_needs_a_noise_conditional_site():
    def model(x):
        with pyro.plate("data", len(x)):
            pyro.sample("x", Unnormalized(lambda z: -(z**2).sum(-1), event_shape=(2,)), obs=x)

    with pytest.raises(ValueError, match="method 'ms_dsm' needs a noise-conditional model"):
        ScoreMatching("ms_dsm").loss(model, lambda x: None, torch.zeros(3, 2))
    with pytest.raises(ValueError, match="option 'sigmas' must be strictly decreasing"):
        ScoreMatching("ms_dsm", sigmas=(0.1, 1.0))


W = torch.tensor([0.8, 0.2], dtype=torch.float64)
MUS = torch.tensor([[-4.0, -4.0], [4.0, 4.0]], dtype=torch.float64)


def _mixture(z, s):
    var = 0.25 + s**2
    comps = [W[k].log() - ((z - MUS[k]) ** 2).sum(-1) / (2 * var) - torch.log(var) for k in range(2)]
    return torch.logsumexp(torch.stack(comps, -1), -1)


def test_annealed_langevin_mode_recovers_the_weights():
    def model():
        pyro.sample("x", NoiseConditional(_mixture, event_shape=(2,)), obs=torch.zeros(2, dtype=torch.float64))

    init = torch.tensor(np.random.default_rng(0).uniform(-8, 8, (600, 2)))
    sigmas = tuple(np.geomspace(8.0, 0.1, 8))
    gen = torch.Generator().manual_seed(0)
    out = langevin(model, "x", num_chains=600, sigmas=sigmas, n_steps_each=40, step_lr=2e-3, init=init, generator=gen)
    assert out.samples.shape == (1, 600, 2)
    assert abs((out.samples[0, :, 0] < 0).double().mean().item() - 0.8) < 0.03 + 3 * (0.16 / 600) ** 0.5
    with pytest.raises(ValueError, match="'num_samples' / 'num_steps' do not apply"):
        langevin(model, "x", num_chains=2, sigmas=sigmas, num_samples=5)
    with pytest.raises(ValueError, match="'step_size', 'thin' do not apply with 'sigmas'"):
        langevin(model, "x", num_chains=2, sigmas=sigmas, thin=5, step_size=0.3)
    with pytest.raises(ValueError, match="'num_warmup', 'adjusted' do not apply"):
        langevin(model, "x", num_chains=2, sigmas=sigmas, num_warmup=7, adjusted=False)
    with pytest.raises(ValueError, match="argument 'sigmas' must be strictly decreasing"):
        langevin(model, "x", num_chains=2, sigmas=(0.1, 1.0))

    def plain():
        pyro.sample("x", Unnormalized(lambda z: -(z**2).sum(-1), event_shape=(2,)), obs=torch.zeros(2))

    with pytest.raises(ValueError, match="needs a noise-conditional site: 'x'"):
        langevin(plain, "x", num_chains=2, sigmas=sigmas)
