"""The score-matching objectives of ``ppl_score.spec.OBJECTIVES`` (torch).

Each ``_per_example_<method>`` returns the per-example value ``[B]``; ``score_matching_loss``
validates, draws what is random, and reduces. The math is in ``ppl_score.spec`` and in
the spec (docs page *Spec*, section 1).
"""

from __future__ import annotations

import weakref
from typing import Any, Callable

import torch

from ..common import objectives as spec
from ..common.validate import warn_nonfinite
from . import derivatives as d
from .projections import (
    draw_directions,
    draw_noise,
    draw_noise_levels,
    draw_projections,
    has_zero_direction,
    unit_directions,
)
from .validate import all_finite, check_array, check_grad_mode, validating

__all__ = ["score_matching_loss"]


def _replicate(x: torch.Tensor, m: int) -> torch.Tensor:
    """``[B, *event] -> [M * B, *event]``: M stacked copies (a view when M = 1)."""
    return x if m == 1 else x.unsqueeze(0).expand(m, *x.shape).reshape(m * x.shape[0], *x.shape[1:])


def _mean_over_projections(t: torch.Tensor, m: int) -> torch.Tensor:
    return t.reshape(m, -1).mean(0)


# Code (or classes) of functions that failed under ``torch.func.vmap``: they go straight to
# the autograd trace instead of paying a failed attempt every step. Weak: nothing is kept.
_NOT_VMAPPABLE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _vmap_key(fn):
    """What decides whether ``fn`` runs under vmap: its code, or its class (a module)."""
    code = getattr(getattr(fn, "__func__", fn), "__code__", None)
    return code if code is not None else type(fn)


def _per_example_esm(fn, kind, x, **_):
    key = _vmap_key(fn)
    if key not in _NOT_VMAPPABLE:
        try:  # per-example torch.func transforms: the fastest exact trace (benchmarks/objectives.py)
            s, trace = d.score_and_trace(fn, kind, x)
            return trace + 0.5 * d.flat_sum(s * s)
        except Exception:  # noqa: BLE001 - fn does not run under torch.func.vmap: plain autograd
            _NOT_VMAPPABLE[key] = True
    xg = d.differentiable_input(x)
    s = d.score(fn, kind, xg)
    return d.hessian_trace(s, xg) + 0.5 * d.flat_sum(s * s)


def _sliced(fn, kind, x, v, variance_reduced):
    m = v.shape[0]
    xg = d.differentiable_input(_replicate(x, m))
    s = d.score(fn, kind, xg)
    vf = v.reshape(m * x.shape[0], *x.shape[1:])
    vhv = d.quadratic_form(s, xg, vf)
    if variance_reduced:
        # the M copies of s are equal; averaging them (not slicing one) keeps the backward
        # free of the zero-filled copy a slice's backward makes
        return _mean_over_projections(vhv + 0.5 * d.flat_sum(s * s), m)
    return _mean_over_projections(vhv + 0.5 * d.flat_sum(s * vf) ** 2, m)


def _per_example_ssm(fn, kind, x, *, v, **_):
    return _sliced(fn, kind, x, v, variance_reduced=False)


def _per_example_ssm_vr(fn, kind, x, *, v, **_):
    return _sliced(fn, kind, x, v, variance_reduced=True)


def _per_example_dsm(fn, kind, x, *, noise, sigma, **_):
    xg = d.differentiable_input(x + sigma * noise)
    s = d.score(fn, kind, xg)
    return 0.5 * d.flat_sum((s + noise / sigma) ** 2)


def _fd_steps(x, u, eps):
    """``v = eps u`` (``u`` already of unit norm) flattened to ``[M * B, *event]`` and
    ``c = D / eps^2``."""
    m = u.shape[0]
    v = (eps * u).reshape(m * x.shape[0], *x.shape[1:])
    return v, spec.event_size(tuple(x.shape)) / (eps * eps)


def _per_example_fd_ssm(fn, kind, x, *, u, eps, **_):
    m, b = u.shape[0], x.shape[0]
    v, c = _fd_steps(x, u, eps)
    xr = _replicate(x, m)
    if kind == "log_prob":
        # one batched call on [x; x+v; x-v]
        out = d.evaluate(fn, kind, torch.cat([x, xr + v, xr - v]))
        l0, lp, lm = out[:b], out[b : b + m * b], out[b + m * b :]
        val = c * (lp + lm - 2 * _replicate(l0, m) + 0.125 * (lp - lm) ** 2)
    else:
        out = d.evaluate(fn, kind, torch.cat([xr + v, xr - v]))
        sp, sm = out[: m * b], out[m * b :]
        val = 0.125 * d.flat_sum((sp + sm) ** 2) + 0.5 * c * d.flat_sum((sp - sm) * v)
    return _mean_over_projections(val, m)


def _per_example_fd_dsm(fn, kind, x, *, u, noise, sigma, eps, **_):
    m, b = u.shape[0], x.shape[0]
    v, c = _fd_steps(x, u, eps)
    xt = _replicate(x + sigma * noise, m)
    shift = _replicate(noise / sigma, m)  # (x~ - x) / sigma^2
    out = d.evaluate(fn, kind, torch.cat([xt + v, xt - v]))
    fp, fm = out[: m * b], out[m * b :]
    if kind == "log_prob":
        inner = 0.5 * (fp - fm) + d.flat_sum(v * shift)
    else:
        inner = d.flat_sum(v * (0.5 * (fp + fm) + shift))
    return _mean_over_projections(0.5 * c * inner**2, m)


def _per_example_ms_dsm(fn, kind, x, *, noise, levels, weighting, **_):
    # levels: sigma_b [B]; (x~ - x) / sigma_b^2 = n / sigma_b
    shape = (-1,) + (1,) * (x.dim() - 1)
    sig = levels.reshape(shape)
    xg = d.differentiable_input(x + sig * noise)
    s = d.score(lambda z: fn(z, levels), kind, xg)
    return 0.5 * spec.ms_dsm_weight(levels, weighting) * d.flat_sum((s + noise / sig) ** 2)


_PER_EXAMPLE = {
    "esm": _per_example_esm,
    "ssm": _per_example_ssm,
    "ssm_vr": _per_example_ssm_vr,
    "dsm": _per_example_dsm,
    "fd_ssm": _per_example_fd_ssm,
    "fd_dsm": _per_example_fd_dsm,
    "ms_dsm": _per_example_ms_dsm,
}


def score_matching_loss(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    method: str = "ssm_vr",
    *,
    kind: str = "log_prob",
    projections: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    noise_levels: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    reduction: str = "mean",
    **options: Any,
) -> torch.Tensor:
    """Score-matching objective ``method`` of ``fn`` on the batch ``x``.

    Args:
        fn: ``kind="log_prob"``: ``x[B, *event] -> [B]``, a log density up to a constant;
            ``kind="score"``: ``x[B, *event] -> [B, *event]``, a score network. For
            ``ms_dsm`` noise-conditional: ``fn(x, sigma)`` with ``sigma`` ``[B]``.
        x: data ``[B, *event]``, floating dtype. Its own graph is kept when it requires grad.
        method: one of ``ppl_score.spec.OBJECTIVES`` (``esm``, ``ssm``, ``ssm_vr``, ``dsm``,
            ``fd_ssm``, ``fd_dsm``, ``ms_dsm``).
        projections: explicit ``v`` (``ssm``, ``ssm_vr``) or directions ``u`` (``fd_*``),
            ``[M, B, *event]`` or ``[B, *event]``.
        noise: explicit ``n ~ N(0, I)`` for ``dsm`` / ``fd_dsm`` / ``ms_dsm``, ``[B, *event]``.
        noise_levels: ``ms_dsm`` only: explicit ``sigma_b`` ``[B]``, each one of the option
            ``sigmas`` (default: drawn uniformly from them).
        generator: ``torch.Generator`` for the random draws (default: the global one).
        reduction: ``"mean"`` | ``"sum"`` | ``"none"`` (per-example ``[B]``).
        **options: the method's options (see ``OBJECTIVES[method].defaults``).

    Returns:
        The reduced objective, differentiable in the parameters ``fn`` closes over. Under
        ``torch.no_grad()`` the derivatives in ``x`` are still taken (grad is re-enabled for
        them) and the value is the same; the result then carries no graph.

    Raises:
        TypeError: a wrong type (``x``, ``fn``, its output, ``projections``, ``noise``,
            ``generator``, an option).
        ValueError: an unknown method/option, a bad option value, mismatched shapes, or (with
            validation on, see ``ppl_score.set_validation``) non-finite ``x``,
            ``projections`` or ``noise``, or a zero direction for ``fd_*``.
        RuntimeError: called under ``torch.inference_mode()``, where autograd cannot run.

    Warns:
        NonFiniteWarning: the result is nan/inf (with validation on; not while compiling).
    """
    resolved = spec.resolve(method, kind, options)
    spec.check_reduction(reduction)
    if not callable(fn):
        raise TypeError(f"argument 'fn' must be callable, got {type(fn).__name__}")
    if resolved.spec.noise_conditional:
        spec.check_noise_conditional_fn(fn, resolved.method)
    check_array("x", x)
    spec.check_x_shape(tuple(x.shape))
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"argument 'generator' must be a torch.Generator, got {type(generator).__name__}")
    spec.check_unused(resolved, projections is not None, noise is not None, noise_levels is not None)
    check_grad_mode("score_matching_loss")
    opts = dict(resolved.options)
    draw = dict(generator=generator, dtype=x.dtype, device=x.device)
    name, fd = resolved.method, resolved.spec.finite_difference
    kwargs = {key: opts[key] for key in ("sigma", "eps") if key in opts}
    validate = validating()
    if resolved.spec.uses_projections:
        if projections is not None:
            projections = check_array("projections", projections, dtype="real").to(dtype=x.dtype, device=x.device)
            m = spec.check_projection_shape(resolved, tuple(projections.shape), tuple(x.shape))
            proj = projections.reshape(m, *x.shape)
            if fd and validate and has_zero_direction(proj):
                raise ValueError("argument 'projections' holds a zero direction u; fd_* methods use u/||u||")
            if fd:
                proj = unit_directions(proj)  # scale-safe: u * 1e25 or u * 1e-25 give u/||u||
        else:
            shape = (opts["n_projections"], *x.shape)
            proj = draw_directions(shape, **draw) if fd else draw_projections(shape, opts["projection"], **draw)
        kwargs["u" if fd else "v"] = proj
    if resolved.spec.uses_noise:
        if noise is not None:
            noise = check_array("noise", noise, dtype="real").to(dtype=x.dtype, device=x.device)
            spec.check_noise_shape(resolved, tuple(noise.shape), tuple(x.shape))
        else:
            noise = draw_noise(x.shape, **draw)
        kwargs["noise"] = noise
    if resolved.spec.noise_conditional:
        kwargs["weighting"] = opts["weighting"]
        if noise_levels is not None:
            noise_levels = check_array("noise_levels", noise_levels, dtype="real").to(dtype=x.dtype, device=x.device)
            spec.check_noise_levels_shape(tuple(noise_levels.shape), x.shape[0])
            if validate:
                spec.check_noise_levels(noise_levels.detach().cpu().numpy(), opts["sigmas"], x.shape[0])
            kwargs["levels"] = noise_levels
        else:
            kwargs["levels"] = draw_noise_levels(opts["sigmas"], x.shape[0], **draw)
    if "eps" in opts:
        spec.fd_roundoff_warning(opts["eps"], torch.finfo(x.dtype).eps, str(x.dtype))
    grad_mode = torch.is_grad_enabled()
    # derivatives in x need autograd even in a no_grad evaluation loop
    with torch.enable_grad():
        per_example = _PER_EXAMPLE[name](fn, resolved.kind, x, **kwargs)
    if not grad_mode:
        per_example = per_example.detach()
    if validate and not all_finite(per_example):
        warn_nonfinite(f"score_matching_loss(method={name!r})", spec.nonfinite_cause(name, opts))
    if reduction == "none":
        return per_example
    return per_example.sum() if reduction == "sum" else per_example.mean()
