"""The score-estimation, implicit-VAE and WAE tutorials run end to end with ``--smoke`` in a
fresh interpreter, print their markdown table with finite numbers and write their figure."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TUTORIALS = {
    "score_estimation": [
        "| learned (ssm_vr) |",
        "| learned (fd_ssm) |",
        "| learned (dsm, sigma=0.1) |",
        "| Stein (eta=0.1) |",
        "| SSGE (99% spectrum) |",
    ],
    "implicit_vae": [
        "| Gaussian encoder, Trace_ELBO |",
        "| implicit, learned (ssm_vr) |",
        "| implicit, Stein |",
        "| implicit, SSGE |",
    ],
    "wae_digits": ["| score (learned, ssm_vr) |", "| score (Stein) |", "| mmd (IMQ) |"],
}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NUMBER = re.compile(r"-?\d+\.\d+")


@pytest.mark.parametrize("name", sorted(TUTORIALS))
def test_tutorial_smoke(name, tmp_path):
    for mod in ("jax", "numpyro", "optax", "matplotlib", "sklearn"):
        pytest.importorskip(mod)
    env = dict(os.environ, MPLBACKEND="Agg", PYTHONPATH=str(ROOT))
    env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tutorials" / f"{name}.py"), "--smoke", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stdout
    assert not re.search(r"\bnan\b|\binf\b", out, re.IGNORECASE), out
    for row in TUTORIALS[name]:
        line = next((ln for ln in out.splitlines() if ln.startswith(row)), None)
        assert line is not None, out
        assert NUMBER.search(line), line  # the row carries numbers
    figure = tmp_path / f"{name}.png"
    assert f"figure: {figure}" in out
    assert figure.read_bytes()[:8] == PNG_MAGIC and figure.stat().st_size > 10_000
    assert (tmp_path / f"{name}.json").stat().st_size > 0
