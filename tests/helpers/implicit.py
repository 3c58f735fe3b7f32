"""The closed forms of the implicit-VI and WAE tests (``tests/{pyro,numpyro}/test_implicit.py``,
``tests/{pyro,numpyro}/test_wae.py``): the conjugate Gaussian posterior, the amortized
posterior of local latents, the WAE data and the checks against them."""

from __future__ import annotations

import numpy as np

# --------------------------------------------------------------------------------------
# exact-score gradient identity

D, P = 3, 6
X_OBS = np.array([[0.3, -1.2, 0.8], [1.1, 0.4, -0.5]])


# --------------------------------------------------------------------------------------
# conjugate Gaussian: the implicit guide z = mu + L eps recovers the posterior

A = np.array([[1.0, 0.5], [0.0, 1.0]])
N_OBS = 5
X_CONJ = np.array([0.5, -1.0]) @ A.T + np.random.default_rng(0).normal(size=(N_OBS, 2))
POST_COV = np.linalg.inv(np.eye(2) + N_OBS * A.T @ A)
POST_MEAN = POST_COV @ (A.T @ X_CONJ.sum(0))
# Posterior sds are about 0.4; the final iterate of a noisy optimization (and, for the
# kernel estimator, the ridge eta's bias) gives mean errors of a few 0.01 and covariance
# errors of 5-15% (measured); the tolerances are well inside what a missing entropy term
# (covariance -> 0) or a wrong sign (covariance blows up) would give.
MEAN_TOL, COV_RTOL = 0.1, 0.3


def _check_posterior(mu, cov):
    mu, cov = np.asarray(mu, float), np.asarray(cov, float)
    assert np.abs(mu - POST_MEAN).max() < MEAN_TOL, (mu, POST_MEAN)
    assert np.linalg.norm(cov - POST_COV) / np.linalg.norm(POST_COV) < COV_RTOL, (cov, POST_COV)


# --------------------------------------------------------------------------------------
# amortized guide: local latents, the learned estimator conditioned on the guide's input
#   z_i ~ N(0, 1), x_i ~ N(z_i, s^2)  =>  z_i | x_i ~ N(x_i / (1 + s^2), s^2 / (1 + s^2))

S2 = 0.5
X_LOCAL = np.random.default_rng(5).normal(size=(256, 1)) * np.sqrt(1 + S2)
AMORT_SLOPE, AMORT_VAR = 1 / (1 + S2), S2 / (1 + S2)


def _check_amortized(a, b, scale):
    # Measured: slope and variance within a few percent after 300 steps.
    assert abs(a - AMORT_SLOPE) < 0.1, a
    assert abs(b) < 0.1, b
    assert abs(scale**2 - AMORT_VAR) / AMORT_VAR < 0.3, scale**2


# --------------------------------------------------------------------------------------
# WAE: both terms decrease (codes start far from the prior: the encoder's output bias is 3)


_R = np.random.default_rng(0)
X_WAE = (np.tanh(_R.normal(size=(512, 2)) @ _R.normal(size=(2, 6))) + 0.05 * _R.normal(size=(512, 6))).astype(
    np.float32
)
WAE_CASES = [("mmd", "stein"), ("score", "stein"), ("score", "spectral"), ("score", "learned")]


def _check_wae(before, after, learned):
    # Measured after 300 steps: reconstruction 3.0 -> 0.05-0.25, MMD^2 to the prior 7.0 ->
    # below 0.05 (kernel estimators, MMD) and below 1 (the learned estimator, one SSM-VR step
    # per SVI step, lags behind the moving codes).
    assert after["reconstruction"] < 0.25 * before["reconstruction"], (before, after)
    assert after["mmd"] < (0.25 if learned else 0.1) * before["mmd"], (before, after)
