"""``experiments/fmnist_wae.py --smoke`` on stand-in idx files, with each front end (Pyro, and
NumPyro by ``--frontend numpyro``): every regularizer's row has finite metrics, and the figure
is written."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.idx import write_fake_fashion_mnist

pytest.importorskip("torch")
pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "experiments" / "fmnist_wae.py"
METRICS = ("reconstruction", "sample_mmd", "code_mmd", "fd")


# the front end, the modules it needs, and the figure's name
FRONTENDS = {
    "pyro": (("pyro",), "fmnist_wae.png"),
    "numpyro": (("jax", "numpyro", "optax"), "fmnist_wae_numpyro.png"),
}


@pytest.mark.parametrize("frontend", list(FRONTENDS))
def test_fmnist_wae_smoke(tmp_path, frontend):
    modules, figure = FRONTENDS[frontend]
    for module in modules:
        pytest.importorskip(module)
    data = write_fake_fashion_mnist(tmp_path / "data")
    out, figures = tmp_path / "out.json", tmp_path / "figures"
    env = dict(os.environ, PPL_SCORE_DATA=data, MPLBACKEND="Agg")
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--smoke",
        "--frontend",
        frontend,
        "--json",
        str(out),
        "--figures",
        str(figures),
    ]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["frontend"] == frontend
    assert [r["regularizer"] for r in result["rows"]] == ["score (learned, ssm_vr)", "score (Stein)", "mmd (IMQ)"]
    for row in result["rows"]:
        for key in METRICS:
            assert isinstance(row[key], float) and math.isfinite(row[key]), (row["regularizer"], key, row[key])
    assert (figures / figure).stat().st_size > 0
    assert result["figure"] == str(figures / figure)
    assert "| score (Stein)" in proc.stdout
