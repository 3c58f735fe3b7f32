"""The calibration tests' closed forms (numpy) and per-backend objectives.

The model where everything is known: ``x_i ~ Gamma(A, theta)`` (shape ``A`` known, rate
``theta`` unknown), matched in ``u = log x``. The exact score-matching objective of a datum,
``SM_i(theta) = 1/2 (A - theta x_i)^2 - theta x_i``, is quadratic in ``theta``, so the
estimator is ``theta_hat = (A + 1) sum x / sum x^2`` and both rules give ``beta = H / J``
with ``H = sum x_i^2``, ``J = sum_i x_i^2 (theta_hat x_i - A - 1)^2``."""

from __future__ import annotations

import numpy as np

A = 3.0  # known Gamma shape
THETA = 2.0  # true rate
N = 1500  # the sandwich sd from one data set is within 15% of the truth for ~99% of seeds
PRIOR = (2.0, 1.0)  # Gamma(shape, rate) prior on theta
N_SIM = 4000  # data sets for the estimator's sampling sd


# ---------------------------------------------------------------------------------------
# closed forms (numpy)
# ---------------------------------------------------------------------------------------


def gamma_data(n=N, seed=0):
    return np.random.default_rng(seed).gamma(A, 1.0 / THETA, size=n)


def theta_hat(x):
    return (A + 1.0) * x.sum(-1) / (x**2).sum(-1)


def closed_beta(x):
    th = theta_hat(x)
    h = (x**2).sum()
    j = ((x * (th * x - A - 1.0)) ** 2).sum()
    return h / j


def sampling_sd(n=N, sims=N_SIM, seed=1):
    """The score-matching estimator's sd over ``sims`` simulated data sets."""
    xs = np.random.default_rng(seed).gamma(A, 1.0 / THETA, size=(sims, n))
    return float(theta_hat(xs).std())


def exact_bayes_sd(x):
    shape, rate = PRIOR[0] + len(x) * A, PRIOR[1] + x.sum()
    return float(np.sqrt(shape) / rate)


def grid_sd(grid, neg_log_post):
    """sd of the density ``exp(-neg_log_post)`` on an even grid."""
    lp = -(neg_log_post - neg_log_post.min())
    p = np.exp(lp)
    p /= p.sum()
    m = (grid * p).sum()
    return float(np.sqrt(((grid - m) ** 2 * p).sum()))


def theta_grid(x, width=6.0, points=161):
    th = theta_hat(x)
    sd = np.sqrt(1.0 / ((x**2).sum() * closed_beta(x)))  # the calibrated sd, roughly
    return np.linspace(th - width * sd, th + width * sd, points)


# ---------------------------------------------------------------------------------------
# backends
# ---------------------------------------------------------------------------------------


def _gamma_fn_torch(x):
    import torch

    from ppl_score.torch import score_matching_loss

    u = torch.as_tensor(np.log(x))[:, None]

    def fn(z):
        return score_matching_loss(lambda v: (A * v - z[0] * v.exp()).sum(-1), u, "esm", reduction="none")

    return fn


def _gamma_fn_jax(x):
    import jax.numpy as jnp

    from ppl_score.jax import score_matching_loss

    u = jnp.asarray(np.log(x))[:, None]

    def fn(z):
        return score_matching_loss(lambda v: (A * v - z[0] * jnp.exp(v)).sum(-1), u, "esm", reduction="none")

    return fn


def tc_tensor(a):
    import torch

    return torch.as_tensor(a, dtype=torch.float64)
