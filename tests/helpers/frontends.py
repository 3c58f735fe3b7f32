"""The same models in both PPLs for the front-end fault tests, selected by ``ppl``
(``tests/{conformance,parity,pyro,numpyro}/test_frontend_faults.py``)."""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pyro = pytest.importorskip("pyro")
jax = pytest.importorskip("jax")
numpyro = pytest.importorskip("numpyro")
import jax.numpy as jnp  # noqa: E402
import numpyro.distributions as ndist  # noqa: E402
import pyro.distributions as pdist  # noqa: E402
from numpyro import handlers  # noqa: E402
from pyro import poutine  # noqa: E402

from ppl_score.numpyro import ScoreMatching as NSM  # noqa: E402
from ppl_score.numpyro import Unnormalized as NUnnormalized  # noqa: E402
from ppl_score.pyro import ScoreMatching as PSM  # noqa: E402
from ppl_score.pyro import Unnormalized as PUnnormalized  # noqa: E402
from tests.helpers.shared import _torch_save_load, empty_guide  # noqa: E402

F64 = torch.float64
KEY = jax.random.PRNGKey(0)
X = np.random.default_rng(0).normal(size=(6, 2))


def quadratic(y):
    """A module-level log density (picklable, unlike a lambda)."""
    return -0.5 * (y**2).sum(-1)


# --- the same models in both PPLs, selected by `ppl` ------------------------------------


def _pyro_model(kind):
    mask = torch.tensor([True, False, True])  # the plate has 6 data points

    def model(x):
        with pyro.plate("data", x.shape[0]):
            if kind == "plain":
                pyro.sample("obs", pdist.Normal(torch.zeros(2, dtype=F64), 1.0).to_event(1), obs=x)
            elif kind == "unnormalized_3":
                pyro.sample("obs", PUnnormalized(quadratic, (3,)), obs=x)
            elif kind == "handler_mask":
                with poutine.mask(mask=mask):
                    pyro.sample("obs", pdist.Normal(torch.zeros(2, dtype=F64), 1.0).to_event(1), obs=x)
            elif kind == "fn_mask":
                d = pdist.Normal(torch.zeros(2, dtype=F64), 1.0).to_event(1).mask(mask)
                pyro.sample("obs", d, obs=x)
            elif kind == "obs_mask":
                d = pdist.Normal(torch.zeros(2, dtype=F64), 1.0).to_event(1)
                pyro.sample("obs", d, obs=x, obs_mask=mask)
            elif kind == "gamma":
                pyro.sample("obs", pdist.Gamma(torch.tensor(2.0, dtype=F64), 1.0).expand([2]).to_event(1), obs=x)

    return model


def _numpyro_model(kind):
    mask = jnp.array([True, False, True])

    def model(x):
        with numpyro.plate("data", x.shape[0]):
            if kind == "plain":
                numpyro.sample("obs", ndist.Normal(jnp.zeros(2), 1.0).to_event(1), obs=x)
            elif kind == "unnormalized_3":
                numpyro.sample("obs", NUnnormalized(quadratic, (3,)), obs=x)
            elif kind == "handler_mask":
                with handlers.mask(mask=mask):
                    numpyro.sample("obs", ndist.Normal(jnp.zeros(2), 1.0).to_event(1), obs=x)
            elif kind == "fn_mask":
                numpyro.sample("obs", ndist.Normal(jnp.zeros(2), 1.0).to_event(1).mask(mask), obs=x)
            elif kind == "obs_mask":
                numpyro.sample("obs", ndist.Normal(jnp.zeros(2), 1.0).to_event(1), obs=x, obs_mask=mask)
            elif kind == "gamma":
                numpyro.sample("obs", ndist.Gamma(2.0, 1.0).expand([2]).to_event(1), obs=x)

    return model


def _loss(ppl, kind, x, method="esm"):
    if ppl == "pyro":
        return PSM(method).loss(_pyro_model(kind), empty_guide, torch.as_tensor(x, dtype=F64))
    return NSM(method).loss(KEY, {}, _numpyro_model(kind), empty_guide, jnp.asarray(x))


def _error(ppl, kind, x, exc=ValueError):
    with pytest.raises(exc) as info:
        _loss(ppl, kind, x)
    return str(info.value)


# ---------------------------------------------------------------------------------------
# Item 3: a non-finite loss warns, naming the method and the site
# ---------------------------------------------------------------------------------------


def nan_density(y):
    return jnp.nan * (y**2).sum(-1) if isinstance(y, jax.Array) else torch.nan * (y**2).sum(-1)


def _nan_model(ppl):
    if ppl == "pyro":

        def model(x):
            with pyro.plate("data", x.shape[0]):
                pyro.sample("obs", PUnnormalized(nan_density, (2,)), obs=x)

    else:

        def model(x):
            with numpyro.plate("data", x.shape[0]):
                numpyro.sample("obs", NUnnormalized(nan_density, (2,)), obs=x)

    return model


ROUNDTRIPS = {
    "pickle": lambda o: pickle.loads(pickle.dumps(o)),
    "deepcopy": copy.deepcopy,
    "torch.save": _torch_save_load,
}
