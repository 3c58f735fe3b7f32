"""The score-matching objectives of ``ppl_score.spec.OBJECTIVES`` (JAX).

Each ``_per_example_<method>`` returns the per-example value ``[B]``; ``score_matching_loss``
validates, draws what is random, and reduces. The math is in ``ppl_score.spec`` and in
the spec (docs page *Spec*, section 1). Method, kind, options and reduction are static under ``jax.jit``.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from ..common import objectives as spec
from ..common.validate import is_validation_enabled, warn_nonfinite
from . import derivatives as d
from .projections import (
    draw_directions,
    draw_noise,
    draw_noise_levels,
    draw_projections,
    has_zero_direction,
    unit_directions,
)
from .validate import check_array, check_key, is_concrete

__all__ = ["score_matching_loss"]


def _replicate(x: jax.Array, m: int) -> jax.Array:
    """``[B, *event] -> [M * B, *event]``: M stacked copies."""
    return x if m == 1 else jnp.broadcast_to(x, (m, *x.shape)).reshape(m * x.shape[0], *x.shape[1:])


def _per_example_esm(fn, kind, x, **_):
    s, trace = d.hessian_trace(fn, kind, x)
    return trace + 0.5 * d.flat_sum(s * s)


def _per_example_ssm(fn, kind, x, *, v, **_):
    s, vhv = d.score_and_quadratic_forms(fn, kind, x, v)  # [B, *event], [M, B]
    vs = (v * s).reshape(v.shape[0], s.shape[0], -1).sum(-1)  # [M, B]
    return (vhv + 0.5 * vs**2).mean(0)


def _per_example_ssm_vr(fn, kind, x, *, v, **_):
    s, vhv = d.score_and_quadratic_forms(fn, kind, x, v)
    return vhv.mean(0) + 0.5 * d.flat_sum(s * s)


def _per_example_dsm(fn, kind, x, *, noise, sigma, **_):
    s = d.score_fn(fn, kind)(x + sigma * noise)
    return 0.5 * d.flat_sum((s + noise / sigma) ** 2)


def _fd_steps(x, u, eps):
    """``v = eps u`` (``u`` already of unit norm) flattened to ``[M * B, *event]`` and
    ``c = D / eps^2``."""
    m = u.shape[0]
    v = (eps * u).reshape(m * x.shape[0], *x.shape[1:])
    return v, spec.event_size(x.shape) / (eps * eps)


def _per_example_fd_ssm(fn, kind, x, *, u, eps, **_):
    m, b = u.shape[0], x.shape[0]
    v, c = _fd_steps(x, u, eps)
    xr = _replicate(x, m)
    if kind == "log_prob":
        # one batched call on [x; x+v; x-v]
        out = d.evaluate(fn, kind, jnp.concatenate([x, xr + v, xr - v]))
        l0, lp, lm = out[:b], out[b : b + m * b], out[b + m * b :]
        val = c * (lp + lm - 2 * _replicate(l0, m) + 0.125 * (lp - lm) ** 2)
    else:
        out = d.evaluate(fn, kind, jnp.concatenate([xr + v, xr - v]))
        sp, sm = out[: m * b], out[m * b :]
        val = 0.125 * d.flat_sum((sp + sm) ** 2) + 0.5 * c * d.flat_sum((sp - sm) * v)
    return val.reshape(m, b).mean(0)


def _per_example_fd_dsm(fn, kind, x, *, u, noise, sigma, eps, **_):
    m, b = u.shape[0], x.shape[0]
    v, c = _fd_steps(x, u, eps)
    xt = _replicate(x + sigma * noise, m)
    shift = _replicate(noise / sigma, m)  # (x~ - x) / sigma^2
    out = d.evaluate(fn, kind, jnp.concatenate([xt + v, xt - v]))
    fp, fm = out[: m * b], out[m * b :]
    if kind == "log_prob":
        inner = 0.5 * (fp - fm) + d.flat_sum(v * shift)
    else:
        inner = d.flat_sum(v * (0.5 * (fp + fm) + shift))
    return (0.5 * c * inner**2).reshape(m, b).mean(0)


def _per_example_ms_dsm(fn, kind, x, *, noise, levels, weighting, **_):
    # levels: sigma_b [B]; (x~ - x) / sigma_b^2 = n / sigma_b
    sig = levels.reshape((-1,) + (1,) * (x.ndim - 1))
    s = d.score_fn(lambda z: fn(z, levels), kind)(x + sig * noise)
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


_X64_WARNED = False


def _warn_x64_once(name: str) -> None:
    """float64 numpy input while x64 is off: JAX computes in float32 without a word."""
    global _X64_WARNED
    if not _X64_WARNED:
        _X64_WARNED = True
        warnings.warn(
            f"argument {name!r} is float64 but JAX's x64 mode is off, so it is computed in "
            "float32; enable it with jax.config.update('jax_enable_x64', True) at start-up "
            "(this warning is shown once)",
            UserWarning,
            stacklevel=4,
        )


def score_matching_loss(
    fn: Callable[[jax.Array], jax.Array],
    x: jax.Array | np.ndarray,
    method: str = "ssm_vr",
    *,
    key: jax.Array | None = None,
    kind: str = "log_prob",
    projections: jax.Array | np.ndarray | None = None,
    noise: jax.Array | np.ndarray | None = None,
    noise_levels: jax.Array | np.ndarray | None = None,
    reduction: str = "mean",
    **options: Any,
) -> jax.Array:
    """Score-matching objective ``method`` of ``fn`` on the batch ``x``.

    Args:
        fn: ``kind="log_prob"``: ``x[B, *event] -> [B]``, a log density up to a constant;
            ``kind="score"``: ``x[B, *event] -> [B, *event]``, a score network. For
            ``ms_dsm`` noise-conditional: ``fn(x, sigma)`` with ``sigma`` ``[B]``.
        x: data ``[B, *event]``, floating dtype.
        method: one of ``ppl_score.spec.OBJECTIVES`` (``esm``, ``ssm``, ``ssm_vr``, ``dsm``,
            ``fd_ssm``, ``fd_dsm``, ``ms_dsm``).
        key: PRNG key, required when something random must be drawn.
        projections: explicit ``v`` (``ssm``, ``ssm_vr``) or directions ``u`` (``fd_*``),
            ``[M, B, *event]`` or ``[B, *event]``.
        noise: explicit ``n ~ N(0, I)`` for ``dsm`` / ``fd_dsm`` / ``ms_dsm``, ``[B, *event]``.
        noise_levels: ``ms_dsm`` only: explicit ``sigma_b`` ``[B]``, each one of the option
            ``sigmas`` (default: drawn uniformly from them; checked eagerly, not under jit).
        reduction: ``"mean"`` | ``"sum"`` | ``"none"`` (per-example ``[B]``).
        **options: the method's options (see ``OBJECTIVES[method].defaults``).

    Returns:
        The reduced objective; differentiate it with ``jax.grad`` of a function that
        builds ``fn`` from its parameters. ``jit``-compatible with everything but the
        arrays static.

    Raises:
        TypeError: a wrong type (``x``, ``fn``, its output, ``key``, ``projections``,
            ``noise``, an option).
        ValueError: an unknown method/option, a bad option value, mismatched shapes, a
            missing or batched ``key``, or (eagerly, with validation on, see
            ``ppl_score.set_validation``) non-finite ``x``, ``projections`` or ``noise``, or
            a zero direction for ``fd_*``.

    Warns:
        NonFiniteWarning: the result is nan/inf (eagerly, with validation on).
        UserWarning: float64 numpy ``x`` while JAX's x64 mode is off (once per process).
    """
    resolved = spec.resolve(method, kind, options)
    spec.check_reduction(reduction)
    if not callable(fn):
        raise TypeError(f"argument 'fn' must be callable, got {type(fn).__name__}")
    if resolved.spec.noise_conditional:
        spec.check_noise_conditional_fn(fn, resolved.method)
    if isinstance(x, np.ndarray) and x.dtype == np.float64 and not jax.config.jax_enable_x64:
        _warn_x64_once("x")
    x = check_array("x", x)
    spec.check_x_shape(tuple(x.shape))
    spec.check_unused(resolved, projections is not None, noise is not None, noise_levels is not None)
    opts = dict(resolved.options)
    name, fd = resolved.method, resolved.spec.finite_difference
    kwargs = {k: opts[k] for k in ("sigma", "eps") if k in opts}
    draws_levels = resolved.spec.noise_conditional and noise_levels is None
    needs_key = (
        (resolved.spec.uses_projections and projections is None)
        or (resolved.spec.uses_noise and noise is None)
        or draws_levels
    )
    if needs_key and key is None:
        what = (
            "projections"
            if projections is None and resolved.spec.uses_projections
            else "noise"
            if noise is None
            else "noise levels"
        )
        raise ValueError(f"argument 'key' is required: method {name!r} draws random {what} (or pass them explicitly)")
    if key is not None:
        key = check_key(key)
    key_proj, key_noise = jax.random.split(key) if needs_key else (None, None)
    if resolved.spec.uses_projections:
        if projections is not None:
            projections = check_array("projections", projections, dtype="real", cast=x.dtype)
            m = spec.check_projection_shape(resolved, tuple(projections.shape), tuple(x.shape))
            proj = projections.reshape(m, *x.shape)
            if fd and is_validation_enabled() and is_concrete(proj) and has_zero_direction(proj):
                raise ValueError("argument 'projections' holds a zero direction u; fd_* methods use u/||u||")
            if fd:
                proj = unit_directions(proj)  # scale-safe: u * 1e25 or u * 1e-25 give u/||u||
        else:
            shape = (opts["n_projections"], *x.shape)
            proj = (
                draw_directions(key_proj, shape, x.dtype)
                if fd
                else draw_projections(key_proj, shape, opts["projection"], x.dtype)
            )
        kwargs["u" if fd else "v"] = proj
    if resolved.spec.uses_noise:
        if noise is not None:
            noise = check_array("noise", noise, dtype="real", cast=x.dtype)
            spec.check_noise_shape(resolved, tuple(noise.shape), tuple(x.shape))
        else:
            noise = draw_noise(key_noise, x.shape, x.dtype)
        kwargs["noise"] = noise
    if resolved.spec.noise_conditional:
        kwargs["weighting"] = opts["weighting"]
        if noise_levels is not None:
            noise_levels = check_array("noise_levels", noise_levels, dtype="real", cast=x.dtype)
            spec.check_noise_levels_shape(tuple(noise_levels.shape), x.shape[0])
            if is_validation_enabled() and is_concrete(noise_levels):
                spec.check_noise_levels(np.asarray(noise_levels), opts["sigmas"], x.shape[0])
            kwargs["levels"] = noise_levels
        else:
            # a third stream, so the noise of a given key is that of dsm
            kwargs["levels"] = draw_noise_levels(jax.random.fold_in(key, 1), opts["sigmas"], x.shape[0], x.dtype)
    if "eps" in opts:
        spec.fd_roundoff_warning(opts["eps"], float(jnp.finfo(x.dtype).eps), str(x.dtype))
    per_example = _PER_EXAMPLE[name](fn, resolved.kind, x, **kwargs)
    # eagerly only: under jit / grad the value is a tracer (like the finiteness check of x)
    if is_validation_enabled() and is_concrete(per_example) and not np.isfinite(np.asarray(per_example)).all():
        warn_nonfinite(f"score_matching_loss(method={name!r})", spec.nonfinite_cause(name, opts))
    if reduction == "none":
        return per_example
    return per_example.sum() if reduction == "sum" else per_example.mean()
