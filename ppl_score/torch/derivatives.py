"""Scores, Hessian-vector products and Hessian traces of a user ``fn`` (torch).

``fn`` is a log density (``kind="log_prob"``, ``[N, *event] -> [N]``) or a score network
(``kind="score"``, ``[N, *event] -> [N, *event]``). ``H`` is the Hessian of the log density
or the Jacobian of the score network; ``v^T H v = v^T H^T v`` either way, so one
reverse pass of ``s . v`` gives every quadratic form we need.

We differentiate by double backward (``create_graph=True``): on CPU it measured faster than
forward-over-reverse through ``torch.func`` (``benchmarks/objectives.py``).
"""

from __future__ import annotations

import torch

from .. import spec

# Basis vectors per batched reverse pass in the exact Hessian trace: bounds memory to
# ``ESM_CHUNK`` copies of the score graph and measured fastest on CPU at D = 64.
ESM_CHUNK = 16


def differentiable_input(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself when it already carries a graph (gradients reach its upstream), else a
    fresh leaf that requires grad; the caller's tensor is never modified."""
    return x if x.requires_grad else x.detach().requires_grad_(True)


def _grad(output: torch.Tensor, x: torch.Tensor, **kwargs) -> torch.Tensor:
    """``autograd.grad`` with create_graph, zeros where ``output`` does not depend on ``x``
    (a linear log density has a constant score, a constant score a zero Jacobian)."""
    if not output.requires_grad:
        shape = kwargs["grad_outputs"].shape[:1] + x.shape if kwargs.get("is_grads_batched") else x.shape
        return x.new_zeros(shape)
    (g,) = torch.autograd.grad(output, x, create_graph=True, materialize_grads=True, **kwargs)
    return g


def evaluate(fn, kind: str, x: torch.Tensor) -> torch.Tensor:
    """``fn(x)`` with its output shape checked against ``kind``."""
    out = fn(x)
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"argument 'fn' must return a torch.Tensor, got {type(out).__name__}")
    spec.check_fn_output_shape(kind, out.shape, x.shape)
    return out


def score(fn, kind: str, x: torch.Tensor) -> torch.Tensor:
    """``s(x)``, differentiable (``x`` must require grad for ``kind="log_prob"``)."""
    out = evaluate(fn, kind, x)
    if kind == "score":
        return out
    return _grad(out.sum(), x)


def quadratic_form(s: torch.Tensor, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``v^T H v`` per example from the graph of ``s(x)``: ``v . grad_x (s . v)``."""
    hv = _grad((s * v).sum(), x)
    return (hv * v).reshape(v.shape[0], -1).sum(-1)


def hessian_trace(s: torch.Tensor, x: torch.Tensor, chunk: int = ESM_CHUNK) -> torch.Tensor:
    """``tr H(x)`` per example: batched reverse passes over chunks of basis vectors.

    Each chunk is one vmapped backward (``is_grads_batched``) through the graph of ``s``,
    so the network is evaluated once and the number of passes is ``ceil(D / chunk)``.
    """
    b = x.shape[0]
    d = s[0].numel()
    eye = torch.eye(d, dtype=s.dtype, device=s.device)
    trace = s.new_zeros(b)
    for start in range(0, d, chunk):
        basis = eye[start : start + chunk]  # [c, D]
        grads_out = basis[:, None, :].expand(-1, b, -1).reshape(-1, *s.shape)
        h = _grad(s, x, grad_outputs=grads_out, is_grads_batched=True)
        # diagonal entries H_ii for i in the chunk
        diag = h.reshape(basis.shape[0], b, d)[:, :, start : start + basis.shape[0]]
        trace = trace + diag.diagonal(dim1=0, dim2=2).sum(-1)
    return trace
