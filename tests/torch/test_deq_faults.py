"""``ppl_score.torch.deq`` under faults (issue 10, items 5, 8, 9): Anderson on trivial
contractions in float32 and float64 (as fast as before), a NaN weight follows
``on_nonconvergence`` (never a linalg error from inside torch), and a map that changes the
shape or dtype of ``z`` is a clear error."""

from __future__ import annotations

import warnings

import pytest

torch = pytest.importorskip("torch")
from ppl_score.torch import deq as tdeq  # noqa: E402
from tests.helpers.deq import DTYPES, SOLVERS, _half_plus_one, _tdtype

pytestmark = pytest.mark.usefixtures("one_torch_thread")


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


# ---------------------------------------------------------------------------------------
# Convergence speed is unchanged (iteration counts measured before the change)
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,expected", [("float64", 13), ("float32", 9)])
def test_anderson_iteration_count(dtype, expected):
    """The width-5 layer of tests/torch/test_deq.py (float64: 13 iterations to 1e-11, as before;
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
