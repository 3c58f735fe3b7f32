"""Cross-backend parity of ``ms_dsm`` and of the noise-conditional networks: the same weights
(copied with ``mlp_params``), noise and levels give the same values and parameter gradients
in torch and JAX (float64, 1e-6 relative; the issue's bound); annealed Langevin with the
same (deterministic, noise-free) start and exact score agrees in its statistics."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")

from ppl_score.jax import score_matching_loss as jax_loss  # noqa: E402
from ppl_score.jax.nets import (  # noqa: E402
    noise_conditional_energy_apply,
    noise_conditional_energy_init,
    noise_conditional_score_apply,
    noise_conditional_score_init,
)
from ppl_score.torch import score_matching_loss as torch_loss  # noqa: E402
from ppl_score.torch.nets import NoiseConditionalEnergy, NoiseConditionalScore, mlp_params  # noqa: E402

SIGMAS = (1.0, 0.3, 0.05)
B, DIM = 5, 4


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    x, n = rng.normal(size=(B, DIM)), rng.normal(size=(B, DIM))
    levels = np.asarray(SIGMAS)[rng.integers(0, len(SIGMAS), B)]
    return x, n, levels


def _jax_params(module):
    return [tuple(None if a is None else jnp.asarray(a) for a in layer) for layer in mlp_params(module)]


@pytest.mark.parametrize(
    "conditioning",
    [dict(condition_on_sigma=True, divide_by_sigma=False), dict(condition_on_sigma=False, divide_by_sigma=True), {}],
)
@pytest.mark.parametrize("weighting", ["sigma2", "none"])
def test_score_network(conditioning, weighting):
    torch.manual_seed(0)
    net = NoiseConditionalScore(DIM, (8, 8), **conditioning).double()
    params = _jax_params(net)
    x, n, levels = _inputs()
    kw = dict(kind="score", sigmas=SIGMAS, weighting=weighting)
    t = torch_loss(net, torch.tensor(x), "ms_dsm", noise=torch.tensor(n), noise_levels=torch.tensor(levels), **kw)
    t.backward()

    def f(p):
        fn = lambda z, s: noise_conditional_score_apply(p, z, s, **conditioning)  # noqa: E731
        return jax_loss(fn, jnp.asarray(x), "ms_dsm", noise=jnp.asarray(n), noise_levels=jnp.asarray(levels), **kw)

    value, grads = jax.value_and_grad(f)(params)
    np.testing.assert_allclose(float(value), t.item(), rtol=1e-6)
    torch_grads = [(m.weight.grad.T.numpy(), m.bias.grad.numpy()) for m in net.net if isinstance(m, torch.nn.Linear)]
    for (gw, gb), (tw, tb) in zip(grads, torch_grads):
        np.testing.assert_allclose(np.asarray(gw), tw, rtol=1e-6, atol=1e-12)
        np.testing.assert_allclose(np.asarray(gb), tb, rtol=1e-6, atol=1e-12)
    # the same init in JAX has the same shapes
    init = noise_conditional_score_init(jax.random.PRNGKey(0), DIM, (8, 8), jnp.float64, **conditioning)
    assert [tuple(w.shape) for w, _ in init] == [tuple(w.shape) for w, _ in params]


def test_energy_network():
    torch.manual_seed(1)
    net = NoiseConditionalEnergy(DIM, (8,), quadratic=0.5).double()
    params = _jax_params(net)
    assert params[-1][1] is None  # no last bias, as the plain energies
    x, n, levels = _inputs(1)
    t = torch_loss(
        net,
        torch.tensor(x),
        "ms_dsm",
        kind="log_prob",
        noise=torch.tensor(n),
        noise_levels=torch.tensor(levels),
        sigmas=SIGMAS,
        reduction="none",
    )
    fn = lambda z, s: noise_conditional_energy_apply(params, z, s, quadratic=0.5)  # noqa: E731
    j = jax_loss(
        fn,
        jnp.asarray(x),
        "ms_dsm",
        kind="log_prob",
        noise=jnp.asarray(n),
        noise_levels=jnp.asarray(levels),
        sigmas=SIGMAS,
        reduction="none",
    )
    np.testing.assert_allclose(np.asarray(j), t.detach().numpy(), rtol=1e-6)
    np.testing.assert_allclose(
        np.asarray(fn(jnp.asarray(x), jnp.asarray(levels))), net(torch.tensor(x), torch.tensor(levels)).detach().numpy()
    )
    init = noise_conditional_energy_init(jax.random.PRNGKey(0), DIM, (8,), jnp.float64)
    assert init[0][0].shape == (DIM + 1, 8) and init[-1][1] is None


def test_network_errors():
    with pytest.raises(ValueError, match="condition_on_sigma=True or divide_by_sigma=True"):
        NoiseConditionalScore(2, condition_on_sigma=False)
    with pytest.raises(ValueError, match="condition_on_sigma=True or divide_by_sigma=True"):
        noise_conditional_score_init(jax.random.PRNGKey(0), 2, condition_on_sigma=False)
    with pytest.raises(TypeError, match="argument 'divide_by_sigma' must be a bool"):
        NoiseConditionalScore(2, divide_by_sigma=1)
