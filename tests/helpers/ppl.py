"""PPL adapters: one interface over Pyro and NumPyro (``t``, ``plate``, ``sample``, the
samplers, ``ScoreMatching("esm")``), so one test body runs in both front ends. Used by the
``ppl`` fixture of ``tests/conformance/conftest.py`` and directly by NumPyro-only tests."""

from __future__ import annotations

import numpy as np
import pytest


class PyroPPL:
    name = "pyro"

    def __init__(self):
        self.torch = pytest.importorskip("torch")
        pytest.importorskip("pyro")
        import pyro
        import pyro.distributions as dist

        import ppl_score.pyro as pp

        self.pyro, self.dist, self.pp = pyro, dist, pp
        self.Unnormalized = pp.Unnormalized

    def t(self, a):
        return self.torch.as_tensor(np.asarray(a, dtype=np.float64))

    def np(self, a):
        return np.asarray(a)

    def plate(self, name, size, dim=None, subsample_size=None):
        return self.pyro.plate(name, size, dim=dim, subsample_size=subsample_size)

    def sample(self, name, fn, obs=None):
        return self.pyro.sample(name, fn, obs=obs)

    def sq(self, v, mu):
        return -0.5 * ((v - mu) ** 2).sum(-1)

    def esm_loss(self, model, guide, *args):
        self.pyro.clear_param_store()
        return self.pp.ScoreMatching("esm").loss(model, guide, *args)

    def langevin(self, model, site, *args, seed=0, **kw):
        self.pyro.set_rng_seed(seed)
        return self.pp.langevin(model, site, *args, generator=self.torch.Generator().manual_seed(seed), **kw)

    def nuts(self, model, site, *args, seed=0, **kw):
        self.pyro.set_rng_seed(seed)
        return self.pp.nuts(model, site, *args, **kw)

    def density(self, model, site, *args, **kw):
        return self.pp.site_log_density(model, site, *args, **kw)


class NumPyroPPL:
    name = "numpyro"

    def __init__(self):
        self.jax = pytest.importorskip("jax")
        pytest.importorskip("numpyro")
        import jax.numpy as jnp
        import numpyro
        import numpyro.distributions as dist

        import ppl_score.numpyro as pn

        self.jnp, self.numpyro, self.dist, self.pn = jnp, numpyro, dist, pn
        self.Unnormalized = pn.Unnormalized

    def t(self, a):
        return self.jnp.asarray(np.asarray(a, dtype=np.float64))

    def np(self, a):
        return np.asarray(a)

    def plate(self, name, size, dim=None, subsample_size=None):
        return self.numpyro.plate(name, size, dim=dim, subsample_size=subsample_size)

    def sample(self, name, fn, obs=None):
        return self.numpyro.sample(name, fn, obs=obs)

    def sq(self, v, mu):
        return -0.5 * ((v - mu) ** 2).sum(-1)

    def esm_loss(self, model, guide, *args):
        return self.pn.ScoreMatching("esm").loss(self.jax.random.PRNGKey(0), {}, model, guide, *args)

    def langevin(self, model, site, *args, seed=0, **kw):
        return self.pn.langevin(model, site, *args, key=self.jax.random.PRNGKey(seed), **kw)

    def nuts(self, model, site, *args, seed=0, **kw):
        return self.pn.nuts(model, site, *args, key=self.jax.random.PRNGKey(seed), **kw)

    def density(self, model, site, *args, **kw):
        return self.pn.site_log_density(model, site, *args, **kw)
