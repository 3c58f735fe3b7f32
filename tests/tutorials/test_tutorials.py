"""Each tutorial in ``tutorials/`` runs end to end with ``--smoke`` (tiny sizes, a few
steps) in a fresh interpreter, prints finite numbers and writes its figure."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TUTORIALS = {
    "gaussian_graphical_model": [
        "MLE (inverse sample covariance)",
        "L1-SM (Pyro)",
        "L1-SM (NumPyro)",
        "true P (reference): KSD test (held-out, N=100): KSD^2",
        "SM (Pyro)         : KSD test (held-out, N=100): KSD^2",
        "L1-SM (Pyro)      : KSD test (held-out, N=100): KSD^2",
        "SM (NumPyro)      : KSD test (held-out, N=100): KSD^2",
        "L1-SM (NumPyro)   : KSD test (held-out, N=100): KSD^2",
    ],
    "deep_energy_2d": [
        "Pyro    : held-out log-lik",
        "NumPyro : held-out log-lik",
        "Pyro    : KSD test (held-out, N=100): KSD^2",
        "NumPyro : KSD test (held-out, N=100): KSD^2",
    ],
    "noise_conditional": [
        "annealed Langevin :",
        "plain Langevin    :",
        "KSD test at sigma 0.05 on held-out data: KSD^2",
        "digits (JAX backend)",
        "KSD test at sigma_min 0.02 (held-out digits + noise at sigma_min vs s(x, sigma_min), N=64): KSD^2",
    ],
    "generalized_bayes": [
        "closed form (generalized Bayes)",
        "NUTS on the potential (Pyro)",
        "SVI + ScoreMatching (NumPyro)",
    ],
}
# tutorials whose KSD lines are checked: how many "KSD ... p-value P" lines each prints
# at least (a p-value is parsed from each and must lie in [0, 1])
KSD_LINES = {"noise_conditional": 2, "generalized_bayes": 3}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def ksd_p_values(stdout: str) -> list[float]:
    """The p-values of the printed KSD test lines (``... KSD^2 <stat>, p-value <p>``)."""
    return [float(m) for m in re.findall(r"KSD\^2 \S+, p-value (\S+)", stdout)]


@pytest.mark.parametrize("name", sorted(TUTORIALS))
def test_tutorial_smoke(name, tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("pyro")
    pytest.importorskip("numpyro")
    pytest.importorskip("matplotlib")
    env = dict(os.environ, MPLBACKEND="Agg", PYTHONPATH=str(ROOT))
    env.setdefault("OMP_NUM_THREADS", "1")  # tiny problems: extra threads only contend
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tutorials" / f"{name}.py"), "--smoke", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    for line in TUTORIALS[name]:
        assert line in proc.stdout, proc.stdout
    assert not re.search(r"\bnan\b|\binf\b", proc.stdout, re.IGNORECASE), proc.stdout
    if name in KSD_LINES:
        p_values = ksd_p_values(proc.stdout)
        assert len(p_values) >= KSD_LINES[name], proc.stdout
        assert all(0.0 <= p <= 1.0 for p in p_values), p_values
    figure = tmp_path / f"{name}.png"
    assert f"figure: {figure}" in proc.stdout
    assert figure.read_bytes()[:8] == PNG_MAGIC and figure.stat().st_size > 10_000


@pytest.mark.parametrize("path", sorted((ROOT / "tutorials").glob("*.py")), ids=lambda p: p.stem)
def test_gallery_title_underline(path):
    """The docs gallery (Sphinx, warnings as errors) needs each tutorial's title underlined at
    least as long as the title."""
    lines = path.read_text().splitlines()
    title, underline = lines[0].lstrip('"'), lines[1]
    assert set(underline) == {"="} and len(underline) >= len(title), f"{path.name}: {title!r} / {underline!r}"
