"""``tutorials/relative_gradient.py --smoke`` runs end to end in a fresh interpreter, as CI runs it."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_tutorial_smoke(tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "MPLBACKEND": "Agg"}
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tutorials", "relative_gradient.py"), "--smoke", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "relgrad_scaling.png").stat().st_size > 0
    table = (tmp_path / "relgrad_density.md").read_text()
    assert "mle_relgrad" in table and "ssm_vr" in table
    # the KSD test of each fit, (2) Pyro, (3) NumPyro, (4) ssm_vr, on held-out data: p-values in [0, 1]
    p_values = re.findall(r"KSD test \(held-out, N=100\): KSD\^2 \S+, p-value (\S+)", proc.stdout)
    assert len(p_values) == 3, proc.stdout
    assert all(0.0 <= float(p) <= 1.0 for p in p_values), p_values
