"""``score_matching_loss`` of ``ppl_score.torch`` in the modes users run it in (issue 10,
items 1 and 7): ``no_grad`` and ``inference_mode``, and the memory of the exact trace."""

from __future__ import annotations

import numpy as np
import pytest

from tests.helpers.objectives import D_BIG, METHODS, RNG, X, _builder, _explicit, _mlp_energy, _quartic

# ------------------------------------------------------------------ 1. torch grad modes


@pytest.mark.parametrize("kind", ["log_prob", "score"])
@pytest.mark.parametrize("method", METHODS)
def test_torch_no_grad_gives_the_same_value(torch_backend, method, kind):
    import torch

    from ppl_score.torch import score_matching_loss

    fn = _builder(kind)(torch_backend.ops(np.float64))
    x = torch.as_tensor(X)
    kw = {k: torch.as_tensor(v) for k, v in _explicit(method).items()}
    ref = score_matching_loss(fn, x, method, kind=kind, **kw)
    with torch.no_grad():
        got = score_matching_loss(fn, x, method, kind=kind, **kw)
    assert not got.requires_grad  # no graph kept in an evaluation loop
    assert float(ref.detach()) != 0.0
    torch.testing.assert_close(got, ref.detach(), rtol=1e-12, atol=1e-12)


def test_torch_no_grad_keeps_parameter_graph_outside(torch_backend):
    """Outside no_grad the loss still reaches the parameters of a module."""
    import torch

    from ppl_score.torch import score_matching_loss

    lin = torch.nn.Linear(3, 1, dtype=torch.float64)
    fn = lambda x: -torch.nn.functional.softplus(lin(x)).squeeze(-1) - 0.5 * (x * x).sum(-1)  # noqa: E731
    loss = score_matching_loss(fn, torch.as_tensor(X), "esm")
    (g,) = torch.autograd.grad(loss, lin.weight)
    assert torch.isfinite(g).all() and g.abs().sum() > 0


@pytest.mark.parametrize("method", METHODS)
def test_torch_inference_mode_raises(torch_backend, method):
    import torch

    from ppl_score.torch import score_matching_loss

    fn = _mlp_energy(torch_backend.ops(np.float64))
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode.*no_grad"):
        score_matching_loss(
            fn, torch.as_tensor(X), method, **{k: torch.as_tensor(v) for k, v in _explicit(method).items()}
        )


def test_torch_inference_tensor_used_outside_inference_mode(torch_backend):
    """Data loaded under inference_mode (an inference tensor) is still accepted later."""
    import torch

    from ppl_score.torch import score_matching_loss

    fn = _mlp_energy(torch_backend.ops(np.float64))
    with torch.inference_mode():
        xi = torch.as_tensor(X).clone()
    ref = score_matching_loss(fn, torch.as_tensor(X), "esm")
    torch.testing.assert_close(score_matching_loss(fn, xi, "esm"), ref)


def test_torch_esm_memory_bounded_by_chunk(torch_backend, monkeypatch):
    """No tensor of the exact trace holds D^2 elements (a D x D identity used to)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from ppl_score.torch import derivatives, score_matching_loss

    monkeypatch.setattr(derivatives, "ESM_MEMORY_BUDGET", 4 * 2 * 512)  # chunk = 4 at B = 2
    x = torch.as_tensor(RNG.normal(size=(2, D_BIG)))

    class Largest(TorchDispatchMode):
        numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    self.numel = max(self.numel, t.numel())
            return out

    fn = _quartic(torch_backend.ops(np.float64))
    with Largest() as mode:
        val = score_matching_loss(fn, x, "esm", reduction="none")
    expected = (-3 * x**2).sum(-1) + 0.5 * ((-(x**3) - 1) ** 2).sum(-1)
    torch.testing.assert_close(val, expected)
    assert mode.numel <= 4 * 2 * D_BIG < D_BIG**2


def test_torch_esm_fallback_for_functions_vmap_cannot_run(torch_backend):
    """A fn with data-dependent Python control flow still gets the exact trace."""
    import torch

    from ppl_score.torch import score_matching_loss

    fn0 = _quartic(torch_backend.ops(np.float64))

    def fn(x):
        if bool((x.abs() > 1e6).any()):  # data-dependent: not allowed under torch.func.vmap
            raise AssertionError
        return fn0(x)

    calls = []
    fn1 = fn

    def fn(x):  # noqa: F811 - counts the evaluations
        calls.append(1)
        return fn1(x)

    x = torch.as_tensor(RNG.normal(size=(3, 5)))
    torch.testing.assert_close(score_matching_loss(fn, x, "esm"), score_matching_loss(fn0, x, "esm"))
    first = len(calls)
    score_matching_loss(fn, x, "esm")
    assert len(calls) - first == first - 1  # the failed vmap attempt is not repeated
