"""Cross-backend parity (SPEC.md section 2): with the same weights, projections and noise,
``ppl_score.torch`` and ``ppl_score.jax`` agree to ``rtol=1e-6`` in float64, in the values
and in the gradients with respect to the network parameters.

The torch networks (``MLPEnergy`` for kind ``log_prob``, ``MLPScore`` for kind ``score``) are
copied to JAX with ``mlp_params``, whose layout ``ppl_score.jax.nets`` shares.
"""

from __future__ import annotations

import numpy as np
import pytest

from ppl_score.spec import OBJECTIVES, UNCONDITIONAL_METHODS

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")

from ppl_score.jax import score_matching_loss as jax_loss  # noqa: E402
from ppl_score.jax.nets import energy_apply, score_apply  # noqa: E402
from ppl_score.torch import score_matching_loss as torch_loss  # noqa: E402
from ppl_score.torch.nets import MLPEnergy, MLPScore, mlp_params  # noqa: E402

METHODS = UNCONDITIONAL_METHODS
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


def _maybe(f, a):
    return None if a is None else f(a)


def _jax_params(net):
    """``mlp_params`` as JAX arrays (``None``: the energy's last layer, without bias)."""
    return [(jnp.asarray(w), _maybe(jnp.asarray, b)) for w, b in mlp_params(net)]


def _torch_value_and_grads(method, kind, case):
    net = case["nets"][kind]
    net.zero_grad(set_to_none=True)
    x = torch.as_tensor(case["x"])
    kw = _explicit(method, case, torch.as_tensor)
    per_example = torch_loss(net, x, method, kind=kind, reduction="none", **kw, **_options(method))
    per_example.mean().backward()
    linears = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    grad = lambda p: np.zeros(tuple(p.shape)) if p.grad is None else p.grad.numpy()
    grads = [(grad(m.weight).T, None if m.bias is None else grad(m.bias)) for m in linears]
    return per_example.detach().numpy(), grads


def _jax_value_and_grads(method, kind, case):
    params = _jax_params(case["nets"][kind])
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
    return np.asarray(value), [(np.asarray(w), _maybe(np.asarray, b)) for w, b in grads]


@pytest.mark.parametrize("kind", ["log_prob", "score"])
@pytest.mark.parametrize("method", METHODS)
def test_values_and_parameter_gradients_agree(case, method, kind):
    t_value, t_grads = _torch_value_and_grads(method, kind, case)
    j_value, j_grads = _jax_value_and_grads(method, kind, case)
    assert t_value.dtype == j_value.dtype == np.float64
    np.testing.assert_allclose(j_value, t_value, rtol=RTOL)
    assert len(t_grads) == len(j_grads) == 3
    scale = max(np.abs(g).max() for pair in t_grads for g in pair if g is not None)
    assert scale > 0
    for layer, (tg, jg) in enumerate(zip(t_grads, j_grads)):
        assert (tg[1] is None) == (jg[1] is None), layer  # an energy's last layer has no bias
        for name, a, b in (("W", tg[0], jg[0]), ("b", tg[1], jg[1]))[: 1 if tg[1] is None else 2]:
            assert a.shape == b.shape, (layer, name)
            # atol relative to the largest entry: entries that cancel to ~0 are compared absolutely
            np.testing.assert_allclose(b, a, rtol=RTOL, atol=1e-10 * scale, err_msg=f"layer {layer} {name}")


def test_networks_agree(case):
    """The copied weights define the same functions (precondition of the parity above)."""
    x = case["x"]
    for kind, net in case["nets"].items():
        params = _jax_params(net)
        expected = net(torch.as_tensor(x)).detach().numpy()
        got = (
            energy_apply(params, jnp.asarray(x), quadratic=QUADRATIC)
            if kind == "log_prob"
            else score_apply(params, jnp.asarray(x))
        )
        np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-12)


def test_energies_have_no_last_bias_in_either_backend():
    """The constant offset of an energy (unidentifiable, gradient-free) is gone from both:
    ``energy_init`` keeps ``mlp_init``'s weights (the same random stream) with a ``None``
    last bias, the layout ``mlp_params`` gives for ``MLPEnergy``; an old parameter list with
    a last bias still applies."""
    from ppl_score.jax.nets import energy_init, mlp_init

    key = jax.random.PRNGKey(0)
    new, old = energy_init(key, DIM, (8, 8), jnp.float64), mlp_init(key, (DIM, 8, 8, 1), jnp.float64)
    assert [b is None for _, b in new] == [b is None for _, b in mlp_params(MLPEnergy(DIM, (8, 8)))]
    assert [b is None for _, b in new] == [False, False, True]
    for (w, b), (w0, b0) in zip(new, old):
        np.testing.assert_array_equal(w, w0)
        assert b is None or np.array_equal(b, b0)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(B, DIM)))
    np.testing.assert_allclose(energy_apply(old, x) - old[-1][1][0], energy_apply(new, x), rtol=1e-12, atol=1e-12)
