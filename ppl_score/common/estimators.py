"""The framework-free half of ``ppl_score.{torch,jax}.estimators``: score estimators' options.

The option checks, defaults and error messages of the kernel (Stein, spectral) and learned
score estimators, written once for both backends; imports neither torch nor JAX. Every check
raises ``TypeError`` for a wrong type and ``ValueError`` for a wrong value, naming the argument.
"""

from __future__ import annotations

import numbers
from typing import Any

from .validate import check_int, check_positive_float

__all__ = [
    "KERNEL_ESTIMATORS",
    "LEARNED_METHODS",
    "LEARNED_N_STEPS",
    "LEARNED_LR",
    "check_positive",
    "check_samples_shape",
    "check_at_shape",
    "check_eta",
    "check_threshold",
    "check_n_eigen",
    "check_bandwidth",
    "singular_tolerance",
    "singular_message",
    "bandwidth_underflow_message",
    "refused_step_message",
    "check_learned_method",
    "check_kernel_name",
    "check_kernel_estimator",
    "median_positions",
    "estimator_kind",
    "check_kernel_particles",
    "check_learned_dim",
    "check_context_rows",
    "check_callable_scores",
    "nonfinite_scores_message",
]

KERNEL_ESTIMATORS = ("stein", "spectral")


# Objectives of section 1 a score network is trained by (kind="score"): the others need
# second derivatives of a network that is itself a derivative (esm, ssm) or add nothing.
LEARNED_METHODS = ("ssm_vr", "fd_ssm", "dsm")


# Defaults of the learned estimators (both backends): Adam steps per ``update`` (one
# ImplicitELBO / WAE loss evaluation) and their learning rate. One step at 1e-3 lets the
# guide outrun the score network, which then underestimates the entropy gradient and the
# guide collapses (posterior sd 0.26-0.39 of the exact one on a conjugate Gaussian, 0.09-1.15
# on Bayesian logistic regressions); 5 steps at 3e-3 are enough for the wider posteriors but
# not the narrow one (0.63-0.97); 10 steps at 3e-3 track all of them (docs page *Score estimators*, "Tuning a
# learned estimator").
LEARNED_N_STEPS = 10


LEARNED_LR = 3e-3


# ``check_positive(name, value)`` and ``check_int(name, value, low, high)``
check_positive = check_positive_float


def _is_real(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, numbers.Real)


def check_samples_shape(shape: tuple, name: str = "samples") -> tuple[int, int]:
    """``samples`` is ``[N, D]`` with ``N >= 2`` (the median heuristic needs a pair)."""
    shape = tuple(shape)
    if len(shape) != 2:
        raise ValueError(f"argument {name!r} must have shape [N, D], got {shape}")
    n, d = shape
    if n < 2:
        raise ValueError(f"argument {name!r} must hold at least 2 samples (N >= 2), got N = {n}")
    if d < 1:
        raise ValueError(f"argument {name!r} must have D >= 1 columns, got shape {shape}")
    return n, d


def check_at_shape(shape: tuple, d: int) -> int:
    """``at`` is ``[K, D]`` with the ``D`` of ``samples``."""
    shape = tuple(shape)
    if len(shape) != 2 or shape[1] != d:
        raise ValueError(f"argument 'at' must have shape [K, {d}] (D of 'samples'), got {shape}")
    return shape[0]


def check_eta(eta: Any) -> float:
    return check_positive("eta", eta)


def check_threshold(threshold: Any) -> float:
    if not _is_real(threshold):
        raise TypeError(f"argument 'threshold' must be a real number in (0, 1], got {type(threshold).__name__}")
    threshold = float(threshold)
    if not (0.0 < threshold <= 1.0):
        raise ValueError(f"argument 'threshold' must be in (0, 1], got {threshold!r}")
    return threshold


def check_n_eigen(n_eigen: Any, n: int) -> int | None:
    if n_eigen is None:
        return None
    return check_int("n_eigen", n_eigen, 1, n)


def check_bandwidth(bandwidth: Any) -> float | None:
    """``None`` (median heuristic) or a finite number ``> 0``; a 0-d array is accepted."""
    if bandwidth is None:
        return None
    if not _is_real(bandwidth):
        try:
            bandwidth = float(bandwidth)  # 0-d torch / numpy / JAX arrays
        except (TypeError, ValueError):
            raise TypeError(
                f"argument 'bandwidth' must be None or a positive real number, got {type(bandwidth).__name__}"
            ) from None
    return check_positive("bandwidth", bandwidth)


def singular_tolerance(n: int, eps: float, eta: float) -> float:
    """Squared Cholesky pivots of ``K + eta I`` (``N x N``, unit diagonal) at or below this are
    numerical zeros: the matrix's condition then exceeds ``1 / ((N + 1) eps)`` and its solve
    carries no correct digit. The usual rank tolerance (``size * eps * largest entry``)."""
    return (n + 1) * eps * (1.0 + eta)


def singular_message(eta: float, bandwidth: Any, dtype: str, where: str = "samples") -> str:
    """The error for a numerically singular Stein system, naming ``eta`` and ``bandwidth``."""
    what = "duplicate or near-duplicate samples" if where == "samples" else "a row of 'at' on (or next to) a sample"
    h = "the median heuristic" if bandwidth is None else f"{float(bandwidth):g}"
    return (
        f"stein_scores: K + eta I is numerically singular in {dtype} (argument 'eta'={eta:g}, "
        f"argument 'bandwidth'={h}): {what} make K singular and eta is below the round-off of the "
        "solve, so the estimate would be noise. Increase 'eta' (e.g. to the default 0.1), use "
        "float64, or remove the duplicates"
    )


def bandwidth_underflow_message(bandwidth: Any, dtype: str) -> str:
    return f"argument 'bandwidth'={float(bandwidth):g} is 0 in {dtype} (underflow); pass a larger bandwidth"


def refused_step_message(loss: float) -> str:
    """The error for a learned-estimator step refused because it is not finite."""
    return (
        f"argument 'samples': the score-matching loss ({loss}) or its gradient is not finite on these "
        "samples (values so large that the score network overflows, or a diverged network); the step "
        "was refused and the estimator's state is unchanged. Rescale or filter the samples, or lower the "
        "learning rate"
    )


def check_learned_method(method: Any) -> str:
    if not isinstance(method, str):
        raise TypeError(f"argument 'method' must be a string, got {type(method).__name__}")
    if method not in LEARNED_METHODS:
        raise ValueError(f"argument 'method' must be one of {LEARNED_METHODS} for a score network, got {method!r}")
    return method


def check_kernel_name(name: Any, argname: str = "estimator") -> str:
    if name not in KERNEL_ESTIMATORS:
        raise ValueError(
            f"argument {argname!r} must be a learned score estimator, a callable, or one of "
            f"{KERNEL_ESTIMATORS}, got {name!r}"
        )
    return name


def check_kernel_estimator(name: Any, num_particles: int) -> str:
    """A kernel estimator's name, and enough particles for it: it estimates the score across
    the particles of one step."""
    check_kernel_name(name)
    if num_particles < 2:
        raise ValueError(
            f"argument 'num_particles' must be >= 2 with the {name!r} kernel estimator, "
            f"which estimates the score across particles; got {num_particles}"
        )
    return name


def median_positions(n_pairs: int) -> tuple[int, int]:
    """Positions in the sorted pairwise distances whose average is the median (the two
    middle values for an even count, the middle one twice for an odd count)."""
    return (n_pairs - 1) // 2, n_pairs // 2


def estimator_kind(estimator: Any, learned_type: type) -> str:
    """``"learned"`` (an instance of the backend's ``learned_type``), ``"stein"``,
    ``"spectral"`` or ``"callable"``.

    Raises:
        ValueError: an unknown estimator name.
        TypeError: anything else.
    """
    if isinstance(estimator, learned_type):
        return "learned"
    if isinstance(estimator, str):
        return check_kernel_name(estimator)
    if callable(estimator):
        return "callable"
    raise TypeError(
        "argument 'estimator' must be a LearnedScoreEstimator, 'stein', 'spectral', a callable "
        f"score(z, context), or a dict of these per site; got {type(estimator).__name__}"
    )


def check_kernel_particles(name: str, kind: str, p: int) -> None:
    if p < 2:
        raise ValueError(
            f"site {name!r}: the {kind!r} kernel estimator needs num_particles >= 2 "
            "(it estimates the score across the particles of each batch element)"
        )


def check_learned_dim(name: str, est_dim: int, d: int) -> None:
    if d != est_dim:
        raise ValueError(f"site {name!r}: the learned estimator has dim={est_dim}, the site's event size is {d}")


def check_context_rows(name: str, rows: int, n_batch: int, batch: tuple) -> None:
    if rows != n_batch:
        raise ValueError(
            f"site {name!r}: the context has {rows} rows, the site has {n_batch} batch elements "
            f"(batch shape {tuple(batch)})"
        )


def check_callable_scores(name: str, out: Any, z_shape: tuple, array_type: type | tuple) -> None:
    """A callable estimator's output must be an array of ``z``'s shape."""
    if not isinstance(out, array_type) or tuple(out.shape) != tuple(z_shape):
        raise ValueError(
            f"site {name!r}: argument 'estimator' must return scores of the shape of z, {tuple(z_shape)}, "
            f"got {getattr(out, 'shape', type(out).__name__)}"
        )


def nonfinite_scores_message(name: str) -> str:
    return f"site {name!r}: the score estimator returned non-finite values (nan or inf)"
