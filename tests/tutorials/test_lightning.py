"""``tutorials/lightning_ddp.py`` with ``--smoke``: ``ScoreMatching`` inside a LightningModule,
trained by Lightning's default DDP strategy on two CPU processes (skipped without Lightning,
which is not a dependency of the library)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.distributed
def test_lightning_ddp_smoke(tmp_path):
    pytest.importorskip("lightning")
    pytest.importorskip("pyro")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tutorials" / "lightning_ddp.py"), "--smoke", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Lightning DDP, 2 processes" in proc.stdout, proc.stdout
    assert "replicas equal after training: True" in proc.stdout, proc.stdout
    before, after = map(float, re.search(r"before (\S+), after (\S+)", proc.stdout).groups())
    assert after < before  # a few steps of ssm_vr already lower the held-out esm loss
    # the KSD test of held-out data against the trained energy: a p-value in [0, 1]
    match = re.search(r"KSD test \(held-out, N=100\): KSD\^2 (\S+), p-value (\S+)", proc.stdout)
    assert match, proc.stdout
    assert 0.0 <= float(match.group(2)) <= 1.0, proc.stdout


def test_lightning_tutorial_without_lightning():
    """Without Lightning the script says so and exits cleanly (how CI and the docs see it)."""
    code = (
        "import sys, runpy; sys.modules['lightning'] = None; sys.argv = ['x', '--smoke']; "
        f"runpy.run_path({str(ROOT / 'tutorials' / 'lightning_ddp.py')!r}, run_name='__main__')"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Lightning is not installed" in proc.stdout
