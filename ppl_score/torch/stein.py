r"""Kernel Stein discrepancy and its goodness-of-fit test (torch).

The squared kernel Stein discrepancy of points ``samples [N, D]`` from a model known by its
score ``scores [N, D]`` (``grad_x log p`` at the points, ``p`` possibly unnormalized):

.. math::

    \mathrm{KSD}^2 = \frac{1}{N(N-1)} \sum_{i \ne j} u(x_i, x_j), \qquad
    u(x, y) = s(x)^T s(y)\, k + s(x)^T \nabla_y k + s(y)^T \nabla_x k
              + \operatorname{tr} \nabla_x \nabla_y k,

(``statistic="v"``: the mean over all ``N^2`` pairs) with the IMQ kernel
``k = (c^2 + ||x - y||^2)^beta`` (default, Gorham & Mackey 2017) or the RBF kernel
``exp(-||x - y||^2 / (2 h^2))``, and a wild-bootstrap test of ``p`` (Liu, Lee & Jordan 2016;
Chwialkowski, Strathmann & Gretton 2016). The kernel's derivatives are closed-form, so no
autograd is needed (both run under ``torch.no_grad()`` and ``torch.inference_mode()``; with
grad enabled the statistic is differentiable in ``samples`` and ``scores``), and the sums run
over row chunks (memory ``O(chunk_size * N)``). ``ppl_score.common.stein`` has the formulas;
``ppl_score.jax.stein`` mirrors this module (same numbers).

- ``ksd(samples, scores, *, kernel="imq", c=1.0, beta=-0.5, bandwidth=None, statistic="u")``
- ``ksd_test(samples, scores, *, n_bootstrap=1000, ..., generator=None)`` ->
  ``KSDTest(statistic, p_value)``
"""

from __future__ import annotations

import torch

from ..common import stein as common
from ..common.estimators import bandwidth_underflow_message
from ..common.stein import KSDTest
from .estimators import median_bandwidth
from .projections import draw_projections
from .validate import check_array, validating

__all__ = ["KSDTest", "ksd", "ksd_test"]


def _check_inputs(samples, scores):
    samples = check_array("samples", samples)
    scores = check_array("scores", scores)
    n, d = common.check_ksd_shapes(tuple(samples.shape), tuple(scores.shape))
    if scores.device != samples.device:
        raise ValueError(f"argument 'scores' is on {scores.device}, argument 'samples' on {samples.device}")
    dtype = torch.promote_types(samples.dtype, scores.dtype)
    return samples.to(dtype), scores.to(dtype), n, d


def _bandwidth(x: torch.Tensor, options: common.KSDOptions) -> torch.Tensor | None:
    """The RBF bandwidth as a 0-d tensor (None for IMQ)."""
    if options.kernel != "rbf":
        return None
    if options.bandwidth is None:
        h = median_bandwidth(x[:: common.median_stride(x.shape[0])])
        if not bool(h > 0):
            raise ValueError(common.median_zero_message())
        return h
    h = torch.as_tensor(options.bandwidth, dtype=x.dtype, device=x.device)
    if float(h) == 0.0:
        raise ValueError(bandwidth_underflow_message(options.bandwidth, str(x.dtype).replace("torch.", "")))
    return h


def _stein_rows(xr, sr, x, s, start, options, h):
    """``u(x_i, x_j)`` for the chunk's rows ``i`` (``xr, sr [C, D]``, the first at ``start``)
    and every ``j`` (``x, s [N, D]``): ``[C, N]``; the diagonal zero for the U-statistic."""
    n, d = x.shape
    diag = (torch.arange(xr.shape[0], device=x.device) + start)[:, None] == torch.arange(n, device=x.device)
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    d2 = ((xr * xr).sum(-1)[:, None] + (x * x).sum(-1) - 2.0 * xr @ x.T).clamp_min(0.0)
    d2 = torch.where(diag, zero, d2)  # exactly 0 on the diagonal
    ss = sr @ s.T
    # (s_i - s_j)^T (x_i - x_j)
    a = (sr * xr).sum(-1)[:, None] + (s * x).sum(-1) - sr @ x.T - xr @ s.T
    a = torch.where(diag, zero, a)
    if options.kernel == "imq":
        b = options.beta
        t = options.c**2 + d2
        u = t**b * (ss - 2.0 * b * a / t - 4.0 * b * (b - 1.0) * d2 / (t * t) - 2.0 * d * b / t)
    else:
        # dividing by h twice: h^2 may underflow for a tiny bandwidth
        k = torch.exp(-0.5 * (d2 / h / h))
        u = k * (ss + a / h / h - d2 / h / h / h / h + d / h / h)
    if options.statistic == "u":
        u = torch.where(diag, zero, u)
    return u


def _sums(samples, scores, options, chunk, weights=None):
    """``(sum_ij u_ij, [sum_ij w_bi w_bj u_ij for each b] or None)`` over the pairs of the
    statistic, one row chunk at a time."""
    x = samples - samples.mean(0)  # the kernels are translation invariant; centring keeps d2 accurate
    s = scores
    h = _bandwidth(x, options)
    n = x.shape[0]
    total = torch.zeros((), dtype=x.dtype, device=x.device)
    boot = None if weights is None else torch.zeros(weights.shape[0], dtype=x.dtype, device=x.device)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        u = _stein_rows(x[start:stop], s[start:stop], x, s, start, options, h)
        total = total + u.sum()
        if weights is not None:
            boot = boot + ((u @ weights.T) * weights[:, start:stop].T).sum(0)
    return total, boot


def ksd(
    samples: torch.Tensor,
    scores: torch.Tensor,
    *,
    kernel: str = "imq",
    c: float = 1.0,
    beta: float = -0.5,
    bandwidth: float | torch.Tensor | None = None,
    statistic: str = "u",
    chunk_size: int | None = None,
) -> torch.Tensor:
    r"""The squared kernel Stein discrepancy of ``samples`` from the model whose score at them
    is ``scores``.

    .. math::

        \mathrm{KSD}^2_U = \frac{1}{N(N-1)} \sum_{i \ne j} u(x_i, x_j), \quad
        \mathrm{KSD}^2_V = \frac{1}{N^2} \sum_{i, j} u(x_i, x_j),

    with the Stein kernel
    :math:`u(x, y) = s(x)^T s(y) k + s(x)^T \nabla_y k + s(y)^T \nabla_x k + \operatorname{tr}
    \nabla_x \nabla_y k` of the IMQ kernel :math:`k = (c^2 + \|x - y\|^2)^\beta` [3] or the
    RBF kernel :math:`k = \exp(-\|x - y\|^2 / (2 h^2))` [1, 2]. For points drawn from the
    model the U-statistic has mean 0 (it is unbiased for :math:`\mathrm{KSD}^2`, which is 0
    exactly when the points' distribution is the model's); the V-statistic is
    nonnegative and biased upwards by :math:`O(1/N)`. The kernel derivatives are in closed
    form (``ppl_score.common.stein``) and the sum runs over chunks of ``chunk_size`` rows,
    so the memory is :math:`O(\text{chunk\_size} \cdot N)`.

    Args:
        samples: ``[N, D]`` points, ``N >= 2``, finite, floating.
        scores: ``[N, D]`` the model's score :math:`\nabla_x \log p` at ``samples`` (the
            normalizer of ``p`` is not needed).
        kernel: ``"imq"`` (default) or ``"rbf"``.
        c: the IMQ kernel's scale, ``> 0`` (default 1).
        beta: the IMQ kernel's exponent, in ``(-1, 0)`` (default -1/2).
        bandwidth: the RBF kernel's ``h > 0``; None (default): the median heuristic, the
            median distance between distinct points (of at most
            ``ppl_score.common.stein.MEDIAN_POINTS`` evenly spaced ones). Not for IMQ.
        statistic: ``"u"`` (default, unbiased) or ``"v"``.
        chunk_size: rows per chunk (default: as many as fit
            ``ppl_score.common.stein.KSD_MEMORY_BUDGET`` elements); the value does not
            depend on it beyond round-off.

    Returns:
        A 0-d tensor in the promoted dtype of ``samples`` and ``scores``, differentiable in
        both when grad is enabled.

    Raises:
        TypeError: a non-tensor or non-floating ``samples``/``scores``, an option of the wrong type.
        ValueError: shapes other than ``[N, D]`` (``N >= 2``) and equal; non-finite values
            (with validation on); ``c <= 0``, ``beta`` outside ``(-1, 0)``, an unknown
            ``kernel`` or ``statistic``, ``bandwidth`` with the IMQ kernel or ``<= 0``,
            ``chunk_size < 1``; a median-heuristic bandwidth of 0 (most points coincide).

    References:
        [1] Q. Liu, J. D. Lee, M. I. Jordan, "A kernelized Stein discrepancy for
        goodness-of-fit tests", ICML, 2016.

        [2] K. Chwialkowski, H. Strathmann, A. Gretton, "A kernel test of goodness of fit",
        ICML, 2016.

        [3] J. Gorham, L. Mackey, "Measuring sample quality with kernels", ICML, 2017.
    """
    samples, scores, n, _ = _check_inputs(samples, scores)
    options = common.check_ksd_options(kernel, c, beta, bandwidth, statistic)
    chunk = common.check_chunk_size(chunk_size, n)
    total, _ = _sums(samples, scores, options, chunk)
    value = total / common.normalizer(n, options.statistic)
    if validating():
        common.warn_if_nonfinite("ksd", float(value))
    return value


def ksd_test(
    samples: torch.Tensor,
    scores: torch.Tensor,
    *,
    n_bootstrap: int = 1000,
    kernel: str = "imq",
    c: float = 1.0,
    beta: float = -0.5,
    bandwidth: float | torch.Tensor | None = None,
    statistic: str = "u",
    chunk_size: int | None = None,
    weights: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> KSDTest:
    r"""Kernel Stein discrepancy test of the hypothesis that ``samples`` are i.i.d. draws of
    the model whose score at them is ``scores``, by the wild bootstrap [1, 2].

    The statistic is ``ksd(samples, scores, ...)``. With Rademacher multipliers
    :math:`w_b \in \{-1, +1\}^N`, :math:`b = 1..B`, the bootstrap statistics

    .. math::

        S_b = \frac{1}{N(N-1)} \sum_{i \ne j} w_{bi} w_{bj}\, u(x_i, x_j)
        \quad (\text{V: } \tfrac{1}{N^2} \sum_{i, j})

    follow the statistic's null distribution, and the p-value is
    :math:`(1 + \#\{b : S_b \ge \mathrm{KSD}^2\}) / (1 + B)`: under the model it is
    (asymptotically) uniform, so rejecting at ``p_value <= alpha`` has level ``alpha``.
    The cost is :math:`O(N^2 (D + B))`, memory :math:`O(\text{chunk\_size} \cdot (N + B))`.

    Args:
        samples, scores, kernel, c, beta, bandwidth, statistic, chunk_size: as in :func:`ksd`.
        n_bootstrap: ``B``, the number of bootstrap draws (default 1000).
        weights: ``[n_bootstrap, N]`` explicit multipliers instead of drawing Rademacher
            ones (e.g. another backend's draws, or the correlated multipliers of a
            Markov-chain wild bootstrap for dependent samples [2]).
        generator: ``torch.Generator`` for the multipliers (default: the global one).

    Returns:
        ``KSDTest(statistic, p_value)``, 0-d tensors of the promoted dtype.

    Raises:
        TypeError, ValueError: as :func:`ksd`; ``n_bootstrap < 1``; ``weights`` not
            ``[n_bootstrap, N]`` or not finite; ``generator`` not a ``torch.Generator``.

    References:
        [1] Q. Liu, J. D. Lee, M. I. Jordan, "A kernelized Stein discrepancy for
        goodness-of-fit tests", ICML, 2016.

        [2] K. Chwialkowski, H. Strathmann, A. Gretton, "A kernel test of goodness of fit",
        ICML, 2016.

        [3] J. Gorham, L. Mackey, "Measuring sample quality with kernels", ICML, 2017.
    """
    samples, scores, n, _ = _check_inputs(samples, scores)
    options = common.check_ksd_options(kernel, c, beta, bandwidth, statistic)
    n_bootstrap = common.check_n_bootstrap(n_bootstrap)
    chunk = common.check_chunk_size(chunk_size, n, n_bootstrap)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"argument 'generator' must be a torch.Generator, got {type(generator).__name__}")
    if weights is None:
        weights = draw_projections(
            (n_bootstrap, n), "rademacher", generator=generator, dtype=samples.dtype, device=samples.device
        )
    else:
        weights = check_array("weights", weights, dtype="real")
        common.check_weights_shape(tuple(weights.shape), n_bootstrap, n)
        weights = weights.to(dtype=samples.dtype, device=samples.device)
    total, boot = _sums(samples, scores, options, chunk, weights)
    norm = common.normalizer(n, options.statistic)
    statistic = total / norm
    exceed = (boot >= total.detach()).sum()
    p_value = (1.0 + exceed.to(samples.dtype)) / (1.0 + n_bootstrap)
    # a non-finite statistic has no p-value (nan >= b is false for every b: it would read as a rejection)
    p_value = torch.where(torch.isfinite(statistic.detach()), p_value, torch.nan)
    if validating():
        common.warn_if_nonfinite("ksd_test", float(statistic))
    return KSDTest(statistic, p_value)
