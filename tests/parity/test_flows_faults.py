"""Full-Jacobian flows under faults (issue 10, item 9), the same in both backends and both
front ends: ``sample`` takes numpy integers (and rejects ``bool`` and floats); inverting
through a singular or non-finite layer is a ``ValueError`` naming the layer (under ``jit``
JAX returns NaN rows, never silent garbage); the validation switch and ``max_iter``."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

from tests.helpers.flows_faults import DTYPES, D, _pair

pytestmark = pytest.mark.usefixtures("one_torch_thread")


_J_INVERSE = {}


def _jit_inverse(jflow):
    if jflow not in _J_INVERSE:
        _J_INVERSE[jflow] = jax.jit(jflow.inverse)
    return _J_INVERSE[jflow]


# ---------------------------------------------------------------------------------------
# sample(n): numpy integers (rejected before)
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [3, np.int64(3), np.int32(3), np.uint8(3)])
def test_sample_accepts_numpy_integers(n):
    tflow, jflow, params = _pair()
    assert tflow.sample(n, generator=torch.Generator().manual_seed(0)).shape == (3, D)
    assert jflow.sample(params, jax.random.PRNGKey(0), n).shape == (3, D)


@pytest.mark.parametrize(
    "n,error", [(True, TypeError), (3.0, TypeError), ("3", TypeError), (0, ValueError), (np.int64(-1), ValueError)]
)
def test_sample_rejects_bad_n(n, error):
    tflow, jflow, params = _pair()
    with pytest.raises(error, match="'n'"):
        tflow.sample(n)
    with pytest.raises(error, match="'n'"):
        jflow.sample(params, jax.random.PRNGKey(0), n)


# ---------------------------------------------------------------------------------------
# singular / non-finite layers
# ---------------------------------------------------------------------------------------


def _break(tflow, jflow, params, layer, how):
    """Make ``layer`` singular (rank deficient), or put a NaN / inf in its weight or bias."""
    w = tflow.weights[layer].detach().clone()
    b = tflow.biases[layer].detach().clone()
    if how == "singular":
        w[:, 1] = 2.0 * w[:, 0]  # exactly rank deficient in any dtype
    elif how == "nan weight":
        w[1, 2] = float("nan")
    elif how == "inf weight":
        w[0, 0] = float("inf")
    else:
        b[0] = float("nan")
    with torch.no_grad():
        tflow.weights[layer].copy_(w)
        tflow.biases[layer].copy_(b)
    params = list(params)
    dtype = params[layer].weight.dtype
    params[layer] = params[layer]._replace(weight=jnp.asarray(w.numpy(), dtype), bias=jnp.asarray(b.numpy(), dtype))
    return tuple(params)


MESSAGES = {
    "singular": "layer {k} weight is singular to working precision",
    "nan weight": r"layer {k} weight contains non-finite values \(nan or inf\)",
    "inf weight": r"layer {k} weight contains non-finite values \(nan or inf\)",
    "nan bias": r"layer {k} bias contains non-finite values",
}


@pytest.mark.parametrize("how", list(MESSAGES))
@pytest.mark.parametrize("layer", [0, 1, 2])
@pytest.mark.parametrize("dtype", DTYPES)
def test_inverse_through_a_bad_layer_names_it(dtype, layer, how):
    tflow, jflow, params = _pair(dtype)
    params = _break(tflow, jflow, params, layer, how)
    z = np.random.default_rng(0).normal(size=(4, D)).astype(dtype)
    match = MESSAGES[how].format(k=layer)
    with pytest.raises(ValueError, match=match):
        tflow.inverse(torch.from_numpy(z))
    with pytest.raises(ValueError, match=match):
        tflow.sample(2)
    with pytest.raises(ValueError, match=match):
        jflow.inverse(params, jnp.asarray(z))
    with pytest.raises(ValueError, match=match):
        jflow.sample(params, jax.random.PRNGKey(0), 2)
    # under jit nothing can be raised: every row is NaN, never NaN/-inf mixed with garbage
    out = np.asarray(_jit_inverse(jflow)(params, jnp.asarray(z)))
    assert np.isnan(out).all()


def test_nearly_singular_layer_in_float32_only():
    """Condition number 1e9: beyond float32's working precision (rejected), fine in float64
    (inverted, and the round trip holds)."""
    for dtype, ok in (("float64", True), ("float32", False)):
        tflow, jflow, params = _pair(dtype)
        w = tflow.weights[1].detach().double()
        u, s, vh = torch.linalg.svd(w)
        w = (u * torch.tensor([1.0, 1.0, 1e-9], dtype=w.dtype)) @ vh
        with torch.no_grad():
            tflow.weights[1].copy_(w)
        params = list(params)
        params[1] = params[1]._replace(weight=jnp.asarray(w.numpy(), params[1].weight.dtype))
        z = torch.zeros(2, D, dtype=tflow.weights[0].dtype)
        if ok:
            x = tflow.inverse(z)
            torch.testing.assert_close(tflow(x), z, atol=1e-5, rtol=0)
            assert np.isfinite(np.asarray(jflow.inverse(params, jnp.asarray(z.numpy())))).all()
        else:
            with pytest.raises(ValueError, match="layer 1 weight is singular"):
                tflow.inverse(z)
            with pytest.raises(ValueError, match="layer 1 weight is singular"):
                jflow.inverse(tuple(params), jnp.asarray(z.numpy()))


def test_good_flow_still_inverts_under_jit():
    tflow, jflow, params = _pair()
    x = np.random.default_rng(1).normal(size=(5, D))
    z = jflow.forward(params, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(_jit_inverse(jflow)(params, z)), x, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(tflow.inverse(torch.from_numpy(np.array(z))).detach().numpy(), x, rtol=1e-9, atol=1e-9)


def test_finiteness_check_respects_the_validation_switch():
    from ppl_score.common.validate import validation_enabled

    tflow, jflow, params = _pair()
    x = np.full((2, D), np.nan)
    with pytest.raises(ValueError, match="'x' contains non-finite"):
        tflow.log_prob(torch.from_numpy(x))
    with validation_enabled(False):  # no host sync: the NaN propagates
        assert torch.isnan(tflow.log_prob(torch.from_numpy(x))).all()
        assert np.isnan(np.asarray(jflow.log_prob(params, jnp.asarray(x)))).all()


# ---------------------------------------------------------------------------------------
# The front ends: sampling a TransformedDistribution through a singular layer
# ---------------------------------------------------------------------------------------


def test_pyro_and_numpyro_transforms_name_the_bad_layer():
    import numpyro.distributions as ndist
    import pyro.distributions as dist

    from ppl_score.numpyro.flows import InvertibleMLPTransform as NTransform
    from ppl_score.pyro.flows import InvertibleMLPTransform as PTransform

    tflow, jflow, params = _pair()
    params = _break(tflow, jflow, params, 1, "singular")
    base = dist.Normal(torch.zeros(D, dtype=torch.float64), 1.0).to_event(1)
    with pytest.raises(ValueError, match="layer 1 weight is singular"):
        dist.TransformedDistribution(base, [PTransform(flow=tflow)]).rsample((2,))
    nbase = ndist.Normal(jnp.zeros(D), 1.0).to_event(1)
    with pytest.raises(ValueError, match="layer 1 weight is singular"):
        ndist.TransformedDistribution(nbase, NTransform(jflow, params)).sample(jax.random.PRNGKey(0), (2,))


def test_inverse_max_iter_type_and_value():
    tflow, jflow, params = _pair()
    z = np.zeros((2, D))
    for bad, error in ((1.5, TypeError), (True, TypeError), (0, ValueError)):
        with pytest.raises(error, match="'max_iter'"):
            tflow.inverse(torch.from_numpy(z), max_iter=bad)
        with pytest.raises(error, match="'max_iter'"):
            jflow.inverse(params, jnp.asarray(z), max_iter=bad)
    assert tflow.inverse(torch.from_numpy(z), max_iter=np.int64(50)).shape == (2, D)
