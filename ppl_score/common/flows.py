"""Framework-free pieces of the full-Jacobian flow (``ppl_score.torch.flows``,
``ppl_score.jax.flows``): configuration checks, tolerances and error messages.

The flow (Gresele et al. 2020, "Relative gradient optimization of the Jacobian term in
unsupervised deep learning") maps data ``x`` to a latent ``z = g(x)``::

    h_0 = x,   y_k = W_k h_{k-1} + b_k,   h_k = sigma(y_k)  (k < L),   z = y_L

with dense ``D x D`` weights (orthogonal init), the smooth leaky ReLU
``sigma(y) = alpha y + (1 - alpha) log(1 + e^y)`` (``sigma' in (alpha, 1)``, so invertible)
and a standard Gaussian base. Exact log-likelihood::

    log p(x) = log N(z; 0, I) + sum_{k<L} sum_i log sigma'(y_ki) + sum_k log|det W_k|.

Relative gradient: each weight's gradient is right-multiplied by ``W^T W``; the log-det
term's ``W^{-T}`` becomes ``W``, so training needs neither determinant nor inverse, and the
data term ``delta^T h W^T W`` is formed as ``delta^T ((h W^T) W)``: ``O(B D^2)``.
"""

from __future__ import annotations

import math
from typing import Any

from .validate import check_int, check_positive_float, check_real_in

__all__ = [
    "DEFAULT_ALPHA",
    "NEWTON_MAX_ITER",
    "HALF_LOG_2PI",
    "check_config",
    "check_event",
    "check_max_iter",
    "check_n_samples",
    "check_layer",
    "singular_tolerance",
    "newton_tolerance",
    "newton_error",
]

DEFAULT_ALPHA = 0.1
NEWTON_MAX_ITER = 100
HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def check_config(dim: Any, n_layers: Any, alpha: Any) -> tuple[int, int, float]:
    """Validate ``(dim, n_layers, alpha)``; ``alpha`` in ``(0, 1]`` keeps ``sigma'`` positive."""
    return check_int("dim", dim), check_int("n_layers", n_layers), check_real_in("alpha", alpha, 0.0, 1.0)


def check_event(name: str, shape: tuple, dim: int) -> None:
    """``shape`` must be ``[..., dim]``."""
    shape = tuple(shape)
    if len(shape) < 1 or shape[-1] != dim:
        raise ValueError(f"argument {name!r} must have shape [..., {dim}] (the flow's dim), got {shape}")


def check_max_iter(max_iter: Any) -> int:
    """Newton's step budget: an ``int >= 1`` (``TypeError`` for a non-integer, ``ValueError``
    for a value below 1)."""
    return check_int("max_iter", max_iter)


def newton_tolerance(tol: float | None, dtype_eps: float) -> float:
    """Residual tolerance of the activation's Newton inverse, relative to ``1 + |t|``.

    Default ``64 * machine-eps``: Newton converges quadratically, so the last step lands at
    round-off, and the residual ``sigma(y) - t`` itself carries a few ulps of ``|t|``.
    """
    if tol is None:
        return 64.0 * dtype_eps
    return check_positive_float("tol", tol)


def newton_error(max_iter: int, n_bad: int, residual: float, tol: float, layer: int | None = None) -> ValueError:
    """The error of a Newton inverse of the activation that did not converge (``layer``: the
    index of the layer whose activation it inverts, when known)."""
    where = "" if layer is None else f" of layer {layer}"
    residual = float(residual)
    if not math.isfinite(residual):
        return ValueError(
            f"inverse of the smooth leaky ReLU{where} did not converge: {n_bad} entries are not finite "
            "(nan or inf) after the later layers' inverses, an overflow of an ill-conditioned flow; check "
            "the weights (InvertibleMLP.inverse rejects singular ones) and the scale of 'z'"
        )
    return ValueError(
        f"inverse of the smooth leaky ReLU{where} did not converge: {n_bad} entries still have a relative "
        f"residual up to {residual:.3g} > tol={tol:.3g} after max_iter={max_iter} Newton steps "
        "(raise 'max_iter' or 'tol')"
    )


def check_n_samples(n: Any) -> int:
    """The number of samples of ``sample``: an ``int >= 1`` (numpy integers too, not ``bool``).

    Raises:
        TypeError: ``n`` is not an integer.
        ValueError: ``n < 1``.
    """
    return check_int("n", n)


def singular_tolerance(dim: int, dtype_eps: float) -> float:
    """A weight is singular to working precision when its smallest singular value is at most
    this times its largest: ``D * eps``, the rule of ``numpy.linalg.matrix_rank``."""
    return dim * dtype_eps


def check_layer(
    k: int, finite_weight: bool, finite_bias: bool, s_max: float, s_min: float, dim: int, dtype_eps: float
) -> None:
    """Refuse to invert layer ``k`` whose weight or bias holds NaN / inf, or whose weight is
    singular to working precision (``s_min <= D eps s_max``, with its singular values
    ``s_max >= s_min``): its inverse would be NaN, inf or round-off noise.

    Raises:
        ValueError: naming the layer and what to do.
    """
    if not finite_weight:
        raise ValueError(
            f"layer {k} weight contains non-finite values (nan or inf): the flow cannot be inverted or "
            "sampled; check the training run that produced it (lower the learning rate)"
        )
    if not finite_bias:
        raise ValueError(f"layer {k} bias contains non-finite values (nan or inf): the flow cannot be inverted")
    tol = singular_tolerance(dim, dtype_eps)
    if not s_min > tol * s_max:
        cond = math.inf if s_min <= 0 else s_max / s_min
        raise ValueError(
            f"layer {k} weight is singular to working precision (condition number {cond:.3g} >= "
            f"1/(D*eps) = {1.0 / tol:.3g}): the flow is not invertible there and its inverse / samples "
            "would be nan, inf or round-off noise; re-initialize the weight or train in float64"
        )
