"""``experiments/fmnist_deq.py``: ``--smoke`` on stand-in idx files gives finite rows and the
figure; the residual energy's step memory grows with depth while the DEQ's stays that of one
layer."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.idx import write_fake_fashion_mnist
from tests.helpers.scripts import load_script

pytest.importorskip("torch")
pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "experiments" / "fmnist_deq.py"


def _script():
    return load_script(SCRIPT, "fmnist_deq_under_test")


def test_fmnist_deq_smoke(tmp_path):
    data = write_fake_fashion_mnist(tmp_path / "data")
    out, figures = tmp_path / "out.json", tmp_path / "figures"
    env = dict(os.environ, PPL_SCORE_DATA=data, MPLBACKEND="Agg")
    cmd = [sys.executable, str(SCRIPT), "--smoke", "--json", str(out), "--figures", str(figures)]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    trained = [r for r in rows if r["trained"]]
    assert {r["model"] for r in trained} == {"residual", "deq"}
    for r in rows:
        keys = ("peak_mb", "test_sm", "train_ssm_vr", "step_ms") if r["trained"] else ("peak_mb",)
        for key in keys:
            assert isinstance(r[key], float) and math.isfinite(r[key]), (r["model"], r["depth"], key, r[key])
        assert r["peak_mb"] > 0
    assert (figures / "fmnist_deq.png").stat().st_size > 0
    assert "| DEQ (gamma 0.5)" in proc.stdout


def test_memory_grows_with_residual_depth_not_with_deq_iterations():
    import torch

    m = _script()
    x = torch.as_tensor(np.random.default_rng(0).uniform(size=(m.BATCH, 16)), dtype=torch.float32)
    cfg = dict(width=16, deq_max_iter=60)

    def mb(kind, depth=0, gamma=None):
        return m.torch_step_bytes(m.torch_model(kind, depth, gamma, 16, cfg, 0), x, 0) / m.MB

    shallow, deep = mb("residual", 1), mb("residual", 4)
    # each block adds at least the [B, width] activations its ssm_vr graphs keep
    assert deep > shallow + 3 * 2 * m.BATCH * 16 * 4 / m.MB
    # gamma 0.9 takes several times gamma 0.5's iterations; the implicit backward keeps none
    fast, slow = mb("deq", gamma=0.5), mb("deq", gamma=0.9)
    assert slow <= 1.1 * fast
    assert slow < deep
