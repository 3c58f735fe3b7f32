"""The generalized-Bayes target of the idiom tests (``tests/{pyro,numpyro}/test_idioms.py``):
``mu ~ N(0, tau^2 I_2)``, ``x_i ~ N(mu, I_2)``, ``esm``: each coordinate of the target is
``N(m*_k, s*^2)`` with ``1/s*^2 = 1/tau^2 + beta N`` and ``m* = beta sum_i x_i s*^2``."""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import norm

TAU, BETA, D = 2.0, 0.5, 2


def target(x):
    """``(m*[D], s*)`` of the generalized-Bayes posterior of ``mu``."""
    prec = 1 / TAU**2 + BETA * len(x)
    return BETA * np.asarray(x).sum(0) / prec, 1 / math.sqrt(prec)


def esm(x, mu):
    """Per-example ``esm`` of ``N(mu, I)``: ``-D + 1/2 ||x_i - mu||^2``."""
    return -D + 0.5 * ((np.asarray(x) - np.asarray(mu)) ** 2).sum(-1)


def log_prior(mu):
    mu = np.asarray(mu)
    return float(norm.logpdf(mu, 0.0, TAU).sum())


def message_says(excinfo, *words):
    msg = str(excinfo.value).lower()
    missing = [w for w in words if w.lower() not in msg]
    assert not missing, f"error message lacks {missing}: {excinfo.value}"
