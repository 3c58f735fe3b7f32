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
import numbers

__all__ = [
    "DEFAULT_ALPHA",
    "NEWTON_MAX_ITER",
    "HALF_LOG_2PI",
    "check_config",
    "check_event",
    "check_max_iter",
    "newton_tolerance",
    "newton_error",
]

DEFAULT_ALPHA = 0.1
NEWTON_MAX_ITER = 100
HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def check_config(dim, n_layers, alpha) -> tuple[int, int, float]:
    """Validate ``(dim, n_layers, alpha)``; ``alpha`` in ``(0, 1]`` keeps ``sigma'`` positive."""
    if isinstance(dim, bool) or not isinstance(dim, numbers.Integral):
        raise TypeError(f"argument 'dim' must be an int, got {type(dim).__name__}")
    if dim < 1:
        raise ValueError(f"argument 'dim' must be >= 1, got {dim}")
    if isinstance(n_layers, bool) or not isinstance(n_layers, numbers.Integral):
        raise TypeError(f"argument 'n_layers' must be an int, got {type(n_layers).__name__}")
    if n_layers < 1:
        raise ValueError(f"argument 'n_layers' must be >= 1, got {n_layers}")
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        raise TypeError(f"argument 'alpha' must be a float, got {type(alpha).__name__}")
    if not 0.0 < float(alpha) <= 1.0:
        raise ValueError(f"argument 'alpha' must be in (0, 1] (the activation's slope bound), got {alpha}")
    return int(dim), int(n_layers), float(alpha)


def check_event(name: str, shape: tuple, dim: int) -> None:
    """``shape`` must be ``[..., dim]``."""
    shape = tuple(shape)
    if len(shape) < 1 or shape[-1] != dim:
        raise ValueError(f"argument {name!r} must have shape [..., {dim}] (the flow's dim), got {shape}")


def check_max_iter(max_iter) -> int:
    if isinstance(max_iter, bool) or not isinstance(max_iter, numbers.Integral) or max_iter < 1:
        raise ValueError(f"argument 'max_iter' must be an int >= 1, got {max_iter!r}")
    return int(max_iter)


def newton_tolerance(tol, dtype_eps: float) -> float:
    """Residual tolerance of the activation's Newton inverse, relative to ``1 + |t|``.

    Default ``64 * machine-eps``: Newton converges quadratically, so the last step lands at
    round-off, and the residual ``sigma(y) - t`` itself carries a few ulps of ``|t|``.
    """
    if tol is None:
        return 64.0 * dtype_eps
    if isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not tol > 0:
        raise ValueError(f"argument 'tol' must be a positive float, got {tol!r}")
    return float(tol)


def newton_error(max_iter: int, n_bad: int, residual: float, tol: float) -> ValueError:
    return ValueError(
        f"inverse of the smooth leaky ReLU did not converge: {n_bad} entries still have a relative "
        f"residual up to {residual:.3g} > tol={tol:.3g} after max_iter={max_iter} Newton steps "
        "(raise 'max_iter' or 'tol')"
    )
