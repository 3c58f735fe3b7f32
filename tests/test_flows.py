"""Full-Jacobian flows and relative-gradient MLE (issue 6): torch, JAX, Pyro, NumPyro.

Float64 throughout, small D. The relative gradient is checked against autograd of the exact
NLL times ``W^T W``; ``log_prob`` against a brute-force Jacobian determinant; the two
backends against each other with the same weights.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

from ppl_score.jax import score_matching_loss as jax_sm_loss  # noqa: E402
from ppl_score.jax.flows import InvertibleMLP as JaxFlow  # noqa: E402
from ppl_score.torch import score_matching_loss as torch_sm_loss  # noqa: E402
from ppl_score.torch.flows import InvertibleMLP as TorchFlow  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
D, L, ALPHA = 4, 3, 0.2
F64 = torch.float64


def make_torch_flow(dim=D, n_layers=L, alpha=ALPHA, bias=True, seed=0):
    """A flow with orthogonal-times-random-scale weights and random biases (not the identity-
    like init, so every term of the gradient is exercised)."""
    gen = torch.Generator().manual_seed(seed)
    flow = TorchFlow(dim, n_layers, alpha, bias, dtype=F64, generator=gen)
    with torch.no_grad():
        for w in flow.weights:
            w.mul_(1.0 + 0.3 * torch.rand(dim, 1, generator=gen, dtype=F64))
        if bias:
            for b in flow.biases:
                b.copy_(0.5 * torch.randn(dim, generator=gen, dtype=F64))
    return flow


def jax_twin(tflow):
    flow = JaxFlow(tflow.dim, tflow.n_layers, tflow.alpha, tflow.biases is not None)
    return flow, flow.params_from(tflow.flow_params())


def flow_params_of(params):
    return [(np.asarray(w), None if b is None else np.asarray(b)) for w, b in params]


def data(n=7, dim=D, seed=1):
    return np.random.default_rng(seed).normal(size=(n, dim)) * 1.5


def log_normal(z):
    return -0.5 * (z * z).sum(-1) - 0.5 * z.shape[-1] * math.log(2 * math.pi)


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


@pytest.mark.parametrize("bias", [True, False])
def test_jax_relative_gradient_is_autograd_times_wtw(bias):
    flow, params = jax_twin(make_torch_flow(bias=bias))
    x = jnp.asarray(data())
    grads = jax.grad(lambda p: -flow.log_prob(p, x).mean())(params)
    rel = jax.jit(jax.grad(flow.relative_gradient_loss))(params, x)
    for layer, g, r in zip(params, grads, rel):
        w = layer.weight
        np.testing.assert_allclose(r.weight, g.weight @ w.T @ w, rtol=1e-10, atol=1e-12)
        if bias:
            np.testing.assert_allclose(r.bias, g.bias, rtol=1e-10, atol=1e-12)


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


_TORCH_CUBIC = {
    "slogdet",
    "logdet",
    "det",
    "inverse",
    "triangular_solve",
    "cholesky",
    "lu",
    "_lu_with_info",
    "svd",
    "qr",
}


def _cubic_torch_ops(loss_fn, dim):
    """Names of linear-algebra ops, and matmuls of two [D, D] operands (O(D^3)), run by
    ``loss_fn().backward()``."""
    with torch.profiler.profile(record_shapes=True) as prof:
        loss_fn().backward()
    bad = []
    for e in prof.events():
        if "linalg" in e.name or e.name.split("::")[-1] in _TORCH_CUBIC:
            bad.append(e.name)
        elif e.name in ("aten::mm", "aten::matmul", "aten::bmm", "aten::addmm"):
            if sum(list(s) == [dim, dim] for s in e.input_shapes) >= 2:
                bad.append(f"{e.name}{e.input_shapes}")
    return bad


def _cubic_jax_ops(jaxpr, dim, out=None):
    out = [] if out is None else out
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name in ("lu", "triangular_solve", "cholesky", "eigh", "eig", "svd", "qr", "lu_pivots_to_permutation"):
            out.append(name)
        elif name == "dot_general" and all(tuple(v.aval.shape) == (dim, dim) for v in eqn.invars):
            out.append(f"dot_general{[tuple(v.aval.shape) for v in eqn.invars]}")
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else [param]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    _cubic_jax_ops(inner, dim, out)
    return out


def test_training_step_has_no_cubic_op():
    """The relative-gradient step runs no determinant, solve or inverse, and every matmul
    involves the batch (B != D), so it is O(B D^2); the autograd step is caught by the same check."""
    b, dim = 5, 6
    tflow = make_torch_flow(dim=dim)
    x = torch.as_tensor(data(b, dim))
    assert _cubic_torch_ops(lambda: tflow.relative_gradient_loss(x), dim) == []
    assert _cubic_torch_ops(lambda: -tflow.log_prob(x).mean(), dim) != []
    flow, params = jax_twin(tflow)
    xj = jnp.asarray(data(b, dim))
    assert _cubic_jax_ops(jax.make_jaxpr(jax.grad(flow.relative_gradient_loss))(params, xj).jaxpr, dim) == []
    exact = jax.make_jaxpr(jax.grad(lambda p, v: -flow.log_prob(p, v).mean()))(params, xj)
    assert _cubic_jax_ops(exact.jaxpr, dim) != []


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


def test_jax_log_prob_matches_brute_force_jacobian():
    flow, params = jax_twin(make_torch_flow())
    x = jnp.asarray(data())

    def brute(xi):
        jac = jax.jacfwd(lambda v: flow.forward(params, v))(xi)
        return log_normal(flow.forward(params, xi)) + jnp.linalg.slogdet(jac)[1]

    np.testing.assert_allclose(flow.log_prob(params, x), jax.jit(jax.vmap(brute))(x), rtol=1e-12)


def test_score_is_gradient_of_exact_log_prob_both_backends():
    tflow = make_torch_flow()
    x = torch.as_tensor(data()).requires_grad_(True)
    (s_unnorm,) = torch.autograd.grad(tflow.unnormalized_log_prob(x).sum(), x)
    (s_exact,) = torch.autograd.grad(tflow.log_prob(x).sum(), x)
    np.testing.assert_allclose(s_unnorm.numpy(), s_exact.numpy(), rtol=1e-12, atol=1e-13)
    # the two differ by the constant sum_k log|det W_k|
    diff = (tflow.log_prob(x) - tflow.unnormalized_log_prob(x)).detach().numpy()
    np.testing.assert_allclose(diff, tflow.log_abs_det_weights().item(), rtol=1e-12)

    flow, params = jax_twin(tflow)
    xj = jnp.asarray(data())
    sj = jax.grad(lambda v: flow.unnormalized_log_prob(params, v).sum())(xj)
    np.testing.assert_allclose(sj, jax.grad(lambda v: flow.log_prob(params, v).sum())(xj), rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(sj, s_exact.numpy(), rtol=1e-10, atol=1e-12)


def extreme_latents():
    z = data(6)
    z[0] = [-40.0, -1e3, 0.0, 1e3]  # deep in both linear regimes of the activation
    z[1] = 0.0
    return z


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


def test_jax_inverse_round_trips_and_is_differentiable():
    flow, params = jax_twin(make_torch_flow())
    x = jnp.asarray(data())
    np.testing.assert_allclose(flow.inverse(params, flow.forward(params, x)), x, rtol=1e-10, atol=1e-10)
    z = jnp.asarray(extreme_latents())
    np.testing.assert_allclose(flow.forward(params, jax.jit(flow.inverse)(params, z)), z, rtol=1e-10, atol=1e-9)

    @jax.jit
    def product(zi):
        jac_inv = jax.jacrev(lambda v: flow.inverse(params, v))(zi)
        return jac_inv @ jax.jacfwd(lambda v: flow.forward(params, v))(flow.inverse(params, zi))

    np.testing.assert_allclose(product(jnp.asarray(data(1)[0])), np.eye(D), atol=1e-10)


def test_newton_non_convergence_is_an_error():
    tflow = make_torch_flow()
    z = torch.full((2, D), 5.0, dtype=F64)
    with pytest.raises(ValueError, match="did not converge.*max_iter=1"):
        tflow.inverse(z, max_iter=1)
    flow, params = jax_twin(tflow)
    with pytest.raises(ValueError, match="did not converge.*max_iter=1"):
        flow.inverse(params, jnp.asarray(z.numpy()), max_iter=1)
    # under jit nothing can be raised: the unconverged rows are NaN, never silent garbage
    out = jax.jit(lambda p, v: flow.inverse(p, v, max_iter=1))(params, jnp.asarray(z.numpy()))
    assert np.isnan(np.asarray(out)).all()


def test_sampling_matches_the_density():
    """Samples from g^{-1}(N(0, I)) have E[grad log p] = 0 and E[s s^T + H] = 0 (Stein)."""
    flow = make_torch_flow(dim=2, n_layers=2, alpha=0.3)
    x = flow.sample(20000, generator=torch.Generator().manual_seed(3)).detach().requires_grad_(True)
    (s,) = torch.autograd.grad(flow.log_prob(x).sum(), x)
    se = s.std(0) / math.sqrt(x.shape[0])
    assert (s.mean(0).abs() < 5 * se).all()


# ----------------------------------------------------------------------------------------
# backend parity
# ----------------------------------------------------------------------------------------


def test_backend_parity():
    tflow = make_torch_flow()
    flow, params = jax_twin(tflow)
    x = data()
    xt = torch.as_tensor(x)
    np.testing.assert_allclose(flow.log_prob(params, x), tflow.log_prob(xt).detach().numpy(), rtol=1e-12)
    np.testing.assert_allclose(
        flow.unnormalized_log_prob(params, x), tflow.unnormalized_log_prob(xt).detach().numpy(), rtol=1e-12
    )
    np.testing.assert_allclose(flow.forward(params, x), tflow(xt).detach().numpy(), rtol=1e-12, atol=1e-13)
    z = extreme_latents()
    np.testing.assert_allclose(
        flow.inverse(params, z), tflow.inverse(torch.as_tensor(z)).detach().numpy(), rtol=1e-9, atol=1e-9
    )
    copy = TorchFlow(D, L, ALPHA, dtype=F64).load_flow_params(flow_params_of(params))
    np.testing.assert_array_equal(copy.log_prob(xt).detach().numpy(), tflow.log_prob(xt).detach().numpy())
    tflow.relative_gradient_loss(xt).backward()
    rel = jax.grad(flow.relative_gradient_loss)(params, jnp.asarray(x))
    for w, b, r in zip(tflow.weights, tflow.biases, rel):
        np.testing.assert_allclose(r.weight, w.grad.numpy(), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(r.bias, b.grad.numpy(), rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------------------
# score matching trains the flow; exact likelihood judges it
# ----------------------------------------------------------------------------------------


def gaussian_data(n, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.tensor([[1.0, 0.0], [0.8, 0.5]], dtype=F64)
    return torch.randn(n, 2, generator=g, dtype=F64) @ a.T + torch.tensor([1.0, -2.0], dtype=F64)


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


def test_jax_flow_trains_by_score_matching_under_jit():
    import optax

    flow = JaxFlow(2, 2, alpha=0.3)
    params = flow.init(jax.random.PRNGKey(0), jnp.float64)
    train, test = jnp.asarray(gaussian_data(2000, 0).numpy()), jnp.asarray(gaussian_data(2000, 1).numpy())
    opt = optax.adam(2e-2)

    def loss(p, xb, key):
        return jax_sm_loss(lambda v: flow.unnormalized_log_prob(p, v), xb, "ssm_vr", key=key)

    @jax.jit
    def update(p, state, key):
        k1, k2 = jax.random.split(key)
        xb = train[jax.random.randint(k1, (100,), 0, train.shape[0])]
        value, grads = jax.value_and_grad(loss)(p, xb, k2)
        updates, state = opt.update(grads, state, p)
        return optax.apply_updates(p, updates), state, value

    def body(carry, key):
        p, s = carry
        p, s, value = update(p, s, key)
        return (p, s), value

    ll0 = flow.log_prob(params, test).mean()
    (params, _), values = jax.lax.scan(body, (params, opt.init(params)), jax.random.split(jax.random.PRNGKey(1), 300))
    assert values[-50:].mean() < values[:50].mean() - 1.0
    assert flow.log_prob(params, test).mean() > ll0 + 1.0


# ----------------------------------------------------------------------------------------
# Pyro
# ----------------------------------------------------------------------------------------


def pyro_model_and_flow(seed=0, n_layers=2):
    import pyro
    import pyro.distributions as dist

    from ppl_score.pyro.flows import InvertibleMLPTransform

    transform = InvertibleMLPTransform(flow=make_torch_flow(dim=2, n_layers=n_layers, seed=seed))

    def model(x, subsample=None):
        pyro.module("flow", transform)
        base = dist.Normal(torch.zeros(2, dtype=F64), 1.0).to_event(1)
        with pyro.plate("data", x.shape[0] if subsample is None else 2000, subsample=subsample):
            pyro.sample("x", dist.TransformedDistribution(base, [transform]), obs=x)

    return model, (lambda x, subsample=None: None), transform


def test_pyro_transform_in_transformed_distribution():
    import pyro.distributions as dist

    from ppl_score.pyro.flows import InvertibleMLPTransform

    tflow = make_torch_flow()
    transform = InvertibleMLPTransform(flow=tflow)
    base = dist.Normal(torch.zeros(D, dtype=F64), 1.0).to_event(1)
    d = dist.TransformedDistribution(base, [transform])
    x = torch.as_tensor(data())
    np.testing.assert_allclose(d.log_prob(x).detach().numpy(), tflow.log_prob(x).detach().numpy(), rtol=1e-12)
    s = d.rsample((5,))
    assert s.shape == (5, D)
    np.testing.assert_allclose(transform.inv(s).detach().numpy(), tflow(s).detach().numpy())
    s.sum().backward()  # sampling is reparameterized in the flow's parameters
    assert all(torch.isfinite(w.grad).all() for w in tflow.weights)
    with pytest.raises(ValueError, match="'dim'"):
        InvertibleMLPTransform()
    with pytest.raises(TypeError, match="'flow'"):
        InvertibleMLPTransform(flow=torch.nn.Linear(2, 2))


def test_pyro_relative_gradient_mle_grads_and_loss_value():
    import pyro
    from pyro.infer import Trace_ELBO

    from ppl_score.pyro.flows import RelativeGradientMLE

    pyro.clear_param_store()
    model, guide, transform = pyro_model_and_flow(n_layers=3)
    x = gaussian_data(50, 0)
    idx = torch.arange(50)
    elbo = RelativeGradientMLE()
    # subsampled plate: scale N/B = 40 on every term, the placeholder's too
    exact = Trace_ELBO().differentiable_loss(model, guide, x, idx)
    weights = list(transform.flow.weights)
    grads = torch.autograd.grad(exact, weights)
    value = elbo.loss_and_grads(model, guide, x, idx)
    for w, g in zip(weights, grads):
        np.testing.assert_allclose(w.grad.numpy(), (g @ w.detach().T @ w.detach()).numpy(), rtol=1e-10, atol=1e-9)
    np.testing.assert_allclose(elbo.exact_nll(model, guide, x, idx), exact.item(), rtol=1e-12)
    logdet = transform.flow.log_abs_det_weights().item()
    np.testing.assert_allclose(value, exact.item() + 2000 * logdet, rtol=1e-12)
    np.testing.assert_allclose(elbo.loss(model, guide, x, idx), value, rtol=1e-12)
    # the ELBOModule route
    np.testing.assert_allclose(elbo(model, guide)(x, idx).item(), value, rtol=1e-12)


def test_pyro_svi_with_relative_gradient_mle_reduces_nll():
    import pyro
    from pyro.infer import SVI

    from ppl_score.pyro.flows import RelativeGradientMLE

    pyro.clear_param_store()
    model, guide, _ = pyro_model_and_flow()
    x = gaussian_data(300, 0)
    elbo = RelativeGradientMLE()
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 5e-2}), elbo)
    nll0 = elbo.exact_nll(model, guide, x) / 300
    for _ in range(60):
        svi.step(x)
    nll1 = elbo.exact_nll(model, guide, x) / 300
    # optimum per point: 2.145, the entropy of the data's Gaussian
    assert nll1 < nll0 - 1.0 and nll1 < 2.35
    assert isinstance(svi.evaluate_loss(x), float)


def test_pyro_relative_gradient_mle_errors():
    import pyro
    import pyro.distributions as dist

    from ppl_score.pyro.flows import RelativeGradientMLE

    x = gaussian_data(10, 0)

    def no_flow(x):
        with pyro.plate("data", 10):
            pyro.sample("x", dist.Normal(torch.zeros(2, dtype=F64), 1.0).to_event(1), obs=x)

    with pytest.raises(ValueError, match="no observed site"):
        RelativeGradientMLE().loss(no_flow, lambda x: None, x)
    model, guide, _ = pyro_model_and_flow()

    def latent(x):
        pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=F64), 1.0))
        model(x)

    with pytest.raises(ValueError, match="'mu' is latent"):
        RelativeGradientMLE().loss(latent, guide, x)


# ----------------------------------------------------------------------------------------
# NumPyro and optax
# ----------------------------------------------------------------------------------------


def numpyro_model(init=None, n_layers=2):
    import numpyro
    import numpyro.distributions as ndist

    from ppl_score.numpyro.flows import invertible_mlp

    def model(x, scale=1.0):
        flow = invertible_mlp("flow", 2, n_layers, ALPHA, init=init)
        base = ndist.Normal(jnp.zeros(2), 1.0).to_event(1)
        with numpyro.plate("data", x.shape[0]), numpyro.handlers.scale(scale=scale):
            numpyro.sample("x", ndist.TransformedDistribution(base, flow), obs=x)

    return model


def test_numpyro_transform_log_prob_matches():
    import numpyro.distributions as ndist

    from ppl_score.numpyro.flows import InvertibleMLPTransform

    tflow = make_torch_flow()
    flow, params = jax_twin(tflow)
    t = InvertibleMLPTransform(flow, params)
    d = ndist.TransformedDistribution(ndist.Normal(jnp.zeros(D), 1.0).to_event(1), t)
    x = jnp.asarray(data())
    np.testing.assert_allclose(
        jax.jit(d.log_prob)(x), tflow.log_prob(torch.as_tensor(data())).detach().numpy(), rtol=1e-12
    )
    s = jax.jit(lambda key: d.sample(key, (5,)))(jax.random.PRNGKey(0))
    assert s.shape == (5, D)
    np.testing.assert_allclose(t.inv(s), flow.forward(params, s), rtol=1e-12)


def test_numpyro_relative_gradient_mle_grads_under_jit():
    from numpyro.infer import Trace_ELBO

    from ppl_score.numpyro.flows import RelativeGradientMLE

    tflow = make_torch_flow(dim=2, n_layers=3)
    flow, init = jax_twin(tflow)
    model, guide = numpyro_model(init, n_layers=3), (lambda x, scale=1.0: None)
    x = jnp.asarray(gaussian_data(40, 0).numpy())
    param_map = {f"flow.{n}{k}": getattr(layer, n) for k, layer in enumerate(init) for n in ("weight", "bias")}
    key = jax.random.PRNGKey(0)
    elbo = RelativeGradientMLE()
    # a site scale (as a subsampled plate's N/B) weights the log-det term too
    rel = jax.jit(jax.grad(lambda p: elbo.loss(key, p, model, guide, x, 2.5)))(param_map)
    exact = jax.jit(jax.grad(lambda p: Trace_ELBO().loss(key, p, model, guide, x, 2.5)))(param_map)
    for k in range(3):
        w = param_map[f"flow.weight{k}"]
        np.testing.assert_allclose(rel[f"flow.weight{k}"], exact[f"flow.weight{k}"] @ w.T @ w, rtol=1e-10, atol=1e-9)
        np.testing.assert_allclose(rel[f"flow.bias{k}"], exact[f"flow.bias{k}"], rtol=1e-10, atol=1e-9)
    value = elbo.loss(key, param_map, model, guide, x)
    exact_nll = elbo.exact_nll(key, param_map, model, guide, x)
    np.testing.assert_allclose(value, exact_nll + 40 * flow.log_abs_det_weights(init), rtol=1e-12)
    np.testing.assert_allclose(exact_nll, -tflow.log_prob(torch.as_tensor(np.array(x))).sum().item(), rtol=1e-12)


def test_numpyro_svi_and_optax_routes_reduce_nll():
    import optax
    from numpyro.infer import SVI

    from ppl_score.numpyro.flows import RelativeGradientMLE

    x = jnp.asarray(gaussian_data(300, 0).numpy())
    model, guide = numpyro_model(), (lambda x, scale=1.0: None)
    elbo = RelativeGradientMLE()
    svi = SVI(model, guide, optax.adam(5e-2), elbo)
    result = svi.run(jax.random.PRNGKey(0), 60, x, progress_bar=False)  # jitted updates
    key = jax.random.PRNGKey(1)
    exact_nll = jax.jit(lambda p: elbo.exact_nll(key, p, model, guide, x) / 300)
    nll0, nll1 = exact_nll(svi.get_params(svi.init(key, x))), exact_nll(result.params)
    # optimum per point: 2.145
    assert nll1 < nll0 - 1.0 and nll1 < 2.35

    # plain optax: jax.grad of relative_gradient_loss inside a jitted update
    flow = JaxFlow(2, 2, ALPHA)
    params = flow.init(jax.random.PRNGKey(0), jnp.float64)
    opt = optax.adam(5e-2)

    @jax.jit
    def update(p, s):
        grads = jax.grad(flow.relative_gradient_loss)(p, x)
        updates, s = opt.update(grads, s, p)
        return optax.apply_updates(p, updates), s

    nll0 = -flow.log_prob(params, x).mean()
    state = opt.init(params)
    for _ in range(60):
        params, state = update(params, state)
    assert -flow.log_prob(params, x).mean() < min(nll0 - 1.0, 2.35)


# ----------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------


def test_bad_arguments():
    with pytest.raises(ValueError, match="'alpha'"):
        TorchFlow(3, alpha=0.0)
    with pytest.raises(ValueError, match="'n_layers'"):
        JaxFlow(3, n_layers=0)
    with pytest.raises(TypeError, match="'dim'"):
        TorchFlow(3.0)
    tflow = make_torch_flow()
    with pytest.raises(ValueError, match=r"'x' must have shape \[\.\.\., 4\]"):
        tflow.log_prob(torch.zeros(3, 5, dtype=F64))
    with pytest.raises(ValueError, match="'x' contains non-finite"):
        tflow.relative_gradient_loss(torch.full((2, D), float("nan"), dtype=F64))
    with pytest.raises(ValueError, match="'reduction'"):
        tflow.relative_gradient_loss(torch.zeros(2, D, dtype=F64), reduction="max")
    with pytest.raises(ValueError, match="'tol'"):
        tflow.inverse(torch.zeros(2, D, dtype=F64), tol=-1.0)
    flow, params = jax_twin(tflow)
    with pytest.raises(ValueError, match="'z' contains non-finite"):
        flow.inverse(params, jnp.full((2, D), jnp.inf))
    with pytest.raises(ValueError, match="layer 0 weight"):
        flow.log_prob(params[:0] + (params[0]._replace(weight=jnp.eye(3)),) + params[1:], jnp.zeros((2, D)))
    with pytest.raises(TypeError, match="'x' must be a torch.Tensor"):
        tflow(np.zeros((2, D)))


# ----------------------------------------------------------------------------------------
# the tutorial, as CI runs it
# ----------------------------------------------------------------------------------------


def test_tutorial_smoke(tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "MPLBACKEND": "Agg"}
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tutorials", "relative_gradient.py"), "--smoke", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "relgrad_scaling.png").stat().st_size > 0
    table = (tmp_path / "relgrad_density.md").read_text()
    assert "mle_relgrad" in table and "ssm_vr" in table
