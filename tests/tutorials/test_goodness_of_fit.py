"""``tutorials/goodness_of_fit.py --smoke`` runs end to end."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_tutorial_smoke(tmp_path, capsys):
    """``tutorials/goodness_of_fit.py --smoke`` in this process (the frameworks are loaded
    already): it prints finite numbers and writes its figure."""
    for name in ("torch", "pyro", "numpyro", "matplotlib"):
        pytest.importorskip(name)
    import importlib.util
    import re
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "tutorials" / "goodness_of_fit.py"
    spec = importlib.util.spec_from_file_location("goodness_of_fit_tutorial", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    report = module.main(["--smoke", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    for line in ("quartic (Pyro)", "Gaussian (Pyro)", "quartic (NumPyro)", "Gaussian (NumPyro)", "KSD^2 (U)"):
        assert line in out, out
    assert not re.search(r"\bnan\b|\binf\b", out, re.IGNORECASE), out
    assert len(report) == 4 and all(0 < r["p_value"] <= 1 for r in report.values())
    figure = tmp_path / "goodness_of_fit.png"
    assert f"figure: {figure}" in out
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and figure.stat().st_size > 10_000
