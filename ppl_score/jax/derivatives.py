"""Scores, Hessian-vector products and Hessian traces of a user ``fn`` (JAX).

``fn`` is a log density (``kind="log_prob"``, ``[N, *event] -> [N]``) or a score network
(``kind="score"``, ``[N, *event] -> [N, *event]``). ``H`` is the Hessian of the log density
or the Jacobian of the score network. Quadratic forms ``v^T H v`` come from one
forward-mode pass over the score (forward-over-reverse for log densities, plain ``jvp``
for score networks), vmapped over projections so the primal is computed once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .. import spec

# Basis vectors per vmapped batch in the exact Hessian trace (bounds memory to
# ``ESM_CHUNK`` tangent copies of the score computation).
ESM_CHUNK = 16


def evaluate(fn, kind: str, x: jax.Array) -> jax.Array:
    """``fn(x)`` with its output shape checked against ``kind`` (at trace time)."""
    out = fn(x)
    if not hasattr(out, "shape"):
        raise TypeError(f"argument 'fn' must return an array, got {type(out).__name__}")
    spec.check_fn_output_shape(kind, out.shape, x.shape)
    return out


def score_fn(fn, kind: str):
    """``x -> s(x)``."""
    if kind == "score":
        return lambda x: evaluate(fn, kind, x)

    def s(x):
        out, pullback = jax.vjp(lambda y: evaluate(fn, kind, y), x)
        return pullback(jnp.ones_like(out))[0]

    return s


def _dot(a: jax.Array, b: jax.Array) -> jax.Array:
    """Per-example inner product over the event dims of ``[N, *event]``."""
    return (a * b).reshape(a.shape[0], -1).sum(-1)


def score_and_quadratic_forms(fn, kind: str, x: jax.Array, v: jax.Array):
    """``s(x)`` ``[B, *event]`` and ``v_m^T H(x) v_m`` ``[M, B]`` for ``v`` ``[M, B, *event]``."""
    sf = score_fn(fn, kind)

    def one(vm):
        s, hv = jax.jvp(sf, (x,), (vm,))
        return s, _dot(hv, vm)

    s, vhv = jax.vmap(one, out_axes=(None, 0))(v)
    return s, vhv


def hessian_trace(fn, kind: str, x: jax.Array, chunk: int = ESM_CHUNK):
    """``s(x)`` and ``tr H(x)`` per example by vmapped Hessian-vector products with the
    ``D`` basis vectors, in chunks of ``chunk`` to bound memory."""
    sf = score_fn(fn, kind)
    d = spec.event_size(x.shape)
    basis = jnp.eye(d, dtype=x.dtype).reshape(d, *x.shape[1:])

    def diag_entry(e):
        ev = jnp.broadcast_to(e, x.shape)
        _, hv = jax.jvp(sf, (x,), (ev,))
        return _dot(hv, ev)

    diag = jax.lax.map(diag_entry, basis, batch_size=min(chunk, d))  # [D, B]
    return sf(x), diag.sum(0)
