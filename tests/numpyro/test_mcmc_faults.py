"""NumPyro's samplers check their ``key`` argument (issue 10, item 14)."""

from __future__ import annotations

import pytest

jax = pytest.importorskip("jax")
numpyro = pytest.importorskip("numpyro")
import jax.numpy as jnp  # noqa: E402


@pytest.mark.parametrize("bad, exc", [(0, TypeError), ("batch", ValueError)])
def test_numpyro_samplers_check_key(bad, exc):
    import numpyro
    import numpyro.distributions as dist

    from ppl_score import numpyro as pnp

    def model(y):
        numpyro.sample("y", dist.Normal(0.0, 1.0), obs=y)

    if bad == "batch":
        bad = jax.random.split(jax.random.key(0), 2)
    y = jnp.zeros(())
    with pytest.raises(exc, match="argument 'key'"):
        pnp.langevin(model, "y", y, num_chains=2, num_steps=2, step_size=0.1, key=bad)
    with pytest.raises(exc, match="argument 'key'"):
        pnp.nuts(model, "y", y, num_samples=2, num_warmup=2, key=bad)
