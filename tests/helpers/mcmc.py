"""The sampler tests' Gaussian target ``N(MU, COV)`` and moment check (``Z`` standard errors),
the data of the draw tests, and the densities and models of the sampler fault tests."""

from __future__ import annotations

import numpy as np

Z = 4.0
MU = np.array([1.0, -1.0])
COV = np.array([[1.0, 0.8], [0.8, 2.0]])
PREC = np.linalg.inv(COV)


def assert_moments(x, mean, cov, z=Z):
    """``x[C, D]`` i.i.d.: sample mean and covariance within ``z`` standard errors."""
    x = np.asarray(x, float).reshape(x.shape[0], -1)
    c = x.shape[0]
    mean, cov = np.atleast_1d(mean), np.atleast_2d(cov)
    se_mean = np.sqrt(np.diag(cov) / c)
    np.testing.assert_array_less(np.abs(x.mean(0) - mean), z * se_mean)
    se_cov = np.sqrt((cov**2 + np.outer(np.diag(cov), np.diag(cov))) / c)
    np.testing.assert_array_less(np.abs(np.cov(x.T).reshape(cov.shape) - cov), z * se_cov)


# the sampler fault tests (tests/{torch,jax,pyro,parity}/test_*_faults.py)


def _torch_gauss(x):
    return -0.5 * (x * x).sum(-1)


def _jax_energy(w, x):
    return -0.5 * ((x * w) ** 2).sum(-1)


def _pyro_model(x):
    import pyro
    import pyro.distributions as pdist

    with pyro.plate("data", x.shape[0]):
        pyro.sample("x", pdist.Normal(0.0, 1.0).expand([2]).to_event(1), obs=x)


X0 = np.array([[0.5, -0.3], [1.0, 0.2], [-0.7, 0.1]])


# the draw tests (tests/conformance/test_sampling_draws.py, tests/numpyro/test_mcmc.py)
RNG = np.random.default_rng(3)
DATA = RNG.normal(size=(40, 2))
