"""Every experiment script, run without the data, ends with the loader's message (where it
looked, how to get the data) and exit status 2, as argparse's ``parser.error`` does: no
``FileNotFoundError`` traceback (``experiments/_common.load_images``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ("fmnist_ebm.py", "fmnist_wae.py", "fmnist_implicit_vae.py", "fmnist_deq.py")


@pytest.mark.parametrize("script", SCRIPTS)
def test_missing_data_exits_with_the_loaders_message(tmp_path, script):
    # an explicit --data DIR is the only place the loader looks (no $PPL_SCORE_DATA, no
    # Debian package fallback), so this holds on a machine with the data installed too
    missing, out = tmp_path / "missing", tmp_path / "out.json"
    env = {k: v for k, v in os.environ.items() if k != "PPL_SCORE_DATA"}
    env["MPLBACKEND"] = "Agg"
    cmd = [sys.executable, str(ROOT / "experiments" / script), "--smoke", "--data", str(missing)]
    cmd += ["--json", str(out), "--figures", str(tmp_path / "figures")]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.startswith(f"{script}: error: fashion-mnist 'train' split not found"), proc.stderr
    for needed in (repr(str(missing)), "make data", "dataset-fashion-mnist", "PPL_SCORE_DATA"):
        assert needed in proc.stderr, (needed, proc.stderr)
    assert not out.exists()
