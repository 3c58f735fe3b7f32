"""Cross-backend parity (SPEC.md section 2): with the same weights, projections and noise,
``ppl_score.torch`` and ``ppl_score.jax`` agree to ``rtol=1e-6`` in float64, in the values
and in the gradients with respect to the network parameters.

The torch networks (``MLPEnergy`` for kind ``log_prob``, ``MLPScore`` for kind ``score``) are
copied to JAX with ``mlp_params``, whose layout ``ppl_score.jax.nets`` shares.
"""

from __future__ import annotations

import numpy as np
import pytest

from ppl_score.spec import OBJECTIVES

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")

from ppl_score.jax import score_matching_loss as jax_loss  # noqa: E402
from ppl_score.jax.nets import energy_apply, score_apply  # noqa: E402
from ppl_score.torch import score_matching_loss as torch_loss  # noqa: E402
from ppl_score.torch.nets import MLPEnergy, MLPScore, mlp_params  # noqa: E402

METHODS = tuple(OBJECTIVES)
EVENT = (2, 3)
DIM = 6
B, M = 4, 3
QUADRATIC = 0.5
RTOL = 1e-6


def _options(method):
    opts = {}
    if OBJECTIVES[method].uses_noise:
        opts["sigma"] = 0.3
    if method.startswith("fd_"):
        opts["eps"] = 0.05
    return opts


@pytest.fixture(scope="module")
def case():
    rng = np.random.default_rng(123)
    torch.manual_seed(123)
    nets = {
        "log_prob": MLPEnergy(DIM, hidden=(8, 8), quadratic=QUADRATIC).double(),
        "score": MLPScore(DIM, hidden=(8, 8)).double(),
    }
    return {
        "nets": nets,
        "x": rng.normal(size=(B, *EVENT)),
        "projections": rng.normal(size=(M, B, *EVENT)),
        "noise": rng.normal(size=(B, *EVENT)),
    }


def _explicit(method, case, as_array):
    spec = OBJECTIVES[method]
    kw = {}
    if spec.uses_projections:
        kw["projections"] = as_array(case["projections"])
    if spec.uses_noise:
        kw["noise"] = as_array(case["noise"])
    return kw


def _torch_value_and_grads(method, kind, case):
    net = case["nets"][kind]
    net.zero_grad(set_to_none=True)
    x = torch.as_tensor(case["x"])
    kw = _explicit(method, case, torch.as_tensor)
    per_example = torch_loss(net, x, method, kind=kind, reduction="none", **kw, **_options(method))
    per_example.mean().backward()
    linears = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    grad = lambda p: np.zeros(tuple(p.shape)) if p.grad is None else p.grad.numpy()
    grads = [(grad(m.weight).T, grad(m.bias)) for m in linears]
    return per_example.detach().numpy(), grads


def _jax_value_and_grads(method, kind, case):
    params = [(jnp.asarray(w), jnp.asarray(b)) for w, b in mlp_params(case["nets"][kind])]
    x = jnp.asarray(case["x"])
    kw = _explicit(method, case, jnp.asarray)
    if kind == "log_prob":
        build = lambda p: lambda y: energy_apply(p, y, quadratic=QUADRATIC)
    else:
        build = lambda p: lambda y: score_apply(p, y)

    def per_example(p):
        return jax_loss(build(p), x, method, kind=kind, reduction="none", **kw, **_options(method))

    value, pullback = jax.vjp(per_example, params)
    (grads,) = pullback(jnp.full((B,), 1.0 / B))  # gradient of the mean
    return np.asarray(value), [(np.asarray(w), np.asarray(b)) for w, b in grads]


@pytest.mark.parametrize("kind", ["log_prob", "score"])
@pytest.mark.parametrize("method", METHODS)
def test_values_and_parameter_gradients_agree(case, method, kind):
    t_value, t_grads = _torch_value_and_grads(method, kind, case)
    j_value, j_grads = _jax_value_and_grads(method, kind, case)
    assert t_value.dtype == j_value.dtype == np.float64
    np.testing.assert_allclose(j_value, t_value, rtol=RTOL)
    assert len(t_grads) == len(j_grads) == 3
    scale = max(np.abs(g).max() for pair in t_grads for g in pair)
    assert scale > 0
    for layer, (tg, jg) in enumerate(zip(t_grads, j_grads)):
        for name, a, b in (("W", tg[0], jg[0]), ("b", tg[1], jg[1])):
            assert a.shape == b.shape, (layer, name)
            # atol relative to the largest entry: entries that cancel to ~0 are compared absolutely
            np.testing.assert_allclose(b, a, rtol=RTOL, atol=1e-10 * scale, err_msg=f"layer {layer} {name}")


def test_networks_agree(case):
    """The copied weights define the same functions (precondition of the parity above)."""
    x = case["x"]
    for kind, net in case["nets"].items():
        params = [(jnp.asarray(w), jnp.asarray(b)) for w, b in mlp_params(net)]
        expected = net(torch.as_tensor(x)).detach().numpy()
        got = (
            energy_apply(params, jnp.asarray(x), quadratic=QUADRATIC)
            if kind == "log_prob"
            else score_apply(params, jnp.asarray(x))
        )
        np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-12)
