"""Maximum mean discrepancy with the inverse multiquadratic kernel (JAX), for ``WAE``.

Mirrors ``ppl_score.torch.mmd`` function for function (same formulas, same numbers; see its
docstring for the estimate and the references); pure and ``jax.jit``-compatible.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import jax
import jax.numpy as jnp

from ..common.mmd import MMD_SCALES

if TYPE_CHECKING:
    from numpyro.distributions import Distribution

__all__ = ["MMD_SCALES", "imq_mmd2", "imq_constant", "prior_variance", "stop_gradient"]

stop_gradient = jax.lax.stop_gradient


def imq_mmd2(x: jax.Array, y: jax.Array, c: float | jax.Array, scales: Sequence[float] = MMD_SCALES) -> jax.Array:
    """Unbiased MMD^2 between ``x [N, D]`` and ``y [M, D]`` (``N, M >= 2``) with the kernel
    ``sum_s c s / (c s + ||x - y||^2)``; a 0-d array, differentiable in ``x`` and ``y``."""

    def k(a, b):
        d2 = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
        return sum(c * s / (c * s + d2) for s in scales)

    n, m = x.shape[0], y.shape[0]
    kxx, kyy = k(x, x), k(y, y)
    off = lambda kk, r: (kk.sum() - jnp.trace(kk)) / (r * (r - 1))  # noqa: E731
    return off(kxx, n) + off(kyy, m) - 2.0 * k(x, y).mean()


def prior_variance(fn: Distribution, draws: jax.Array) -> jax.Array:
    """Mean variance of the prior ``p_Z`` (a ``numpyro`` distribution): analytic where it has
    one, else that of its ``draws [N, D]``; a 0-d array without gradient."""
    try:
        return jax.lax.stop_gradient(jnp.mean(fn.variance))
    except (NotImplementedError, AttributeError):
        return jnp.mean(jnp.var(draws, axis=0))


def imq_constant(fn: Distribution, draws: jax.Array) -> jax.Array:
    """WAE-MMD's kernel constant ``C = 2 D var(p_Z)`` for draws ``[N, D]`` of the prior ``fn``."""
    return 2.0 * draws.shape[1] * prior_variance(fn, draws)
