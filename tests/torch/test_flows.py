"""Full-Jacobian flows of ``ppl_score.torch.flows`` (issue 6), float64, small D: the relative
gradient against autograd of the exact NLL times ``W^T W``, ``log_prob`` against a
brute-force Jacobian determinant, the inverse, sampling, and training by score matching."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from ppl_score.torch import score_matching_loss as torch_sm_loss  # noqa: E402
from ppl_score.torch.flows import InvertibleMLP as TorchFlow  # noqa: E402
from tests.helpers.flows import F64, D, data, extreme_latents, gaussian_data, log_normal, make_torch_flow

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ----------------------------------------------------------------------------------------
# relative gradient
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_torch_relative_gradient_is_autograd_times_wtw(bias, reduction):
    flow = make_torch_flow(bias=bias)
    x = torch.as_tensor(data())
    exact = -flow.log_prob(x)
    exact = exact.mean() if reduction == "mean" else exact.sum()
    params = list(flow.parameters())
    grads = dict(zip(map(id, params), torch.autograd.grad(exact, params)))
    loss = flow.relative_gradient_loss(x, reduction=reduction)
    loss.backward()
    for w in flow.weights:
        expected = grads[id(w)] @ w.detach().T @ w.detach()
        np.testing.assert_allclose(w.grad.numpy(), expected.numpy(), rtol=1e-10, atol=1e-12)
    if bias:
        for b in flow.biases:  # biases: ordinary gradients
            np.testing.assert_allclose(b.grad.numpy(), grads[id(b)].numpy(), rtol=1e-10, atol=1e-12)
    # the training loss is the NLL without the log|det W| terms
    n_eff = 1 if reduction == "mean" else x.shape[0]
    with torch.no_grad():
        np.testing.assert_allclose(loss.item(), exact.item() + n_eff * flow.log_abs_det_weights().item(), rtol=1e-12)


def test_relative_gradient_weights_of_the_placeholder():
    """Any weighting of the per-example loss (here non-uniform) gets the log-det relative
    gradient ``(sum of the weights) * W``, as a Pyro plate scale or mask would."""
    flow = make_torch_flow()
    x = torch.as_tensor(data())
    c = torch.linspace(0.5, 2.0, x.shape[0], dtype=F64)
    params = list(flow.weights)
    grads = torch.autograd.grad(-(c * flow.log_prob(x)).sum(), params)
    (c * flow.relative_gradient_loss(x, reduction="none")).sum().backward()
    for w, g in zip(params, grads):
        np.testing.assert_allclose(w.grad.numpy(), (g @ w.detach().T @ w.detach()).numpy(), rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------------------
# exact likelihood, score, inverse
# ----------------------------------------------------------------------------------------


def test_torch_log_prob_matches_brute_force_jacobian():
    flow = make_torch_flow()
    x = torch.as_tensor(data())
    expected = []
    for xi in x:
        jac = torch.autograd.functional.jacobian(lambda v: flow(v[None])[0], xi)
        expected.append(log_normal(flow(xi[None])[0]) + torch.linalg.slogdet(jac)[1])
    np.testing.assert_allclose(flow.log_prob(x).detach().numpy(), torch.stack(expected).detach().numpy(), rtol=1e-12)
    z, log_det = flow.forward_and_log_det(x)
    np.testing.assert_allclose(
        (log_normal(z) + log_det).detach().numpy(), flow.log_prob(x).detach().numpy(), rtol=1e-12
    )


def test_torch_inverse_round_trips_and_is_differentiable():
    flow = make_torch_flow()
    x = torch.as_tensor(data())
    np.testing.assert_allclose(flow.inverse(flow(x)).detach().numpy(), x.numpy(), rtol=1e-10, atol=1e-10)
    z = torch.as_tensor(extreme_latents())
    np.testing.assert_allclose(flow(flow.inverse(z)).detach().numpy(), z.numpy(), rtol=1e-10, atol=1e-9)
    # batch shapes [..., D]
    assert flow.inverse(z.reshape(2, 3, D)).shape == (2, 3, D)
    # d g^{-1}/dz = (dg/dx)^{-1} at x = g^{-1}(z), also in the parameters (one implicit step)
    zs = torch.as_tensor(data(3)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v: flow.inverse(v), (zs,))
    gen = torch.Generator().manual_seed(5)
    c, e = (torch.randn(3, D, generator=gen, dtype=F64), torch.randn(D, D, generator=gen, dtype=F64))
    w = flow.weights[0]
    (flow.inverse(zs.detach()) * c).sum().backward()
    h = 1e-6
    with torch.no_grad():
        w.add_(h * e)
        plus = (flow.inverse(zs) * c).sum()
        w.sub_(2 * h * e)
        minus = (flow.inverse(zs) * c).sum()
        w.add_(h * e)
    np.testing.assert_allclose((w.grad * e).sum().item(), ((plus - minus) / (2 * h)).item(), rtol=1e-6)


def test_sampling_matches_the_density():
    """Samples from g^{-1}(N(0, I)) have E[grad log p] = 0 and E[s s^T + H] = 0 (Stein)."""
    flow = make_torch_flow(dim=2, n_layers=2, alpha=0.3)
    x = flow.sample(20000, generator=torch.Generator().manual_seed(3)).detach().requires_grad_(True)
    (s,) = torch.autograd.grad(flow.log_prob(x).sum(), x)
    se = s.std(0) / math.sqrt(x.shape[0])
    assert (s.mean(0).abs() < 5 * se).all()


def test_torch_flow_trains_by_score_matching():
    """ssm_vr on Gaussian data: the exact esm objective on held-out data and the exact test
    log-likelihood both improve (a 1-layer flow is a Gaussian: SM and MLE share the optimum)."""
    train, test = gaussian_data(2000, 0), gaussian_data(2000, 1)
    flow = TorchFlow(2, 1, dtype=F64, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.Adam(flow.parameters(), lr=5e-2)
    gen = torch.Generator().manual_seed(2)

    def held_out():
        return torch_sm_loss(flow.unnormalized_log_prob, test, "esm").item(), flow.log_prob(test).mean().item()

    esm0, ll0 = held_out()
    for _ in range(100):
        xb = train[torch.randint(0, 2000, (100,), generator=gen)]
        opt.zero_grad()
        torch_sm_loss(flow.unnormalized_log_prob, xb, "ssm_vr", generator=gen).backward()
        opt.step()
    esm1, ll1 = held_out()
    # optimum: esm = -tr(P)/2 = -3.78, log-lik = -(1 + log 2 pi) - log 0.5 = -2.145
    assert esm1 < esm0 - 2.0 and esm1 < -3.2
    assert ll1 > ll0 + 1.0 and ll1 > -2.3
