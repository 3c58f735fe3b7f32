"""``score_matching_loss`` of ``ppl_score.torch``: the global generator, no input mutation,
and results differentiable in the network's parameters."""

from __future__ import annotations

import numpy as np
import pytest

from tests.helpers.objectives import KINDS, METHODS, B, _draw_case, _inputs


def test_torch_global_generator_used_without_generator(torch_backend, refs, rng):
    torch = torch_backend.torch
    dens = refs.Gaussian.random(3, rng)
    x = torch_backend.asarray(rng.normal(size=(B, 3)))
    fn = dens.log_prob_fn(torch_backend.ops(np.float64))
    torch.manual_seed(5)
    a = torch_backend.call(fn, x, "ssm")
    torch.manual_seed(5)
    b = torch_backend.call(fn, x, "ssm")
    assert torch.equal(a, b)


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("method", METHODS)
def test_torch_inputs_not_mutated(torch_backend, refs, rng, method, requires_grad):
    dens = refs.Gaussian.random(6, rng)
    x_np, proj_np, noise_np = _draw_case(rng, (2, 3))
    x = torch_backend.asarray(x_np).requires_grad_(requires_grad)
    proj, noise = torch_backend.asarray(proj_np), torch_backend.asarray(noise_np)
    kw = _inputs(method, proj, noise)
    out = torch_backend.call(dens.log_prob_fn(torch_backend.ops(np.float64)), x, method, **kw)
    if out.requires_grad:
        out.backward()
    assert x.requires_grad is requires_grad
    np.testing.assert_array_equal(x.detach().numpy(), x_np)
    np.testing.assert_array_equal(proj.numpy(), proj_np)
    np.testing.assert_array_equal(noise.numpy(), noise_np)
    assert not proj.requires_grad and not noise.requires_grad
    if not requires_grad:
        assert x.grad is None


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", METHODS)
def test_torch_result_differentiable_in_parameters(torch_backend, rng, method, kind):
    torch = torch_backend.torch
    from ppl_score.torch.nets import MLPEnergy, MLPScore

    torch.manual_seed(0)
    net = (MLPEnergy(3, hidden=(8,)) if kind == "log_prob" else MLPScore(3, hidden=(8,))).double()
    x = torch_backend.asarray(rng.normal(size=(B, 3)))
    out = torch_backend.call(net, x, method, kind=kind, seed=0)
    assert out.requires_grad
    out.backward()
    # the output bias of an energy does not move its score, so it may get no gradient
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    assert len(grads) >= len(list(net.parameters())) - 1
    assert all(bool(torch.isfinite(g).all()) for g in grads)
    assert any(bool((g != 0).any()) for g in grads)
