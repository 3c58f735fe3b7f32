"""Pyro's samplers (``ppl_score.pyro.mcmc``) under faults (issue 10): grad modes of
``langevin`` and ``nuts``, and a diverged ULA chain reported before Pyro's support check."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pyro = pytest.importorskip("pyro")
import pyro.distributions as pdist  # noqa: E402

from ppl_score.pyro import mcmc as pmcmc  # noqa: E402
from tests.helpers.mcmc import _pyro_model


def _pyro_positive_model(x):
    with pyro.plate("data", x.shape[0]):
        pyro.sample("x", pdist.Gamma(2.0, 1.0).expand([2]).to_event(1), obs=x)


def test_pyro_langevin_grad_modes():
    x = torch.zeros(1, 2)
    kw = dict(num_chains=3, num_steps=3, step_size=0.3)
    a = pmcmc.langevin(_pyro_model, "x", x, generator=torch.Generator().manual_seed(0), **kw)
    with torch.no_grad():
        b = pmcmc.langevin(_pyro_model, "x", x, generator=torch.Generator().manual_seed(0), **kw)
    torch.testing.assert_close(a.samples, b.samples, rtol=0, atol=0)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="no_grad"):
        pmcmc.langevin(_pyro_model, "x", x, **kw)


def test_pyro_ula_divergence_reported_before_pyro_support_check():
    """A diverged chain on a positive site used to surface as Pyro's support-validation
    error from inside the model; the sampler reports its own step_size advice first."""
    with pytest.raises(ValueError, match="step_size") as err:
        pmcmc.langevin(
            _pyro_positive_model,
            "x",
            torch.ones(1, 2),
            num_chains=2,
            num_steps=60,
            step_size=1e3,
            adjusted=False,
            generator=torch.Generator().manual_seed(0),
        )
    assert "support" not in str(err.value)


def test_pyro_nuts_grad_modes():
    x = torch.zeros(1, 2)
    pyro.set_rng_seed(0)
    a = pmcmc.nuts(_pyro_model, "x", x, num_samples=3, warmup_steps=3)
    pyro.set_rng_seed(0)
    with torch.no_grad():
        b = pmcmc.nuts(_pyro_model, "x", x, num_samples=3, warmup_steps=3)
    torch.testing.assert_close(a.samples, b.samples, rtol=0, atol=0)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="no_grad"):
        pmcmc.nuts(_pyro_model, "x", x, num_samples=3, warmup_steps=3)
