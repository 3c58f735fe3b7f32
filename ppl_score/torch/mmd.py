"""Maximum mean discrepancy with the inverse multiquadratic kernel (torch), for ``WAE``.

The kernel ``k(x, y) = sum_s C s / (C s + ||x - y||^2)`` over the scales ``s`` (default
``ppl_score.common.mmd.MMD_SCALES``) and the unbiased estimate (Gretton et al. 2012)

    MMD^2 = 1/(N(N-1)) sum_{i != j} k(x_i, x_j) + 1/(M(M-1)) sum_{i != j} k(y_i, y_j)
            - 2/(N M) sum_{i, j} k(x_i, y_j)

with ``C = 2 D var(p_Z)`` (Tolstikhin et al. 2018, WAE-MMD). Mirrors ``ppl_score.jax.mmd``
function for function (same numbers).

References:
    Gretton, Borgwardt, Rasch, Schoelkopf, Smola. A kernel two-sample test. JMLR 2012.
    Tolstikhin, Bousquet, Gelly, Schoelkopf. Wasserstein auto-encoders. ICLR 2018.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..common.mmd import MMD_SCALES

__all__ = ["MMD_SCALES", "imq_mmd2", "imq_constant", "prior_variance", "stop_gradient"]


def stop_gradient(x: torch.Tensor) -> torch.Tensor:
    """``x`` cut from the autograd graph (``x.detach()``; the name the JAX mirror uses)."""
    return x.detach()


def imq_mmd2(
    x: torch.Tensor, y: torch.Tensor, c: float | torch.Tensor, scales: Sequence[float] = MMD_SCALES
) -> torch.Tensor:
    """Unbiased MMD^2 between ``x [N, D]`` and ``y [M, D]`` with the IMQ kernel.

    Args:
        x: ``[N, D]``, ``N >= 2``.
        y: ``[M, D]``, ``M >= 2``.
        c: the constant ``C > 0`` (a float or a 0-d tensor).
        scales: the scales ``s``.

    Returns:
        A 0-d tensor, differentiable in ``x`` and ``y``.
    """

    def k(a, b):
        d2 = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
        return sum(c * s / (c * s + d2) for s in scales)

    n, m = x.shape[0], y.shape[0]
    kxx, kyy = k(x, x), k(y, y)
    off = lambda kk, r: (kk.sum() - kk.diagonal().sum()) / (r * (r - 1))  # noqa: E731
    return off(kxx, n) + off(kyy, m) - 2.0 * k(x, y).mean()


def prior_variance(fn: torch.distributions.Distribution, draws: torch.Tensor) -> float:
    """Mean variance of the prior ``p_Z``: analytic where the distribution has it, else that
    of its ``draws [N, D]`` (a prior without ``variance``, e.g. a mixture or a transformed one).

    Args:
        fn: the prior, a ``torch.distributions.Distribution``.
        draws: ``[N, D]`` draws from it.

    Returns:
        A float (no gradient flows through the kernel's constant).
    """
    try:
        return float(fn.variance.detach().mean())
    except (NotImplementedError, AttributeError, RuntimeError):
        return float(draws.var(dim=0, correction=0).mean())  # the population variance, as jnp.var


def imq_constant(fn: torch.distributions.Distribution, draws: torch.Tensor) -> float:
    """WAE-MMD's kernel constant ``C = 2 D var(p_Z)`` for draws ``[N, D]`` of the prior ``fn``."""
    return 2.0 * draws.shape[1] * prior_variance(fn, draws)
