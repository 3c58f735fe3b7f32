r"""The framework-free half of ``ppl_score.{torch,jax}.stein``: the kernel Stein discrepancy.

The checks, defaults, messages and result type of ``ksd`` / ``ksd_test`` and of the front
ends' ``goodness_of_fit``, written once for both backends; imports neither torch nor JAX.
Every check raises ``TypeError`` for a wrong type and ``ValueError`` for a wrong value,
naming the argument.

The maths (the spec, section 5). Given points ``x_1..x_N`` (``[N, D]``) and the model's
score ``s_i = grad_x log p(x_i)`` at them (``[N, D]``; ``p`` may be unnormalized), the
Stein kernel of a base kernel ``k`` is

.. math::

    u(x, y) = s(x)^T s(y)\, k(x, y) + s(x)^T \nabla_y k(x, y) + s(y)^T \nabla_x k(x, y)
              + \operatorname{tr} \nabla_x \nabla_y k(x, y),

whose mean under ``x, y ~ q`` i.i.d. is the squared kernel Stein discrepancy
``KSD^2(q, p)``: zero when ``q = p`` and, for the kernels here, positive otherwise (for
``q`` with enough moments) [1, 2]. Its estimates are the U-statistic
``sum_{i != j} u_ij / (N (N - 1))`` (``statistic="u"``, unbiased) and the V-statistic
``sum_{i, j} u_ij / N^2`` (``statistic="v"``, nonnegative).

For a radial kernel ``k = phi(r^2)``, ``r^2 = ||x - y||^2``, ``delta = x - y``, the
derivatives are closed-form (no autograd)::

    u = phi s(x)^T s(y) - 2 phi' (s(x) - s(y))^T delta - 4 phi'' r^2 - 2 D phi'

- IMQ (default; Gorham & Mackey [3]): ``phi(t) = (c^2 + t)^beta``, ``c > 0``,
  ``beta in (-1, 0)``: the KSD then detects non-convergence (their Theorem 8), where a
  Gaussian kernel's may not in ``D >= 3``.
- RBF: ``phi(t) = exp(-t / (2 h^2))``, i.e.
  ``u = k (s(x)^T s(y) + (s(x) - s(y))^T delta / h^2 - r^2 / h^4 + D / h^2)``; ``h`` the
  median of the distances between distinct points unless given (on an evenly spaced subset
  of ``MEDIAN_POINTS`` points when ``N`` is larger).

The sums run over row chunks, so the memory is ``O(chunk_size * N)``, never
``O(N^2 D)``.

The test (``ksd_test``) is the wild bootstrap of [1, 2]: for Rademacher multipliers
``w_b in {-1, +1}^N``, ``b = 1..B``, the bootstrap statistics
``sum_{i != j} w_bi w_bj u_ij / (N (N - 1))`` (U) or ``sum_{i, j} w_bi w_bj u_ij / N^2``
(V) follow the null distribution of the statistic, and the p-value is
``(1 + #{b: boot_b >= statistic}) / (1 + B)``.

References:
    [1] Q. Liu, J. D. Lee, M. I. Jordan, "A kernelized Stein discrepancy for goodness-of-fit
    tests", ICML, 2016.

    [2] K. Chwialkowski, H. Strathmann, A. Gretton, "A kernel test of goodness of fit", ICML,
    2016.

    [3] J. Gorham, L. Mackey, "Measuring sample quality with kernels", ICML, 2017.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, NamedTuple

from .estimators import check_bandwidth, check_samples_shape
from .validate import check_choice, check_int, check_positive_float, warn_nonfinite

__all__ = [
    "KERNELS",
    "STATISTICS",
    "KSD_MEMORY_BUDGET",
    "MEDIAN_POINTS",
    "KSDOptions",
    "KSDTest",
    "check_ksd_options",
    "check_ksd_shapes",
    "check_n_bootstrap",
    "check_weights_shape",
    "check_chunk_size",
    "default_chunk_size",
    "median_stride",
    "normalizer",
    "median_zero_message",
    "too_few_points_error",
    "check_goodness_of_fit_args",
    "check_site_scores",
    "NONFINITE_CAUSE",
    "warn_if_nonfinite",
]

KERNELS = ("imq", "rbf")

STATISTICS = ("u", "v")

# Working-set budget of one row chunk, in elements: a chunk of ``C`` rows holds a handful of
# ``[C, N]`` arrays and, in the test, one ``[C, B]`` array, so ``C (N + B) <= budget``.
KSD_MEMORY_BUDGET = 2**21

# The median heuristic uses at most this many points (evenly spaced rows), so that its
# ``M (M - 1) / 2`` pairwise distances stay small for any ``N``.
MEDIAN_POINTS = 1000


class KSDTest(NamedTuple):
    """The result of ``ksd_test`` and ``goodness_of_fit``: the squared KSD (U- or
    V-statistic, as ``ksd`` returns it) and the wild-bootstrap p-value of ``p`` being the
    points' distribution; 0-d arrays of the backend (torch tensors or JAX arrays)."""

    statistic: Any
    p_value: Any


class KSDOptions(NamedTuple):
    """The checked options of ``ksd``: ``bandwidth`` None (median heuristic), a float, or
    an array the caller passes through (a traced JAX bandwidth)."""

    kernel: str
    c: float
    beta: float
    bandwidth: Any
    statistic: str


def _is_real(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, numbers.Real)


def check_ksd_options(
    kernel: Any, c: Any, beta: Any, bandwidth: Any, statistic: Any, *, traced_bandwidth: bool = False
) -> KSDOptions:
    """The kernel options of ``ksd`` / ``ksd_test``.

    Args:
        kernel: ``"imq"`` or ``"rbf"``.
        c: the IMQ kernel's scale, a finite number ``> 0``.
        beta: the IMQ kernel's exponent, in ``(-1, 0)``.
        bandwidth: the RBF kernel's ``h``: None (median heuristic) or a number ``> 0``; the
            IMQ kernel takes none (its scale is ``c``).
        statistic: ``"u"`` or ``"v"``.
        traced_bandwidth: the bandwidth is a traced array (JAX): passed through unchecked.

    Raises:
        TypeError, ValueError: naming the argument.
    """
    kernel = check_choice("kernel", kernel, KERNELS)
    statistic = check_choice("statistic", statistic, STATISTICS)
    c = check_positive_float("c", c)
    if not _is_real(beta):
        raise TypeError(f"argument 'beta' must be a real number in (-1, 0), got {type(beta).__name__}")
    beta = float(beta)
    if not -1.0 < beta < 0.0:
        raise ValueError(
            f"argument 'beta' must be in (-1, 0) (the IMQ kernel's exponent; Gorham & Mackey 2017), got {beta!r}"
        )
    if bandwidth is not None and kernel == "imq":
        raise ValueError("argument 'bandwidth' applies to kernel='rbf' only; the IMQ kernel's scale is argument 'c'")
    if not traced_bandwidth:
        bandwidth = check_bandwidth(bandwidth)
    return KSDOptions(kernel, c, beta, bandwidth, statistic)


def check_ksd_shapes(samples_shape: tuple, scores_shape: tuple) -> tuple[int, int]:
    """``samples`` is ``[N, D]`` with ``N >= 2`` and ``D >= 1``, ``scores`` the same shape."""
    samples_shape, scores_shape = tuple(samples_shape), tuple(scores_shape)
    n, d = check_samples_shape(samples_shape, "samples")
    if scores_shape != samples_shape:
        raise ValueError(
            f"argument 'scores' must have the shape of 'samples', {samples_shape} (the score at each point), "
            f"got {scores_shape}"
        )
    return n, d


def check_n_bootstrap(n_bootstrap: Any) -> int:
    return check_int("n_bootstrap", n_bootstrap)


def check_weights_shape(shape: tuple, n_bootstrap: int, n: int) -> None:
    """Explicit bootstrap multipliers are ``[n_bootstrap, N]``."""
    shape = tuple(shape)
    if shape != (n_bootstrap, n):
        raise ValueError(
            f"argument 'weights' must have shape [n_bootstrap, N] = [{n_bootstrap}, {n}], got {shape} "
            "(pass n_bootstrap=weights.shape[0])"
        )


def check_chunk_size(chunk_size: Any, n: int, n_bootstrap: int = 0) -> int:
    """Rows per chunk: ``chunk_size`` (an int ``>= 1``, at most ``N``) or the default."""
    if chunk_size is None:
        return default_chunk_size(n, n_bootstrap)
    return min(check_int("chunk_size", chunk_size), n)


def default_chunk_size(n: int, n_bootstrap: int = 0) -> int:
    """The most rows whose chunk fits ``KSD_MEMORY_BUDGET`` (at least 1, at most ``N``)."""
    return max(1, min(n, KSD_MEMORY_BUDGET // max(1, n + n_bootstrap)))


def median_stride(n: int) -> int:
    """Every ``stride``-th point enters the median heuristic (at most ``MEDIAN_POINTS``)."""
    return max(1, math.ceil(n / MEDIAN_POINTS))


def normalizer(n: int, statistic: str) -> float:
    """The number of pairs the statistic averages over: ``N (N - 1)`` (U) or ``N^2`` (V)."""
    return float(n * (n - 1)) if statistic == "u" else float(n * n)


def median_zero_message() -> str:
    return (
        "argument 'samples': the median heuristic gives bandwidth 0 (most points coincide); pass 'bandwidth' explicitly"
    )


# what a non-finite statistic most likely comes from (the inputs are checked finite)
NONFINITE_CAUSE = (
    "an overflow of the Stein kernel, s(x)^T s(y) k, with very large scores (try float64, or a model "
    "whose score is finite and moderate at the samples); the p-value is nan"
)


def warn_if_nonfinite(what: str, statistic: float, stacklevel: int = 4) -> None:
    """Warn (``NonFiniteWarning``) that ``what``'s statistic is nan or infinite; the default
    ``stacklevel`` points at the caller of the backend's function that calls this."""
    if not math.isfinite(statistic):
        warn_nonfinite(what, NONFINITE_CAUSE, stacklevel=stacklevel)


def check_goodness_of_fit_args(
    site: Any,
    guide: Any,
    n_bootstrap: Any,
    kernel: Any,
    c: Any,
    beta: Any,
    bandwidth: Any,
    statistic: Any,
    chunk_size: Any,
) -> None:
    """The arguments of the front ends' ``goodness_of_fit`` that need no data, checked before
    the model runs (the chunk size again once ``N`` is known)."""
    if not isinstance(site, str):
        raise TypeError(f"argument 'site' must be a site name (a string), got {type(site).__name__}")
    check_ksd_options(kernel, c, beta, bandwidth, statistic)
    check_n_bootstrap(n_bootstrap)
    if chunk_size is not None:
        check_chunk_size(chunk_size, 1)
    if guide is not None and not callable(guide):
        raise TypeError(f"argument 'guide' must be callable, got {type(guide).__name__}")


def check_site_scores(site: str, finite_rows: Any) -> None:
    """``goodness_of_fit``: a ``ValueError`` naming ``site`` when the model's score is not
    finite at some data points (``finite_rows``: a boolean numpy array, one entry per point)."""
    bad = int((~finite_rows).sum())
    if bad:
        raise ValueError(
            f"site {site!r}: the model's score is not finite (nan or inf) at {bad} of {finite_rows.size} "
            "data points; likely cause: a nan/inf parameter, data outside the support of the site's "
            "density, or an overflow in float32 (try float64)"
        )


def too_few_points_error(site: str, n: int) -> ValueError:
    """``goodness_of_fit`` on a site with fewer than 2 (unmasked) data points."""
    return ValueError(
        f"site {site!r}: the kernel Stein discrepancy needs at least 2 data points, got {n} "
        "(every point masked, a single point, or a site whose points are coupled by another site, "
        "which makes the whole batch one data point; the test assumes i.i.d. points)"
    )
