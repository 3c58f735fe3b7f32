"""The demo (``python -m ppl_score demo``), its data sets and the two training loops."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from ppl_score import datasets
from ppl_score.__main__ import main
from ppl_score.spec import OBJECTIVES

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
BACKENDS = ["torch", "jax"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _require(backend):
    pytest.importorskip(backend)
    if backend == "jax":
        pytest.importorskip("optax")


# --------------------------------------------------------------------------------------
# The mixture's exact log density, score and Hessian trace


def test_mixture_score_is_gradient_of_log_density():
    x = np.random.default_rng(0).normal(scale=1.5, size=(50, 2))
    h = 1e-5
    eye = np.eye(2)
    fd = np.stack(
        [(datasets.mixture_log_prob(x + h * e) - datasets.mixture_log_prob(x - h * e)) / (2 * h) for e in eye], -1
    )
    # central differences: error ~ h^2 |f'''| + roundoff |f| eps / h, both below 1e-8 here
    np.testing.assert_allclose(datasets.mixture_score(x), fd, rtol=0, atol=1e-7)


def test_mixture_hessian_trace_is_divergence_of_score():
    x = np.random.default_rng(1).normal(scale=1.5, size=(50, 2))
    h = 1e-5
    fd = sum(
        (datasets.mixture_score(x + h * e)[:, i] - datasets.mixture_score(x - h * e)[:, i]) / (2 * h)
        for i, e in enumerate(np.eye(2))
    )
    np.testing.assert_allclose(datasets.mixture_hessian_trace(x), fd, rtol=0, atol=1e-6)


def test_mixture_density_is_normalized_and_samples_match_it():
    m = datasets.DEFAULT_MIXTURE
    g = np.linspace(-7, 7, 701)
    xx, yy = np.meshgrid(g, g)
    p = np.exp(datasets.mixture_log_prob(np.stack([xx.ravel(), yy.ravel()], -1)))
    assert abs(p.sum() * (g[1] - g[0]) ** 2 - 1.0) < 1e-6

    n = 40_000
    x = datasets.mixture_sample(np.random.default_rng(2), n)
    mean = m.weights @ m.means
    second = np.einsum("k,kij->ij", m.weights, m.covariances + np.einsum("ki,kj->kij", m.means, m.means))
    cov = second - np.outer(mean, mean)
    # 5 standard errors of the sample mean
    assert np.all(np.abs(x.mean(0) - mean) < 5 * np.sqrt(np.diag(cov) / n))
    np.testing.assert_allclose(np.cov(x.T), cov, atol=0.05)


def test_make_mixture_rejects_bad_parameters():
    with pytest.raises(ValueError, match="weights"):
        datasets.make_mixture([0.5, 0.6], [[0, 0], [1, 1]], [np.eye(2)] * 2)
    with pytest.raises(ValueError, match="positive definite"):
        datasets.make_mixture([1.0], [[0, 0]], [[[1, 2], [2, 1]]])
    with pytest.raises(ValueError, match="x"):
        datasets.mixture_score(np.zeros((3, 3)))


# --------------------------------------------------------------------------------------
# Array data sets


def test_load_digits():
    pytest.importorskip("sklearn")
    d = datasets.load_digits()
    assert d.train.shape[1:] == (64,) and d.image_shape == (8, 8)
    assert len(d.train) + len(d.test) == 1797
    # Gaussian dequantization of one level (std 1/17) around (k + 1/2) / 17
    assert -0.35 < d.train.min() and d.train.max() < 1.35
    z = datasets.load_digits(scaling="standardize")
    np.testing.assert_allclose(z.train.mean(0), 0, atol=1e-10)
    np.testing.assert_allclose(z.train.std(0), 1, atol=1e-10)


def test_load_array_npy_and_npz(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(50, 6, 6), dtype=np.uint8)
    np.save(tmp_path / "imgs.npy", images)
    d = datasets.load_array(tmp_path / "imgs.npy", test_fraction=0.2)
    assert d.train.shape == (40, 6, 6) and d.test.shape == (10, 6, 6) and d.image_shape == (6, 6)
    assert d.train.dtype == np.float64
    # uint8 values k become (k + 1/2 + z) / 256 with z ~ N(0, 1)
    assert abs(np.concatenate([d.train, d.test]).mean() - (images.mean() + 0.5) / 256) < 0.01

    points = rng.normal(size=(30, 2)).astype(np.float32)
    np.savez(tmp_path / "pts.npz", x=points, labels=np.arange(30))
    d = datasets.load_array(tmp_path / "pts.npz")  # picks "x"
    np.testing.assert_allclose(np.sort(np.concatenate([d.train, d.test]), 0), np.sort(points, 0), rtol=1e-7)
    assert d.image_shape is None
    with pytest.raises(ValueError, match=r"\[N, \*event\]"):
        datasets.load_array(tmp_path / "pts.npz", "labels")  # 1-D

    np.savez(tmp_path / "two.npz", a=points, b=points)
    with pytest.raises(ValueError, match="key"):
        datasets.load_array(tmp_path / "two.npz")
    with pytest.raises(ValueError, match="key"):
        datasets.load_array(tmp_path / "two.npz", key="c")
    np.save(tmp_path / "flat.npy", np.arange(10.0))
    with pytest.raises(ValueError, match=r"\[N, \*event\]"):
        datasets.load_array(tmp_path / "flat.npy")
    np.save(tmp_path / "bad.npy", np.array([[0.0, np.nan], [1.0, 2.0], [3.0, 4.0]]))
    with pytest.raises(ValueError, match="non-finite"):
        datasets.load_array(tmp_path / "bad.npy", test_fraction=0.34)
    with pytest.raises(ValueError, match="path"):
        datasets.load_array(tmp_path / "missing.npy")
    (tmp_path / "x.csv").write_text("1,2\n")
    with pytest.raises(ValueError, match=".npy or .npz"):
        datasets.load_array(tmp_path / "x.csv")


# --------------------------------------------------------------------------------------
# Training loops


def _fit(backend, method, steps, hidden=(16, 16), seed=0, batch_size=64, lr=5e-3, **options):
    """Fit an MLP energy on the mixture with ``backend``; returns the fit and a check that
    the caller's initial model / parameters were left untouched."""
    data = datasets.mixture_dataset(n_train=2000, n_test=500)
    quadratic = 0.08
    if backend == "torch":
        import torch

        from ppl_score.torch.nets import MLPEnergy, mlp_params
        from ppl_score.torch.training import fit_energy

        torch.manual_seed(seed)
        model = MLPEnergy(2, hidden, torch.nn.Softplus, quadratic)
        before = mlp_params(model)
        fit = fit_energy(
            model, data.train, method, steps=steps, batch_size=batch_size, lr=lr, seed=seed, progress=False, **options
        )
        trained = mlp_params(fit.model)
        untouched = all(np.array_equal(a, b) for pair in zip(before, mlp_params(model)) for a, b in zip(*pair))
    else:
        import functools

        import jax

        from ppl_score.jax.nets import energy_apply, energy_init
        from ppl_score.jax.training import fit_energy

        params = energy_init(jax.random.PRNGKey(seed), 2, hidden)
        before = [(np.array(w), np.array(b)) for w, b in params]
        apply_fn = functools.partial(energy_apply, quadratic=quadratic)
        fit = fit_energy(
            apply_fn,
            params,
            data.train,
            method,
            steps=steps,
            batch_size=batch_size,
            lr=lr,
            seed=seed,
            progress=False,
            **options,
        )
        trained = [(np.asarray(w), np.asarray(b)) for w, b in fit.params]
        untouched = all(np.array_equal(a, np.asarray(b)) for pair in zip(before, params) for a, b in zip(*pair))
    changed = any(not np.allclose(a, b) for pair in zip(before, trained) for a, b in zip(*pair))
    return data, fit, untouched, changed


@pytest.mark.parametrize("method", list(OBJECTIVES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_fit_energy_runs_every_method(backend, method):
    _require(backend)
    options = {k: v for k, v in {"sigma": 0.1, "eps": 0.1}.items() if k in OBJECTIVES[method].defaults}
    data, fit, untouched, changed = _fit(backend, method, steps=3, **options)
    assert fit.losses.shape == (3,) and np.isfinite(fit.losses).all()
    assert changed and untouched


@pytest.mark.parametrize("backend", BACKENDS)
def test_fit_energy_evaluators_agree_with_finite_differences(backend):
    _require(backend)
    data, fit, _, _ = _fit(backend, "ssm_vr", steps=0)
    x = data.test[:20]
    assert fit.log_prob(x).shape == (20,) and fit.score(x).shape == (20, 2) and fit.esm(x).shape == (20,)
    h = 1e-2  # the model runs in float32: a large step keeps roundoff (eps32 |l| / h) small
    fd = np.stack([(fit.log_prob(x + h * e) - fit.log_prob(x - h * e)) / (2 * h) for e in np.eye(2)], -1)
    np.testing.assert_allclose(fit.score(x), fd, rtol=1e-3, atol=1e-3)
    trace = sum((fit.score(x + h * e)[:, i] - fit.score(x - h * e)[:, i]) / (2 * h) for i, e in enumerate(np.eye(2)))
    s = fit.score(x)
    np.testing.assert_allclose(fit.esm(x), trace + 0.5 * (s * s).sum(-1), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fit_energy_reduces_fisher_divergence(backend):
    _require(backend)

    def fisher(data, fit):
        return 0.5 * np.mean(((fit.score(data.test) - data.score(data.test)) ** 2).sum(-1))

    data, untrained, _, _ = _fit(backend, "ssm_vr", steps=0, hidden=(32, 32))
    _, trained, _, _ = _fit(backend, "ssm_vr", steps=300, hidden=(32, 32), batch_size=128, lr=2e-2)
    before, after = fisher(data, untrained), fisher(data, trained)
    # the untrained model's score is ~ -0.08 x: Fisher ~ 1/2 E||s_true||^2 ~ 4
    assert after < 0.25 * before, (before, after)


def test_fit_energy_rejects_bad_arguments():
    _require("torch")
    import torch

    from ppl_score.torch.nets import MLPEnergy
    from ppl_score.torch.training import fit_energy

    model = MLPEnergy(2, (4,))
    x = np.zeros((10, 2))
    with pytest.raises(ValueError, match="method"):
        fit_energy(model, x, "nope", steps=1, progress=False)
    with pytest.raises(ValueError, match="option"):
        fit_energy(model, x, "ssm_vr", steps=1, progress=False, sigma=0.1)
    with pytest.raises(ValueError, match="steps"):
        fit_energy(model, x, steps=-1, progress=False)
    with pytest.raises(ValueError, match="lr"):
        fit_energy(model, x, steps=1, lr=0.0, progress=False)
    with pytest.raises(ValueError, match="data"):
        fit_energy(model, np.full((10, 2), np.nan), steps=1, progress=False)
    with pytest.raises(TypeError, match="model"):
        fit_energy(lambda y: y.sum(-1), x, steps=1, progress=False)

    class NaNEnergy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(2))

        def forward(self, x):
            return (x * x * self.w).sum(-1) * float("nan")

    with pytest.raises(FloatingPointError, match="non-finite by step 1"):
        fit_energy(NaNEnergy(), x, steps=2, progress=False)


def test_jax_fit_energy_rejects_bad_arguments():
    _require("jax")
    import jax
    import jax.numpy as jnp

    from ppl_score.jax.nets import energy_apply, energy_init
    from ppl_score.jax.training import fit_energy

    params = energy_init(jax.random.PRNGKey(0), 2, (4,))
    x = np.zeros((10, 2))
    with pytest.raises(ValueError, match="method"):
        fit_energy(energy_apply, params, x, "nope", steps=1, progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        fit_energy(energy_apply, params, x, batch_size=0, progress=False)
    with pytest.raises(ValueError, match="lr"):
        fit_energy(energy_apply, params, x, lr=float("inf"), progress=False)
    with pytest.raises(ValueError, match="data"):
        fit_energy(energy_apply, params, np.full((10, 2), np.inf), steps=1, progress=False)
    with pytest.raises(TypeError, match="apply_fn"):
        fit_energy(None, params, x, steps=1, progress=False)
    with pytest.raises(FloatingPointError, match="non-finite by step 1"):
        fit_energy(lambda p, y: energy_apply(p, y) * jnp.nan, params, x, steps=2, progress=False)


# --------------------------------------------------------------------------------------
# The command line


def _run_cli(argv, capsys):
    assert main(argv) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("backend", BACKENDS)
def test_demo_mixture(backend, tmp_path, capsys):
    _require(backend)
    if backend == "torch":
        import torch

        torch.set_num_threads(2)  # the demo runs with --threads 1 and must restore this
    out = _run_cli(
        [
            "demo",
            "--backend",
            backend,
            "--steps",
            "5",
            "--hidden",
            "16,16",
            "--eval-size",
            "300",
            "--no-progress",
            "--out",
            str(tmp_path),
        ],
        capsys,
    )
    assert "held-out exact score-matching loss (esm)" in out
    assert "Fisher divergence 1/2 E||s_model - s_true||^2" in out
    assert "training time" in out
    assert (tmp_path / "demo.png").read_bytes()[:8] == PNG_MAGIC
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["backend"] == backend and metrics["method"] == "ssm_vr" and metrics["n_eval"] == 300
    for key in ("heldout_esm", "fisher_divergence", "train_seconds", "heldout_loglik_grid_normalized"):
        assert math.isfinite(metrics[key]), key
    # the printed Fisher divergence is the one in metrics.json
    assert f"{metrics['fisher_divergence']:.4f}" in out
    if backend == "torch":
        assert torch.get_num_threads() == 2


def test_demo_digits(tmp_path, capsys):
    _require("torch")
    pytest.importorskip("sklearn")
    out = _run_cli(
        [
            "demo",
            "--data",
            "digits",
            "--steps",
            "2",
            "--hidden",
            "16",
            "--eval-size",
            "40",
            "--no-progress",
            "--out",
            str(tmp_path),
        ],
        capsys,
    )
    assert "held-out exact score-matching loss (esm)" in out and "Fisher" not in out
    assert "Langevin samples" in out
    assert (tmp_path / "demo.png").read_bytes()[:8] == PNG_MAGIC
    assert math.isfinite(json.loads((tmp_path / "metrics.json").read_text())["heldout_esm"])


def test_demo_user_array(tmp_path, capsys):
    _require("torch")
    path = tmp_path / "blobs.npy"
    np.save(path, np.random.default_rng(0).normal(size=(200, 2)))
    out = _run_cli(
        [
            "demo",
            "--data",
            str(path),
            "--method",
            "dsm",
            "--sigma",
            "0.2",
            "--steps",
            "2",
            "--hidden",
            "8",
            "--no-progress",
            "--out",
            str(tmp_path / "o"),
        ],
        capsys,
    )
    assert "sigma=0.2" in out and "held-out log-likelihood" in out and "Fisher" not in out
    assert (tmp_path / "o" / "demo.png").read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize(
    "argv, message",
    [
        (["demo", "--method", "nope"], "invalid choice: 'nope'"),
        (["demo", "--backend", "numpy"], "invalid choice: 'numpy'"),
        (["demo", "--sigma", "0.1"], "--sigma is not used by method 'ssm_vr'"),
        (["demo", "--method", "dsm", "--eps", "0.1"], "--eps is not used by method 'dsm'"),
        (["demo", "--steps", "0"], "positive integer"),
        (["demo", "--lr", "-1"], "number > 0"),
        (["demo", "--hidden", "128,x"], "layer widths"),
        (["demo", "--data", "/no/such/file.npy"], "--data must be"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_cli_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as err:
        main(argv)
    assert err.value.code == 2
    assert message in capsys.readouterr().err


def test_demo_modules_import_no_framework():
    code = (
        "import sys, ppl_score, ppl_score.datasets, ppl_score.demo, ppl_score.__main__; "
        "bad = [m for m in ('torch', 'jax') if m in sys.modules]; "
        "sys.exit(f'imported {bad}' if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
