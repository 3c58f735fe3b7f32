"""``ppl_score.numpyro.flows`` (issue 6), float64: the transform's ``log_prob`` and samples, the
relative-gradient MLE's gradients under jit, and the SVI and plain optax routes."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

from ppl_score.jax.flows import InvertibleMLP as JaxFlow  # noqa: E402
from tests.helpers.flows import ALPHA, D, data, gaussian_data, jax_twin, make_torch_flow

pytestmark = pytest.mark.usefixtures("one_torch_thread")


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
