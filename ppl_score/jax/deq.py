"""Deep equilibrium (DEQ) layers, energies and score models (JAX).

A DEQ layer replaces a deep stack by the fixed point of one weight-tied map,

    z*(x) = f(z*, x),    f(z, x) = act(z W_hat + x U + b),
    W_hat = W / max(1, ||W|| / gamma),

with ``act`` 1-Lipschitz (softplus, tanh) and ``||W||`` the spectral norm (exact, by SVD)
or the Frobenius norm (an upper bound of it). Then ``Lip_z(f) <= ||W_hat||_2 <= gamma < 1``:
``f`` is a contraction in ``z`` for every ``x`` and the fixed point exists, is unique, and
plain iteration converges to it from any start (Banach). This is the norm-scaled variant of
the map ``softplus(B softplus(A z)) / (C ||A||_F ||B||_F) + y(x)`` of Huang et al. [2].

Forward: plain iteration (the default) or Anderson acceleration in a ``lax.while_loop``
(memory does not grow with the number of iterations). The defaults of every option
(``solver``, ``tol``, ``gamma``, ...) are ``ppl_score.common.deq.DEFAULT_*``, shared with torch;
their cost and accuracy: ``deq_layer_apply``. Backward modes:

- ``"implicit"``: a ``jax.custom_jvp`` whose tangent rule is the implicit function theorem,
  ``dz = (I - J)^{-1} (df/dtheta) dtheta`` with ``J = df/dz`` at ``z*``, solved by
  ``lax.custom_linear_solve`` with fixed-point iteration of ``u <- b + J u`` (and of
  ``u <- b + J^T u`` for the transpose, which reverse mode uses). The rule is built from
  differentiable pieces (the fixed point itself, ``jvp`` of ``f``, a linear solve JAX knows how
  to differentiate and transpose), so ``grad``, ``jvp``-of-``grad`` (the Hessian-vector
  products of score matching) and ``grad`` of a score-matching loss are exact up to the
  solver tolerance, at constant memory in the number of iterations.
- ``"phantom"``: ``K`` steps ``z <- f(z, x)`` from the ``stop_gradient`` of the fixed point
  (the "phantom gradient" of Huang et al.'s code [2]); it truncates the Neumann series of
  ``(I - J)^{-1}`` after ``K`` terms, so its error decays like ``gamma^K``.
- ``"unrolled"``: ``max_iter`` plain iterations from ``z0`` in a ``lax.scan``, differentiated
  through (memory grows with ``max_iter``): the reference the other two are tested against.

``optimistix.fixed_point`` with ``ImplicitAdjoint`` also composes with ``jvp``-of-``grad``
(checked in ``tests/jax/test_deq.py``); this module keeps its own solver for Anderson
acceleration, the convergence report and the mirror of the torch backend.

Convergence: iteration stops when every example satisfies
``||f(z) - z|| <= tol * (1 + ||f(z)||)``; ``FixedPointInfo(iterations, residual,
converged)`` reports the worst example's relative residual (as arrays). A solve that does
not converge warns (``FixedPointWarning``), raises (``FixedPointError``; under ``jit`` it
surfaces wrapped in JAX's runtime error) or is ignored, per ``on_nonconvergence``; the check
runs on the host through ``jax.debug.callback``.

Faults: Anderson's least-squares step is regularized relative to the dtype and to the size
of the residuals (``common.anderson_reg``: ``max(1e-8, 10 eps)`` of the normalized Gram
matrix), and an example whose step is still singular or non-finite takes a plain step
instead (``jnp.where``: jit-compatible). A map that returns NaN or inf (a NaN
weight, a NaN input) stops the solve at once and goes through the same policy, with a
message that says so; a map that changes the shape or dtype of ``z`` is a
``ValueError`` / ``TypeError`` naming ``f``.

Parameters are dicts in the layout of ``ppl_score.torch.deq.deq_params``.

References:
    [1] S. Bai, J. Z. Kolter, V. Koltun, "Deep equilibrium models", NeurIPS, 2019.

    [2] Y. Huang, Q. Wang, A. Onwunta, B. Wang, "Efficient score matching with deep equilibrium
    layers", ICLR, 2024.
"""

from __future__ import annotations

import math
from functools import partial, wraps
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ..common import deq as common
from ..common.deq import (  # noqa: F401  (re-exported: the framework-free part, shared with ppl_score.torch.deq)
    ANDERSON_REG,
    BACKWARDS,
    DEFAULT_GAMMA,
    DEFAULT_MAX_ITER,
    DEFAULT_MEMORY,
    DEFAULT_SOLVER,
    DEFAULT_TOL,
    NORMS,
    POLICIES,
    SOLVERS,
    DEQConfig,
    FixedPointError,
    FixedPointInfo,
    FixedPointWarning,
    SolverConfig,
    solver_config,
)
from ..common.validate import check_choice as _choice
from ..common.validate import check_int
from .validate import check_key, is_concrete

__all__ = [
    "SOLVERS",
    "BACKWARDS",
    "NORMS",
    "ACTIVATIONS",
    "FixedPointInfo",
    "SolverConfig",
    "DEQConfig",
    "FixedPointWarning",
    "FixedPointError",
    "solver_config",
    "deq_config",
    "solve",
    "fixed_point",
    "lipschitz_scaled",
    "deq_layer_init",
    "deq_layer_apply",
    "deq_energy_init",
    "deq_energy_apply",
    "deq_score_init",
    "deq_score_apply",
]

# a pytree of arrays (the parameters a fixed-point map is differentiated in)
Params = Any

ACTIVATIONS = {"softplus": jax.nn.softplus, "tanh": jnp.tanh}  # keys: common.ACTIVATION_NAMES
# the functions themselves are accepted for parity with ``nets.energy_apply(activation=...)``
_ACTIVATION_FUNCTIONS = {jax.nn.softplus: "softplus", jnp.tanh: "tanh"}


@wraps(common.deq_config, assigned=())  # signature: that of the shared deq_config
# ``Any``: typing.get_type_hints reads a wrapper's annotations in the globals of ``common.deq``
def deq_config(activation: Any = "softplus", *args: Any, **kwargs: Any) -> DEQConfig:
    """Validated ``DEQConfig`` (hashable: pass it as a static argument under ``jit``).
    ``gamma`` in (0, 1) bounds the Lipschitz constant of the map. ``activation`` is
    ``"softplus"`` / ``"tanh"`` or ``jax.nn.softplus`` / ``jnp.tanh``."""
    if callable(activation) and activation in _ACTIVATION_FUNCTIONS:
        activation = _ACTIVATION_FUNCTIONS[activation]
    return common.deq_config(activation, *args, **kwargs)


def _host_report(converged, residual, iterations, *, cfg: SolverConfig, what: str) -> None:
    converged, residual, iterations = np.asarray(converged), np.asarray(residual), np.asarray(iterations)
    if converged.all():
        return
    common.report_nonconvergence(what, residual.max(), iterations.max(), cfg, stacklevel=2)


def _report(info: FixedPointInfo, cfg: SolverConfig, what: str) -> None:
    if cfg.on_nonconvergence == "ignore":
        return
    if is_concrete(info.converged):  # eager: report right here
        _host_report(info.converged, info.residual, info.iterations, cfg=cfg, what=what)
        return
    jax.debug.callback(partial(_host_report, cfg=cfg, what=what), info.converged, info.residual, info.iterations)


# ---------------------------------------------------------------------------------------
# Solvers: ``step`` maps z [B, *shape] -> f(z); they are not differentiated.
# ---------------------------------------------------------------------------------------


def _residuals(fz: jax.Array, z: jax.Array) -> jax.Array:
    """Per-example ``||f(z) - z|| / (1 + ||f(z)||)``."""
    b = fz.shape[0]
    return jnp.linalg.norm((fz - z).reshape(b, -1), axis=-1) / (1 + jnp.linalg.norm(fz.reshape(b, -1), axis=-1))


def _info(k, res, cfg: SolverConfig) -> FixedPointInfo:
    return FixedPointInfo(k, res, res <= cfg.tol)


def _check_output(fz, z) -> None:
    """``f(z)`` must be an array shaped like ``z`` (static: checked when the loop body is
    traced, before ``lax`` would reject the carry with its own error)."""
    if not hasattr(fz, "shape") or not hasattr(fz, "dtype"):
        raise TypeError(f"argument 'f' must return an array, got {type(fz).__name__}")
    common.check_map_output(fz.shape, fz.dtype, z.shape, z.dtype)


def _go_on(k, res, cfg: SolverConfig):
    """Iterate while ``k < max_iter`` and the residual is above ``tol`` but finite: a NaN /
    inf residual (the map returned non-finite values) cannot recover (torch: the same)."""
    return (k < cfg.max_iter) & ((k == 0) | ((res > cfg.tol) & jnp.isfinite(res)))


def _iteration(step, z0, cfg: SolverConfig):
    def cond(c):
        k, _, res = c
        return _go_on(k, res, cfg)

    def body(c):
        k, z, _ = c
        fz = step(z)
        _check_output(fz, z)
        return k + 1, fz, _residuals(fz, z).max()

    k, z, res = lax.while_loop(cond, body, (jnp.int32(0), z0, jnp.asarray(jnp.inf, z0.dtype)))
    return z, _info(k, res, cfg)


def _anderson_mix(xs, fs, k, m: int):
    """Anderson's next iterate from the ring buffers ``xs``, ``fs`` ``[B, m, N]`` holding
    ``min(k, m)`` valid entries, the newest in slot ``(k - 1) % m``: ``sum_i alpha_i f_i``
    with ``alpha`` minimizing ``||sum_i alpha_i (f_i - x_i)||`` subject to
    ``sum_i alpha_i = 1``, i.e. ``alpha ~ A^{-1} 1`` with ``A`` the Gram matrix of the
    residuals, normalized to unit mean diagonal and regularized by ``anderson_reg`` of the
    dtype. Invalid slots get identity rows and a zero right-hand side, so every shape is
    fixed.

    An example whose system is singular anyway, or whose coefficients are not finite (a Gram
    matrix that overflowed), takes the plain step ``f`` of its newest iterate instead (a
    ``jnp.where``: no Python branch on traced values). A solve stops at the first
    non-finite residual, so a non-finite ``f`` is never mixed in."""
    valid = (jnp.arange(m) < jnp.minimum(k, m)).astype(xs.dtype)  # [m]
    tiny = jnp.finfo(xs.dtype).tiny
    g = (fs - xs) * valid[:, None]
    gram = g @ jnp.swapaxes(g, 1, 2)  # [B, m, m]
    scale = jnp.trace(gram, axis1=1, axis2=2) / valid.sum()
    gram = gram / jnp.maximum(scale, tiny)[:, None, None]
    eye = jnp.eye(m, dtype=xs.dtype)
    outer = valid[:, None] * valid[None, :]
    reg = common.anderson_reg(float(jnp.finfo(xs.dtype).eps))
    a = gram * outer + eye * (reg * valid + (1 - valid))
    alpha = jnp.linalg.solve(a, jnp.broadcast_to(valid, (xs.shape[0], m))[..., None])[..., 0]
    total = alpha.sum(-1, keepdims=True)  # finite iff every coefficient is
    # a plain step is the mix with weight 1 on the newest slot: only [B, m] is selected
    alpha = jnp.where(jnp.isfinite(total), alpha / total, eye[(k - 1) % m])
    return (alpha[:, None, :] @ fs)[:, 0]


def _anderson(step, z0, cfg: SolverConfig):
    b, shape, m = z0.shape[0], z0.shape, cfg.memory
    xs = jnp.zeros((b, m, math.prod(shape[1:])), z0.dtype)

    def cond(c):
        k, *_, res = c
        return _go_on(k, res, cfg)

    def body(c):
        k, z, _, xs, fs, _ = c
        fz = step(z)
        _check_output(fz, z)
        xs = xs.at[:, k % m].set(z.reshape(b, -1))
        fs = fs.at[:, k % m].set(fz.reshape(b, -1))
        znext = _anderson_mix(xs, fs, k + 1, m).reshape(shape)
        return k + 1, znext, fz, xs, fs, _residuals(fz, z).max()

    init = (jnp.int32(0), z0, z0, xs, xs, jnp.asarray(jnp.inf, z0.dtype))
    k, _, fz, _, _, res = lax.while_loop(cond, body, init)
    return fz, _info(k, res, cfg)


_SOLVE = {"iteration": _iteration, "anderson": _anderson}


def solve(
    step: Callable[[jax.Array], jax.Array], z0: jax.Array, cfg: SolverConfig = SolverConfig(), what: str = "forward"
) -> tuple[jax.Array, FixedPointInfo]:
    """Fixed point of ``step`` from ``z0`` ``[B, *shape]`` (not differentiated): ``(z, info)``,
    with the non-convergence policy of ``cfg`` applied."""
    z, info = _SOLVE[cfg.solver](step, lax.stop_gradient(z0), cfg)
    _report(info, cfg, what)
    return z, info


# ---------------------------------------------------------------------------------------
# Implicit differentiation, exact at every order
# ---------------------------------------------------------------------------------------


def _zero_tangent(a: jax.Array):
    if jnp.issubdtype(a.dtype, jnp.inexact):
        return jnp.zeros_like(a)
    return np.zeros(a.shape, dtype=jax.dtypes.float0)


def _linear_fixed_point(cfg: SolverConfig, what: str, matvec, b):
    """Solve ``matvec(u) = b`` for ``matvec = I - J`` (or its transpose) as the fixed point
    ``u = b + (u - matvec(u))``, a contraction with the same rate as the forward map."""
    u, _ = solve(lambda u: b + u - matvec(u), b, cfg, what)
    return u


@partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _implicit(f, cfg: SolverConfig, z0, params):
    return solve(lambda z: f(z, params), z0, cfg)


@_implicit.defjvp
def _implicit_jvp(f, cfg, primals, tangents):
    z0, params = primals
    _, dparams = tangents
    z, info = _implicit(f, cfg, z0, params)
    # (I - J) dz = (df/dtheta) dtheta; custom_linear_solve is linear in its right-hand side
    # (so reverse mode transposes it with transpose_solve) and JAX differentiates it in the
    # matvec's closed-over (z, params) by another solve: every order stays implicit.
    _, rhs = jax.jvp(lambda p: f(z, p), (params,), (dparams,))

    def matvec(u):
        return u - jax.jvp(lambda zz: f(zz, params), (z,), (u,))[1]

    dz = lax.custom_linear_solve(
        matvec,
        rhs,
        partial(_linear_fixed_point, cfg, "tangent"),
        transpose_solve=partial(_linear_fixed_point, cfg, "adjoint"),
    )
    return (z, info), (dz, FixedPointInfo(*map(_zero_tangent, info)))


def _unrolled(f, z0, params, cfg: SolverConfig):
    def body(z, _):
        fz = f(z, params)
        _check_output(fz, z)
        return fz, _residuals(lax.stop_gradient(fz), lax.stop_gradient(z)).max()

    z, res = lax.scan(body, z0, None, length=cfg.max_iter)
    info = _info(jnp.int32(cfg.max_iter), res[-1], cfg)
    _report(info, cfg, "unrolled")
    return z, info


def fixed_point(
    f: Callable[[jax.Array, Params], jax.Array],
    z0: jax.Array,
    params: Params = (),
    *,
    backward: str = "implicit",
    phantom_steps: int = 2,
    **solver_options: Any,
) -> tuple[jax.Array, FixedPointInfo]:
    """Differentiable fixed point ``z* = f(z*, params)`` of a contraction ``f`` in ``z``.

    Args:
        f: ``(z [B, *shape], params) -> [B, *shape]``, a differentiable JAX function; a
            stable (module-level) function object keeps ``jit`` caches warm.
        z0: the start ``[B, *shape]`` (the fixed point does not depend on it).
        params: a pytree of arrays ``f`` depends on (differentiate through these, not
            through closed-over arrays, in ``implicit`` mode).
        backward: ``"implicit"``, ``"phantom"`` (``phantom_steps`` unrolled steps from the
            ``stop_gradient`` of the fixed point) or ``"unrolled"`` (``max_iter`` iterations).
        **solver_options: ``solver``, ``tol``, ``max_iter``, ``memory``, ``on_nonconvergence``
            (see ``solver_config``).

    Returns:
        ``(z, FixedPointInfo)``.
    """
    backward = _choice("backward", backward, BACKWARDS)
    phantom_steps = check_int("phantom_steps", phantom_steps)
    return _fixed_point(f, z0, params, backward, phantom_steps, solver_config(**solver_options))


def _fixed_point(f, z0, params, backward, phantom_steps, cfg):
    if not hasattr(z0, "shape") or not hasattr(z0, "dtype"):
        raise TypeError(f"argument 'z0' must be an array [B, *shape], got {type(z0).__name__}")
    if len(z0.shape) < 1:
        raise ValueError("argument 'z0' must be an array [B, *shape] with a leading batch dim")
    if not jnp.issubdtype(z0.dtype, jnp.floating):
        raise TypeError(f"argument 'z0' must have a floating dtype, got {z0.dtype}")
    if backward == "unrolled":
        return _unrolled(f, z0, params, cfg)
    if backward == "phantom":
        z, info = solve(lambda z: f(z, params), z0, cfg)
        z = lax.stop_gradient(z)
        for _ in range(phantom_steps):
            z = f(z, params)
        return z, info
    return _implicit(f, cfg, z0, params)


# ---------------------------------------------------------------------------------------
# The DEQ layer and models: params are dicts of arrays, config a static DEQConfig
# ---------------------------------------------------------------------------------------


def _spectral_norm(weight: jax.Array) -> jax.Array:
    """``||W||_2 = u1^T W v1`` with the top singular pair ``(u1, v1)`` held constant: the value
    and the gradient ``u1 v1^T`` are exact, and reverse mode keeps two vectors instead of the
    SVD's factors (only second derivatives in ``W``, which score matching never takes, would
    differ); mirrors ``torch.deq._spectral_norm``."""
    u, _, vh = jnp.linalg.svd(jax.lax.stop_gradient(weight), full_matrices=False)
    return u[:, 0] @ weight @ vh[0]


def lipschitz_scaled(weight: jax.Array, gamma: float, norm: str = "spectral") -> jax.Array:
    """``W / max(1, ||W|| / gamma)``: spectral norm ``<= gamma``.

    Args:
        weight: a matrix ``[n, n]`` (or ``[n, k]``).
        gamma: the bound, a finite number ``> 0`` (``< 1`` for a contraction); a traced
            value is not checked.
        norm: ``"spectral"`` is exact (SVD, fine for the widths used here); ``"frobenius"``
            is a cheaper upper bound.

    Returns:
        The scaled matrix (NaN where ``weight`` has a NaN or inf).

    Raises:
        TypeError: ``weight`` is not an array, or ``gamma`` not a real number.
        ValueError: ``weight`` is not a matrix, ``gamma`` not finite or ``<= 0``, or
            ``norm`` unknown.
    """
    if not hasattr(weight, "shape"):
        raise TypeError(f"argument 'weight' must be an array, got {type(weight).__name__}")
    if len(weight.shape) != 2:
        raise ValueError(f"argument 'weight' must be a matrix [n, k], got shape {tuple(weight.shape)}")
    gamma = common.check_gamma(gamma, concrete=is_concrete(gamma))
    norm = _choice("norm", norm, NORMS)
    n = _spectral_norm(weight) if norm == "spectral" else jnp.linalg.norm(weight, ord="fro")
    return weight / jnp.maximum(n / gamma, 1.0)


def _softplus_map(z, params):
    w_hat, u = params
    return jax.nn.softplus(z @ w_hat + u)


def _tanh_map(z, params):
    w_hat, u = params
    return jnp.tanh(z @ w_hat + u)


_LAYER_MAPS = {"softplus": _softplus_map, "tanh": _tanh_map}


def _uniform(key, shape, bound, dtype):
    return jax.random.uniform(key, shape, dtype, -bound, bound)


def _linear_init(key, a: int, b: int, dtype):
    """torch's ``nn.Linear`` init: uniform in +-1/sqrt(fan_in)."""
    kw, kb = jax.random.split(key)
    bound = 1.0 / math.sqrt(a)
    return _uniform(kw, (a, b), bound, dtype), _uniform(kb, (b,), bound, dtype)


def deq_layer_init(key: jax.Array, in_dim: int, width: int, dtype: jnp.dtype | type = jnp.float32) -> dict[str, Any]:
    """``{"weight": W [width, width], "inject": (U [in_dim, width], b [width])}``."""
    in_dim, width = check_int("in_dim", in_dim), check_int("width", width)
    kw, ki = jax.random.split(check_key(key))
    return {
        "weight": _uniform(kw, (width, width), 1.0 / math.sqrt(width), dtype),
        "inject": _linear_init(ki, in_dim, width, dtype),
    }


def deq_layer_apply(
    params: dict[str, Any], x: jax.Array, config: DEQConfig = DEQConfig()
) -> tuple[jax.Array, FixedPointInfo]:
    """``x [B, in_dim] -> (z* [B, width], FixedPointInfo)`` with
    ``z* = act(z* W_hat + x U + b)``; mirrors ``torch.deq.DEQLayer``.

    Args:
        params: from ``deq_layer_init``.
        x: ``[B, in_dim]``.
        config: a ``DEQConfig`` from ``deq_config`` (static under ``jit``). The default,
            ``DEQConfig()``, is the torch layer's (``common.DEFAULT_*``): ``solver="iteration"``,
            ``tol=1e-4``, ``gamma=0.9``, ``max_iter=100``, ``backward="implicit"``. Their cost
            against a depth-2 MLP step of the same width (``ssm_vr``, width 128, CPU;
            ``benchmarks/deq_defaults.py``, ``benchmarks/README.md``, "DEQ defaults"):

            ==============  ==========================  =================================
            option          cheaper                     costlier
            ==============  ==========================  =================================
            ``solver``      ``"iteration"`` (default)   ``"anderson"``: fewer iterations,
                                                        1.4-2.7x the step on this map
            ``tol``         ``1e-3``: 0-30% cheaper,    ``1e-6``: 1.15-1.45x the step,
                            gradient error < 1%         fit within seed noise; default
                                                        ``1e-4`` (gradient error < 1e-3)
            ``gamma``       ``0.5``: fewer iterations   ``0.9`` (default): more feedback;
                                                        fits the smooth mixture better
            ==============  ==========================  =================================
    """
    if not isinstance(config, DEQConfig):
        raise TypeError(f"argument 'config' must be a DEQConfig (see deq_config), got {type(config).__name__}")
    u_w, u_b = params["inject"]
    u = x @ u_w + u_b  # the input injection, computed once per solve
    w_hat = lipschitz_scaled(params["weight"], config.gamma, config.norm)
    z0 = jnp.zeros((x.shape[0], w_hat.shape[0]), u.dtype)
    f = _LAYER_MAPS[config.activation]
    return _fixed_point(f, z0, (w_hat, u), config.backward, config.phantom_steps, config.solver)


def _check_input(x, dim: int) -> jax.Array:
    if not hasattr(x, "shape"):
        raise TypeError(f"argument 'x' must be an array, got {type(x).__name__}")
    if len(x.shape) < 2 or math.prod(x.shape[1:]) != dim:
        raise ValueError(f"argument 'x' must have shape [B, *event] with prod(event) = {dim}, got {tuple(x.shape)}")
    return x.reshape(x.shape[0], -1)


def deq_energy_init(
    key: jax.Array, dim: int, width: int = 512, dtype: jnp.dtype | type = jnp.float32
) -> dict[str, Any]:
    """Parameters of ``deq_energy_apply``: a DEQ layer ``dim -> width`` and a linear
    readout ``width -> 1``."""
    k1, k2 = jax.random.split(check_key(key))
    params = deq_layer_init(k1, dim, width, dtype)
    params["readout"] = _linear_init(k2, width, 1, dtype)
    return params


def deq_energy_apply(
    params: dict[str, Any],
    x: jax.Array,
    config: DEQConfig = DEQConfig(),
    quadratic: float = 0.0,
    return_info: bool = False,
) -> jax.Array | tuple[jax.Array, FixedPointInfo]:
    """``log p(x) = w^T z*(x) + c - quadratic/2 ||x||^2 + const`` for ``x [B, *event] -> [B]``
    (with the ``FixedPointInfo`` when ``return_info``); mirrors ``torch.deq.DEQEnergy``.

    Args:
        params: from ``deq_energy_init``.
        x: ``[B, *event]``.
        config: a ``DEQConfig``; default ``DEQConfig()``: ``solver="iteration"``,
            ``tol=1e-4``, ``gamma=0.9`` (their trade-off: ``deq_layer_apply``).
        quadratic: the coefficient of ``-quadratic/2 ||x||^2``.
        return_info: also return the forward solve's ``FixedPointInfo``.
    """
    dim = params["inject"][0].shape[0]
    flat = _check_input(x, dim)
    z, info = deq_layer_apply(params, flat, config)
    w, c = params["readout"]
    out = (z @ w + c)[:, 0]
    if quadratic:
        out = out - 0.5 * quadratic * (flat * flat).sum(-1)
    return (out, info) if return_info else out


def deq_score_init(key: jax.Array, dim: int, width: int = 256, dtype: jnp.dtype | type = jnp.float32) -> dict[str, Any]:
    """Parameters of ``deq_score_apply``: a DEQ layer ``dim -> width`` and a linear
    readout ``width -> dim``."""
    k1, k2 = jax.random.split(check_key(key))
    params = deq_layer_init(k1, dim, width, dtype)
    params["readout"] = _linear_init(k2, width, dim, dtype)
    return params


def deq_score_apply(
    params: dict[str, Any], x: jax.Array, config: DEQConfig = DEQConfig(), return_info: bool = False
) -> jax.Array | tuple[jax.Array, FixedPointInfo]:
    """Score network ``x [B, *event] -> [B, *event]``, ``s(x) = z*(x) V + c``; mirrors
    ``torch.deq.DEQScore``.

    Args:
        params: from ``deq_score_init``.
        x: ``[B, *event]``.
        config: a ``DEQConfig``; default ``DEQConfig()``: ``solver="iteration"``,
            ``tol=1e-4``, ``gamma=0.9`` (their trade-off: ``deq_layer_apply``).
        return_info: also return the forward solve's ``FixedPointInfo``.
    """
    dim = params["inject"][0].shape[0]
    flat = _check_input(x, dim)
    z, info = deq_layer_apply(params, flat, config)
    w, c = params["readout"]
    out = (z @ w + c).reshape(x.shape)
    return (out, info) if return_info else out
