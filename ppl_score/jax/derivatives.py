"""Scores, Hessian-vector products and Hessian traces of a user ``fn`` (JAX).

``fn`` is a log density (``kind="log_prob"``, ``[N, *event] -> [N]``) or a score network
(``kind="score"``, ``[N, *event] -> [N, *event]``). ``H`` is the Hessian of the log density
or the Jacobian of the score network. Quadratic forms ``v^T H v`` come from one
forward-mode pass over the score (forward-over-reverse for log densities, plain ``jvp``
for score networks), vmapped over projections so the primal is computed once.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from ..common import objectives as spec

# Working-set budget of the exact Hessian trace, in elements: a chunk of ``c`` basis
# vectors is one vmapped Hessian-vector product whose buffers hold about
# ``c * B * max(D, 512)`` elements (512 stands for hidden layers wider than the input). The
# basis is made per chunk from indices, never a ``D x D`` identity.
ESM_MEMORY_BUDGET = 2**20


def flat_sum(t: jax.Array) -> jax.Array:
    """Per-example sum over the event dims: ``[N, *event] -> [N]``."""
    return t.reshape(t.shape[0], -1).sum(-1)


def esm_chunk(batch: int, dim: int, budget: int | None = None) -> int:
    """Basis vectors per vmapped batch of the exact trace for ``x`` ``[batch, dim]``."""
    budget = ESM_MEMORY_BUDGET if budget is None else budget
    return max(1, min(dim, budget // max(1, batch * max(dim, 512))))


def evaluate(fn: Callable[[jax.Array], jax.Array], kind: str, x: jax.Array) -> jax.Array:
    """``fn(x)`` with its output shape checked against ``kind`` (at trace time)."""
    out = fn(x)
    if not hasattr(out, "shape"):
        raise TypeError(f"argument 'fn' must return an array, got {type(out).__name__}")
    if not jnp.issubdtype(out.dtype, jnp.floating):
        raise TypeError(
            f"argument 'fn' must return a floating-point array (its derivatives in x are the "
            f"score), got dtype {out.dtype}; compute it in x's dtype {x.dtype}"
        )
    spec.check_fn_output_shape(kind, out.shape, x.shape)
    return out


def score_fn(fn: Callable[[jax.Array], jax.Array], kind: str) -> Callable[[jax.Array], jax.Array]:
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


def score_and_quadratic_forms(
    fn: Callable[[jax.Array], jax.Array], kind: str, x: jax.Array, v: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """``s(x)`` ``[B, *event]`` and ``v_m^T H(x) v_m`` ``[M, B]`` for ``v`` ``[M, B, *event]``."""
    sf = score_fn(fn, kind)

    def one(vm):
        s, hv = jax.jvp(sf, (x,), (vm,))
        return s, _dot(hv, vm)

    if v.shape[0] == 1:
        # no vmap over a single projection: its [1, B, H] tangents cost transposes and
        # copies in the parameter gradient (about 10% of a step, benchmarks/objectives.py)
        s, vhv = one(v[0])
        return s, vhv[None]
    s, vhv = jax.vmap(one, out_axes=(None, 0))(v)
    return s, vhv


def hessian_trace(
    fn: Callable[[jax.Array], jax.Array], kind: str, x: jax.Array, chunk: int | None = None
) -> tuple[jax.Array, jax.Array]:
    """``s(x)`` and ``tr H(x)`` per example by vmapped Hessian-vector products with the
    ``D`` basis vectors, ``chunk`` at a time (default :func:`esm_chunk`); each basis vector
    is made from its index inside the map, so no ``D x D`` identity is ever built."""
    sf = score_fn(fn, kind)
    d = spec.event_size(x.shape)
    chunk = esm_chunk(x.shape[0], d) if chunk is None else chunk
    s, lin = jax.linearize(sf, x)

    def diag_entry(i):
        e = jax.nn.one_hot(i, d, dtype=x.dtype).reshape(x.shape[1:])
        hv = lin(jnp.broadcast_to(e, x.shape))
        return hv.reshape(x.shape[0], d)[:, i]

    diag = jax.lax.map(diag_entry, jnp.arange(d), batch_size=min(chunk, d))  # [D, B]
    return s, diag.sum(0)
