"""DEQ layers of ``ppl_score.jax.deq``, in float64 at tiny widths (weights copied from the
torch model of the same seed): the solvers reach the fixed point, ``implicit`` gives the same
score, Hessian-vector product, ``ssm_vr`` and its gradients as the unrolled iteration (and
as ``optimistix.fixed_point`` with ``ImplicitAdjoint``), the ``phantom`` error decays with K,
every objective runs, non-convergence warns or raises, bad arguments raise, and the default
options converge."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from ppl_score.spec import UNCONDITIONAL_METHODS
from tests.helpers.deq import BAD_OPTIONS, GAMMA, RTOL, TIGHT, B, D, H, _jax_params, _jax_quantities_fn, _rel


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
        return jnp.stack([score_matching_loss(fn, x, m, key=key) for m in UNCONDITIONAL_METHODS])

    vals = losses(params, jax.random.PRNGKey(0))
    assert bool(jnp.isfinite(vals).all())

    # parameter gradients of ssm_vr (third order) are checked above; here the first-order
    # fd_ssm (each compile costs seconds, so not every method)
    fn = lambda q: lambda y: jdeq.deq_energy_apply(q, y, config, quadratic=0.5)  # noqa: E731
    g = jax.jit(jax.grad(lambda q: score_matching_loss(fn(q), x, "fd_ssm", key=jax.random.PRNGKey(1))))(params)
    assert all(bool(jnp.isfinite(t).all()) for t in jax.tree.leaves(g))
    assert float(jnp.abs(g["weight"]).sum()) > 0


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
