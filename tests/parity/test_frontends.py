"""The Pyro and the NumPyro ``ScoreMatching`` give the same value on the same model and data.

Each model is written once against a small namespace ``F`` (the PPL module, its
distributions, its handlers) and run through both front ends in float64. The methods are
deterministic here: ``esm`` always, and ``ssm``, ``ssm_vr``, ``fd_ssm`` on a one-dimensional
quadratic log density (a Rademacher ``v`` or a unit direction has ``v^2 = 1``, and central
differences are exact for a quadratic), so the values must agree to round-off.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pyro = pytest.importorskip("pyro")
jax = pytest.importorskip("jax")
numpyro = pytest.importorskip("numpyro")
import jax.numpy as jnp  # noqa: E402
import numpyro.distributions as ndist  # noqa: E402
import pyro.distributions as pdist  # noqa: E402
from jax import random  # noqa: E402
from numpyro import handlers  # noqa: E402
from pyro import poutine  # noqa: E402

import ppl_score.numpyro as snp  # noqa: E402
import ppl_score.pyro as spy  # noqa: E402
from ppl_score.jax.nets import energy_apply  # noqa: E402
from ppl_score.torch.nets import MLPEnergy, mlp_params  # noqa: E402
from tests.helpers.shared import empty_guide

pytestmark = pytest.mark.usefixtures("one_torch_thread")


RTOL = 1e-10


def _pyro_ns():
    const = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float64)  # noqa: E731

    def loss(elbo, model, guide, *args, params=None, subsample=None):
        pyro.clear_param_store()
        for name, value in (params or {}).items():
            pyro.param(name, const(value))
        return elbo.loss(model, guide, *(const(a) for a in args))

    return SimpleNamespace(
        name="pyro",
        ppl=pyro,
        dist=pdist,
        const=const,
        log=torch.log,
        mask=lambda m: poutine.mask(mask=torch.as_tensor(m)),
        plate=lambda name, n, idx=None: pyro.plate(name, n, subsample=None if idx is None else torch.as_tensor(idx)),
        SM=spy.ScoreMatching,
        Unnormalized=spy.Unnormalized,
        loss=loss,
    )


def _numpyro_ns():
    const = lambda a: jnp.asarray(np.asarray(a), dtype=jnp.float64)  # noqa: E731

    def loss(elbo, model, guide, *args, params=None, subsample=None):
        if subsample is not None:
            model = handlers.substitute(model, data={k: jnp.asarray(v) for k, v in subsample.items()})
        fn = jax.jit(lambda p, *a: elbo.loss(random.PRNGKey(0), p, model, guide, *a))
        return float(fn({k: const(v) for k, v in (params or {}).items()}, *(const(a) for a in args)))

    return SimpleNamespace(
        name="numpyro",
        ppl=numpyro,
        dist=ndist,
        const=const,
        log=jnp.log,
        mask=lambda m: handlers.mask(mask=np.asarray(m)),
        plate=lambda name, n, idx=None: numpyro.plate(name, n, subsample_size=None if idx is None else len(idx)),
        SM=snp.ScoreMatching,
        Unnormalized=snp.Unnormalized,
        loss=loss,
    )


FRONTENDS = (_pyro_ns(), _numpyro_ns())


def both(case, *args, **kwargs):
    """``case(F)`` returns ``(elbo, model, guide)``; its loss in each front end."""
    return [F.loss(*case(F), *args, **kwargs) for F in FRONTENDS]


def test_mvn_esm(rng):
    d = 3
    a = rng.normal(size=(d, d))
    prec, mu, x = a @ a.T / d + 0.5 * np.eye(d), rng.normal(size=d), rng.normal(size=(20, d))

    def case(F):
        def model(x):
            with F.plate("data", x.shape[0]):
                F.ppl.sample("x", F.dist.MultivariateNormal(F.const(mu), precision_matrix=F.const(prec)), obs=x)

        return F.SM("esm", beta=0.7), model, empty_guide

    r = (x - mu) @ prec
    expected = 0.7 * (-np.trace(prec) + 0.5 * (r * r).sum(-1)).sum()
    v_pyro, v_numpyro = both(case, x)
    assert v_pyro == pytest.approx(expected, rel=RTOL)
    assert v_numpyro == pytest.approx(v_pyro, rel=RTOL)


@pytest.mark.parametrize("method", ["esm", "ssm", "ssm_vr", "fd_ssm"])
def test_deterministic_methods_in_one_dimension(rng, method):
    x = rng.normal(size=15)

    def case(F):
        def model(x):
            with F.plate("data", x.shape[0]):
                F.ppl.sample("x", F.dist.Normal(F.const(0.3), F.const(1.7)), obs=x)

        opts = {"n_projections": 3, "eps": 0.7} if method == "fd_ssm" else {}
        return F.SM(method, **opts), model, empty_guide

    v_pyro, v_numpyro = both(case, x)
    prec = 1 / 1.7**2
    assert v_pyro == pytest.approx((-prec + 0.5 * (prec * (x - 0.3)) ** 2).sum(), rel=1e-9)
    assert v_numpyro == pytest.approx(v_pyro, rel=1e-9)


def test_subsample_mask_and_positive_support(rng):
    x = rng.gamma(2.0, 0.7, size=12)
    idx = np.array([0, 2, 5, 6, 9, 11])
    keep = np.array([True, False, True, True, False, True])

    def case(F):
        def model(x):
            with F.plate("data", 12, idx) as i:
                with F.mask(keep):
                    F.ppl.sample("x", F.dist.Gamma(F.const(2.5), F.const(1.5)), obs=x[i])

        return F.SM("esm"), model, empty_guide

    v_pyro, v_numpyro = both(case, x, subsample={"data": idx})
    xs = x[idx][keep]
    assert v_pyro == pytest.approx(12 / 6 * (-1.5 * xs + 0.5 * (2.5 - 1.5 * xs) ** 2).sum(), rel=RTOL)
    assert v_numpyro == pytest.approx(v_pyro, rel=RTOL)


def test_simplex_and_interval_sites_matched_jointly(rng):
    """Same bijections (stick-breaking, sigmoid) in torch and NumPyro."""
    p = rng.dirichlet([2.0, 3.0, 4.0], size=10)
    q = rng.beta(2.0, 3.0, size=10)

    def case(F):
        def model(p, q):
            with F.plate("data", 10):
                F.ppl.sample("p", F.dist.Dirichlet(F.const([2.0, 3.0, 4.0])), obs=p)
                F.ppl.sample("q", F.dist.Beta(F.const(2.0), F.const(3.0)), obs=q)

        return F.SM("esm"), model, empty_guide

    v_pyro, v_numpyro = both(case, p, q)
    assert math.isfinite(v_pyro)
    assert v_numpyro == pytest.approx(v_pyro, rel=RTOL)


def test_mlp_energy_with_the_same_weights(rng):
    torch.manual_seed(0)
    energy = MLPEnergy(4, hidden=(16, 16), quadratic=0.5).double()
    weights = [tuple(None if a is None else jnp.asarray(a) for a in layer) for layer in mlp_params(energy)]
    x = rng.normal(size=(10, 4))

    def case(F):
        fn = energy if F.name == "pyro" else (lambda y: energy_apply(weights, y, quadratic=0.5))

        def model(x):
            with F.plate("data", x.shape[0]):
                F.ppl.sample("x", F.Unnormalized(fn, (4,)), obs=x)

        return F.SM("esm"), model, empty_guide

    v_pyro, v_numpyro = both(case, x)
    assert v_numpyro == pytest.approx(v_pyro, rel=1e-9)


def test_generalized_bayes_with_a_point_guide_and_a_factor(rng):
    x = rng.normal(1.0, 1.0, size=8)
    tau, beta, m = 2.0, 0.5, 0.4

    def case(F):
        def model(x):
            mu = F.ppl.sample("mu", F.dist.Normal(F.const(0.0), F.const(tau)))
            F.ppl.factor("penalty", -0.3 * mu**2)  # counts in log p(z)
            with F.plate("data", x.shape[0]):
                F.ppl.sample("x", F.dist.Normal(mu, F.const(1.0)), obs=x)

        def guide(x):
            F.ppl.sample("mu", F.dist.Delta(F.ppl.param("m", F.const(0.0))))

        return F.SM("esm", beta=beta), model, guide

    v_pyro, v_numpyro = both(case, x, params={"m": m})
    log_p = -0.5 * (m / tau) ** 2 - math.log(tau) - 0.5 * math.log(2 * math.pi) - 0.3 * m**2
    assert v_pyro == pytest.approx(beta * (-1 + 0.5 * (x - m) ** 2).sum() - log_p, rel=RTOL)
    assert v_numpyro == pytest.approx(v_pyro, rel=RTOL)


@pytest.mark.parametrize("method", ["esm", "ssm", "ssm_vr", "fd_ssm"])
def test_a_dependent_chain_in_one_dimension_per_step(rng, method):
    """A Gaussian AR(1) chain of three scalar steps per series (each step depends on the
    previous, matched value), a positive site depending on the last step, subsampled and
    masked: the joint density, equal in both front ends. ``esm`` matches every step; the
    projected methods match the last step only (``D = 1``, where a Rademacher or unit
    direction is +-1, so the two backends' different draws give the same value)."""
    x = rng.normal(size=(8, 3))
    s = rng.gamma(2.0, 0.5, size=8)
    idx = np.array([0, 2, 3, 5, 7])
    keep = np.array([True, True, False, True, True])

    def case(F):
        def model(x, s):
            with F.plate("series", 8, idx) as i:
                with F.mask(keep):
                    prev = F.ppl.sample("x0", F.dist.Normal(F.const(0.0), F.const(1.3)), obs=x[i, 0])
                    for k in (1, 2):
                        prev = F.ppl.sample(f"x{k}", F.dist.Normal(0.6 * prev, F.const(0.8)), obs=x[i, k])
                    F.ppl.sample("s", F.dist.Gamma(F.const(2.0), 1.0 + prev**2), obs=s[i])

        sites = None if method == "esm" else ["x2"]
        opts = {"n_projections": 1, "eps": 0.3} if method == "fd_ssm" else {}
        return F.SM(method, sites=sites, **opts), model, empty_guide

    v_pyro, v_numpyro = both(case, x, s, subsample={"series": idx})
    assert math.isfinite(v_pyro)
    assert v_numpyro == pytest.approx(v_pyro, rel=RTOL if method != "fd_ssm" else 1e-9)
