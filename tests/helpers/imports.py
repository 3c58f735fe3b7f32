"""Running code in a fresh interpreter for the import-hygiene tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import ppl_score

# the directory holding the ppl_score under test (the repository root for a source checkout)
ROOT = Path(ppl_score.__file__).resolve().parents[1]


def _run(code: str) -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
