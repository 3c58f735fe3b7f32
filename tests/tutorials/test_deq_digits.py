"""``tutorials/deq_digits.py --smoke`` runs end to end in a fresh interpreter."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_tutorial_smoke(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("sklearn")
    script = os.path.join(ROOT, "tutorials", "deq_digits.py")
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "MPLBACKEND": "Agg"}
    proc = subprocess.run(
        [sys.executable, script, "--smoke", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "held-out exact SM loss" in proc.stdout, proc.stdout
    # the KSD test of the fitted energy on the 32 held-out points of --smoke
    ksd = re.search(r"KSD test \(held-out, N=32\): KSD\^2 (\S+), p-value (\S+)", proc.stdout)
    assert ksd, proc.stdout
    statistic, p_value = float(ksd.group(1)), float(ksd.group(2))
    assert math.isfinite(statistic) and 0.0 < p_value <= 1.0, proc.stdout
    assert "reference, the Gaussian with the training digits' mean and covariance" in proc.stdout, proc.stdout
