"""Framework-free pieces of the deep equilibrium layers (``ppl_score.torch.deq``,
``ppl_score.jax.deq``): option names, the configuration tuples and their checks, the
convergence report and the non-convergence warning / error. Imports neither torch nor JAX.

Both backends re-export every public name here, so ``ppl_score.torch.deq.FixedPointWarning``
and ``ppl_score.jax.deq.FixedPointWarning`` are the same class. What differs per backend (the
activation functions, the torch classes / JAX functions accepted as activation aliases, how
a solve's convergence reaches the host) stays in the backend, which then calls
``deq_config`` / ``report_nonconvergence`` here.
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Any, NamedTuple, Sequence, SupportsFloat, SupportsInt

from .validate import check_choice, check_int, check_positive_float

__all__ = [
    "SOLVERS",
    "BACKWARDS",
    "NORMS",
    "POLICIES",
    "ACTIVATION_NAMES",
    "ANDERSON_REG",
    "DEFAULT_SOLVER",
    "DEFAULT_TOL",
    "DEFAULT_GAMMA",
    "DEFAULT_MAX_ITER",
    "DEFAULT_MEMORY",
    "anderson_reg",
    "FixedPointInfo",
    "SolverConfig",
    "DEQConfig",
    "FixedPointWarning",
    "FixedPointError",
    "check_choice",
    "check_positive_float",
    "solver_config",
    "deq_config",
    "check_gamma",
    "check_map_output",
    "nonconvergence_message",
    "report_nonconvergence",
]

SOLVERS = ("anderson", "iteration")
BACKWARDS = ("implicit", "phantom", "unrolled")
NORMS = ("spectral", "frobenius")
POLICIES = ("warn", "raise", "ignore")
# the 1-Lipschitz smooth activations; each backend's ``ACTIVATIONS`` maps these names to functions
ACTIVATION_NAMES = ("softplus", "tanh")
# Anderson: relative Tikhonov regularization of the normalized Gram matrix (see anderson_reg).
ANDERSON_REG = 1e-8

# The defaults of every DEQ layer and fixed-point solve, torch and JAX, Pyro and NumPyro
# (the signatures and NamedTuples below use these names; nothing else spells the values).
# Chosen by ``benchmarks/deq_defaults.py`` (``benchmarks/results/deq_defaults_*_run*.json``;
# ``benchmarks/README.md``, "DEQ defaults", has the table). Per training step of the
# width-128 DEQ energy under ``ssm_vr`` on CPU, float32, against a depth-2 MLP step:
#
# - ``solver="iteration"``: plain iteration needs 1.17-1.96x the iterations of Anderson
#   but each costs one map evaluation instead of one plus a batched ``memory x memory``
#   least-squares solve, and the step is 1.4-2.7x cheaper (torch and JAX alike). Anderson
#   remains the choice for a map much more expensive than the layer's one matrix product,
#   or for ``gamma`` near 1, where plain iteration needs ``log(tol) / log(gamma)`` steps.
# - ``tol=1e-4``: the parameter gradient's relative error is 0.7-6x ``tol``, far below the
#   minibatch noise of the gradient; held-out SM after training is within 0.06 of
#   ``1e-6``'s in torch and 0.13 above it in JAX at ``gamma=0.9`` (one seed, about the seed
#   noise), and ``1e-6`` costs 1.15-1.45x the step of ``1e-4``. In float32 ``1e-6`` is also near round-off (the residual is relative to
#   ``1 + ||f(z)||``, float32 eps 1.2e-7), and with ``gamma=0.9`` plain iteration may need
#   ``log(1e-6) / log(0.9) = 131 > max_iter`` steps. ``1e-3`` saves another 0-30% for a
#   gradient error of 0.1-0.6%. Tests and float64 checks pass their own tighter ``tol``.
# - ``gamma=0.9``: ``gamma`` is part of the model (how much of itself the layer feeds back),
#   not only of the solve: on the 16-D mixture ``0.9`` fits better than ``0.5`` (held-out
#   SM lower by 0.12-0.33), on the 8x8 digits ``0.5`` does; ``0.5`` converges in fewer
#   iterations (1.16-1.87x cheaper steps).
DEFAULT_SOLVER = "iteration"
DEFAULT_TOL = 1e-4
DEFAULT_GAMMA = 0.9
DEFAULT_MAX_ITER = 100
DEFAULT_MEMORY = 5


def anderson_reg(eps: float) -> float:
    """Relative Tikhonov regularization of Anderson's Gram matrix for a dtype of machine
    epsilon ``eps``: ``lambda = max(ANDERSON_REG, 10 * eps)``, added to the diagonal of the
    Gram matrix normalized to unit mean diagonal, i.e. ``lambda * trace(G) / m`` in absolute
    terms: it scales with the dtype and with the size of the residuals.

    The Gram matrix of the last ``m`` residuals is singular whenever they are linearly
    dependent, which is the rule near convergence and for any map affine in ``z``
    (``f(z) = a z + b`` makes every residual a multiple of the first). A fixed ``1e-8`` is
    below float32's round-off (``eps = 1.2e-7``) and leaves it exactly singular; ``10 eps``
    is the smallest value that registers on the unit diagonal with a margin, and larger
    ones slow convergence (``100 eps`` costs float32 solves 1-2 extra iterations on the
    tests' layers). Float64 keeps ``1e-8``. Whatever the solve still gets wrong (singular
    or non-finite coefficients) falls back to a plain fixed-point step, per example.
    """
    return max(ANDERSON_REG, 10.0 * eps)


class FixedPointWarning(RuntimeWarning):
    """A fixed-point solve stopped at ``max_iter`` above its tolerance."""


class FixedPointError(RuntimeError):
    """A fixed-point solve did not converge and ``on_nonconvergence="raise"``."""


class FixedPointInfo(NamedTuple):
    """Convergence of one solve: number of map evaluations, the worst example's relative
    residual ``||f(z) - z|| / (1 + ||f(z)||)`` at the last one, and whether it is ``<= tol``.
    Python scalars in torch, arrays in JAX."""

    iterations: Any
    residual: Any
    converged: Any


class SolverConfig(NamedTuple):
    """A fixed-point solve (see ``solver_config``); the defaults are the ``DEFAULT_*``
    names above."""

    solver: str = DEFAULT_SOLVER
    tol: float = DEFAULT_TOL
    max_iter: int = DEFAULT_MAX_ITER
    memory: int = DEFAULT_MEMORY
    on_nonconvergence: str = "warn"


class DEQConfig(NamedTuple):
    """Everything static about a DEQ layer but its sizes (the same in both backends;
    hashable, so a static argument under ``jit``)."""

    activation: str = "softplus"
    gamma: float = DEFAULT_GAMMA
    norm: str = "spectral"
    backward: str = "implicit"
    phantom_steps: int = 2
    solver: SolverConfig = SolverConfig()


# ---------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------


def solver_config(
    solver: str = DEFAULT_SOLVER,
    tol: float = DEFAULT_TOL,
    max_iter: int = DEFAULT_MAX_ITER,
    memory: int = DEFAULT_MEMORY,
    on_nonconvergence: str = "warn",
) -> SolverConfig:
    """Validated ``SolverConfig``.

    Args:
        solver: ``"iteration"`` (default: plain ``z <- f(z)``, one map evaluation per
            step) or ``"anderson"`` (Anderson acceleration: 1.17-1.96x fewer iterations, but
            each adds a batched ``memory x memory`` least-squares solve; on the layer's cheap
            map the training step is 1.4-2.7x slower; worth it for expensive maps or
            ``gamma`` near 1).
        tol: stop when every example's ``||f(z) - z|| <= tol * (1 + ||f(z)||)``. Default
            ``1e-4``: gradients then carry a relative error of 0.7-6x ``tol``; ``1e-6`` costs
            1.15-1.45x the training step for a fit within about the seed noise, ``1e-3``
            saves 0-30% for a gradient error of 0.1-0.6% (``benchmarks/deq_defaults.py``).
        max_iter: the most map evaluations per solve (forward and each adjoint solve).
        memory: Anderson's history length (ignored by ``"iteration"``).
        on_nonconvergence: ``"warn"``, ``"raise"`` or ``"ignore"``.
    """
    return SolverConfig(
        check_choice("solver", solver, SOLVERS),
        check_positive_float("tol", tol),
        check_int("max_iter", max_iter),
        check_int("memory", memory),
        check_choice("on_nonconvergence", on_nonconvergence, POLICIES),
    )


def deq_config(
    activation: str = "softplus",
    gamma: float = DEFAULT_GAMMA,
    norm: str = "spectral",
    backward: str = "implicit",
    phantom_steps: int = 2,
    solver: str = DEFAULT_SOLVER,
    tol: float = DEFAULT_TOL,
    max_iter: int = DEFAULT_MAX_ITER,
    memory: int = DEFAULT_MEMORY,
    on_nonconvergence: str = "warn",
) -> DEQConfig:
    """Validated ``DEQConfig``; ``activation`` is a name (the backends' ``deq_config`` also
    map their activation classes / functions to it).

    Args:
        activation: ``"softplus"`` or ``"tanh"`` (1-Lipschitz, so the map stays contractive).
        gamma: in (0, 1), the bound on the map's Lipschitz constant. Part of the model, not
            only of the solve: a higher ``gamma`` lets the layer feed more of itself back and
            needs more iterations (about ``log(tol) / log(gamma)`` for plain iteration).
            Default ``0.9`` (fits the 16-D mixture of ``benchmarks/deq.py`` better than
            ``0.5``; ``0.5`` fits the 8x8 digits better and makes steps 1.16-1.87x cheaper).
        norm: ``"spectral"`` (exact) or ``"frobenius"`` (a cheaper upper bound).
        backward: ``"implicit"``, ``"phantom"`` or ``"unrolled"``.
        phantom_steps: the number of unrolled steps of ``"phantom"``.
        solver, tol, max_iter, memory, on_nonconvergence: see ``solver_config`` (defaults
            ``"iteration"``, ``1e-4``: the trade-off is measured there).
    """
    if not isinstance(activation, str) or activation not in ACTIVATION_NAMES:
        raise ValueError(
            f"argument 'activation' must be one of {', '.join(map(repr, ACTIVATION_NAMES))} (a 1-Lipschitz "
            f"smooth activation, so the map stays contractive), got {activation!r}"
        )
    gamma = check_positive_float("gamma", gamma)
    if not gamma < 1:
        raise ValueError(f"argument 'gamma' must be in (0, 1) for a contraction, got {gamma}")
    return DEQConfig(
        activation,
        gamma,
        check_choice("norm", norm, NORMS),
        check_choice("backward", backward, BACKWARDS),
        check_int("phantom_steps", phantom_steps),
        solver_config(solver, tol, max_iter, memory, on_nonconvergence),
    )


def check_gamma(gamma: Any, concrete: bool = True) -> float:
    """``lipschitz_scaled``'s bound: a finite real number ``> 0``. ``concrete=False`` (a
    traced JAX value) skips the value check and returns ``gamma`` unchanged.

    Raises:
        TypeError: ``gamma`` is not a real number (a ``bool`` is not one).
        ValueError: ``gamma`` is not finite or ``<= 0``.
    """
    if not concrete:
        return gamma
    if not isinstance(gamma, numbers.Real) and getattr(gamma, "shape", None) == ():
        gamma = float(gamma)  # a 0-d array (numpy, torch, concrete JAX)
    return check_positive_float("gamma", gamma)


def check_map_output(
    out_shape: Sequence[int], out_dtype: Any, z_shape: Sequence[int], z_dtype: Any, name: str = "f"
) -> None:
    """A fixed-point map must return an array of the shape and dtype of its input ``z``.

    Raises:
        ValueError: the shape differs (a map ``R^n -> R^m`` has no fixed point).
        TypeError: the dtype differs.
    """
    if tuple(out_shape) != tuple(z_shape):
        raise ValueError(
            f"argument {name!r} must map z to an array of the same shape, got shape {tuple(out_shape)} for z of "
            f"shape {tuple(z_shape)}: a fixed point needs f(z) shaped like z (and z0 like the fixed point)"
        )
    if out_dtype != z_dtype:
        raise TypeError(
            f"argument {name!r} must map z to an array of the same dtype, got {out_dtype} for z of dtype "
            f"{z_dtype}: give z0 the dtype of f's output (or cast inside f)"
        )


# ---------------------------------------------------------------------------------------
# Non-convergence
# ---------------------------------------------------------------------------------------


def nonconvergence_message(what: str, residual: SupportsFloat, iterations: SupportsInt, cfg: SolverConfig) -> str:
    """``residual`` / ``iterations``: the worst example's (a float / int, or a numpy scalar).
    A non-finite residual means the map itself returned NaN or inf (a NaN weight or input,
    or an overflow), which no number of iterations fixes: the message says so."""
    residual = float(residual)
    if not math.isfinite(residual):
        return (
            f"DEQ {what} fixed-point solve did not converge: the map returned non-finite values (nan or inf) "
            f"after {iterations} iterations (solver={cfg.solver!r}); check the map's parameters (a NaN or inf "
            f"weight?) and its input"
        )
    return (
        f"DEQ {what} fixed-point solve did not converge: relative residual {residual:.3g} > "
        f"tol={cfg.tol:g} after {iterations} iterations (solver={cfg.solver!r}); raise "
        f"max_iter, loosen tol, or lower gamma"
    )


def report_nonconvergence(
    what: str, residual: SupportsFloat, iterations: SupportsInt, cfg: SolverConfig, stacklevel: int = 1
) -> None:
    """Apply ``cfg.on_nonconvergence`` to a solve that did not converge: raise
    ``FixedPointError``, warn ``FixedPointWarning`` or do nothing. ``stacklevel`` counts
    from the caller, as in ``warnings.warn``."""
    if cfg.on_nonconvergence == "ignore":
        return
    msg = nonconvergence_message(what, residual, iterations, cfg)
    if cfg.on_nonconvergence == "raise":
        raise FixedPointError(msg)
    warnings.warn(msg, FixedPointWarning, stacklevel=stacklevel + 1)
