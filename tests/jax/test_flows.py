"""Full-Jacobian flows of ``ppl_score.jax.flows`` (issue 6), float64, weights copied from the
torch flow: the relative gradient against autograd of the exact NLL times ``W^T W``,
``log_prob`` against a brute-force Jacobian determinant, the inverse, and training by score
matching under jit."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

from ppl_score.jax import score_matching_loss as jax_sm_loss  # noqa: E402
from ppl_score.jax.flows import InvertibleMLP as JaxFlow  # noqa: E402
from tests.helpers.flows import D, data, extreme_latents, gaussian_data, jax_twin, log_normal, make_torch_flow

pytestmark = pytest.mark.usefixtures("one_torch_thread")


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


def test_jax_log_prob_matches_brute_force_jacobian():
    flow, params = jax_twin(make_torch_flow())
    x = jnp.asarray(data())

    def brute(xi):
        jac = jax.jacfwd(lambda v: flow.forward(params, v))(xi)
        return log_normal(flow.forward(params, xi)) + jnp.linalg.slogdet(jac)[1]

    np.testing.assert_allclose(flow.log_prob(params, x), jax.jit(jax.vmap(brute))(x), rtol=1e-12)


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
