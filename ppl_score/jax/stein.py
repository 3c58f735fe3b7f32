r"""Kernel Stein discrepancy and its goodness-of-fit test (JAX).

Mirrors ``ppl_score.torch.stein`` function for function (same formulas, same numbers; see
its docstring and ``ppl_score.common.stein`` for the maths and the references): the squared
KSD of points ``samples [N, D]`` from a model known by its score ``scores [N, D]``, with the
IMQ (default) or RBF kernel, its closed-form derivatives and row chunks (memory
``O(chunk_size * N)``), and the wild-bootstrap test.

- ``ksd(samples, scores, *, kernel="imq", c=1.0, beta=-0.5, bandwidth=None, statistic="u")``
- ``ksd_test(samples, scores, *, key, n_bootstrap=1000, ...)`` -> ``KSDTest(statistic, p_value)``

Both are pure and ``jax.jit``/``jax.vmap``-compatible with the options static (Python
values; one compilation per kernel, shape and chunk size); a ``bandwidth`` may also be a
traced array. Checks that need values (finite inputs,
a zero median bandwidth) run eagerly; under tracing a zero median bandwidth gives NaN.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from ..common import stein as common
from ..common.estimators import bandwidth_underflow_message
from ..common.stein import KSDTest
from ..common.validate import is_validation_enabled
from .estimators import median_bandwidth
from .projections import draw_projections
from .validate import check_array, check_key, is_concrete

__all__ = ["KSDTest", "ksd", "ksd_test"]


def _check_inputs(samples, scores):
    samples = check_array("samples", samples)
    scores = check_array("scores", scores)
    n, d = common.check_ksd_shapes(tuple(samples.shape), tuple(scores.shape))
    dtype = jnp.result_type(samples.dtype, scores.dtype)
    return samples.astype(dtype), scores.astype(dtype), n, d


def _check_options(kernel, c, beta, bandwidth, statistic):
    traced = bandwidth is not None and not isinstance(bandwidth, (int, float)) and not is_concrete(bandwidth)
    return common.check_ksd_options(kernel, c, beta, bandwidth, statistic, traced_bandwidth=traced)


def _stein_rows(xr, sr, x, s, rows, kernel, c, beta, u_stat, h):
    """``u(x_i, x_j)`` for the chunk's rows (global indices ``rows [C]``) and every ``j``:
    ``[C, N]``; the diagonal zero for the U-statistic (``u_stat``; see the torch mirror)."""
    n, d = x.shape
    diag = rows[:, None] == jnp.arange(n)[None, :]
    d2 = jnp.maximum((xr * xr).sum(-1)[:, None] + (x * x).sum(-1)[None, :] - 2.0 * xr @ x.T, 0.0)
    d2 = jnp.where(diag, 0.0, d2)
    ss = sr @ s.T
    a = (sr * xr).sum(-1)[:, None] + (s * x).sum(-1)[None, :] - sr @ x.T - xr @ s.T
    a = jnp.where(diag, 0.0, a)
    if kernel == "imq":
        t = c * c + d2
        u = t**beta * (ss - 2.0 * beta * a / t - 4.0 * beta * (beta - 1.0) * d2 / (t * t) - 2.0 * d * beta / t)
    else:
        k = jnp.exp(-0.5 * (d2 / h / h))
        u = k * (ss + a / h / h - d2 / h / h / h / h + d / h / h)
    return jnp.where(diag & u_stat, 0.0, u)


def _sums(samples, scores, weights, bandwidth, c, beta, u_stat, kernel, chunk):
    """``(sum_ij u_ij, bootstrap sums [B] or None, raw bandwidth)``, one row chunk at a time
    (a ``lax.scan`` over the chunks, the rows padded to a whole number of chunks)."""
    x = samples - samples.mean(0)  # translation invariant; centring keeps d2 accurate
    s = scores
    n, d = x.shape
    dtype = x.dtype
    c, beta = jnp.asarray(c, dtype), jnp.asarray(beta, dtype)
    if kernel == "rbf" and bandwidth is None:
        h_raw = median_bandwidth(x[:: common.median_stride(n)])
        h = jnp.where(h_raw > 0, h_raw, jnp.nan)  # reported eagerly by the caller
    else:
        h_raw = h = jnp.asarray(1.0 if bandwidth is None else bandwidth, dtype)
    n_chunks = -(-n // chunk)
    pad = n_chunks * chunk - n
    xp = jnp.pad(x, ((0, pad), (0, 0)))
    sp = jnp.pad(s, ((0, pad), (0, 0)))
    wp = None if weights is None else jnp.pad(weights, ((0, 0), (0, pad)))

    def chunk_sums(start):
        rows = start + jnp.arange(chunk)
        xr = jax.lax.dynamic_slice(xp, (start, 0), (chunk, d))
        sr = jax.lax.dynamic_slice(sp, (start, 0), (chunk, d))
        u = _stein_rows(xr, sr, x, s, rows, kernel, c, beta, u_stat, h)
        u = jnp.where((rows < n)[:, None], u, 0.0)  # padding rows
        if wp is None:
            return u.sum(), None
        wr = jax.lax.dynamic_slice(wp, (0, start), (wp.shape[0], chunk))
        return u.sum(), ((u @ weights.T) * wr.T).sum(0)

    if n_chunks == 1:
        total, boot = chunk_sums(0)
        return total, boot, h_raw

    def body(carry, start):
        total, boot = carry
        t, b = chunk_sums(start)
        return (total + t, None if boot is None else boot + b), None

    init = (jnp.zeros((), dtype), None if weights is None else jnp.zeros(weights.shape[0], dtype))
    (total, boot), _ = jax.lax.scan(body, init, jnp.arange(n_chunks) * chunk)
    return total, boot, h_raw


def _normalizer(n, u_stat, dtype):
    return jnp.where(u_stat, n * (n - 1.0), n * float(n)).astype(dtype)


# One compiled program per kernel, shape and chunk size: ``c``, ``beta`` and ``u_stat`` (U- or
# V-statistic) are arguments, not constants, so every value shares it.
@partial(jax.jit, static_argnames=("kernel", "chunk"))
def _ksd(samples, scores, bandwidth, c, beta, u_stat, *, kernel, chunk):
    total, _, h_raw = _sums(samples, scores, None, bandwidth, c, beta, u_stat, kernel, chunk)
    return total / _normalizer(samples.shape[0], u_stat, total.dtype), h_raw


@partial(jax.jit, static_argnames=("kernel", "chunk", "n_bootstrap"))
def _ksd_test(samples, scores, weights, key, bandwidth, c, beta, u_stat, *, kernel, chunk, n_bootstrap):
    if weights is None:
        weights = draw_projections(key, (n_bootstrap, samples.shape[0]), "rademacher", samples.dtype)
    total, boot, h_raw = _sums(samples, scores, weights, bandwidth, c, beta, u_stat, kernel, chunk)
    exceed = jnp.sum(boot >= jax.lax.stop_gradient(total))
    p_value = (1.0 + exceed.astype(total.dtype)) / (1.0 + n_bootstrap)
    # a non-finite statistic has no p-value (nan >= b is false for every b: it would read as a rejection)
    p_value = jnp.where(jnp.isfinite(jax.lax.stop_gradient(total)), p_value, jnp.nan)
    return total / _normalizer(samples.shape[0], u_stat, total.dtype), p_value, h_raw


def _check_bandwidth_values(options, dtype):
    bandwidth = options.bandwidth
    if bandwidth is not None and is_concrete(bandwidth) and float(jnp.asarray(bandwidth, dtype)) == 0.0:
        raise ValueError(bandwidth_underflow_message(bandwidth, str(dtype)))


def _warn_if_nonfinite(what, value):
    # eagerly only: under jit / grad the value is a tracer
    if is_validation_enabled() and is_concrete(value):
        common.warn_if_nonfinite(what, float(value), stacklevel=5)


def _check_median(options, h_raw):
    if options.kernel == "rbf" and options.bandwidth is None and is_concrete(h_raw) and not float(h_raw) > 0:
        raise ValueError(common.median_zero_message())


def ksd(
    samples: jax.Array | np.ndarray,
    scores: jax.Array | np.ndarray,
    *,
    kernel: str = "imq",
    c: float = 1.0,
    beta: float = -0.5,
    bandwidth: float | jax.Array | None = None,
    statistic: str = "u",
    chunk_size: int | None = None,
) -> jax.Array:
    r"""The squared kernel Stein discrepancy of ``samples [N, D]`` from the model whose score at
    them is ``scores [N, D]``; see ``ppl_score.torch.stein.ksd`` (same arguments, same
    numbers).

    .. math::

        \mathrm{KSD}^2_U = \frac{1}{N(N-1)} \sum_{i \ne j} u(x_i, x_j), \quad
        u(x, y) = s(x)^T s(y) k + s(x)^T \nabla_y k + s(y)^T \nabla_x k
                  + \operatorname{tr} \nabla_x \nabla_y k,

    IMQ kernel :math:`k = (c^2 + \|x - y\|^2)^\beta` [3] or RBF
    :math:`k = \exp(-\|x - y\|^2 / (2 h^2))` [1, 2]; ``statistic="v"`` averages over all
    :math:`N^2` pairs.

    Args:
        samples: ``[N, D]`` points, ``N >= 2``, finite, floating (a ``jax.Array`` or numpy array).
        scores: ``[N, D]`` the model's score at ``samples``.
        kernel: ``"imq"`` (default) or ``"rbf"``.
        c: the IMQ kernel's scale, ``> 0``.
        beta: the IMQ kernel's exponent, in ``(-1, 0)``.
        bandwidth: the RBF kernel's ``h > 0`` (may be traced), or None for the median heuristic.
        statistic: ``"u"`` (default) or ``"v"``.
        chunk_size: rows per chunk (default: ``ppl_score.common.stein.KSD_MEMORY_BUDGET``).

    Returns:
        A 0-d array in the promoted dtype of ``samples`` and ``scores``, differentiable in both.

    Raises:
        TypeError, ValueError: as the torch twin (eagerly; under tracing a zero median
            bandwidth gives NaN).

    References:
        [1] Q. Liu, J. D. Lee, M. I. Jordan, "A kernelized Stein discrepancy for
        goodness-of-fit tests", ICML, 2016.

        [2] K. Chwialkowski, H. Strathmann, A. Gretton, "A kernel test of goodness of fit",
        ICML, 2016.

        [3] J. Gorham, L. Mackey, "Measuring sample quality with kernels", ICML, 2017.
    """
    samples, scores, n, _ = _check_inputs(samples, scores)
    options = _check_options(kernel, c, beta, bandwidth, statistic)
    chunk = common.check_chunk_size(chunk_size, n)
    _check_bandwidth_values(options, samples.dtype)
    value, h_raw = _ksd(
        samples,
        scores,
        options.bandwidth,
        options.c,
        options.beta,
        options.statistic == "u",
        kernel=options.kernel,
        chunk=chunk,
    )
    _check_median(options, h_raw)
    _warn_if_nonfinite("ksd", value)
    return value


def ksd_test(
    samples: jax.Array | np.ndarray,
    scores: jax.Array | np.ndarray,
    *,
    key: jax.Array | None = None,
    n_bootstrap: int = 1000,
    kernel: str = "imq",
    c: float = 1.0,
    beta: float = -0.5,
    bandwidth: float | jax.Array | None = None,
    statistic: str = "u",
    chunk_size: int | None = None,
    weights: jax.Array | np.ndarray | None = None,
) -> KSDTest:
    r"""Kernel Stein discrepancy test by the wild bootstrap [1, 2]; see
    ``ppl_score.torch.stein.ksd_test`` (same arguments, with ``key`` for ``generator``).

    Bootstrap statistics :math:`S_b = \sum_{i \ne j} w_{bi} w_{bj} u_{ij} / (N(N-1))` for
    Rademacher :math:`w_b` (V: :math:`\sum_{i, j} / N^2`), p-value
    :math:`(1 + \#\{b : S_b \ge \mathrm{KSD}^2\}) / (1 + B)`.

    Args:
        samples, scores, kernel, c, beta, bandwidth, statistic, chunk_size: as in :func:`ksd`.
        key: a ``jax.random`` key for the Rademacher multipliers (required unless ``weights``
            is given).
        n_bootstrap: ``B`` (default 1000).
        weights: ``[n_bootstrap, N]`` explicit multipliers instead of drawn ones.

    Returns:
        ``KSDTest(statistic, p_value)``, 0-d arrays of the promoted dtype.

    Raises:
        TypeError, ValueError: as the torch twin; a bad ``key``, or neither ``key`` nor ``weights``.

    References:
        [1] Q. Liu, J. D. Lee, M. I. Jordan, "A kernelized Stein discrepancy for
        goodness-of-fit tests", ICML, 2016.

        [2] K. Chwialkowski, H. Strathmann, A. Gretton, "A kernel test of goodness of fit",
        ICML, 2016.

        [3] J. Gorham, L. Mackey, "Measuring sample quality with kernels", ICML, 2017.
    """
    samples, scores, n, _ = _check_inputs(samples, scores)
    options = _check_options(kernel, c, beta, bandwidth, statistic)
    n_bootstrap = common.check_n_bootstrap(n_bootstrap)
    chunk = common.check_chunk_size(chunk_size, n, n_bootstrap)
    if weights is None:
        if key is None:
            raise ValueError("argument 'key' is required to draw the bootstrap multipliers (or pass 'weights')")
        key = check_key(key)
    else:
        if key is not None:
            check_key(key)
        key = None  # the multipliers are given
        weights = check_array("weights", weights, dtype="real")
        common.check_weights_shape(tuple(weights.shape), n_bootstrap, n)
        weights = weights.astype(samples.dtype)
    _check_bandwidth_values(options, samples.dtype)
    statistic, p_value, h_raw = _ksd_test(
        samples,
        scores,
        weights,
        key,
        options.bandwidth,
        options.c,
        options.beta,
        options.statistic == "u",
        kernel=options.kernel,
        chunk=chunk,
        n_bootstrap=n_bootstrap,
    )
    _check_median(options, h_raw)
    _warn_if_nonfinite("ksd_test", statistic)
    return KSDTest(statistic, p_value)
