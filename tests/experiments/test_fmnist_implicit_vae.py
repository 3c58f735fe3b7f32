"""experiments/fmnist_implicit_vae.py: the smoke run on stand-in idx files with each front end
(Pyro, and NumPyro by ``--frontend numpyro``: trained in JAX, scored by the same torch AIS), and
its AIS estimator on a linear-Gaussian model whose marginal likelihood is known in closed form."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.idx import write_fake_fashion_mnist
from tests.helpers.scripts import load_script

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "experiments" / "fmnist_implicit_vae.py"


def _load_script():
    return load_script(SCRIPT, "fmnist_implicit_vae")


def test_ais_linear_gaussian():
    """AIS recovers log N(x; b, W W^T + s^2 I) of x = W z + b + s e, z ~ N(0, I_2): mean error
    under 0.1 nats, each image within 0.35 (it converges to the exact value; here 1000
    temperatures and 64 chains, about 2 s)."""
    torch = pytest.importorskip("torch")
    ais_log_px = _load_script().ais_log_px
    gen = torch.Generator().manual_seed(0)
    d, obs, s = 2, 5, 0.3  # a posterior much narrower than the prior
    w = torch.randn(obs, d, generator=gen, dtype=torch.float64)
    b = torch.randn(obs, generator=gen, dtype=torch.float64)
    x = torch.randn(12, d, generator=gen, dtype=torch.float64) @ w.T + b
    x = x + s * torch.randn(x.shape, generator=gen, dtype=torch.float64)
    exact = torch.distributions.MultivariateNormal(b, w @ w.T + s**2 * torch.eye(obs)).log_prob(x)

    def log_lik(z, xb):
        r = (xb - z @ w.T - b) / s
        return -0.5 * (r * r).sum(-1) - obs * math.log(s) - 0.5 * obs * math.log(2 * math.pi)

    est, acc = ais_log_px(log_lik, x, latent_dim=d, chains=64, temps=1000, leapfrog=3, generator=gen)
    assert est.shape == (12,)
    assert 0.5 < acc < 0.8  # adapted towards 0.65
    err = est - exact
    assert err.mean().abs() < 0.1 and err.abs().max() < 0.35, err.tolist()
    # with one temperature step (plain importance sampling from the prior) it is far worse
    crude, _ = ais_log_px(log_lik, x, latent_dim=d, chains=32, temps=2, leapfrog=1, generator=gen)
    assert (crude - exact).mean() < -1.0 and (crude - exact).abs().mean() > 5 * err.abs().mean()


# the front end, the modules it needs (torch for the AIS in both), and the figure's name
FRONTENDS = {
    "pyro": (("pyro",), "fmnist_implicit_vae.png"),
    "numpyro": (("jax", "numpyro", "optax"), "fmnist_implicit_vae_numpyro.png"),
}


@pytest.mark.parametrize("frontend", list(FRONTENDS))
def test_smoke_run(tmp_path, frontend):
    modules, figure = FRONTENDS[frontend]
    for module in ("torch", "matplotlib", *modules):
        pytest.importorskip(module)
    data = write_fake_fashion_mnist(tmp_path / "data")
    out, figs = tmp_path / "out.json", tmp_path / "figs"
    env = {**os.environ, "PPL_SCORE_DATA": data, "MPLBACKEND": "Agg"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--frontend", frontend, "--json", str(out), "--figures", str(figs)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["config"]["frontend"] == frontend
    assert set(result["summary"]) == {"gaussian", "implicit_ssm_vr", "implicit_stein"}
    for kind, rows in result["runs"].items():
        assert len(rows) == result["config"]["seeds"] >= 2
        for r in rows:
            assert r["nll"] is not None and math.isfinite(r["nll"]), kind
        s = result["summary"][kind]
        assert math.isfinite(s["nll_mean"]) and math.isfinite(s["nll_se"]), kind
    gaussian = result["summary"]["gaussian"]
    assert math.isfinite(gaussian["elbo_mean"]) and gaussian["iwae_mean"] >= gaussian["elbo_mean"] - 1e-6
    assert (figs / figure).is_file() and result["figure"] == str(figs / figure)
    assert "| encoder / loss" in proc.stdout
