"""NumPyro's samplers (``ppl_score.numpyro.mcmc``): every chain in one model call inside a
plate over chains gives the draws of the ``vmap`` fallback, and a model that does not
broadcast names ``vectorize='vmap'``."""

from __future__ import annotations

import numpy as np
import pytest

from tests.helpers.mcmc import DATA
from tests.helpers.ppl import NumPyroPPL


def test_numpyro_plate_and_vmap_chains_agree():
    """NumPyro runs every chain in one model call inside a plate over chains (as Pyro does);
    the ``vmap`` fallback gives the same draws, latents from a guide included."""
    ppl = NumPyroPPL()
    dist = ppl.dist

    def model(x):
        loc = ppl.sample("loc", dist.Normal(0.0, 10.0))
        with ppl.plate("data", x.shape[0]):
            x = ppl.sample("x", dist.Normal(loc, 1.0), obs=x)
            ppl.numpyro.factor("f", -0.1 * x**2)

    def guide(x):
        ppl.sample("loc", dist.Normal(ppl.t(2.0), ppl.t(1.0)))

    kw = dict(guide=guide, num_chains=5, num_samples=3, num_warmup=2, step_size=0.3)
    a = ppl.langevin(model, "x", ppl.t(DATA[:4, 0]), vectorize="plate", **kw)
    b = ppl.langevin(model, "x", ppl.t(DATA[:4, 0]), vectorize="vmap", **kw)
    np.testing.assert_allclose(np.asarray(a.samples), np.asarray(b.samples), rtol=1e-10)
    assert a.layout == b.layout
    with pytest.raises(ValueError, match="vectorize"):
        ppl.langevin(model, "x", ppl.t(DATA[:4, 0]), vectorize="pmap", **kw)


def test_numpyro_model_that_does_not_broadcast_needs_vmap():
    """A model mixing a latent with data by plain arithmetic (``x + loc`` with ``loc`` of
    shape [C, 1] under the plate of chains) fails in the plate with a hint naming
    ``vectorize='vmap'``, and runs with it."""
    ppl = NumPyroPPL()
    dist = ppl.dist

    def model(x):
        loc = ppl.sample("loc", dist.Normal(0.0, 1.0))
        with ppl.plate("data", x.shape[0]):
            y = ppl.sample("x", dist.Normal(0.0, 1.0).expand([2]).to_event(1), obs=x)
            ppl.sample("z", dist.Normal(y, 1.0).to_event(1), obs=x + loc)

    def guide(x):
        ppl.sample("loc", dist.Normal(ppl.t(0.3), ppl.t(0.1)))

    kw = dict(guide=guide, num_chains=3, num_samples=2, num_warmup=0, step_size=0.1)
    with pytest.raises(TypeError) as err:
        ppl.langevin(model, "x", ppl.t(DATA[:4]), **kw)
    assert "vectorize='vmap'" in " ".join(getattr(err.value, "__notes__", []))
    out = ppl.langevin(model, "x", ppl.t(DATA[:4]), vectorize="vmap", **kw)
    assert tuple(out.samples.shape) == (2, 3, 4, 2)
