"""``score_matching_loss`` of ``ppl_score.jax``: float32 with x64 disabled, jit against eager
(method and options static; x, key, projections and noise traced), and grad under jit."""

from __future__ import annotations

import numpy as np

from ppl_score.spec import OBJECTIVES
from tests.helpers.objectives import METHODS, B


def test_jax_float32_with_x64_disabled(jax_backend, refs, rng):
    """JAX's default configuration (no x64), as most NumPyro users run it: drawn randomness,
    float32 throughout."""
    dens = refs.Gaussian.random(3, rng)
    x = rng.normal(size=(B, 3))
    with jax_backend.jax.enable_x64(False):
        for method in METHODS:
            out = jax_backend.loss(dens.log_prob_fn, x, method, dtype=np.float32, seed=0, reduction="none")
            assert out.dtype == np.float32 and np.isfinite(out).all(), method


def _jit_options(method):
    opts = {"sigma": 0.4} if OBJECTIVES[method].uses_noise else {}
    if method.startswith("fd_"):
        opts["eps"] = 0.05
    return opts


def test_jax_jit_matches_eager(jax_backend, refs):
    """Method and options static; x, key, projections and noise traced. All methods in one
    jitted function: one compilation instead of one per method."""
    jax, jnp = jax_backend.jax, jax_backend.jnp
    from ppl_score.jax import score_matching_loss

    rng = np.random.default_rng(8)
    dens = refs.LogCosh.random(3, rng)
    fn = dens.log_prob_fn(jax_backend.ops(np.float64))
    x = jnp.asarray(rng.normal(size=(B, 3)))
    key = jax.random.PRNGKey(0)

    def drawn(x, key):
        return {m: score_matching_loss(fn, x, m, key=key, reduction="none", **_jit_options(m)) for m in METHODS}

    jitted = jax.jit(drawn)
    eager, traced = drawn(x, key), jitted(x, key)
    for m in METHODS:
        np.testing.assert_allclose(traced[m], eager[m], rtol=1e-12, err_msg=m)
    # checks that need concrete values (finiteness of x) are skipped under tracing
    with_nan = jitted(x.at[0, 0].set(jnp.nan), key)
    for m in METHODS:
        assert np.isnan(np.asarray(with_nan[m])[0]), m

    explicit_methods = [m for m in METHODS if OBJECTIVES[m].uses_projections or OBJECTIVES[m].uses_noise]

    def explicit(x, proj, noise):
        out = {}
        for m in explicit_methods:
            spec = OBJECTIVES[m]
            kw = {"projections": proj} if spec.uses_projections else {}
            kw.update({"noise": noise} if spec.uses_noise else {})
            out[m] = score_matching_loss(fn, x, m, reduction="none", **kw, **_jit_options(m))
        return out

    proj, noise = jnp.asarray(rng.normal(size=(2, B, 3))), jnp.asarray(rng.normal(size=(B, 3)))
    eager, traced = explicit(x, proj, noise), jax.jit(explicit)(x, proj, noise)
    for m in explicit_methods:
        np.testing.assert_allclose(traced[m], eager[m], rtol=1e-12, err_msg=m)


def test_jax_grad_under_jit(jax_backend):
    """``jax.jit(jax.grad(...))`` of a loss whose ``x`` is closed over: a concrete array
    inside a trace, where the eager finiteness check must not touch a tracer."""
    jax, jnp = jax_backend.jax, jax_backend.jnp
    from ppl_score.jax import score_matching_loss
    from ppl_score.jax.nets import energy_apply, energy_init

    params = energy_init(jax.random.PRNGKey(0), 3, hidden=(8,), dtype=jnp.float64)
    x = jnp.asarray(np.random.default_rng(9).normal(size=(B, 3)))

    def loss(p, key):
        return score_matching_loss(lambda y: energy_apply(p, y), x, "ssm_vr", key=key, n_projections=2)

    g_eager = jax.grad(loss)(params, jax.random.PRNGKey(1))
    g_jit = jax.jit(jax.grad(loss))(params, jax.random.PRNGKey(1))
    for a, b in zip(jax.tree_util.tree_leaves(g_eager), jax.tree_util.tree_leaves(g_jit)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14)
    assert any(bool(jnp.any(a != 0)) for a in jax.tree_util.tree_leaves(g_eager))
