"""Deep equilibrium (DEQ) layers, energies and score models (torch).

A DEQ layer replaces a deep stack by the fixed point of one weight-tied map,

    z*(x) = f(z*, x),    f(z, x) = act(W_hat z + U x + b),
    W_hat = W / max(1, ||W|| / gamma),

with ``act`` 1-Lipschitz (softplus, tanh) and ``||W||`` the spectral norm (exact, by SVD)
or the Frobenius norm (an upper bound of it). Then ``Lip_z(f) <= ||W_hat||_2 <= gamma < 1``:
``f`` is a contraction in ``z`` for every ``x`` and the fixed point exists, is unique, and
plain iteration converges to it from any start (Banach). This is the norm-scaled variant of
the map ``softplus(B softplus(A z)) / (C ||A||_F ||B||_F) + y(x)`` of Huang et al. [2].

Forward: plain iteration (the default) or Anderson acceleration under ``no_grad`` (memory
does not grow with the number of iterations). The defaults of every option (``solver``,
``tol``, ``gamma``, ...) are ``ppl_score.common.deq.DEFAULT_*``, shared with JAX; their cost and
accuracy: ``DEQLayer``. Backward modes:

- ``"implicit"``: exact implicit differentiation. With ``J = df/dz`` at ``z*``, the
  vector-Jacobian product is ``theta_bar = (df/dtheta)^T g`` with ``g = v + J^T g`` (the
  adjoint fixed point, also contractive since ``||J^T||_2 <= gamma``). The adjoint solve is
  itself an implicit fixed point of the same kind, built from differentiable autograd ops,
  so its backward is again an implicit solve: double backward (``create_graph=True``), and
  any higher order, is exact up to the solver tolerance, at constant memory in the number
  of iterations. Score matching needs this: ``s = grad_x log p`` goes through one adjoint
  solve, ``v^T H v`` and the parameter gradients of the loss through more.
- ``"phantom"``: ``K`` steps ``z <- f(z, x)`` from the detached fixed point with plain
  autograd (the "phantom gradient" of Huang et al.'s code [2]); it truncates the Neumann series of
  ``(I - J)^{-1}`` after ``K`` terms, so its error decays like ``gamma^K``.
- ``"unrolled"``: ``max_iter`` plain iterations from ``z0`` with autograd through all of
  them (memory grows with ``max_iter``): the reference the other two are tested against.

Memory: nothing grows with the number of iterations, and a step keeps only a few
``[B, width]`` buffers: the solvers reuse their iterates in place (for maps known to return
new tensors), the DEQ layer's adjoint solves use the closed-form products
``g -> (act'(pre) * g) W_hat`` and ``h -> act'(pre) * (h W_hat^T)`` (one buffer, no graph of
``f``), and the spectral norm keeps its singular vectors, not the SVD's factors.

Convergence: iteration stops when every example satisfies
``||f(z) - z|| <= tol * (1 + ||f(z)||)``; ``FixedPointInfo(iterations, residual,
converged)`` reports the worst example's relative residual. A solve that does not converge
warns (``FixedPointWarning``), raises (``FixedPointError``) or is ignored, per
``on_nonconvergence``.

Faults: Anderson's least-squares step is regularized relative to the dtype and to the size
of the residuals (``common.anderson_reg``: ``max(1e-8, 10 eps)`` of the normalized Gram
matrix), and an example whose step is still singular or non-finite takes a plain step
instead (``solve_ex``, no host synchronisation). A map that returns NaN or inf (a NaN
weight, a NaN input) stops the solve at once and goes through the same policy, with a
message that says so; a map that changes the shape or dtype of ``z`` is a
``ValueError`` / ``TypeError`` naming ``f``.

The layout mirrors ``ppl_score.jax.deq`` (``deq_params`` converts the weights).

References:
    [1] S. Bai, J. Z. Kolter, V. Koltun, "Deep equilibrium models", NeurIPS, 2019.

    [2] Y. Huang, Q. Wang, A. Onwunta, B. Wang, "Efficient score matching with deep equilibrium
    layers", ICLR, 2024.
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..common import deq as common
from ..common.deq import (  # noqa: F401  (re-exported: the framework-free part, shared with ppl_score.jax.deq)
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
from .nets import _drop_state_key

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
    "DEQLayer",
    "DEQEnergy",
    "DEQScore",
    "deq_params",
]

ACTIVATIONS = {"softplus": F.softplus, "tanh": torch.tanh}  # keys: common.ACTIVATION_NAMES
# torch activation classes accepted for parity with ``nets.MLPEnergy(activation=...)``
_ACTIVATION_CLASSES = {nn.Softplus: "softplus", nn.Tanh: "tanh"}


@functools.wraps(common.deq_config, assigned=())  # signature: that of the shared deq_config
# ``Any``: typing.get_type_hints reads a wrapper's annotations in the globals of ``common.deq``
def deq_config(activation: Any = "softplus", *args: Any, **kwargs: Any) -> DEQConfig:
    """Validated ``DEQConfig``. ``gamma`` in (0, 1) bounds the Lipschitz constant of the map.
    ``activation`` is ``"softplus"`` / ``"tanh"`` or ``nn.Softplus`` / ``nn.Tanh``."""
    if isinstance(activation, type) and activation in _ACTIVATION_CLASSES:
        activation = _ACTIVATION_CLASSES[activation]
    return common.deq_config(activation, *args, **kwargs)


def _report(info: FixedPointInfo, cfg: SolverConfig, what: str) -> None:
    if info.converged:
        return
    common.report_nonconvergence(what, info.residual, info.iterations, cfg, stacklevel=3)


# ---------------------------------------------------------------------------------------
# Solvers: ``step`` maps z [B, *shape] -> f(z); no autograd.
# ---------------------------------------------------------------------------------------


def _residuals(fz: torch.Tensor, diff: torch.Tensor) -> torch.Tensor:
    """Per-example ``||f(z) - z|| / (1 + ||f(z)||)``, ``diff = f(z) - z`` (or its negative)."""
    b = fz.shape[0]
    return diff.reshape(b, -1).norm(dim=-1) / (1 + fz.reshape(b, -1).norm(dim=-1))


def _check_output(fz, z) -> None:
    """The first map evaluation of a solve: ``f(z)`` must be a tensor shaped like ``z``."""
    if not isinstance(fz, torch.Tensor):
        raise TypeError(f"argument 'f' must return a torch.Tensor, got {type(fz).__name__}")
    common.check_map_output(fz.shape, fz.dtype, z.shape, z.dtype)


def _iteration(step, z0, cfg: SolverConfig, fresh: bool = False):
    z = z0
    for k in range(1, cfg.max_iter + 1):
        fz = step(z)
        if k == 1:
            _check_output(fz, z)
        # when ``step`` returns new tensors, z is ours and dead after this step: reuse it for
        # z - f(z) (one [B, N] buffer fewer at the peak); z0 is the caller's, never in place
        res = _residuals(fz, z.sub_(fz) if fresh and k > 1 else z - fz).max().item()
        z = fz
        if res <= cfg.tol or not math.isfinite(res):  # NaN / inf: no iteration recovers from it
            break
    return z, FixedPointInfo(k, res, res <= cfg.tol)


def _anderson_mix(xs, fs, k: int, m: int):
    """Anderson's next iterate from the ring buffers ``xs``, ``fs`` ``[B, m, N]`` holding
    ``min(k, m)`` valid entries, the newest in slot ``(k - 1) % m``: ``sum_i alpha_i f_i``
    with ``alpha`` minimizing ``||sum_i alpha_i (f_i - x_i)||`` subject to
    ``sum_i alpha_i = 1``, i.e. ``alpha ~ A^{-1} 1`` with ``A`` the Gram matrix of the
    residuals, normalized to unit mean diagonal and regularized by ``anderson_reg`` of the
    dtype. Invalid slots get identity rows and a zero right-hand side, so every shape is
    fixed (as in JAX).

    The solve cannot raise (``solve_ex``): an example whose system is singular anyway, or
    whose coefficients are not finite (a Gram matrix that overflowed), takes the plain step
    ``f`` of its newest iterate instead (no host synchronisation). The buffers never hold a
    non-finite ``f``: a solve stops at the first non-finite residual."""
    b = xs.shape[0]
    valid = (torch.arange(m, device=xs.device) < min(k, m)).to(xs.dtype)  # [m]
    tiny = torch.finfo(xs.dtype).tiny
    g = (fs - xs) * valid[:, None]
    gram = g @ g.transpose(1, 2)  # [B, m, m]
    scale = gram.diagonal(dim1=1, dim2=2).sum(-1) / valid.sum()
    gram = gram / scale.clamp_min(tiny)[:, None, None]
    eye = torch.eye(m, dtype=xs.dtype, device=xs.device)
    outer = valid[:, None] * valid[None, :]
    reg = common.anderson_reg(torch.finfo(xs.dtype).eps)
    a = gram * outer + eye * (reg * valid + (1 - valid))
    alpha, info = torch.linalg.solve_ex(a, valid.expand(b, m))
    total = alpha.sum(-1, keepdim=True)  # finite iff every coefficient is
    ok = (info[:, None] == 0) & torch.isfinite(total)
    # a plain step is the mix with weight 1 on the newest slot: only [B, m] is selected
    alpha = torch.where(ok, alpha / total, eye[(k - 1) % m])
    return (alpha[:, None, :] @ fs)[:, 0]


def _anderson(step, z0, cfg: SolverConfig, fresh: bool = False):
    b, shape, m = z0.shape[0], z0.shape, cfg.memory
    xs = z0.new_zeros(b, m, z0[0].numel())
    fs = torch.zeros_like(xs)
    z = z0
    for k in range(1, cfg.max_iter + 1):
        fz = step(z)
        if k == 1:
            _check_output(fz, z)
        res = _residuals(fz, fz - z).max().item()
        if res <= cfg.tol or not math.isfinite(res):  # NaN / inf: no iteration recovers from it
            break
        slot = (k - 1) % m
        xs[:, slot] = z.reshape(b, -1)
        fs[:, slot] = fz.reshape(b, -1)
        z = _anderson_mix(xs, fs, k, m).reshape(shape)
    return fz, FixedPointInfo(k, res, res <= cfg.tol)


_SOLVE = {"iteration": _iteration, "anderson": _anderson}


def solve(
    step: Callable[[torch.Tensor], torch.Tensor],
    z0: torch.Tensor,
    cfg: SolverConfig = SolverConfig(),
    what: str = "forward",
    fresh: bool = False,
) -> tuple[torch.Tensor, FixedPointInfo]:
    """Fixed point of ``step`` from ``z0`` ``[B, *shape]`` (no autograd): ``(z, info)``,
    with the non-convergence policy of ``cfg`` applied. ``fresh``: ``step`` always returns
    a newly allocated tensor (never an input, a parameter or a view), so the solver may
    reuse its iterates in place."""
    with torch.no_grad():
        z, info = _SOLVE[cfg.solver](step, z0, cfg, fresh)
    _report(info, cfg, what)
    return z, info


# ---------------------------------------------------------------------------------------
# Implicit differentiation, exact at every order
# ---------------------------------------------------------------------------------------


def _partial_input(t: torch.Tensor, create_graph: bool) -> torch.Tensor:
    """An input to differentiate with respect to *only along its own edge*: an alias (a
    view, no copy) keeps the graph to ``t``'s upstream (for higher orders) while
    ``autograd.grad`` with respect to the alias gives the partial derivative, not the total
    one through other uses of ``t``'s upstream (e.g. the fixed point, itself a function of
    ``t``)."""
    if create_graph and t.requires_grad:
        return t.view_as(t)
    return t.detach().requires_grad_(True)


class _Map:
    """A differentiable map ``f(z, *params)`` and a fast no-autograd step for solving."""

    fresh = False  # a user's ``f`` may return an input or a parameter: never reuse in place

    def __init__(self, f: Callable):
        self.f = f

    def __call__(self, z, *params):
        return self.f(z, *params)

    def stepper(self, *params):
        return lambda z: self.f(z, *params)

    def vjp_stepper(self, z, *params):
        """``g -> (df/dz)^T g`` at ``(z, params)``, no autograd: one graph of ``f`` reused by
        every call (a subclass that knows ``f`` keeps less)."""
        with torch.enable_grad():
            za = z.detach().requires_grad_(True)
            out = self(za, *[p.detach() for p in params])

        def vjp(g):
            with torch.enable_grad():
                return torch.autograd.grad(out, za, g, retain_graph=True)[0]

        return vjp

    jvp_stepper = None  # ``h -> (df/dz) h`` where a subclass has it in closed form


class _AdjointMap(_Map):
    """``A(g; v, z, *params) = v + (df/dz)(z, params)^T g``: the adjoint fixed-point map of
    ``f``. Its output stays differentiable in all its inputs (``create_graph=True``), so its
    own implicit backward can differentiate it."""

    fresh = True  # ``v + ...`` is always a new tensor

    def __init__(self, inner: _Map):
        self.inner = inner

    def __call__(self, g, v, z, *params):
        with torch.enable_grad():
            za = _partial_input(z, True)
            out = self.inner(za, *params)
            (jtg,) = torch.autograd.grad(out, za, g, create_graph=True)
        return v + jtg

    def stepper(self, v, z, *params):
        vjp, v = self.inner.vjp_stepper(z, *params), v.detach()
        return lambda g: v + vjp(g)

    def vjp_stepper(self, g, v, z, *params):
        # A is linear in g with Jacobian J^T, so its vector-Jacobian product is J h
        if self.inner.jvp_stepper is not None:
            return self.inner.jvp_stepper(z, *params)
        return super().vjp_stepper(g, v, z, *params)


def _is_legacy_batched(t: torch.Tensor) -> bool:
    check = getattr(getattr(torch._C, "_functorch", None), "is_legacy_batchedtensor", None)
    return bool(check is not None and check(t))


class _ImplicitFixedPoint(torch.autograd.Function):
    """``z* = f(z*, *params)``; the backward solves the adjoint fixed point with another
    ``_ImplicitFixedPoint`` (of ``_AdjointMap(f)``), so it is differentiable again."""

    @staticmethod
    def forward(ctx, fmap: _Map, cfg: SolverConfig, sink: list, what: str, z0, *params):
        z, info = solve(fmap.stepper(*params), z0.detach(), cfg, what, fmap.fresh)
        sink.append(info)
        ctx.fmap, ctx.cfg = fmap, cfg
        ctx.save_for_backward(z, *params)
        return z

    @staticmethod
    def backward(ctx, gz):
        z, *params = ctx.saved_tensors
        needs = ctx.needs_input_grad[5:]
        none = (None,) * 5
        if not any(needs):
            return (*none, *(None,) * len(params))
        create_graph = torch.is_grad_enabled()  # True iff the caller asked for create_graph
        adjoint = _AdjointMap(ctx.fmap)
        if _is_legacy_batched(gz):
            # Under ``autograd.grad(..., is_grads_batched=True)`` (the exact-SM Hessian trace)
            # tensors are vmapped: no data-dependent stop, no detach. Solve the adjoint by
            # max_iter differentiable plain iterations instead (error <= gamma^max_iter).
            g = gz
            for _ in range(ctx.cfg.max_iter):
                g = adjoint(g, gz, z, *params)
        else:
            # g = gz + J^T g, differentiable in (gz, z, params) when create_graph
            g = _ImplicitFixedPoint.apply(adjoint, ctx.cfg, [], "adjoint", gz.detach(), gz, z, *params)
        with torch.enable_grad():
            zi = z if create_graph else z.detach()
            ps = [
                _partial_input(p, create_graph) if n else (p if create_graph else p.detach())
                for p, n in zip(params, needs)
            ]
            out = ctx.fmap(zi, *ps)
            wrt = [p for p, n in zip(ps, needs) if n]
            grads = iter(torch.autograd.grad(out, wrt, g, create_graph=create_graph, allow_unused=True))
        return (*none, *(next(grads) if n else None for n in needs))


def _unrolled(f, z0, params, cfg: SolverConfig):
    z = z0
    for k in range(cfg.max_iter):
        fz = f(z, *params)
        if k == 0:
            _check_output(fz, z)
        res = _residuals(fz.detach(), (fz - z).detach()).max().item()
        z = fz
    info = FixedPointInfo(cfg.max_iter, res, res <= cfg.tol)
    _report(info, cfg, "unrolled")
    return z, info


def fixed_point(
    f: Callable[..., torch.Tensor],
    z0: torch.Tensor,
    params: Sequence[torch.Tensor] = (),
    *,
    backward: str = "implicit",
    phantom_steps: int = 2,
    **solver_options: Any,
) -> tuple[torch.Tensor, FixedPointInfo]:
    """Differentiable fixed point ``z* = f(z*, *params)`` of a contraction ``f`` in ``z``.

    Args:
        f: ``(z [B, *shape], *params) -> [B, *shape]``, built from differentiable torch ops
            (``implicit`` differentiates it to any order).
        z0: the start ``[B, *shape]`` (the fixed point does not depend on it).
        params: the tensors ``f`` depends on that gradients must reach (closed-over tensors
            get no gradient in ``implicit`` mode).
        backward: ``"implicit"``, ``"phantom"`` (``phantom_steps`` unrolled steps from the
            detached fixed point) or ``"unrolled"`` (``max_iter`` iterations with autograd).
        **solver_options: ``solver``, ``tol``, ``max_iter``, ``memory``, ``on_nonconvergence``
            (see ``solver_config``).

    Returns:
        ``(z, FixedPointInfo)``.
    """
    backward = _choice("backward", backward, BACKWARDS)
    phantom_steps = check_int("phantom_steps", phantom_steps)
    cfg = solver_config(**solver_options)
    return _fixed_point(_Map(f), z0, tuple(params), backward, phantom_steps, cfg)


def _fixed_point(fmap: _Map, z0, params, backward, phantom_steps, cfg):
    if not isinstance(z0, torch.Tensor):
        raise TypeError(f"argument 'z0' must be a torch.Tensor [B, *shape], got {type(z0).__name__}")
    if z0.dim() < 1:
        raise ValueError("argument 'z0' must be a tensor [B, *shape] with a leading batch dim")
    if not z0.is_floating_point():
        raise TypeError(f"argument 'z0' must have a floating dtype, got {z0.dtype}")
    for i, p in enumerate(params):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"argument 'params' must hold tensors, item {i} is {type(p).__name__}")
    if backward == "unrolled":
        return _unrolled(fmap, z0, params, cfg)
    if backward == "phantom":
        z, info = solve(fmap.stepper(*params), z0.detach(), cfg, fresh=fmap.fresh)
        for _ in range(phantom_steps):
            z = fmap(z, *params)
        return z, info
    sink: list = []
    z = _ImplicitFixedPoint.apply(fmap, cfg, sink, "forward", z0, *params)
    return z, sink[0]


# ---------------------------------------------------------------------------------------
# The DEQ layer and models
# ---------------------------------------------------------------------------------------


def _spectral_norm(weight: torch.Tensor) -> torch.Tensor:
    """``||W||_2 = u1^T W v1`` with the top singular pair ``(u1, v1)`` held constant: the value
    and the gradient ``u1 v1^T`` are exact, and the backward keeps two vectors instead of the
    SVD's factors (``torch.nn.utils.parametrizations.spectral_norm`` uses the same form; only
    second derivatives in ``W``, which score matching never takes, would differ)."""
    with torch.no_grad():
        # a NaN / inf weight would make LAPACK raise: take the singular pair of its finite
        # part, so the norm (and every fixed point built on it) comes out NaN and the
        # solver's non-convergence policy reports it, as in JAX
        w = torch.nan_to_num(weight.detach(), nan=0.0, posinf=0.0, neginf=0.0)
        u, _, vh = torch.linalg.svd(w, full_matrices=False)
        u1, v1 = u[:, 0].clone(), vh[0].clone()  # copies: views would keep all of u, vh alive
    return u1 @ weight @ v1


def lipschitz_scaled(weight: torch.Tensor, gamma: float, norm: str = "spectral") -> torch.Tensor:
    """``W / max(1, ||W|| / gamma)``: spectral norm ``<= gamma``.

    Args:
        weight: a matrix ``[n, n]`` (or ``[n, k]``).
        gamma: the bound, a finite number ``> 0`` (``< 1`` for a contraction).
        norm: ``"spectral"`` is exact (SVD, fine for the widths used here); ``"frobenius"``
            is a cheaper upper bound.

    Returns:
        The scaled matrix (NaN where ``weight`` has a NaN or inf).

    Raises:
        TypeError: ``weight`` is not a tensor, or ``gamma`` not a real number.
        ValueError: ``weight`` is not a matrix, ``gamma`` not finite or ``<= 0``, or
            ``norm`` unknown.
    """
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"argument 'weight' must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"argument 'weight' must be a matrix [n, k], got shape {tuple(weight.shape)}")
    gamma = common.check_gamma(gamma)
    norm = _choice("norm", norm, NORMS)
    n = _spectral_norm(weight) if norm == "spectral" else torch.linalg.matrix_norm(weight, ord="fro")
    return weight / torch.clamp(n / gamma, min=1.0)


def _dsoftplus(pre):
    return torch.sigmoid(pre)


def _dtanh(pre):
    return 1 - torch.tanh(pre).square()


_DERIVATIVES = {"softplus": _dsoftplus, "tanh": _dtanh}  # act' for the closed-form products


class _LayerMap(_Map):
    """``f(z; W_hat, u) = act(z W_hat^T + u)`` with its Jacobian products in closed form, so an
    adjoint solve keeps only ``act'(pre)`` ``[B, width]`` instead of a graph of ``f``."""

    fresh = True

    def __init__(self, activation: str):
        # the name, not the functions: a module holding this map pickles (no lambda)
        self.activation = activation

    def __call__(self, z, w_hat, u):
        return ACTIVATIONS[self.activation](torch.addmm(u, z, w_hat.T))

    def stepper(self, w_hat, u):
        return functools.partial(self, w_hat=w_hat, u=u)

    def _slope(self, z, w_hat, u):
        with torch.no_grad():
            return _DERIVATIVES[self.activation](torch.addmm(u, z, w_hat.T)), w_hat.detach()

    def vjp_stepper(self, z, w_hat, u):
        d, w = self._slope(z, w_hat, u)
        return lambda g: (g * d) @ w

    def jvp_stepper(self, z, w_hat, u):
        d, w = self._slope(z, w_hat, u)
        return lambda h: (h @ w.T).mul_(d)


class DEQLayer(nn.Module):
    """``x [B, in_dim] -> z*(x) [B, width]`` with ``z* = act(W_hat z* + U x + b)``.

    Args:
        in_dim: the input size.
        width: the number of hidden units (the fixed point's size).
        **options: see ``deq_config``. The defaults (``common.DEFAULT_*``, the same in JAX)
            are ``solver="iteration"``, ``tol=1e-4``, ``gamma=0.9``, ``max_iter=100``,
            ``backward="implicit"``. Their cost against a depth-2 MLP step of the same width
            (``ssm_vr``, width 128, CPU; ``benchmarks/deq_defaults.py``, ``benchmarks/README.md``, "DEQ defaults"):

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

    After each call ``last_info`` holds the forward solve's ``FixedPointInfo``.
    """

    def __init__(self, in_dim: int, width: int, **options: Any):
        super().__init__()
        in_dim, width = check_int("in_dim", in_dim), check_int("width", width)
        self.config = deq_config(**options)
        bound = 1.0 / math.sqrt(width)
        self.weight = nn.Parameter(torch.empty(width, width).uniform_(-bound, bound))
        self.inject = nn.Linear(in_dim, width)
        self._map = _LayerMap(self.config.activation)
        self.last_info: FixedPointInfo | None = None

    @property
    def width(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.config
        u = self.inject(x)  # the input injection, computed once per solve
        w_hat = lipschitz_scaled(self.weight, c.gamma, c.norm)
        z0 = u.new_zeros(x.shape[0], self.width)
        z, self.last_info = _fixed_point(self._map, z0, (w_hat, u), c.backward, c.phantom_steps, c.solver)
        return z


def _check_input(x, dim: int) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"argument 'x' must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 2 or x[0].numel() != dim:
        raise ValueError(f"argument 'x' must have shape [B, *event] with prod(event) = {dim}, got {tuple(x.shape)}")
    return x.reshape(x.shape[0], -1)


class DEQEnergy(nn.Module):
    """DEQ energy model: ``log p(x) = w^T z*(x) - quadratic/2 ||x||^2 + const``,
    ``x [B, *event] -> [B]``; the DEQ counterpart of ``nets.MLPEnergy`` (one weight-tied
    layer of ``width`` units instead of a stack).

    The readout has no bias: a constant offset of the log density is not identifiable under
    score matching and never receives a gradient (``DistributedDataParallel`` reports it as
    an unused parameter). A ``state_dict`` with ``readout.bias`` (the earlier layout) still
    loads, the key dropped; ``deq_params`` gives a zero ``c`` for ``ppl_score.jax.deq``.

    Args:
        dim: the event size (``prod(event)``).
        width: the DEQ layer's width.
        quadratic: the coefficient of ``-quadratic/2 ||x||^2`` in ``log p``.
        **options: see ``deq_config``; defaults ``solver="iteration"``, ``tol=1e-4``,
            ``gamma=0.9`` (their cost and accuracy trade-off: ``DEQLayer``).
    """

    def __init__(self, dim: int, width: int = 512, quadratic: float = 0.0, **options: Any):
        super().__init__()
        self.dim = check_int("dim", dim)
        self.deq = DEQLayer(self.dim, width, **options)
        self.readout = nn.Linear(self.deq.width, 1, bias=False)
        self._register_load_state_dict_pre_hook(functools.partial(_drop_state_key, "readout.bias"))
        if isinstance(quadratic, bool) or not isinstance(quadratic, numbers.Real) or not quadratic >= 0:
            raise ValueError(f"argument 'quadratic' must be a real number >= 0, got {quadratic!r}")
        self.quadratic = float(quadratic)

    @property
    def last_info(self) -> FixedPointInfo | None:
        return self.deq.last_info

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = _check_input(x, self.dim)
        out = self.readout(self.deq(flat)).squeeze(-1)
        if self.quadratic:
            out = out - 0.5 * self.quadratic * (flat * flat).sum(-1)
        return out


class DEQScore(nn.Module):
    """DEQ score network ``x [B, *event] -> [B, *event]``: ``s(x) = V z*(x) + c``, the DEQ
    counterpart of ``nets.MLPScore``.

    Args:
        dim: the event size (``prod(event)``).
        width: the DEQ layer's width.
        **options: see ``deq_config``; defaults ``solver="iteration"``, ``tol=1e-4``,
            ``gamma=0.9`` (their cost and accuracy trade-off: ``DEQLayer``).
    """

    def __init__(self, dim: int, width: int = 256, **options: Any):
        super().__init__()
        self.dim = check_int("dim", dim)
        self.deq = DEQLayer(self.dim, width, **options)
        self.readout = nn.Linear(self.deq.width, self.dim)

    @property
    def last_info(self) -> FixedPointInfo | None:
        return self.deq.last_info

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = _check_input(x, self.dim)
        return self.readout(self.deq(flat)).reshape(x.shape)


def deq_params(module: nn.Module) -> dict[str, Any]:
    """The weights of a ``DEQEnergy`` / ``DEQScore`` as float64 numpy arrays in the layout of
    ``ppl_score.jax.deq`` (``[in, out]`` matrices), for cross-backend parity."""
    if not isinstance(module, (DEQEnergy, DEQScore)):
        raise TypeError(f"argument 'module' must be a DEQEnergy or DEQScore, got {type(module).__name__}")
    np_ = lambda t: t.detach().double().cpu().numpy().copy()  # noqa: E731
    layer, readout = module.deq, module.readout
    # DEQEnergy's readout has no bias (a constant offset): a zero c in the JAX layout
    bias = np_(readout.bias) if readout.bias is not None else np_(readout.weight.new_zeros(readout.out_features))
    return {
        "weight": np_(layer.weight.T),
        "inject": (np_(layer.inject.weight.T), np_(layer.inject.bias)),
        "readout": (np_(readout.weight.T), bias),
    }
