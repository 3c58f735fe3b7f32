"""Closed forms shared by ``tests/{pyro,numpyro}/test_score_matching.py`` (float64): for
``x ~ N(mu, P^{-1})`` the exact score-matching objective of a data point is
``-tr P + 1/2 ||P (x - mu)||^2``; for ``x ~ Gamma(a, b)`` matched in ``u = log x`` it is
``-b x + 1/2 (a - b x)^2``; the generalized-Bayes target of ``mu ~ N(0, tau^2)``,
``x_i ~ N(mu, 1)``."""

from __future__ import annotations

import math

import numpy as np


def mvn_case(rng, n=40, d=3):
    a = rng.normal(size=(d, d))
    prec = a @ a.T / d + 0.5 * np.eye(d)
    mu = rng.normal(size=d)
    x = rng.normal(size=(n, d))
    return mu, prec, x


def esm_gaussian(mu, prec, x):
    """Per-example ``-tr P + 1/2 ||P (x - mu)||^2``."""
    r = (np.asarray(x) - mu) @ prec
    return -np.trace(prec) + 0.5 * (r * r).sum(-1)


def esm_gamma(a, b, x):
    """Per-example esm of Gamma(a, b) in ``u = log x``: ``s = a - b x``, ``H = -b x``."""
    return -b * x + 0.5 * (a - b * x) ** 2


# Generalized Bayes: mu ~ N(0, tau^2), x_i ~ N(mu, 1), esm: SM_i(mu) = -1 + (x_i - mu)^2 / 2;
# the target p(mu) exp(-beta sum_i SM_i) is N(m*, s*^2) with
# 1/s*^2 = 1/tau^2 + beta N and m* = beta sum(x) s*^2.
TAU, BETA_GB = 2.0, 0.5


def gb_target(x):
    prec = 1 / TAU**2 + BETA_GB * len(x)
    return BETA_GB * x.sum() / prec, 1 / math.sqrt(prec)


# ---------------------------------------------------------------------------------------
# Masks
# ---------------------------------------------------------------------------------------


def _mask(n):
    m = np.zeros(n, bool)
    m[::3] = True
    m[1] = True
    return m
