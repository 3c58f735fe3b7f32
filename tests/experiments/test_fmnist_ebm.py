"""``experiments/fmnist_ebm.py --smoke`` runs end to end in a fresh interpreter on stand-in idx
files: every (backend, method) row with finite metrics, the ratios and the samples figure."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from tests.helpers.idx import write_fake_fashion_mnist

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
METHODS = ("dsm", "fd_dsm", "ssm", "ssm_vr", "fd_ssm")
METRICS = ("heldout_esm", "heldout_esm_stderr", "final_train_loss", "step_ms", "step_mb", "mean_logp_samples")


def test_fmnist_ebm_smoke(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("jax")
    pytest.importorskip("matplotlib")
    data = write_fake_fashion_mnist(tmp_path / "data")
    out, figures = tmp_path / "out.json", tmp_path / "figures"
    env = {
        **os.environ,
        "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "PPL_SCORE_DATA": data,
        "MPLBACKEND": "Agg",
    }
    script = os.path.join(ROOT, "experiments", "fmnist_ebm.py")
    proc = subprocess.run(
        [sys.executable, script, "--smoke", "--json", str(out), "--figures", str(figures)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| backend" in proc.stdout  # the markdown tables

    result = json.loads(out.read_text())
    rows = {(r["backend"], r["method"]): r for r in result["rows"]}
    assert set(rows) == {(b, m) for b in ("torch", "jax") for m in METHODS}
    for key, row in rows.items():
        assert "error" not in row, (key, row["error"])
        for metric in METRICS:
            assert isinstance(row[metric], float) and math.isfinite(row[metric]), (key, metric, row[metric])
        assert len(row["step_ms_passes"]) == 2 and all(math.isfinite(v) and v > 0 for v in row["step_ms_passes"])
        assert row["step_mb"] > 0
    ratios = {(q["backend"], q["ratio"]) for q in result["ratios"]}
    assert {("torch", "fd_ssm/ssm"), ("jax", "fd_dsm/dsm")} <= ratios
    assert result["config"]["space"].startswith("[0, 1]")
    assert (figures / "fmnist_ebm_samples.png").stat().st_size > 0
