"""``tutorials/calibrated_bayes.py --smoke`` runs end to end."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_tutorial_smoke(tmp_path, capsys):
    """``tutorials/calibrated_bayes.py --smoke`` in this process (the frameworks are loaded
    already): it prints finite numbers and writes its figure."""
    for name in ("torch", "pyro", "numpyro", "matplotlib", "scipy"):
        pytest.importorskip(name)
    import importlib.util
    import re
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "tutorials" / "calibrated_bayes.py"
    spec = importlib.util.spec_from_file_location("calibrated_bayes_tutorial", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    report = module.main(["--smoke", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    for line in (
        "exact Bayes (conjugate Gamma posterior)",
        "Pyro: SVI, calibrated beta",
        "NumPyro: SVI, beta = 1",
        "calibrated  ",
    ):
        assert line in out, out
    assert not re.search(r"\bnan\b|\binf\b", out, re.IGNORECASE), out
    assert report["Pyro"]["beta"] > 0 and report["NumPyro"]["beta"] > 0
    # the KSD test of held-out data, one line per front end, p-values in [0, 1]
    p_values = [
        float(p)
        for p in re.findall(
            r"(?:Pyro|NumPyro) \(theta = \S+\)\s*: KSD test \(held-out, N=50\): KSD\^2 \S+, p-value (\S+)", out
        )
    ]
    assert len(p_values) == 2, out
    assert all(0.0 <= p <= 1.0 for p in p_values), p_values
    assert all(0.0 <= report[name]["ksd_p_value"] <= 1.0 for name in ("Pyro", "NumPyro"))
    figure = tmp_path / "calibrated_bayes.png"
    assert f"figure: {figure}" in out
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and figure.stat().st_size > 10_000
