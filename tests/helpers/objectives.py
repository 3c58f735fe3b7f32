"""Cases of the ``score_matching_loss`` tests: the explicit randomness each method takes, and
the non-quadratic densities of the modes tests, written once for both backends (``ops``)."""

from __future__ import annotations

import numpy as np

from ppl_score.spec import OBJECTIVES, UNCONDITIONAL_METHODS

METHODS = UNCONDITIONAL_METHODS
KINDS = ("log_prob", "score")


B = 4  # batch
M = 3  # projections per example
SIGMA = 0.3


def _draw_case(rng, event, m=M):
    x = rng.normal(size=(B, *event))
    return x, rng.normal(size=(m, B, *event)), rng.normal(size=(B, *event))


def _inputs(method, proj, noise):
    """The explicit randomness ``method`` takes (passing more is an error)."""
    spec = OBJECTIVES[method]
    kw = {}
    if spec.uses_projections:
        kw["projections"] = proj
    if spec.uses_noise:
        kw["noise"] = noise
        kw["sigma"] = SIGMA
    return kw


RNG = np.random.default_rng(0)
X = RNG.normal(size=(4, 3))
W = RNG.normal(size=(3, 5))


def _mlp_energy(ops, w=W):
    """A non-quadratic log density ``-sum softplus(x W) - 1/2 ||x||^2``."""
    wc = ops.const(w)

    def fn(x):
        return -ops.softplus(x @ wc).sum(-1) - 0.5 * (x * x).sum(-1)

    return fn


def _exp(ops):
    if ops.name == "torch":
        import torch

        return torch.exp
    import jax.numpy as jnp

    return jnp.exp


def _builder(kind):
    if kind == "log_prob":
        return _mlp_energy

    def score(ops):
        wc = ops.const(W)
        exp = _exp(ops)
        return lambda x: -(1.0 / (1.0 + exp(-(x @ wc)))) @ wc.T - x

    return score


def _explicit(method, m=2, dtype=np.float64, scale=1.0):
    rng = np.random.default_rng(1)
    kw = {}
    if OBJECTIVES[method].uses_projections:
        kw["projections"] = (scale * rng.normal(size=(m, *X.shape))).astype(dtype)
    if OBJECTIVES[method].uses_noise:
        kw["noise"] = rng.normal(size=X.shape).astype(dtype)
    return kw


# ------------------------------------------------------------------ 3. non-finite results


def _nan_energy(ops):
    wc = ops.const(np.full_like(W, np.nan))
    return lambda x: -ops.softplus(x @ wc).sum(-1) - 0.5 * (x * x).sum(-1)


# --------------------------------------------------------------- 7. memory of the exact trace


def _quartic(ops):
    return lambda x: -0.25 * (x**4).reshape(x.shape[0], -1).sum(-1) - x.reshape(x.shape[0], -1).sum(-1)


D_BIG = 96
