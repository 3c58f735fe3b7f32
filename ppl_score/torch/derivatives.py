"""Scores, Hessian-vector products and Hessian traces of a user ``fn`` (torch).

``fn`` is a log density (``kind="log_prob"``, ``[N, *event] -> [N]``) or a score network
(``kind="score"``, ``[N, *event] -> [N, *event]``). ``H`` is the Hessian of the log density
or the Jacobian of the score network; ``v^T H v = v^T H^T v`` either way, so one
reverse pass of ``s . v`` gives every quadratic form we need.

We differentiate by double backward (``create_graph=True``): on CPU it measured faster than
forward-over-reverse through ``torch.func`` (``benchmarks/objectives.py``).
"""

from __future__ import annotations

from typing import Callable

import torch

from ..common import objectives as spec

# Working-set budget of the exact Hessian trace, in elements. A chunk of ``c`` basis
# vectors is one vmapped reverse pass whose buffers hold about ``c * B * max(D, 512)``
# elements (the 512 stands for hidden layers wider than the input); the chunk is the
# largest that fits, at least 1 and at most ``D``. Never a ``D x D`` identity. Measured on
# CPU (``benchmarks/objectives.py --explore``): larger chunks lose to cache misses.
ESM_MEMORY_BUDGET = 2**20


def flat_sum(t: torch.Tensor) -> torch.Tensor:
    """Per-example sum over the event dims: ``[N, *event] -> [N]``."""
    return t.reshape(t.shape[0], -1).sum(-1)


def esm_chunk(batch: int, dim: int, budget: int | None = None) -> int:
    """Basis vectors per vmapped reverse pass of the exact trace for ``x`` ``[batch, dim]``."""
    budget = ESM_MEMORY_BUDGET if budget is None else budget
    return max(1, min(dim, budget // max(1, batch * max(dim, 512))))


def _basis_chunk(start: int, c: int, d: int, like: torch.Tensor):
    """The ``c`` basis vectors ``e_start .. e_{start+c-1}`` of R^d, ``[c, d]``, and their indices."""
    idx = torch.arange(c, device=like.device)
    basis = like.new_zeros(c, d)
    basis[idx, start + idx] = 1
    return basis, idx


def score_and_trace(
    fn: Callable[[torch.Tensor], torch.Tensor], kind: str, x: torch.Tensor, chunk: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``s(x)`` and ``tr H(x)`` per example by ``torch.func``: per example, one reverse pass
    for the score and vmapped vector-Jacobian products of the score with ``chunk`` basis
    vectors at a time (the structure of ``vmap(jacrev(grad))``, without its ``D x D``
    Hessian). Gradients reach the parameters ``fn`` closes over. ``fn`` must run under
    ``torch.func.vmap`` on a single example ``[1, *event]``; callers fall back to
    :func:`hessian_trace` when it does not.
    """
    b, event = x.shape[0], tuple(x.shape[1:])
    d = spec.event_size(tuple(x.shape))
    chunk = esm_chunk(b, d) if chunk is None else chunk

    def one_score(xi):
        out = evaluate(fn, kind, xi[None])[0]
        return out

    score_one = one_score if kind == "score" else torch.func.grad(one_score)

    def one(xi):
        s, vjp_fn = torch.func.vjp(score_one, xi)
        trace = xi.new_zeros(())
        for start in range(0, d, chunk):
            c = min(chunk, d - start)
            basis, idx = _basis_chunk(start, c, d, xi)
            (h,) = torch.func.vmap(vjp_fn)(basis.reshape(c, *event))
            trace = trace + h.reshape(c, d)[idx, start + idx].sum()
        return s, trace

    return torch.func.vmap(one)(x)


def differentiable_input(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself when it already carries a graph (gradients reach its upstream), else a
    fresh leaf that requires grad; the caller's tensor is never modified. An inference
    tensor (made under ``torch.inference_mode``) is copied first: autograd cannot record it."""
    if x.requires_grad:
        return x
    if x.is_inference():
        x = x.clone()
    return x.detach().requires_grad_(True)


def _grad(output: torch.Tensor, x: torch.Tensor, **kwargs) -> torch.Tensor:
    """``autograd.grad`` with create_graph, zeros where ``output`` does not depend on ``x``
    (a linear log density has a constant score, a constant score a zero Jacobian)."""
    if not output.requires_grad:
        shape = kwargs["grad_outputs"].shape[:1] + x.shape if kwargs.get("is_grads_batched") else x.shape
        return x.new_zeros(shape)
    (g,) = torch.autograd.grad(output, x, create_graph=True, materialize_grads=True, **kwargs)
    return g


def evaluate(fn: Callable[[torch.Tensor], torch.Tensor], kind: str, x: torch.Tensor) -> torch.Tensor:
    """``fn(x)`` with its output shape checked against ``kind``."""
    out = fn(x)
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"argument 'fn' must return a torch.Tensor, got {type(out).__name__}")
    if not out.is_floating_point():
        raise TypeError(
            f"argument 'fn' must return a floating-point tensor (its derivatives in x are the "
            f"score), got dtype {out.dtype}; compute it in x's dtype {x.dtype}"
        )
    spec.check_fn_output_shape(kind, out.shape, x.shape)
    return out


def score(fn: Callable[[torch.Tensor], torch.Tensor], kind: str, x: torch.Tensor) -> torch.Tensor:
    """``s(x)``, differentiable (``x`` must require grad for ``kind="log_prob"``)."""
    out = evaluate(fn, kind, x)
    if kind == "score":
        return out
    return _grad(out.sum(), x)


def quadratic_form(s: torch.Tensor, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``v^T H v`` per example from the graph of ``s(x)``: ``v^T grad_x (v^T s)``."""
    hv = _grad((s * v).sum(), x)
    return (hv * v).reshape(v.shape[0], -1).sum(-1)


def hessian_trace(s: torch.Tensor, x: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """``tr H(x)`` per example from the graph of ``s(x)``: batched reverse passes
    (``is_grads_batched``) over chunks of basis vectors; the fallback of
    :func:`score_and_trace` for functions ``torch.func`` cannot transform. Memory is bounded
    by the chunk (default: :func:`esm_chunk`), never a ``D x D`` identity.
    """
    b = x.shape[0]
    d = s[0].numel()
    chunk = esm_chunk(b, d) if chunk is None else chunk
    trace = s.new_zeros(b)
    for start in range(0, d, chunk):
        c = min(chunk, d - start)
        basis, idx = _basis_chunk(start, c, d, s)
        grads_out = basis[:, None, :].expand(c, b, d).reshape(c, *s.shape)
        h = _grad(s, x, grad_outputs=grads_out, is_grads_batched=True)
        # diagonal entries H_ii for i in the chunk
        trace = trace + h.reshape(c, b, d)[idx, :, start + idx].sum(0)
    return trace
