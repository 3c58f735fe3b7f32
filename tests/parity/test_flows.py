"""Full-Jacobian flows across backends (issue 6), float64: with the same weights torch and JAX
agree on ``log_prob``, forward, inverse and relative gradients; the training step runs no
cubic op in either; scores, Newton non-convergence and bad arguments alike."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

from ppl_score.jax.flows import InvertibleMLP as JaxFlow  # noqa: E402
from ppl_score.torch.flows import InvertibleMLP as TorchFlow  # noqa: E402
from tests.helpers.flows import ALPHA, F64, D, L, data, extreme_latents, flow_params_of, jax_twin, make_torch_flow

pytestmark = pytest.mark.usefixtures("one_torch_thread")


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
