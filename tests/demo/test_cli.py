"""The demo's command line (``python -m ppl_score demo``, ``ppl_score.demo.cli``)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from ppl_score.__main__ import main
from tests.helpers.demo import BACKENDS, _require

pytestmark = pytest.mark.usefixtures("one_torch_thread")


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


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
        "import sys, ppl_score, ppl_score.demo.datasets, ppl_score.demo, ppl_score.__main__; "
        "bad = [m for m in ('torch', 'jax') if m in sys.modules]; "
        "sys.exit(f'imported {bad}' if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
