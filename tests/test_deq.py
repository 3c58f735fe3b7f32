"""DEQ layers (``ppl_score.torch.deq``, ``ppl_score.jax.deq``) and their front-end wrappers.

What is proven here, in float64 at tiny widths:
- the solvers reach the fixed point (residual below tol, recomputed independently) and the
  scaled weight makes the map a contraction with constant ``gamma``;
- ``implicit`` gives the same score, Hessian-vector product, ``ssm_vr`` value and parameter
  gradients of ``ssm_vr`` (third-order quantities) as autograd through a fully unrolled,
  converged plain iteration, in both backends (and, in JAX, as ``optimistix.fixed_point``
  with ``ImplicitAdjoint``);
- the ``phantom`` error decays with the number of steps K (printed as a table);
- the two backends agree on energy, score, ``ssm_vr`` and its gradients with the same weights;
- non-convergence warns or raises as configured; bad arguments raise clear errors;
- the models work as ``fn`` for every objective and inside Pyro / NumPyro ``SVI``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

from ppl_score.spec import OBJECTIVES

D, H, B = 3, 5, 4  # event size, width, batch
GAMMA = 0.8
TIGHT = dict(gamma=GAMMA, tol=1e-11, max_iter=300)  # converged far below the 1e-4 target
RTOL = 1e-7  # the target is 1e-4; observed agreement is ~1e-12
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rel(a, b) -> float:
    a, b = np.asarray(a, float), np.asarray(b, float)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(5)
    return rng.normal(size=(B, D)), rng.normal(size=(2, B, D))


# ---------------------------------------------------------------------------------------
# torch
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tdeq():
    torch = pytest.importorskip("torch")
    from ppl_score.torch import deq

    # Anderson solves tiny batched linear systems; with 2 OpenMP threads on a loaded CPU
    # each such LAPACK call waits milliseconds for the second thread.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield deq
    torch.set_num_threads(threads)


def _torch_energy(tdeq, seed=0, **options):
    import torch

    torch.manual_seed(seed)
    return tdeq.DEQEnergy(D, H, quadratic=0.5, **{**TIGHT, **options}).double()


def _set_backward(module, backward, **kw):
    module.deq.config = module.deq.config._replace(backward=backward, **kw)


def _torch_quantities(tdeq, model, x, v, backward, **kw):
    """log p, s, H v, ssm_vr and its parameter gradients (as one flat vector)."""
    import torch

    from ppl_score.torch import score_matching_loss

    _set_backward(model, backward, **kw)
    xg = torch.tensor(x, requires_grad=True)
    lp = model(xg)
    (s,) = torch.autograd.grad(lp.sum(), xg, create_graph=True)
    (hv,) = torch.autograd.grad((s * torch.tensor(v[0])).sum(), xg)
    model.zero_grad()
    loss = score_matching_loss(model, torch.tensor(x), "ssm_vr", projections=torch.tensor(v))
    loss.backward()
    grads = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in model.parameters()])
    return [t.detach().numpy() for t in (lp, s, hv, loss, grads)]


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


@pytest.mark.parametrize("method", list(OBJECTIVES))
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


BAD_OPTIONS = [
    (dict(gamma=1.0), ValueError, "gamma"),
    (dict(gamma=0.0), ValueError, "gamma"),
    (dict(gamma="a"), TypeError, "gamma"),
    (dict(solver="broyden"), ValueError, "solver"),
    (dict(backward="neumann"), ValueError, "backward"),
    (dict(norm="nuclear"), ValueError, "norm"),
    (dict(activation="relu"), ValueError, "activation"),
    (dict(tol=0.0), ValueError, "tol"),
    (dict(tol=float("nan")), ValueError, "tol"),
    (dict(max_iter=0), ValueError, "max_iter"),
    (dict(max_iter=2.5), TypeError, "max_iter"),
    (dict(memory=0), ValueError, "memory"),
    (dict(phantom_steps=0), ValueError, "phantom_steps"),
    (dict(on_nonconvergence="panic"), ValueError, "on_nonconvergence"),
]


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


def test_spectral_norm_value_and_gradient(tdeq):
    """``||W||_2`` as ``u1^T W v1`` with the singular pair held constant: the value and the
    gradient ``u1 v1^T`` of the exact (SVD) spectral norm, in both backends."""
    import torch

    w = torch.randn(H, H, dtype=torch.float64, generator=torch.Generator().manual_seed(4)).requires_grad_(True)
    (g_ref,) = torch.autograd.grad(torch.linalg.matrix_norm(w, ord=2), w)
    n = tdeq._spectral_norm(w)
    (g,) = torch.autograd.grad(n, w)
    assert abs(n.item() - torch.linalg.matrix_norm(w, ord=2).item()) < 1e-12
    assert _rel(g, g_ref) < 1e-10
    jax = pytest.importorskip("jax")
    from ppl_score.jax import deq as jdeq

    wj = jax.numpy.asarray(w.detach().numpy())
    n_j, g_j = jax.value_and_grad(jdeq._spectral_norm)(wj)
    assert abs(float(n_j) - n.item()) < 1e-12
    assert _rel(g_j, g_ref) < 1e-10


# ---------------------------------------------------------------------------------------
# JAX
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def jdeq():
    pytest.importorskip("jax")
    from ppl_score.jax import deq

    return deq


def _jax_params(tdeq, seed=0):
    """Weights of the torch model of the same seed, in the JAX layout."""
    import jax
    import jax.numpy as jnp

    return jax.tree.map(jnp.asarray, tdeq.deq_params(_torch_energy(tdeq, seed)))


def _jax_quantities_fn(jdeq, config):
    """A jitted ``(params, x, v) -> [log p, s, H v, ssm_vr, grads of ssm_vr]``."""
    import jax
    import jax.numpy as jnp

    from ppl_score.jax import score_matching_loss

    def energy(p, y):
        return jdeq.deq_energy_apply(p, y, config, quadratic=0.5)

    @jax.jit
    def quantities(p, x, v):
        score = jax.grad(lambda y: energy(p, y).sum())
        s, hv = jax.jvp(score, (x,), (v[0],))
        loss, grads = jax.value_and_grad(
            lambda q: score_matching_loss(lambda y: energy(q, y), x, "ssm_vr", projections=v)
        )(p)
        flat = jnp.concatenate([g.ravel() for g in jax.tree.leaves(grads)])
        return [energy(p, x), s, hv, loss, flat]

    return quantities


@pytest.fixture(scope="module")
def jax_reference(tdeq, jdeq, data):
    """The unrolled quantities (compiled once for the module)."""
    import jax.numpy as jnp

    x, v = data
    params = _jax_params(tdeq)
    fn = _jax_quantities_fn(jdeq, jdeq.deq_config(backward="unrolled", **TIGHT))
    return params, [np.asarray(a) for a in fn(params, jnp.asarray(x), jnp.asarray(v[:1]))]


def test_jax_fixed_point_reached(jdeq, tdeq, data):
    import jax
    import jax.numpy as jnp

    params = _jax_params(tdeq)
    x = jnp.asarray(data[0])
    zs = {}
    for solver in ("anderson", "iteration"):
        config = jdeq.deq_config(solver=solver, **TIGHT)
        z, info = jax.jit(lambda p, x: jdeq.deq_layer_apply(p, x, config))(params, x)
        assert bool(info.converged) and float(info.residual) <= TIGHT["tol"]
        w_hat = jdeq.lipschitz_scaled(params["weight"], GAMMA)
        fz = jax.nn.softplus(z @ w_hat + x @ params["inject"][0] + params["inject"][1])
        assert float(jnp.abs(fz - z).max()) < 1e-9
        zs[solver] = (np.asarray(z), int(info.iterations))
    assert np.allclose(zs["anderson"][0], zs["iteration"][0], rtol=0, atol=1e-9)
    assert zs["anderson"][1] < zs["iteration"][1]


def test_jax_implicit_matches_unrolled(jdeq, data, jax_reference):
    import jax.numpy as jnp

    x, v = data
    params, ref = jax_reference
    fn = _jax_quantities_fn(jdeq, jdeq.deq_config(backward="implicit", **TIGHT))
    imp = fn(params, jnp.asarray(x), jnp.asarray(v[:1]))
    for name, a, b in zip(["log p", "score", "Hv", "ssm_vr", "grad ssm_vr"], imp, ref):
        assert _rel(a, b) < RTOL, name


def test_jax_phantom_error_decreases_with_k(jdeq, data, jax_reference, record_property):
    import jax.numpy as jnp

    x, v = data
    params, exact = jax_reference
    ks = (1, 8)  # each K is a compile; the torch test tabulates more
    errors = []
    for k in ks:
        fn = _jax_quantities_fn(jdeq, jdeq.deq_config(backward="phantom", phantom_steps=k, **TIGHT))
        approx = fn(params, jnp.asarray(x), jnp.asarray(v[:1]))
        errors.append([_rel(a, b) for a, b in zip(approx[1:], exact[1:])])
    errors = np.array(errors)
    print("\nphantom relative error vs unrolled (JAX): K | score | Hv | ssm_vr | grad ssm_vr")
    for k, row in zip(ks, errors):
        print(f"  {k:2d} | " + " | ".join(f"{e:.2e}" for e in row))
    record_property("phantom_errors_jax", {k: row.tolist() for k, row in zip(ks, errors)})
    assert np.all(np.diff(errors, axis=0) < 0), errors
    assert errors[0].max() > 1e-3 and errors[-1].max() < 1e-3


def test_backend_parity(tdeq, jdeq, data, jax_reference):
    """Same weights, same projections: torch and JAX agree to 1e-6 (observed ~1e-13)."""
    x, v = data
    _, jax_ref = jax_reference
    torch_imp = _torch_quantities(tdeq, _torch_energy(tdeq), x, v[:1], "implicit")
    # parameter order: torch (deq.weight, inject.weight, inject.bias, readout.weight,
    # readout.bias), JAX leaves (inject W, inject b, readout w, readout c, weight), transposed
    tw = torch_imp[4]
    sizes = [H * H, H * D, H, H, 1]
    w, uw, ub, rw, rb = np.split(tw, np.cumsum(sizes)[:-1])
    torch_grads = np.concatenate(
        [uw.reshape(H, D).T.ravel(), ub, rw.reshape(1, H).T.ravel(), rb, w.reshape(H, H).T.ravel()]
    )
    for name, a, b in zip(["log p", "score", "Hv", "ssm_vr"], torch_imp[:4], jax_ref[:4]):
        assert _rel(a, b) < 1e-6, name
    assert _rel(torch_grads, jax_ref[4]) < 1e-6


def test_jax_every_objective(jdeq, tdeq, data):
    import jax
    import jax.numpy as jnp

    from ppl_score.jax import score_matching_loss

    params = _jax_params(tdeq)
    x = jnp.asarray(data[0])
    config = jdeq.deq_config(**{**TIGHT, "tol": 1e-8})

    @jax.jit
    def losses(p, key):
        fn = lambda y: jdeq.deq_energy_apply(p, y, config, quadratic=0.5)  # noqa: E731
        return jnp.stack([score_matching_loss(fn, x, m, key=key) for m in OBJECTIVES])

    vals = losses(params, jax.random.PRNGKey(0))
    assert bool(jnp.isfinite(vals).all())

    # parameter gradients of ssm_vr (third order) are checked above; here the first-order
    # fd_ssm (each compile costs seconds, so not every method)
    fn = lambda q: lambda y: jdeq.deq_energy_apply(q, y, config, quadratic=0.5)  # noqa: E731
    g = jax.jit(jax.grad(lambda q: score_matching_loss(fn(q), x, "fd_ssm", key=jax.random.PRNGKey(1))))(params)
    assert all(bool(jnp.isfinite(t).all()) for t in jax.tree.leaves(g))
    assert float(jnp.abs(g["weight"]).sum()) > 0


def test_jax_score_model_matches_torch(jdeq, tdeq, data):
    """``kind="score"``: gradients of ``ssm_vr`` of a DEQ score network agree with torch's
    (whose implicit gradients are checked against unrolled ones above)."""
    import jax
    import jax.numpy as jnp
    import torch

    from ppl_score.jax import score_matching_loss as jloss
    from ppl_score.torch import score_matching_loss as tloss

    x, v = data
    torch.manual_seed(2)
    model = tdeq.DEQScore(D, H, **TIGHT).double()
    tloss(model, torch.tensor(x), "ssm_vr", kind="score", projections=torch.tensor(v)).backward()
    params = jax.tree.map(jnp.asarray, tdeq.deq_params(model))
    config = jdeq.deq_config(**TIGHT)
    loss = lambda p: jloss(  # noqa: E731
        lambda y: jdeq.deq_score_apply(p, y, config), jnp.asarray(x), "ssm_vr", kind="score", projections=jnp.asarray(v)
    )
    g = jax.jit(jax.grad(loss))(params)
    assert _rel(g["weight"], model.deq.weight.grad.T.numpy()) < 1e-6
    assert _rel(g["inject"][0], model.deq.inject.weight.grad.T.numpy()) < 1e-6
    assert _rel(g["readout"][0], model.readout.weight.grad.T.numpy()) < 1e-6


def test_jax_matches_optimistix(jdeq, tdeq, data, jax_reference):
    """``optimistix.fixed_point`` with ``ImplicitAdjoint`` composes with jvp-of-grad and
    with the gradient of ``ssm_vr``; it agrees with our implicit rule."""
    optx = pytest.importorskip("optimistix")
    import jax
    import jax.numpy as jnp

    from ppl_score.jax import score_matching_loss

    x, v = data
    x, v = jnp.asarray(x), jnp.asarray(v[:1])
    params = _jax_params(tdeq)

    def optx_energy(p, y):
        u = y @ p["inject"][0] + p["inject"][1]
        w_hat = jdeq.lipschitz_scaled(p["weight"], GAMMA)
        f = lambda z, args: jax.nn.softplus(z @ args[0] + args[1])  # noqa: E731
        sol = optx.fixed_point(
            f,
            optx.FixedPointIteration(rtol=1e-12, atol=1e-12),
            jnp.zeros((y.shape[0], H)),
            (w_hat, u),
            max_steps=500,
            adjoint=optx.ImplicitAdjoint(),
        )
        return (sol.value @ p["readout"][0] + p["readout"][1])[:, 0] - 0.25 * (y * y).sum(-1)

    @jax.jit
    def quantities(p):
        hv = jax.jvp(jax.grad(lambda y: optx_energy(p, y).sum()), (x,), (v[0],))[1]
        g = jax.grad(lambda q: score_matching_loss(lambda y: optx_energy(q, y), x, "ssm_vr", projections=v))(p)
        return hv, jnp.concatenate([t.ravel() for t in jax.tree.leaves(g)])

    hv, g = quantities(params)
    _, ref = jax_reference
    assert _rel(hv, ref[2]) < 1e-6 and _rel(g, ref[4]) < 1e-6


def test_jax_nonconvergence(jdeq, tdeq, data):
    import jax
    import jax.numpy as jnp

    params = _jax_params(tdeq)
    x = jnp.asarray(data[0])
    config = jdeq.deq_config(gamma=GAMMA, tol=1e-14, max_iter=3)
    run = jax.jit(lambda p: jdeq.deq_energy_apply(p, x, config, return_info=True))
    with pytest.warns(jdeq.FixedPointWarning, match="did not converge.*after 3 iterations"):
        _, info = run(params)
        jax.block_until_ready(info)
    assert not bool(info.converged) and int(info.iterations) == 3
    raising = jdeq.deq_config(gamma=GAMMA, tol=1e-14, max_iter=3, on_nonconvergence="raise")
    with pytest.raises(jdeq.FixedPointError, match="did not converge"):
        jdeq.deq_energy_apply(params, x, raising)  # eager: the error itself
    with pytest.raises(RuntimeError, match="did not converge"):  # jit: wrapped by JAX
        jax.block_until_ready(jax.jit(lambda p: jdeq.deq_energy_apply(p, x, raising))(params))
    quiet = jdeq.deq_config(gamma=GAMMA, tol=1e-14, max_iter=3, on_nonconvergence="ignore")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jax.block_until_ready(jax.jit(lambda p: jdeq.deq_energy_apply(p, x, quiet))(params))


@pytest.mark.parametrize("options, error, name", BAD_OPTIONS, ids=[n for _, _, n in BAD_OPTIONS])
def test_jax_bad_arguments(jdeq, options, error, name):
    with pytest.raises(error, match=name):
        jdeq.deq_config(**options)


def test_jax_bad_inputs(jdeq):
    import jax
    import jax.numpy as jnp

    params = jdeq.deq_energy_init(jax.random.PRNGKey(0), D, H)
    with pytest.raises(ValueError, match="'x'"):
        jdeq.deq_energy_apply(params, jnp.zeros((B, D + 1)))
    with pytest.raises(TypeError, match="config"):
        jdeq.deq_energy_apply(params, jnp.zeros((B, D)), {"gamma": 0.5})
    with pytest.raises(ValueError, match="width"):
        jdeq.deq_energy_init(jax.random.PRNGKey(0), D, 0)
    with pytest.raises(ValueError, match="backward"):
        jdeq.fixed_point(lambda z, p: z, jnp.zeros((2, 1)), backward="exact")


def test_jax_generic_fixed_point(jdeq):
    """z = 0.5 cos(z) + a: first and second derivatives in closed form, via grad-of-grad."""
    import jax
    import jax.numpy as jnp

    a = jnp.linspace(-1.0, 1.0, 5).reshape(5, 1)
    solve = lambda a: jdeq.fixed_point(lambda z, a: 0.5 * jnp.cos(z) + a, jnp.zeros_like(a), a, tol=1e-12)[0]  # noqa: E731
    first = jax.grad(lambda a: solve(a).sum())

    @jax.jit
    def derivatives(a):
        return solve(a), first(a), jax.grad(lambda a: first(a).sum())(a)

    z, dz, d2 = derivatives(a)
    assert np.allclose(dz, 1 / (1 + 0.5 * jnp.sin(z)), atol=1e-10)
    assert np.allclose(d2, -0.5 * jnp.cos(z) * dz / (1 + 0.5 * jnp.sin(z)) ** 2, atol=1e-10)


# ---------------------------------------------------------------------------------------
# Pyro and NumPyro
# ---------------------------------------------------------------------------------------


def test_pyro_module_in_model(tdeq, data):
    """The PyroModule energy equals the torch one, its weights are Pyro params, and as the
    ``Unnormalized`` energy of a model ``ScoreMatching("esm")`` gives ``B`` times the
    per-example ``esm`` of the plain module (SPEC.md section 3), with gradients reaching
    the tied weight."""
    pyro = pytest.importorskip("pyro")
    import torch

    from ppl_score.pyro import ScoreMatching, Unnormalized
    from ppl_score.pyro.deq import DEQEnergy
    from ppl_score.torch import score_matching_loss

    pyro.clear_param_store()
    torch.manual_seed(0)
    energy = DEQEnergy(D, H, quadratic=0.5, **TIGHT).double()
    plain = _torch_energy(tdeq)
    plain.load_state_dict(energy.state_dict())
    x = torch.tensor(data[0])
    assert torch.allclose(energy(x), plain(x))
    with pyro.poutine.trace(param_only=True) as tr:
        energy(x)
    assert {"deq.weight", "deq.inject.weight", "readout.weight"} <= set(tr.trace.nodes)

    def model(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", Unnormalized(energy, event_shape=(D,)), obs=x)

    loss = ScoreMatching("esm").differentiable_loss(model, lambda x: None, x)
    assert torch.allclose(loss, B * score_matching_loss(plain, x, "esm"), rtol=1e-9)
    loss.backward()
    grad = pyro.get_param_store().get_param("deq.weight").unconstrained().grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    pyro.clear_param_store()


def test_numpyro_module_in_svi(jdeq, data):
    pytest.importorskip("numpyro")
    import jax
    import jax.numpy as jnp
    import numpyro
    import optax

    from ppl_score.numpyro import ScoreMatching, Unnormalized
    from ppl_score.numpyro.deq import deq_energy_module

    x = jnp.asarray(data[0])

    def model(x):
        energy = deq_energy_module("energy", D, H, quadratic=0.5, **{**TIGHT, "tol": 1e-8})
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("x", Unnormalized(energy, event_shape=(D,)), obs=x)

    svi = numpyro.infer.SVI(model, lambda x: None, optax.adam(1e-2), loss=ScoreMatching("dsm", sigma=0.5))
    state = svi.init(jax.random.PRNGKey(0), x)
    p0 = svi.get_params(state)["energy$params"]
    assert p0["weight"].shape == (H, H) and p0["weight"].dtype == jnp.float64
    state, loss = jax.jit(svi.update)(state, x)
    p1 = svi.get_params(state)["energy$params"]
    assert np.isfinite(float(loss)) and not np.allclose(p0["weight"], p1["weight"])
    # the registered module is the plain JAX energy with those params
    with numpyro.handlers.seed(rng_seed=0), numpyro.handlers.substitute(data={"energy$params": p1}):
        fn = deq_energy_module("energy", D, H, quadratic=0.5, **{**TIGHT, "tol": 1e-8})
    config = jdeq.deq_config(**{**TIGHT, "tol": 1e-8})
    both = jax.jit(lambda y: (fn(y), jdeq.deq_energy_apply(p1, y, config, quadratic=0.5)))(x)
    assert np.allclose(*both)


# ---------------------------------------------------------------------------------------
# Defaults (issue 11, item 4): defined once in ppl_score._deq, the same in every front end
# ---------------------------------------------------------------------------------------


def test_defaults_are_shared_by_every_backend(tdeq, jdeq):
    import inspect

    from ppl_score import _deq

    # one class, one default instance, one set of values (benchmarks/deq_defaults.py)
    assert tdeq.DEQConfig is jdeq.DEQConfig is _deq.DEQConfig
    assert tdeq.SolverConfig is jdeq.SolverConfig is _deq.SolverConfig
    default = _deq.DEQConfig()
    assert (default.solver.solver, default.solver.tol, default.gamma) == ("iteration", 1e-4, 0.9)
    assert (
        default.solver.solver,
        default.solver.tol,
        default.gamma,
        default.solver.max_iter,
        default.solver.memory,
    ) == (_deq.DEFAULT_SOLVER, _deq.DEFAULT_TOL, _deq.DEFAULT_GAMMA, _deq.DEFAULT_MAX_ITER, _deq.DEFAULT_MEMORY)
    for mod in (tdeq, jdeq):
        assert (mod.DEFAULT_SOLVER, mod.DEFAULT_TOL, mod.DEFAULT_GAMMA) == (
            _deq.DEFAULT_SOLVER,
            _deq.DEFAULT_TOL,
            _deq.DEFAULT_GAMMA,
        )
    # the validating constructors' signatures spell the same defaults as the NamedTuples
    sig = inspect.signature(_deq.solver_config).parameters
    assert {k: sig[k].default for k in _deq.SolverConfig._fields} == _deq.SolverConfig()._asdict()
    sig = inspect.signature(_deq.deq_config).parameters
    flat = {**default._asdict(), **default.solver._asdict()}  # "solver": the solver's name
    assert {k: sig[k].default for k in flat} == flat
    assert tdeq.deq_config() == jdeq.deq_config() == default
    assert tdeq.solver_config() == jdeq.solver_config() == default.solver
    # every model built without options gets them
    assert tdeq.DEQLayer(D, H).config == default
    assert tdeq.DEQEnergy(D, H).deq.config == default and tdeq.DEQScore(D, H).deq.config == default
    for fn in (jdeq.deq_layer_apply, jdeq.deq_energy_apply, jdeq.deq_score_apply):
        assert inspect.signature(fn).parameters["config"].default == default
    assert inspect.signature(tdeq.solve).parameters["cfg"].default == default.solver
    assert inspect.signature(jdeq.solve).parameters["cfg"].default == default.solver
    if _has("pyro"):
        from ppl_score.pyro.deq import DEQEnergy, DEQScore

        assert DEQEnergy(D, H).deq.config == default and DEQScore(D, H).deq.config == default
    if _has("numpyro"):
        from ppl_score.numpyro.deq import deq_energy, deq_score

        assert deq_energy(H)[1].config == default and deq_score(H)[1].config == default


def _has(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


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


def test_jax_defaults_converge(jdeq):
    import jax
    import jax.numpy as jnp

    from ppl_score.jax import score_matching_loss

    params = jdeq.deq_energy_init(jax.random.PRNGKey(0), 4, 32, jnp.float32)
    x = jax.random.normal(jax.random.PRNGKey(1), (16, 4), jnp.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error", jdeq.FixedPointWarning)
        z, info = jdeq.deq_layer_apply(params, x)
        loss, grads = jax.value_and_grad(
            lambda p: score_matching_loss(
                lambda y: jdeq.deq_energy_apply(p, y, quadratic=0.5), x, "ssm_vr", key=jax.random.PRNGKey(2)
            )
        )(params)
    tol = jdeq.DEFAULT_TOL
    assert bool(info.converged) and float(info.residual) <= tol
    w_hat = jdeq.lipschitz_scaled(params["weight"], jdeq.DEFAULT_GAMMA)
    fz = jax.nn.softplus(z @ w_hat + x @ params["inject"][0] + params["inject"][1])
    res = float((jnp.linalg.norm(fz - z, axis=-1) / (1 + jnp.linalg.norm(fz, axis=-1))).max())
    assert res <= tol
    assert np.isfinite(float(loss)) and all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


# ---------------------------------------------------------------------------------------
# Tutorial
# ---------------------------------------------------------------------------------------


def test_tutorial_smoke(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("sklearn")
    script = os.path.join(ROOT, "tutorials", "deq_digits.py")
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "MPLBACKEND": "Agg"}
    proc = subprocess.run(
        [sys.executable, script, "--smoke", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "held-out" in proc.stdout
