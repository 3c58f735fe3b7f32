"""``ms_dsm`` (multi-scale denoising score matching, Song & Ermon 2019) in both backends:
the value against its formula, the expected loss and its minimizer for Gaussian data in
closed form, the level draw, and the errors. Parity with the same weights is in
``tests/parity/test_ms_dsm.py``."""

from __future__ import annotations

import numpy as np
import pytest

from ppl_score.spec import DEFAULT_SIGMAS, OBJECTIVES, geometric_sigmas, resolve

SIGMAS = (1.0, 0.5, 0.1)
MU, TAU = 0.3, 0.7


def _gauss(m=MU, t=TAU, kind="score"):
    """The noisy score of N(m, t^2 I) at level sigma: -(x~ - m) / (t^2 + sigma^2)."""

    def build(ops):
        if kind == "score":
            return lambda x, s: -(x - m) / (t * t + s[:, None] ** 2)
        return lambda x, s: -0.5 * ((x - m) ** 2).sum(-1) / (t * t + s**2)

    return build


def _formula(x, n, levels, weighting="sigma2", m=MU, t=TAU):
    xt = x + levels[:, None] * n
    s = -(xt - m) / (t * t + levels[:, None] ** 2)
    lam = levels**2 if weighting == "sigma2" else np.ones_like(levels)
    return 0.5 * lam * ((s + n / levels[:, None]) ** 2).sum(-1)


def test_spec_entry():
    obj = OBJECTIVES["ms_dsm"]
    assert obj.noise_conditional and obj.uses_noise and not obj.uses_projections
    assert dict(obj.defaults) == {"sigmas": DEFAULT_SIGMAS, "weighting": "sigma2"}
    assert len(DEFAULT_SIGMAS) == 10 and DEFAULT_SIGMAS[0] == 1.0 and DEFAULT_SIGMAS[-1] == 0.01
    np.testing.assert_allclose(np.diff(np.log(DEFAULT_SIGMAS)), np.log(0.01) / 9)
    assert geometric_sigmas(2.0, 0.5, 3) == (2.0, 1.0, 0.5)
    assert resolve("ms_dsm", "score", {"sigmas": np.array([1.0, 0.1])}).options["sigmas"] == (1.0, 0.1)


@pytest.mark.parametrize("kind", ["score", "log_prob"])
@pytest.mark.parametrize("weighting", ["sigma2", "none"])
def test_value_is_the_formula(backend, kind, weighting):
    rng = np.random.default_rng(0)
    x, n = rng.normal(MU, TAU, (6, 3)), rng.normal(size=(6, 3))
    levels = np.array([1.0, 0.5, 0.1, 0.1, 1.0, 0.5])
    out = backend.loss(
        _gauss(kind=kind),
        x,
        "ms_dsm",
        kind=kind,
        noise=n,
        noise_levels=levels,
        sigmas=SIGMAS,
        weighting=weighting,
        reduction="none",
    )
    np.testing.assert_allclose(out, _formula(x, n, levels, weighting), rtol=1e-12, atol=1e-12)


def test_expected_loss_at_the_truth(backend):
    # at the true noisy score, E[value | sigma] = lambda D tau^2 / (2 sigma^2 (tau^2 + sigma^2)),
    # with lambda = sigma^2: D tau^2 / (2 (tau^2 + sigma^2)); averaged over the uniform levels
    d, b = 2, 20000
    x = np.random.default_rng(1).normal(MU, TAU, (b, d))
    per = backend.loss(_gauss(), x, "ms_dsm", kind="score", sigmas=SIGMAS, seed=3, reduction="none")
    expected = np.mean([d * TAU**2 / (2 * (TAU**2 + s**2)) for s in SIGMAS])
    assert abs(per.mean() - expected) < 4 * per.std() / np.sqrt(b)


def test_minimizer_is_the_data_distribution(torch_backend):
    # the expected loss over the family s(x~, sigma) = -(x~ - m) / (t^2 + sigma^2) is minimized
    # at the data's (mu, tau): fit (m, log t) on one fixed large draw by L-BFGS
    torch = torch_backend.torch
    from ppl_score.torch import score_matching_loss

    rng = np.random.default_rng(2)
    b, d = 20000, 2
    x = torch.tensor(rng.normal(MU, TAU, (b, d)))
    noise = torch.tensor(rng.normal(size=(b, d)))
    levels = torch.tensor(np.asarray(SIGMAS)[rng.integers(0, 3, b)])
    m = torch.zeros((), dtype=torch.float64, requires_grad=True)
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([m, log_t], max_iter=100, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        fn = lambda z, s: -(z - m) / (torch.exp(2 * log_t) + s[:, None] ** 2)  # noqa: E731
        loss = score_matching_loss(fn, x, "ms_dsm", kind="score", noise=noise, noise_levels=levels, sigmas=SIGMAS)
        loss.backward()
        return loss

    opt.step(closure)
    # sampling error of the estimates is ~ tau / sqrt(b d) ~ 0.004
    assert abs(m.item() - MU) < 0.02 and abs(np.exp(log_t.item()) - TAU) < 0.02


def test_levels_are_drawn_uniformly(backend):
    # fn records the levels it is called with: about B/3 of each of the three
    seen = []

    def build(ops):
        def fn(x, s):
            seen.append(np.asarray(s.detach() if hasattr(s, "detach") else s))
            return -x

        return fn

    x = np.zeros((3000, 1))
    backend.loss(build, x, "ms_dsm", kind="score", sigmas=SIGMAS, seed=0)
    levels = seen[-1]
    counts = np.array([(np.abs(levels - s) < 1e-12).sum() for s in SIGMAS])
    assert counts.sum() == 3000
    assert np.all(np.abs(counts - 1000) < 4 * np.sqrt(3000 * (1 / 3) * (2 / 3)))


def test_float32(backend):
    x = np.random.default_rng(0).normal(size=(5, 2)).astype(np.float32)
    out = backend.loss(_gauss(), x, "ms_dsm", kind="score", seed=1, sigmas=SIGMAS)
    assert out.dtype == np.float32 and np.isfinite(out)


@pytest.mark.parametrize(
    "kw, error, match",
    [
        (dict(noise_levels=np.full(4, 0.3)), ValueError, "argument 'noise_levels' must hold values of option 'sigmas'"),
        (dict(noise_levels=np.ones(3)), ValueError, r"argument 'noise_levels' must have shape \[B\] = \(4,\)"),
        (dict(sigmas=(0.1, 1.0)), ValueError, "strictly decreasing"),
        (dict(sigmas=(1.0, -0.1)), ValueError, "positive finite"),
        (dict(sigmas=()), ValueError, "at least one"),
        (dict(sigmas="big"), TypeError, "option 'sigmas' must be a sequence"),
        (dict(sigmas=(True,)), TypeError, "option 'sigmas' must hold real numbers, got a bool"),
        (dict(weighting="lambda"), ValueError, "option 'weighting'"),
        (dict(sigma=0.1), ValueError, "unknown option"),
    ],
)
def test_errors(backend, kw, error, match):
    x = np.zeros((4, 2))
    kw = {"sigmas": SIGMAS, **kw}
    with pytest.raises(error, match=match):
        backend.loss(_gauss(), x, "ms_dsm", kind="score", seed=0, **kw)


def test_fn_must_be_noise_conditional(backend):
    with pytest.raises(TypeError, match="needs a noise-conditional argument 'fn': fn\\(x, sigma\\)"):
        backend.loss(lambda ops: lambda x: -x, np.zeros((2, 2)), "ms_dsm", kind="score", seed=0)
    with pytest.raises(ValueError, match="'noise_levels' is only used by method 'ms_dsm', not 'dsm'"):
        backend.loss(lambda ops: lambda x: -x, np.zeros((2, 2)), "dsm", kind="score", seed=0, noise_levels=np.ones(2))
