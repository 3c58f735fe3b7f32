"""Pyro idioms a user tries first with ``ppl_score.pyro.ScoreMatching`` (issue #11 item 3).

A generalized-Bayes fit: ``mu ~ N(0, tau^2 I_2)``, ``x_i ~ N(mu, I_2)`` (an ordinary
``Normal`` site, or the same density as an ``Unnormalized`` energy), fitted by
``SVI(model, guide, optim, loss=ScoreMatching("esm", beta=beta))``. With ``esm`` the
per-example objective is ``SM_i(mu) = -2 + 1/2 ||x_i - mu||^2``, so the target
``p(mu) exp(-beta sum_i SM_i(mu))`` is Gaussian: each coordinate ``N(m*_k, s*^2)`` with
``1/s*^2 = 1/tau^2 + beta N`` and ``m* = beta sum_i x_i s*^2``. The posterior summaries
(``median``, ``quantiles``, ``Predictive``) are checked against it; the other idioms against
exact values (scales, particles, round trips) or closed forms (fitted energies).
"""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
import pytest
from scipy.stats import norm

torch = pytest.importorskip("torch")
pyro = pytest.importorskip("pyro")
import pyro.distributions as dist  # noqa: E402
from pyro import poutine  # noqa: E402
from pyro.distributions import constraints  # noqa: E402
from pyro.infer import SVI, Predictive, config_enumerate  # noqa: E402
from pyro.infer.autoguide import (  # noqa: E402
    AutoDelta,
    AutoLowRankMultivariateNormal,
    AutoMultivariateNormal,
    AutoNormal,
    init_to_feasible,
)
from pyro.nn import PyroModule, PyroParam, PyroSample  # noqa: E402
from pyro.optim import Adam, ClippedAdam  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from ppl_score.pyro import ScoreMatching, Unnormalized  # noqa: E402
from tests.helpers.idioms import BETA, TAU, D, esm, log_prior, message_says, target
from tests.helpers.shared import empty_guide

pytestmark = pytest.mark.usefixtures("one_torch_thread", "fresh_pyro")


F64 = torch.float64


def t(a, dtype=F64):
    return torch.as_tensor(np.asarray(a), dtype=dtype)


def data(rng, n=10):
    return rng.normal(1.0, 1.0, size=(n, D))


def model(x, n=None):
    """``x=None`` (with ``n``): the posterior predictive draws ``x``."""
    n = x.shape[0] if x is not None else n
    mu = pyro.sample("mu", dist.Normal(torch.zeros(D, dtype=F64), TAU).to_event(1))
    with pyro.plate("data", n):
        pyro.sample("x", dist.Normal(mu, 1.0).to_event(1), obs=x)


def unnormalized_model(x, n=None, batched=True):
    """The same density as ``model`` with an energy: identical ``esm`` values. The energy
    closes over ``mu``, which carries a particle dim under vectorized particles: the
    ``batched=True`` form broadcasts with it."""
    n = x.shape[0] if x is not None else n
    mu = pyro.sample("mu", dist.Normal(torch.zeros(D, dtype=F64), TAU).to_event(1))
    with pyro.plate("data", n):
        energy = Unnormalized(lambda y: -0.5 * ((y - mu) ** 2).sum(-1), (D,), batched=batched)
        pyro.sample("x", energy, obs=x)


def delta_guide(x, *args, **kwargs):
    """A deterministic guide (``log q = 0``): the loss is exact, not a Monte Carlo draw."""
    m = pyro.param("m", torch.full((D,), 0.3, dtype=F64))
    pyro.sample("mu", dist.Delta(m).to_event(1))


def normal_guide(x, *args, **kwargs):
    m = pyro.param("m", torch.tensor([0.3, -0.2], dtype=F64))
    s = pyro.param("s", torch.tensor([0.7, 0.4], dtype=F64), constraint=constraints.positive)
    pyro.sample("mu", dist.Normal(m, s).to_event(1))


def fit(model_, guide, x, steps=100, lr=0.1, lrd=0.97, num_particles=16):
    """SVI with vectorized particles (the default for ``num_particles > 1``)."""
    elbo = ScoreMatching("esm", beta=BETA, num_particles=num_particles)
    svi = SVI(model_, guide, ClippedAdam({"lr": lr, "lrd": lrd}), loss=elbo)
    losses = [svi.step(x) for _ in range(steps)]
    assert all(math.isfinite(v) for v in losses)
    return svi


# ---------------------------------------------------------------------------------------
# AutoGuides, median / quantiles, Predictive after a generalized-Bayes fit
# ---------------------------------------------------------------------------------------

GAUSSIAN_GUIDES = [AutoNormal, AutoMultivariateNormal, AutoLowRankMultivariateNormal]


@pytest.mark.parametrize("autoguide", GAUSSIAN_GUIDES, ids=lambda g: g.__name__)
def test_gaussian_autoguide_fit_median_quantiles_and_predictive(rng, autoguide):
    x_np = data(rng)
    x = t(x_np)
    m_star, s_star = target(x_np)
    guide = autoguide(model, init_loc_fn=init_to_feasible)
    fit(model, guide, x)

    # the fit: near the target (Adam on noisy reparameterized gradients: to ~0.2 s*)
    median = guide.median(x)["mu"]
    assert median.dtype == F64 and median.shape == (D,)
    np.testing.assert_allclose(median.detach().numpy(), m_star, atol=0.08)
    probs = [0.1, 0.5, 0.9]
    quantiles = guide.quantiles(probs, x)["mu"]
    assert quantiles.shape == (3, D)
    np.testing.assert_allclose(quantiles[1].detach().numpy(), median.detach().numpy(), atol=1e-12)
    spread = (quantiles[2] - quantiles[0]).detach().numpy() / (norm.ppf(0.9) - norm.ppf(0.1))
    np.testing.assert_allclose(spread, [s_star] * D, rtol=0.15)  # beta ignored would give -29%

    # sequential Predictive (the default): shapes, and the observed site holds the data
    samples = Predictive(model, guide=guide, num_samples=10)(x)
    # Pyro's Predictive keeps the plate dimension of a global site: [S, 1, D]
    assert samples["mu"].shape == (10, 1, D) and samples["x"].shape == (10, len(x_np), D)
    assert torch.equal(samples["x"], x.expand(10, *x.shape))
    assert len({tuple(v) for v in samples["mu"].reshape(10, D).tolist()}) == 10

    # vectorized: Predictive of the guide, then of the model given those draws; the draws
    # are the fitted guide's (its median and quantile spread, to Monte Carlo error)
    s = 2000
    draws = Predictive(guide, num_samples=s, parallel=True)(x)["mu"]
    assert draws.shape == (s, D) and draws.dtype == F64
    mu = draws.numpy()
    np.testing.assert_allclose(mu.mean(0), median.detach().numpy(), atol=5 * s_star / math.sqrt(s))
    np.testing.assert_allclose(mu.std(0), spread, rtol=0.1)

    # the posterior predictive of new data (x=None) given those draws: N(mu, I) per draw
    k = 300
    new = Predictive(model, posterior_samples={"mu": draws[:k]})(None, n=3)["x"]
    assert new.shape == (k, 3, D)
    resid = (new - draws[:k, None, :]).numpy()  # N(0, I) if each draw's data follow its mu
    assert abs(resid.mean()) < 5 / math.sqrt(resid.size)
    assert resid.var() == pytest.approx(1.0, rel=0.1)


def test_autodelta_fit_median_and_predictive(rng):
    x_np = data(rng)
    x = t(x_np)
    m_star, _ = target(x_np)
    guide = AutoDelta(model, init_loc_fn=init_to_feasible)
    fit(
        model, guide, x, steps=200, lr=0.05, lrd=0.99, num_particles=1
    )  # deterministic (esm, a Delta guide): converges to the mode
    median = guide.median(x)["mu"]
    np.testing.assert_allclose(median.detach().numpy(), m_star, atol=2e-3)
    samples = Predictive(model, guide=guide, num_samples=5)(x)
    assert samples["mu"].shape == (5, 1, D)
    assert torch.equal(samples["mu"].reshape(5, D), median.detach().expand(5, D))


def test_unnormalized_site_predictive_returns_latents_and_refuses_to_sample_the_energy(rng):
    x_np = data(rng)
    x = t(x_np)
    m_star, s_star = target(x_np)
    guide = AutoNormal(unnormalized_model)
    fit(unnormalized_model, guide, x)
    np.testing.assert_allclose(guide.median(x)["mu"].detach().numpy(), m_star, atol=0.08)
    samples = Predictive(unnormalized_model, guide=guide, num_samples=400, return_sites=["mu"])(x)
    assert set(samples) == {"mu"} and samples["mu"].shape == (400, 1, D)
    np.testing.assert_allclose(samples["mu"].reshape(400, D).std(0).numpy(), [s_star] * D, rtol=0.25)
    # new data from an energy model: the error points to the samplers
    with pytest.raises(NotImplementedError, match="langevin"):
        Predictive(unnormalized_model, guide=guide, num_samples=4)(None, n=3)


def test_rows_form_energy_over_a_latent_falls_back_to_sequential_particles(rng):
    """The rows form (default) flattens x, so an energy closing over a particle-batched
    latent cannot line up with the vectorized particles: by default the loss warns once and
    runs the particles one trace at a time (the value of sequential particles); asked for
    explicitly, vectorization raises the clear error naming ``batched=True``."""
    x = t(data(rng))
    rows = lambda x: unnormalized_model(x, batched=False)  # noqa: E731
    with pytest.raises(ValueError, match=r"batched=True"):
        ScoreMatching("esm", beta=BETA, num_particles=4, vectorize_particles=True).loss(rows, normal_guide, x)
    sequential = ScoreMatching("esm", beta=BETA, num_particles=4, vectorize_particles=False)
    pyro.set_rng_seed(3)
    a = sequential.loss(rows, normal_guide, x)
    auto = ScoreMatching("esm", beta=BETA, num_particles=4)
    pyro.set_rng_seed(3)
    with pytest.warns(RuntimeWarning, match="one trace at a time"):
        b = auto.loss(rows, normal_guide, x)
    assert auto.vectorize_particles is False
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # once
        auto.loss(rows, normal_guide, x)
    pyro.set_rng_seed(3)
    assert sequential.loss(unnormalized_model, normal_guide, x) == pytest.approx(a, rel=1e-12)
    pyro.set_rng_seed(3)
    assert sequential.loss(model, normal_guide, x) == pytest.approx(a, rel=1e-12)  # the Normal site
    assert np.isfinite(b)


def test_bayesian_pyro_module_model_with_pyro_sample_prior(rng):
    """A ``PyroModule`` model whose parameter has a ``PyroSample`` prior: generalized Bayes
    with ``AutoDelta`` converges to the target's mode."""

    class Model(PyroModule):
        def __init__(self):
            super().__init__()
            self.loc = PyroSample(dist.Normal(torch.zeros(D, dtype=F64), TAU).to_event(1))

        def forward(self, x):
            loc = self.loc
            with pyro.plate("data", x.shape[0]):
                pyro.sample("x", Unnormalized(lambda y: -0.5 * ((y - loc) ** 2).sum(-1), (D,)), obs=x)

    x_np = data(rng)
    m_star, _ = target(x_np)
    net = Model()
    guide = AutoDelta(net, init_loc_fn=init_to_feasible)
    fit(net, guide, t(x_np), steps=200, lr=0.05, lrd=0.99, num_particles=1)
    np.testing.assert_allclose(guide.median(t(x_np))["loc"].detach().numpy(), m_star, atol=2e-3)


# ---------------------------------------------------------------------------------------
# num_particles, poutine.scale, subsampling
# ---------------------------------------------------------------------------------------


def test_sequential_particles_average_the_particles(rng):
    """esm draws nothing: ``num_particles=3, vectorize_particles=False`` is the mean of three
    one-particle losses on the same guide draws (same seed), value and gradient."""
    x = t(data(rng))
    elbo1 = ScoreMatching("esm", beta=BETA)
    elbo3 = ScoreMatching("esm", beta=BETA, num_particles=3, vectorize_particles=False)
    normal_guide(x)  # create the params
    params = [pyro.param("m").unconstrained(), pyro.param("s").unconstrained()]
    pyro.set_rng_seed(11)
    ones = [elbo1.differentiable_loss(model, normal_guide, x) for _ in range(3)]
    pyro.set_rng_seed(11)
    three = elbo3.differentiable_loss(model, normal_guide, x)
    assert len({v.item() for v in ones}) == 3  # three different draws
    assert three.item() == pytest.approx(sum(v.item() for v in ones) / 3, rel=1e-12)
    g1 = [sum(gs) / 3 for gs in zip(*(torch.autograd.grad(v, params) for v in ones))]
    g3 = torch.autograd.grad(three, params)
    for a, b in zip(g1, g3):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    pyro.set_rng_seed(11)
    assert elbo3.loss(model, normal_guide, x) == pytest.approx(three.item(), rel=1e-12)


def _expected_normal_guide_loss(x):
    """``E_q[beta sum_i SM_i + log q - log p]`` for ``normal_guide``'s q = N(m, diag s^2)."""
    m, s = np.array([0.3, -0.2]), np.array([0.7, 0.4])
    sm = BETA * (-D + 0.5 * (((x - m) ** 2).sum(-1) + (s**2).sum())).sum()
    log_q = (-0.5 - np.log(s) - 0.5 * math.log(2 * math.pi)).sum()
    log_p = (-(m**2 + s**2) / (2 * TAU**2) - math.log(TAU) - 0.5 * math.log(2 * math.pi)).sum()
    return sm + log_q - log_p


@pytest.mark.parametrize("kw", [{}, {"vectorize_particles": True, "max_plate_nesting": 1}], ids=["default", "explicit"])
def test_vectorized_particles_estimate_the_expected_loss(rng, kw):
    x_np = data(rng)
    x = t(x_np)
    n = 4000
    elbo = ScoreMatching("esm", beta=BETA, num_particles=n, **kw)
    assert elbo.vectorize_particles
    # Monte Carlo error of the mean of n particles, from the same integrand in numpy
    m, s = np.array([0.3, -0.2]), np.array([0.7, 0.4])
    mu = m + s * np.random.default_rng(0).normal(size=(20000, D))
    per = (
        BETA * esm(x_np[None], mu[:, None]).sum(-1) + norm.logpdf(mu, m, s).sum(-1) - norm.logpdf(mu, 0.0, TAU).sum(-1)
    )
    expected = _expected_normal_guide_loss(x_np)
    assert per.mean() == pytest.approx(expected, abs=6 * per.std() / math.sqrt(20000))
    assert elbo.loss(model, normal_guide, x) == pytest.approx(expected, abs=6 * per.std() / math.sqrt(n))
    # a deterministic guide: every particle is the same, the mean is the one-particle loss
    exact = ScoreMatching("esm", beta=BETA).loss(model, delta_guide, x)
    assert ScoreMatching("esm", beta=BETA, num_particles=5, **kw).loss(model, delta_guide, x) == pytest.approx(
        exact, rel=1e-12
    )


def test_max_plate_nesting_is_accepted_and_changes_nothing(rng):
    x = t(data(rng))
    elbo = ScoreMatching("esm", beta=BETA, max_plate_nesting=1)
    assert elbo.max_plate_nesting == 1
    expected = ScoreMatching("esm", beta=BETA).loss(model, delta_guide, x)
    assert elbo.loss(model, delta_guide, x) == pytest.approx(expected, rel=1e-12)


def test_poutine_scale_scales_the_loss(rng):
    x_np = data(rng)
    x = t(x_np)
    m = np.full(D, 0.3)
    exact = BETA * esm(x_np, m).sum() - log_prior(m)  # Delta guide: log q = 0
    elbo = ScoreMatching("esm", beta=BETA)
    assert elbo.loss(model, delta_guide, x) == pytest.approx(exact, rel=1e-12)
    # the whole model scaled (latent prior and data): the loss scales
    assert elbo.loss(poutine.scale(model, scale=0.25), delta_guide, x) == pytest.approx(0.25 * exact, rel=1e-12)

    # per-datum weights on the observed site: sum_i w_i SM_i
    w = rng.uniform(0.5, 2.0, size=len(x_np))

    def weighted(x):
        mu = pyro.sample("mu", dist.Normal(torch.zeros(D, dtype=F64), TAU).to_event(1))
        with pyro.plate("data", x.shape[0]), poutine.scale(scale=t(w)):
            pyro.sample("x", dist.Normal(mu, 1.0).to_event(1), obs=x)

    expected = BETA * (w * esm(x_np, m)).sum() - log_prior(m)
    assert elbo.loss(weighted, delta_guide, x) == pytest.approx(expected, rel=1e-12)
    svi = SVI(poutine.scale(model, scale=0.25), delta_guide, Adam({"lr": 0.05}), loss=elbo)
    assert svi.step(x) == pytest.approx(0.25 * exact, rel=1e-12)
    assert not torch.equal(pyro.param("m").detach(), torch.full((D,), 0.3, dtype=F64))


def subsampled_model(x, idx):
    """``Unnormalized`` observed site in a subsampled plate; the data loader hands ``idx``."""
    mu = pyro.sample("mu", dist.Normal(torch.zeros(D, dtype=F64), TAU).to_event(1))
    with pyro.plate("data", x.shape[0], subsample=idx) as i:
        pyro.sample("x", Unnormalized(lambda y: -0.5 * ((y - mu) ** 2).sum(-1), (D,)), obs=x[i])


def test_dataloader_subsampling_value_and_fit(rng):
    n, b = 40, 10
    x_np = data(rng, n)
    x = t(x_np)
    loader = DataLoader(
        TensorDataset(torch.arange(n)), batch_size=b, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    (idx,) = next(iter(loader))
    m = np.full(D, 0.3)
    exact = BETA * n / b * esm(x_np[idx.numpy()], m).sum() - log_prior(m)
    assert ScoreMatching("esm", beta=BETA).loss(subsampled_model, delta_guide, x, idx) == pytest.approx(
        exact, rel=1e-12
    )

    pyro.clear_param_store()
    m_star, s_star = target(x_np)
    guide = AutoNormal(subsampled_model)
    svi = SVI(subsampled_model, guide, ClippedAdam({"lr": 0.05, "lrd": 0.99}), loss=ScoreMatching("esm", beta=BETA))
    for _ in range(50):
        for (idx,) in loader:
            assert math.isfinite(svi.step(x, idx))
    # the full-data target, up to the noise of subsampled reparameterized gradients
    np.testing.assert_allclose(guide.median(x, idx)["mu"].detach().numpy(), m_star, atol=0.1)
    np.testing.assert_allclose(pyro.param("AutoNormal.scales.mu").detach().numpy(), [s_star] * D, rtol=0.35)


# ---------------------------------------------------------------------------------------
# Energies: pyro.param and PyroModule; param-store round trips
# ---------------------------------------------------------------------------------------


def param_energy_model(x):
    """A diagonal Gaussian energy ``-1/2 sum_k p_k (x_k - l_k)^2`` from ``pyro.param``: its
    esm minimizer is ``l = mean``, ``p = 1 / var`` (the MLE)."""
    loc = pyro.param("loc", torch.zeros(D, dtype=F64))
    prec = pyro.param("prec", torch.ones(D, dtype=F64), constraint=constraints.positive)
    with pyro.plate("data", x.shape[0]):
        pyro.sample("x", Unnormalized(lambda y: -0.5 * (prec * (y - loc) ** 2).sum(-1), (D,)), obs=x)


def energy_data(rng, n=200):
    return rng.normal([1.0, -0.5], [0.7, 1.5], size=(n, D))


def test_pyro_param_energy_fit_and_param_store_round_trip(rng, tmp_path):
    x_np = energy_data(rng)
    x = t(x_np)
    optim = ClippedAdam({"lr": 0.1, "lrd": 0.98})
    svi = SVI(param_energy_model, empty_guide, optim, loss=ScoreMatching())  # ssm_vr: draws projections
    for _ in range(150):
        svi.step(x)
    np.testing.assert_allclose(pyro.param("loc").detach().numpy(), x_np.mean(0), atol=0.03)
    np.testing.assert_allclose(pyro.param("prec").detach().numpy(), 1 / x_np.var(0), rtol=0.05)

    # save: the param store through torch.save, and the optimizer's state (PyroOptim.save)
    buf = io.BytesIO()
    torch.save(pyro.get_param_store().get_state(), buf)
    optim.save(tmp_path / "optim.pt")
    pyro.set_rng_seed(7)
    losses_a = [svi.step(x) for _ in range(3)]
    params_a = {k: v.detach().clone() for k, v in pyro.get_param_store().items()}

    # restore into a fresh store and a fresh optimizer: training resumes identically
    pyro.clear_param_store()
    buf.seek(0)
    pyro.get_param_store().set_state(torch.load(buf, weights_only=False))
    optim_b = ClippedAdam({"lr": 0.1, "lrd": 0.98})
    optim_b.load(tmp_path / "optim.pt")
    svi_b = SVI(param_energy_model, empty_guide, optim_b, loss=ScoreMatching())
    pyro.set_rng_seed(7)
    losses_b = [svi_b.step(x) for _ in range(3)]
    assert losses_a == losses_b
    params_b = dict(pyro.get_param_store().items())
    assert set(params_a) == set(params_b) == {"loc", "prec"}
    for k in params_a:
        assert torch.equal(params_a[k], params_b[k].detach()), k
        assert params_b[k].dtype == F64


def test_pyro_module_energy_fit_and_state_dict_round_trip(rng):
    class DiagonalEnergy(PyroModule):
        def __init__(self):
            super().__init__()
            self.loc = PyroParam(torch.zeros(D, dtype=F64))
            self.prec = PyroParam(torch.ones(D, dtype=F64), constraint=constraints.positive)

        def forward(self, y):
            return -0.5 * (self.prec * (y - self.loc) ** 2).sum(-1)

    energy = DiagonalEnergy()

    def energy_model(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", Unnormalized(energy, (D,)), obs=x)

    x_np = energy_data(rng)
    x = t(x_np)
    svi = SVI(energy_model, empty_guide, ClippedAdam({"lr": 0.1, "lrd": 0.98}), loss=ScoreMatching("esm"))
    first = svi.evaluate_loss(x)
    for _ in range(150):
        svi.step(x)
    assert svi.evaluate_loss(x) < first
    np.testing.assert_allclose(energy.loc.detach().numpy(), x_np.mean(0), atol=0.03)
    np.testing.assert_allclose(energy.prec.detach().numpy(), 1 / x_np.var(0), rtol=0.05)
    # the module's parameters live in the param store, and a state_dict round trip keeps the loss
    assert {"loc", "prec"} <= set(pyro.get_param_store().keys())
    buf = io.BytesIO()
    torch.save(energy.state_dict(), buf)
    value = svi.evaluate_loss(x)
    pyro.clear_param_store()
    fresh = DiagonalEnergy()
    buf.seek(0)
    fresh.load_state_dict(torch.load(buf))
    energy = fresh  # energy_model reads the global name
    assert svi.evaluate_loss(x) == value


# ---------------------------------------------------------------------------------------
# dtype and device
# ---------------------------------------------------------------------------------------


def test_float64_and_cpu_are_kept(rng):
    assert torch.get_default_dtype() == torch.float32  # the user's data, not the default, decides
    x_np = data(rng)
    x = t(x_np)
    guide = AutoNormal(model)
    elbo = ScoreMatching("esm", beta=BETA)
    svi = SVI(model, guide, Adam({"lr": 0.01}), loss=elbo)
    for _ in range(3):
        svi.step(x)
    value = elbo.differentiable_loss(model, guide, x)
    assert value.dtype == F64 and value.device.type == "cpu"
    for name, p in pyro.get_param_store().items():
        assert p.dtype == F64 and p.device.type == "cpu", name
    # float64 precision all the way: the exact value to 1e-13 (float32 would give ~1e-7)
    pyro.clear_param_store()
    m = np.full(D, 0.3)
    exact = BETA * esm(x_np, m).sum() - log_prior(m)
    assert elbo.differentiable_loss(model, delta_guide, x).item() == pytest.approx(exact, rel=1e-13)


def test_float32_is_kept(rng):
    x = t(data(rng), torch.float32)

    def model32(x):
        mu = pyro.sample("mu", dist.Normal(torch.zeros(D), TAU).to_event(1))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", Unnormalized(lambda y: -0.5 * ((y - mu) ** 2).sum(-1), (D,)), obs=x)

    guide = AutoNormal(model32)
    elbo = ScoreMatching(beta=BETA)
    svi = SVI(model32, guide, Adam({"lr": 0.01}), loss=elbo)
    svi.step(x)
    assert elbo.differentiable_loss(model32, guide, x).dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in pyro.get_param_store().values())


# ---------------------------------------------------------------------------------------
# Discrete sites
# ---------------------------------------------------------------------------------------


def discrete_latent_model(x):
    z = pyro.sample("z", dist.Bernoulli(torch.tensor(0.5, dtype=F64)))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("x", dist.Normal(z, 1.0).expand([x.shape[0], D]).to_event(1), obs=x)


def test_discrete_observed_site_is_an_error_naming_it(rng):
    x = t(data(rng))

    def discrete_obs(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("flips", dist.Bernoulli(torch.full((x.shape[0],), 0.5, dtype=F64)), obs=(x[:, 0] > 0).double())

    with pytest.raises(ValueError, match="'flips'") as excinfo:
        ScoreMatching().loss(discrete_obs, empty_guide, x)
    message_says(excinfo, "discrete", "continuous")


def test_discrete_latent_site_error_says_what_is_supported(rng):
    x = t(data(rng))

    def bernoulli_guide(x):
        pyro.sample("z", dist.Bernoulli(torch.tensor(0.3, dtype=F64)))

    with pytest.raises(ValueError, match="'z'") as excinfo:
        ScoreMatching().loss(discrete_latent_model, bernoulli_guide, x)
    message_says(excinfo, "discrete", "continuous")


def test_enumerated_discrete_latent_site_error(rng):
    x = t(data(rng))
    enumerated = config_enumerate(discrete_latent_model)
    with pytest.raises(ValueError, match="'z'") as excinfo:
        ScoreMatching().loss(enumerated, empty_guide, x)
    message_says(excinfo, "discrete", "enumerat", "continuous")
