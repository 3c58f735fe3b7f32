"""DEQ fixed-point solvers under faults (issue 10, items 5, 8, 9), both backends.

- Anderson on trivial contractions in float32 and float64: its regularization scales with the
  dtype, a singular or non-finite least-squares step falls back to a plain step (per example,
  jit-compatible), and it converges as fast as in float64;
- a NaN weight follows ``on_nonconvergence`` (``FixedPointError`` / ``FixedPointWarning``),
  never a linalg error from inside torch; a map that changes the shape (or dtype) of ``z``
  is a clear error;
- ``lipschitz_scaled`` rejects a non-positive ``gamma``;
- every public DEQ object survives ``pickle``, ``copy.deepcopy`` and ``torch.save``.
"""

from __future__ import annotations

import copy
import io
import pickle
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

from ppl_score.jax import deq as jdeq  # noqa: E402
from ppl_score.torch import deq as tdeq  # noqa: E402

DTYPES = ["float32", "float64"]
SOLVERS = ["anderson", "iteration"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _tdtype(name):
    return getattr(torch, name)


def _jdtype(name):
    if name == "float64" and not jax.config.jax_enable_x64:
        pytest.skip("JAX float64 needs x64")
    return getattr(jnp, name)


def _half_plus_one(z, *params):
    return 0.5 * z + 1


# ---------------------------------------------------------------------------------------
# Anderson on trivial contractions (failed before: torch LinAlgError, JAX NaN)
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("solver", SOLVERS)
def test_torch_trivial_contraction(dtype, solver):
    z0 = torch.zeros(2, 3, dtype=_tdtype(dtype))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # tol: tighter than the default 1e-4, so the 1e-5 comparison below is the solve's
        z, info = tdeq.fixed_point(_half_plus_one, z0, solver=solver, tol=1e-6, on_nonconvergence="raise")
    assert z.dtype == z0.dtype and info.converged
    torch.testing.assert_close(z, torch.full_like(z0, 2.0), rtol=1e-5, atol=1e-5)
    assert torch.equal(z0, torch.zeros_like(z0))  # the start is not mutated
    if solver == "anderson":  # exact on an affine map once it has two residuals
        assert info.iterations <= 4


_J_SOLVE = {}


def _jax_solve(solver, dtype):
    """One jitted solve per (solver, dtype): the trivial contraction from zeros."""
    key = (solver, dtype)
    if key not in _J_SOLVE:
        _J_SOLVE[key] = jax.jit(
            lambda z0: jdeq.fixed_point(_half_plus_one, z0, solver=solver, tol=1e-6, on_nonconvergence="ignore")
        )
    return _J_SOLVE[key]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("solver", SOLVERS)
def test_jax_trivial_contraction(dtype, solver):
    z0 = jnp.zeros((2, 3), _jdtype(dtype))
    z, info = jdeq.fixed_point(_half_plus_one, z0, solver=solver, tol=1e-6, on_nonconvergence="raise")  # eager
    zj, infoj = _jax_solve(solver, dtype)(z0)  # under jit
    for out, inf in ((z, info), (zj, infoj)):
        assert out.dtype == z0.dtype and bool(inf.converged)
        np.testing.assert_allclose(np.asarray(out), 2.0, rtol=1e-5)
        if solver == "anderson":
            assert int(inf.iterations) <= 4


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


def test_anderson_regularization_scales_with_dtype():
    from ppl_score import _deq

    eps32, eps64 = float(np.finfo(np.float32).eps), float(np.finfo(np.float64).eps)
    assert _deq.anderson_reg(eps32) > eps32  # registers on the unit diagonal in float32
    assert _deq.anderson_reg(eps64) == _deq.ANDERSON_REG  # float64 keeps its value (and speed)


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


# ---------------------------------------------------------------------------------------
# Convergence speed is unchanged (iteration counts measured before the change)
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,expected", [("float64", 13), ("float32", 9)])
def test_anderson_iteration_count(dtype, expected):
    """The width-5 layer of tests/test_deq.py (float64: 13 iterations to 1e-11, as before;
    float32: 9 to 1e-6, where it took 8 or failed before): the regularization does not slow
    Anderson down."""
    torch.manual_seed(0)
    tol = 1e-11 if dtype == "float64" else 1e-6
    model = tdeq.DEQEnergy(3, 5, gamma=0.8, solver="anderson", tol=tol, max_iter=300, on_nonconvergence="raise").to(
        _tdtype(dtype)
    )
    x = torch.randn(16, 3, dtype=_tdtype(dtype), generator=torch.Generator().manual_seed(0)) * 2
    with torch.no_grad():
        model(x)
    assert model.last_info.converged and model.last_info.iterations <= expected


# ---------------------------------------------------------------------------------------
# A NaN weight follows on_nonconvergence (failed before: torch LinAlgError from the SVD)
# ---------------------------------------------------------------------------------------


def _nan_torch_energy(policy, backward="implicit"):
    torch.manual_seed(0)
    model = tdeq.DEQEnergy(3, 4, on_nonconvergence=policy, backward=backward)
    with torch.no_grad():
        model.deq.weight[0, 1] = float("nan")
    return model


@pytest.mark.parametrize("backward", ["implicit", "phantom", "unrolled"])
def test_torch_nan_weight_follows_the_policy(backward):
    x = torch.randn(2, 3)
    with pytest.raises(tdeq.FixedPointError, match="non-finite"):
        _nan_torch_energy("raise", backward)(x)
    model = _nan_torch_energy("warn", backward)
    with pytest.warns(tdeq.FixedPointWarning, match="non-finite.*NaN or inf weight"):
        out = model(x)
    assert torch.isnan(out).all() and not model.last_info.converged
    if backward != "unrolled":  # a NaN stops the solve at once
        assert model.last_info.iterations == 1


@pytest.mark.parametrize("solver", SOLVERS)
def test_torch_nan_parameter_of_a_generic_map(solver):
    c = torch.tensor([1.0, float("nan"), 1.0])
    with pytest.raises(tdeq.FixedPointError, match="non-finite"):
        tdeq.fixed_point(lambda z, c: 0.5 * z + c, torch.zeros(2, 3), (c,), solver=solver, on_nonconvergence="raise")


def test_jax_nan_weight_follows_the_policy():
    params = jdeq.deq_energy_init(jax.random.PRNGKey(0), 3, 4)
    params["weight"] = params["weight"].at[0, 1].set(jnp.nan)
    x = jnp.ones((2, 3))
    with pytest.raises(jdeq.FixedPointError, match="non-finite"):
        jdeq.deq_energy_apply(params, x, jdeq.deq_config(on_nonconvergence="raise"))
    with pytest.warns(jdeq.FixedPointWarning, match="non-finite.*NaN or inf weight"):
        out, info = jdeq.deq_energy_apply(params, x, jdeq.deq_config(on_nonconvergence="warn"), return_info=True)
    assert np.isnan(np.asarray(out)).all() and int(info.iterations) == 1


# ---------------------------------------------------------------------------------------
# A map that changes the shape / dtype of z (failed before: a broadcasting error, a JAX
# carry-type error)
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("backward", ["implicit", "phantom", "unrolled"])
@pytest.mark.parametrize("solver", SOLVERS)
def test_torch_map_changing_shape(backward, solver):
    z0 = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"'f' must map z to an array of the same shape.*\(2, 4\).*\(2, 3\)"):
        tdeq.fixed_point(lambda z: torch.cat([z, z[:, :1]], 1), z0, solver=solver, backward=backward)
    with pytest.raises(ValueError, match="'f' must map z to an array of the same shape"):
        tdeq.fixed_point(lambda z: z.sum(-1), z0, solver=solver, backward=backward)
    with pytest.raises(TypeError, match="'f' must map z to an array of the same dtype"):
        tdeq.fixed_point(lambda z: 0.5 * z.double(), z0, solver=solver, backward=backward)
    with pytest.raises(TypeError, match="'f' must return a torch.Tensor"):
        tdeq.fixed_point(lambda z: 1.0, z0, solver=solver, backward=backward)


@pytest.mark.parametrize("backward", ["implicit", "phantom", "unrolled"])
@pytest.mark.parametrize("solver", SOLVERS)
def test_jax_map_changing_shape(backward, solver):
    z0 = jnp.zeros((2, 3))
    with pytest.raises(ValueError, match=r"'f' must map z to an array of the same shape.*\(2, 4\).*\(2, 3\)"):
        jdeq.fixed_point(lambda z, p: jnp.concatenate([z, z[:, :1]], 1), z0, solver=solver, backward=backward)
    with pytest.raises(ValueError, match="'f' must map z to an array of the same shape"):
        jdeq.fixed_point(lambda z, p: z.sum(-1), z0, solver=solver, backward=backward)
    with pytest.raises(TypeError, match="'f' must map z to an array of the same dtype"):
        jdeq.fixed_point(lambda z, p: (0.5 * z).astype(jnp.float16), z0, solver=solver, backward=backward)


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


# ---------------------------------------------------------------------------------------
# pickle / deepcopy / torch.save (failed before for the torch modules: a local lambda)
# ---------------------------------------------------------------------------------------


def _torch_modules():
    from ppl_score.pyro import deq as pdeq

    torch.manual_seed(0)
    return {
        "DEQEnergy": tdeq.DEQEnergy(3, 4, quadratic=0.5),
        "DEQScore": tdeq.DEQScore(3, 4, activation="tanh"),
        "pyro.DEQEnergy": pdeq.DEQEnergy(3, 4, quadratic=0.5),
        "pyro.DEQScore": pdeq.DEQScore(3, 4),
    }


def _torch_save_load(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.mark.parametrize("name", ["DEQEnergy", "DEQScore", "pyro.DEQEnergy", "pyro.DEQScore"])
def test_torch_modules_pickle_deepcopy_and_save(name):
    module = _torch_modules()[name]
    x = torch.randn(2, 3)

    def values(m):
        xg = x.clone().requires_grad_(True)
        out = m(xg)
        (g,) = torch.autograd.grad(out.sum(), xg)  # the implicit backward works after a copy
        return out.detach(), g

    ref = values(module)
    module(x)  # last_info is set: it travels with the module
    for copy_of in (lambda m: pickle.loads(pickle.dumps(m)), copy.deepcopy, _torch_save_load):
        clone = copy_of(module)
        assert type(clone) is type(module)
        for a, b in zip(values(clone), ref):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_jax_objects_pickle_and_deepcopy():
    from ppl_score.numpyro import deq as ndeq

    cfg = jdeq.deq_config(gamma=0.7, solver="iteration", tol=1e-5)
    x = jnp.ones((2, 3))
    pairs = {"energy": ndeq.deq_energy(4, quadratic=0.5), "score": ndeq.deq_score(4)}
    inits = {k: pair[0](jax.random.PRNGKey(1), (2, 3)) for k, pair in pairs.items()}
    params = inits["energy"][1]  # = deq_energy_init(key, 3, 4)
    energy = jax.jit(jdeq.deq_energy_apply, static_argnums=(2, 3, 4))  # one compilation for all copies
    out, info = energy(params, x, cfg, 0.0, True)
    for copy_of in (lambda o: pickle.loads(pickle.dumps(o)), copy.deepcopy):
        assert copy_of(cfg) == cfg and copy_of(jdeq.SolverConfig()) == jdeq.SolverConfig()
        c_params, c_cfg, c_info = copy_of((params, cfg, info))
        np.testing.assert_array_equal(np.asarray(energy(c_params, x, c_cfg, 0.0, False)), np.asarray(out))
        assert int(c_info.iterations) == int(info.iterations)
        # the stax-style pairs of the NumPyro front end (closures before)
        for kind, pair in pairs.items():
            init_fn, apply_fn = copy_of(pair)
            p = inits[kind][1]
            if copy_of is copy.deepcopy:  # eager inits and solves are slow: one of each per copy kind
                np.testing.assert_array_equal(np.asarray(apply_fn(p, x)), np.asarray(pair[1](p, x)))
            else:
                out_shape, c_p = init_fn(jax.random.PRNGKey(1), (2, 3))
                assert tuple(out_shape) == tuple(inits[kind][0])
                jax.tree_util.tree_map(np.testing.assert_array_equal, c_p, p)


# ---------------------------------------------------------------------------------------
# The front ends: the same behaviour through ppl_score.pyro / ppl_score.numpyro
# ---------------------------------------------------------------------------------------


def test_pyro_front_end_nan_weight_and_float32():
    from ppl_score.pyro import deq as pdeq

    torch.manual_seed(1)
    # Anderson (no longer the default): the float32 case that returned NaN before
    model = pdeq.DEQEnergy(3, 2, gamma=0.9, solver="anderson", tol=1e-6, on_nonconvergence="raise").float()
    x = torch.randn(16, 3, generator=torch.Generator().manual_seed(1)) * 2
    assert torch.isfinite(model(x)).all() and model.last_info.converged
    with torch.no_grad():
        model.deq.weight[0, 0] = float("nan")
    with pytest.raises(tdeq.FixedPointError, match="non-finite"):
        model(x)


def test_numpyro_front_end_nan_weight_and_float32():
    from ppl_score.numpyro import deq as ndeq

    init_fn, apply_fn = ndeq.deq_energy(
        2, dtype=jnp.float32, gamma=0.9, solver="anderson", tol=1e-6, on_nonconvergence="raise"
    )
    _, params = init_fn(jax.random.PRNGKey(0), (16, 3))
    x = jax.random.normal(jax.random.PRNGKey(1), (16, 3), jnp.float32) * 2
    assert np.isfinite(np.asarray(apply_fn(params, x))).all()
    params["weight"] = params["weight"].at[0, 0].set(jnp.nan)
    with pytest.raises(jdeq.FixedPointError, match="non-finite"):
        apply_fn(params, x)
