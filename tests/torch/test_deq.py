"""DEQ layers of ``ppl_score.torch.deq``, in float64 at tiny widths:
- the solvers reach the fixed point (residual below tol, recomputed independently) and the
  scaled weight makes the map a contraction with constant ``gamma``;
- ``implicit`` gives the same score, Hessian-vector product, ``ssm_vr`` value and parameter
  gradients of ``ssm_vr`` (third-order quantities) as autograd through a fully unrolled,
  converged plain iteration;
- the ``phantom`` error decays with the number of steps K (printed as a table);
- non-convergence warns or raises as configured; bad arguments raise clear errors;
- the models work as ``fn`` for every objective, and the default options converge.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from ppl_score.spec import UNCONDITIONAL_METHODS
from tests.helpers.deq import (
    BAD_OPTIONS,
    GAMMA,
    RTOL,
    TIGHT,
    B,
    D,
    H,
    _rel,
    _set_backward,
    _torch_energy,
    _torch_quantities,
)


@pytest.mark.parametrize("solver", ["anderson", "iteration"])
def test_torch_fixed_point_reached(tdeq, data, solver):
    import torch

    model = _torch_energy(tdeq, solver=solver)
    x = torch.tensor(data[0])
    layer = model.deq
    z = layer(x)
    info = layer.last_info
    assert isinstance(info, tdeq.FixedPointInfo)
    assert info.converged and info.residual <= TIGHT["tol"] and 1 <= info.iterations <= TIGHT["max_iter"]
    # recompute the residual independently of the solver
    w_hat = tdeq.lipschitz_scaled(layer.weight, GAMMA)
    fz = torch.nn.functional.softplus(z @ w_hat.T + layer.inject(x))
    assert torch.linalg.norm(fz - z, dim=-1).max() <= 1e-9 * (1 + torch.linalg.norm(fz, dim=-1).max())


def test_torch_solvers_agree_and_anderson_is_faster(tdeq, data):
    import torch

    x = torch.tensor(data[0])
    models = {s: _torch_energy(tdeq, solver=s) for s in ("anderson", "iteration")}
    z = {s: m.deq(x).detach() for s, m in models.items()}
    assert torch.allclose(z["anderson"], z["iteration"], rtol=0, atol=1e-9)
    assert models["anderson"].last_info.iterations < models["iteration"].last_info.iterations


@pytest.mark.parametrize("norm", ["spectral", "frobenius"])
def test_torch_map_is_contraction(tdeq, norm):
    import torch

    torch.manual_seed(1)
    w = 3.0 * torch.randn(H, H, dtype=torch.float64)
    w_hat = tdeq.lipschitz_scaled(w, GAMMA, norm)
    assert torch.linalg.matrix_norm(w_hat, ord=2) <= GAMMA * (1 + 1e-12)
    small = 1e-3 * w  # already inside the ball: left unchanged
    assert torch.equal(tdeq.lipschitz_scaled(small, GAMMA, norm), small)
    z1, z2, u = torch.randn(3, 64, H, dtype=torch.float64)
    f = lambda z: torch.nn.functional.softplus(z @ w_hat.T + u)  # noqa: E731
    ratio = torch.linalg.norm(f(z1) - f(z2), dim=-1) / torch.linalg.norm(z1 - z2, dim=-1)
    assert ratio.max() <= GAMMA


@pytest.mark.parametrize("solver", ["anderson", "iteration"])
def test_torch_implicit_matches_unrolled(tdeq, data, solver):
    x, v = data
    model = _torch_energy(tdeq, solver=solver)
    ref = _torch_quantities(tdeq, model, x, v[:1], "unrolled")
    imp = _torch_quantities(tdeq, model, x, v[:1], "implicit")
    for name, a, b in zip(["log p", "score", "Hv", "ssm_vr", "grad ssm_vr"], imp, ref):
        assert _rel(a, b) < RTOL, name


def test_torch_score_model_implicit_matches_unrolled(tdeq, data):
    import torch

    from ppl_score.torch import score_matching_loss

    x, v = data
    torch.manual_seed(2)
    model = tdeq.DEQScore(D, H, **TIGHT).double()
    out = {}
    for backward in ("unrolled", "implicit"):
        model.deq.config = model.deq.config._replace(backward=backward)
        model.zero_grad()
        loss = score_matching_loss(model, torch.tensor(x), "ssm_vr", kind="score", projections=torch.tensor(v))
        loss.backward()
        out[backward] = torch.cat([p.grad.flatten() for p in model.parameters()]).numpy()
    assert _rel(out["implicit"], out["unrolled"]) < RTOL


def test_torch_phantom_error_decreases_with_k(tdeq, data, record_property):
    x, v = data
    model = _torch_energy(tdeq)
    exact = _torch_quantities(tdeq, model, x, v[:1], "implicit")
    ks = (1, 2, 4, 8, 16)
    errors = []
    for k in ks:
        approx = _torch_quantities(tdeq, model, x, v[:1], "phantom", phantom_steps=k)
        errors.append([_rel(a, b) for a, b in zip(approx[1:], exact[1:])])  # score, Hv, loss, grad
    errors = np.array(errors)
    print("\nphantom relative error vs implicit (torch): K | score | Hv | ssm_vr | grad ssm_vr")
    for k, row in zip(ks, errors):
        print(f"  {k:2d} | " + " | ".join(f"{e:.2e}" for e in row))
    record_property("phantom_errors_torch", {k: row.tolist() for k, row in zip(ks, errors)})
    assert np.all(np.diff(errors, axis=0) < 0), errors
    assert errors[0].max() > 1e-3 and errors[-1].max() < 1e-5  # biased at K=1, ~gamma^K after


@pytest.mark.parametrize("method", list(UNCONDITIONAL_METHODS))
def test_torch_every_objective(tdeq, data, method):
    import torch

    from ppl_score.torch import score_matching_loss

    x = torch.tensor(data[0])
    x_before = x.clone()
    energy = _torch_energy(tdeq, tol=1e-8)
    torch.manual_seed(3)
    score = tdeq.DEQScore(D, H, **{**TIGHT, "tol": 1e-8}).double()
    for kind, model in (("log_prob", energy), ("score", score)):
        model.zero_grad()
        loss = score_matching_loss(model, x, method, kind=kind, generator=torch.Generator().manual_seed(0))
        loss.backward()
        assert torch.isfinite(loss)
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        assert model.deq.weight.grad is not None and model.deq.weight.grad.abs().sum() > 0
    assert torch.equal(x, x_before)


def test_torch_esm_implicit_matches_unrolled(tdeq, data):
    """``esm`` takes the Hessian trace by a vmapped backward (``is_grads_batched``), where the
    adjoint solve runs as max_iter differentiable iterations; it must still be exact."""
    import torch

    from ppl_score.torch import score_matching_loss

    x = torch.tensor(data[0])
    model = _torch_energy(tdeq)
    out = {}
    for backward in ("unrolled", "implicit"):
        _set_backward(model, backward)
        model.zero_grad()
        loss = score_matching_loss(model, x, "esm")
        loss.backward()
        out[backward] = np.concatenate([[loss.item()], model.deq.weight.grad.flatten().numpy()])
    assert _rel(out["implicit"], out["unrolled"]) < RTOL


def test_torch_nonconvergence(tdeq, data):
    import torch

    x = torch.tensor(data[0])
    model = _torch_energy(tdeq, tol=1e-14, max_iter=3)
    with pytest.warns(tdeq.FixedPointWarning, match="did not converge.*after 3 iterations"):
        model(x)
    assert not model.last_info.converged and model.last_info.iterations == 3
    model.deq.config = model.deq.config._replace(solver=model.deq.config.solver._replace(on_nonconvergence="raise"))
    with pytest.raises(tdeq.FixedPointError, match="did not converge"):
        model(x)
    model.deq.config = model.deq.config._replace(solver=model.deq.config.solver._replace(on_nonconvergence="ignore"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(x)
    # the adjoint solve reports too
    model = _torch_energy(tdeq, max_iter=3, tol=1e-14, on_nonconvergence="ignore")
    model.deq.config = model.deq.config._replace(solver=model.deq.config.solver._replace(on_nonconvergence="warn"))
    xg = x.clone().requires_grad_(True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(xg).sum().backward()
    messages = [str(w.message) for w in caught if issubclass(w.category, tdeq.FixedPointWarning)]
    assert any("DEQ adjoint" in m for m in messages) and any("DEQ forward" in m for m in messages)


@pytest.mark.parametrize("options, error, name", BAD_OPTIONS, ids=[n for _, _, n in BAD_OPTIONS])
def test_torch_bad_arguments(tdeq, options, error, name):
    with pytest.raises(error, match=name):
        tdeq.DEQEnergy(D, H, **options)


def test_torch_bad_inputs(tdeq):
    import torch

    with pytest.raises(ValueError, match="width"):
        tdeq.DEQEnergy(D, 0)
    with pytest.raises(ValueError, match="quadratic"):
        tdeq.DEQEnergy(D, H, quadratic=-1.0)
    model = _torch_energy(tdeq)
    with pytest.raises(ValueError, match="'x'"):
        model(torch.zeros(B, D + 1, dtype=torch.float64))
    with pytest.raises(TypeError, match="'x'"):
        model(np.zeros((B, D)))
    with pytest.raises(ValueError, match="z0"):
        tdeq.fixed_point(lambda z: z, torch.tensor(1.0))
    with pytest.raises(TypeError, match="module"):
        tdeq.deq_params(torch.nn.Linear(2, 2))


def test_torch_generic_fixed_point(tdeq):
    """``fixed_point`` on a user map: z = 0.5 cos(z) + a, derivative (1 + 0.5 sin z)^{-1}."""
    import torch

    a = torch.linspace(-1, 1, 5, dtype=torch.float64).reshape(5, 1).requires_grad_(True)
    z, info = tdeq.fixed_point(
        lambda z, a: 0.5 * torch.cos(z) + a, torch.zeros(5, 1, dtype=torch.float64), (a,), tol=1e-12
    )
    assert info.converged
    assert torch.allclose(z, 0.5 * torch.cos(z) + a, atol=1e-11)
    (dz,) = torch.autograd.grad(z.sum(), a, create_graph=True)
    assert torch.allclose(dz, 1 / (1 + 0.5 * torch.sin(z)), atol=1e-10)
    # second derivative: d/da (1 + 0.5 sin z)^{-1} = -0.5 cos z dz / (1 + 0.5 sin z)^2
    (d2,) = torch.autograd.grad(dz.sum(), a)
    expected = -0.5 * torch.cos(z) * dz / (1 + 0.5 * torch.sin(z)) ** 2
    assert torch.allclose(d2, expected.detach(), atol=1e-10)


def test_torch_generic_map_output_never_reused_in_place(tdeq):
    """The solver reuses its iterates in place only for maps known to return new tensors: a
    user map that returns its parameter itself leaves it (and ``z0``) untouched."""
    import torch

    c = torch.linspace(-1, 1, 6, dtype=torch.float64).reshape(3, 2)
    c_copy, z0 = c.clone(), torch.ones(3, 2, dtype=torch.float64)
    z, info = tdeq.fixed_point(lambda z, c: c, z0, (c,), solver="iteration", tol=1e-12)
    assert info.converged and torch.equal(z, c_copy)
    assert torch.equal(c, c_copy) and torch.equal(z0, torch.ones(3, 2, dtype=torch.float64))


@pytest.mark.parametrize("activation", ["softplus", "tanh"])
def test_torch_layer_map_products_match_autograd(tdeq, activation):
    """The closed-form Jacobian products the adjoint solves use (``act'(pre)`` only, no graph)
    equal autograd's vector-Jacobian and Jacobian-vector products of the layer map."""
    import torch
    from torch.func import jvp, vjp

    gen = torch.Generator().manual_seed(3)
    z, u, g = (torch.randn(B, H, dtype=torch.float64, generator=gen) for _ in range(3))
    w_hat = 0.3 * torch.randn(H, H, dtype=torch.float64, generator=gen)
    fmap = tdeq._LayerMap(activation)
    _, pullback = vjp(lambda zz: fmap(zz, w_hat, u), z)
    assert _rel(fmap.vjp_stepper(z, w_hat, u)(g), pullback(g)[0]) < 1e-14
    _, tangent = jvp(lambda zz: fmap(zz, w_hat, u), (z,), (g,))
    assert _rel(fmap.jvp_stepper(z, w_hat, u)(g), tangent) < 1e-14


def test_torch_defaults_converge(tdeq):
    """A float32 DEQ with the default options reaches ``tol`` in the forward solve (residual
    recomputed here) and in the adjoint solves of an ``ssm_vr`` step (no warning)."""
    import torch

    from ppl_score.torch import score_matching_loss

    torch.manual_seed(0)
    model = tdeq.DEQEnergy(4, 32, quadratic=0.5)
    x = torch.randn(16, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", tdeq.FixedPointWarning)
        flat_z = model.deq(x)
        info = model.last_info
        loss = score_matching_loss(model, x, "ssm_vr", generator=torch.Generator().manual_seed(0))
        loss.backward()
    tol = tdeq.DEFAULT_TOL
    assert info.converged and info.residual <= tol and 1 <= info.iterations <= tdeq.DEFAULT_MAX_ITER
    layer = model.deq
    with torch.no_grad():
        w_hat = tdeq.lipschitz_scaled(layer.weight, layer.config.gamma)
        fz = torch.nn.functional.softplus(flat_z @ w_hat.T + layer.inject(x))
        res = ((fz - flat_z).norm(dim=-1) / (1 + fz.norm(dim=-1))).max().item()
    assert res <= tol
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
