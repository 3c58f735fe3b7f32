"""DEQ solvers under faults (issue 10), the same behaviour in both backends: the width-2
float32 layer is finite and agrees, Anderson's least-squares step falls back to a plain step,
``z0`` must be floating, and ``lipschitz_scaled`` checks ``gamma`` and ``weight``."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

from ppl_score.jax import deq as jdeq  # noqa: E402
from ppl_score.torch import deq as tdeq  # noqa: E402
from tests.helpers.deq import DTYPES, _half_plus_one, _jdtype, _tdtype

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _tiny_torch_energy(dtype):
    """The width-2 float32 layer on which JAX's Anderson returned NaN rows (and the same
    weights in torch)."""
    torch.manual_seed(1)
    model = tdeq.DEQEnergy(3, 2, gamma=0.9, solver="anderson", tol=1e-6, max_iter=300, on_nonconvergence="raise").to(
        _tdtype(dtype)
    )
    x = torch.randn(16, 3, dtype=_tdtype(dtype), generator=torch.Generator().manual_seed(1)) * 2
    return model, x


@pytest.mark.parametrize("dtype", DTYPES)
def test_width2_energy_is_finite_and_agrees(dtype):
    model, x = _tiny_torch_energy(dtype)
    with torch.no_grad():
        lp = model(x)
    assert torch.isfinite(lp).all() and model.last_info.converged
    jdt = _jdtype(dtype)
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jdt), tdeq.deq_params(model))
    cfg = jdeq.deq_config(gamma=0.9, solver="anderson", tol=1e-6, max_iter=300, on_nonconvergence="raise")
    out, info = jdeq.deq_energy_apply(params, jnp.asarray(x.numpy()), cfg, return_info=True)
    assert np.isfinite(np.asarray(out)).all() and bool(info.converged)
    np.testing.assert_allclose(np.asarray(out), lp.numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_anderson_mix_falls_back_to_a_plain_step(dtype):
    """Example 0's residuals are so large that their Gram matrix overflows (non-finite
    coefficients): it takes the plain step (its newest f); example 1, whose residuals are
    collinear (a singular Gram matrix), still mixes to the exact fixed point of its affine
    map; both backends (JAX under jit), no error."""
    b, m, n = 2, 3, 4
    huge = 1e25 if dtype == "float32" else 1e200  # finite, but its square is not
    xs = np.zeros((b, m, n))
    fs = np.zeros((b, m, n))
    # example 1: iterates of f(z) = 0.5 z + 1 from 0, 1, 1.5 (residuals 1, 0.5, 0.25)
    for i, z in enumerate((0.0, 1.0, 1.5)):
        xs[1, i], fs[1, i] = z, 0.5 * z + 1
    fs[0] = huge * np.arange(1, m * n + 1).reshape(m, n) / (m * n)
    k = 3  # three valid slots, the newest in slot 2
    tmix = tdeq._anderson_mix(torch.tensor(xs, dtype=_tdtype(dtype)), torch.tensor(fs, dtype=_tdtype(dtype)), k, m)
    jdt = _jdtype(dtype)
    jmix = jax.jit(jdeq._anderson_mix, static_argnums=3)(jnp.asarray(xs, jdt), jnp.asarray(fs, jdt), k, m)
    for mix in (tmix.numpy(), np.asarray(jmix)):
        np.testing.assert_allclose(mix[0], fs[0, 2].astype(dtype), rtol=1e-6)  # the plain step
        np.testing.assert_allclose(mix[1], 2.0, rtol=1e-4)  # the fixed point of 0.5 z + 1


def test_z0_must_be_floating():
    with pytest.raises(TypeError, match="'z0' must have a floating dtype"):
        tdeq.fixed_point(_half_plus_one, torch.zeros(2, 3, dtype=torch.int64))
    with pytest.raises(TypeError, match="'z0' must have a floating dtype"):
        jdeq.fixed_point(_half_plus_one, jnp.zeros((2, 3), jnp.int32))


# ---------------------------------------------------------------------------------------
# lipschitz_scaled's gamma (accepted gamma <= 0 before)
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "gamma,error",
    [
        (0.0, ValueError),
        (-0.5, ValueError),
        (float("nan"), ValueError),
        (float("inf"), ValueError),
        ("0.9", TypeError),
        (True, TypeError),
    ],
)
def test_lipschitz_scaled_rejects_bad_gamma(gamma, error):
    with pytest.raises(error, match="'gamma'"):
        tdeq.lipschitz_scaled(torch.eye(3), gamma)
    with pytest.raises(error, match="'gamma'"):
        jdeq.lipschitz_scaled(jnp.eye(3), gamma)


def test_lipschitz_scaled_accepts_numpy_gamma_and_checks_weight():
    w = np.diag([3.0, 1.0, 0.5])
    expected = w / 3.0 * 0.9
    np.testing.assert_allclose(tdeq.lipschitz_scaled(torch.tensor(w), np.float64(0.9)).numpy(), expected)
    np.testing.assert_allclose(
        np.asarray(jdeq.lipschitz_scaled(jnp.asarray(w, jnp.float32), np.float32(0.9))), expected, rtol=1e-6
    )
    with pytest.raises(ValueError, match="'weight' must be a matrix"):
        tdeq.lipschitz_scaled(torch.ones(3), 0.9)
    with pytest.raises(ValueError, match="'weight' must be a matrix"):
        jdeq.lipschitz_scaled(jnp.ones(3), 0.9)
    with pytest.raises(TypeError, match="'weight'"):
        tdeq.lipschitz_scaled(w, 0.9)
