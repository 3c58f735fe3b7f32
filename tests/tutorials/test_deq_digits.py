"""``tutorials/deq_digits.py --smoke`` runs end to end in a fresh interpreter."""

from __future__ import annotations

import os
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
    assert "held-out" in proc.stdout
