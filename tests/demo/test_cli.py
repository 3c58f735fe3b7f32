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
from tests.helpers.idx import write_fake_fashion_mnist

pytestmark = pytest.mark.usefixtures("one_torch_thread")


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _has_fashion_mnist() -> bool:
    from ppl_score.datasets import find_idx_dir

    try:
        return bool(find_idx_dir(split="train") and find_idx_dir(split="test"))
    except FileNotFoundError:
        return False


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
    for key in ("heldout_esm", "fisher_divergence", "train_seconds", "heldout_loglik_grid_normalized", "ksd"):
        assert math.isfinite(metrics[key]), key
    assert 0 < metrics["ksd_p_value"] <= 1 and metrics["ksd_points"] == 300
    assert "kernel Stein discrepancy test (IMQ, 300 held-out points" in out
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


def _fashion_argv(tmp_path, *extra):
    return [
        "demo",
        "--data",
        "fashion-mnist",
        "--steps",
        "2",
        "--hidden",
        "16",
        "--eval-size",
        "8",
        "--no-progress",
        "--out",
        str(tmp_path / "out"),
        *extra,
    ]


def test_demo_fashion_mnist_on_stand_in_files(tmp_path, monkeypatch, capsys):
    # small idx files with the real names, found through $PPL_SCORE_DATA: runs without the data
    _require("torch")
    monkeypatch.setenv("PPL_SCORE_DATA", write_fake_fashion_mnist(tmp_path / "data", n_train=40, n_test=12))
    out = _run_cli(_fashion_argv(tmp_path, "--max-examples", "30"), capsys)
    assert "data: fashion-mnist, event shape (784,) (D=784), 30 train / 8 held-out" in out
    assert "Langevin samples" in out
    assert (tmp_path / "out" / "demo.png").read_bytes()[:8] == PNG_MAGIC
    assert math.isfinite(json.loads((tmp_path / "out" / "metrics.json").read_text())["heldout_esm"])


@pytest.mark.skipif(not _has_fashion_mnist(), reason="Fashion-MNIST is not installed (`make data`)")
@pytest.mark.parametrize("backend", BACKENDS)
def test_demo_fashion_mnist_real(backend, tmp_path, capsys):
    _require(backend)
    out = _run_cli(_fashion_argv(tmp_path, "--backend", backend, "--max-examples", "300"), capsys)
    assert "data: fashion-mnist, event shape (784,) (D=784), 300 train / 8 held-out" in out
    assert math.isfinite(json.loads((tmp_path / "out" / "metrics.json").read_text())["heldout_esm"])


def test_demo_fashion_mnist_missing_says_how_to_get_it(tmp_path, monkeypatch, capsys):
    import ppl_score.datasets as ds

    monkeypatch.delenv("PPL_SCORE_DATA", raising=False)
    monkeypatch.setattr(ds, "DEBIAN_FASHION_MNIST", str(tmp_path / "none"))
    with pytest.raises(SystemExit) as err:
        main(["demo", "--data", "fashion-mnist"])
    assert err.value.code == 2
    message = capsys.readouterr().err
    assert "--data fashion-mnist" in message and "make data" in message and "dataset-fashion-mnist" in message


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
        (["demo", "--data", "digits", "--max-examples", "10"], "--max-examples applies to"),
        (["demo", "--max-examples", "0"], "positive integer"),
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
