"""``ppl_score.jax.deq`` under faults (issue 10): Anderson on trivial contractions in float32
and float64 (eagerly and under jit), a NaN weight follows ``on_nonconvergence``, and a map
that changes the shape or dtype of ``z`` is a clear error."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

from ppl_score.jax import deq as jdeq  # noqa: E402
from tests.helpers.deq import DTYPES, SOLVERS, _half_plus_one, _jdtype

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


def test_jax_nan_weight_follows_the_policy():
    params = jdeq.deq_energy_init(jax.random.PRNGKey(0), 3, 4)
    params["weight"] = params["weight"].at[0, 1].set(jnp.nan)
    x = jnp.ones((2, 3))
    with pytest.raises(jdeq.FixedPointError, match="non-finite"):
        jdeq.deq_energy_apply(params, x, jdeq.deq_config(on_nonconvergence="raise"))
    with pytest.warns(jdeq.FixedPointWarning, match="non-finite.*NaN or inf weight"):
        out, info = jdeq.deq_energy_apply(params, x, jdeq.deq_config(on_nonconvergence="warn"), return_info=True)
    assert np.isnan(np.asarray(out)).all() and int(info.iterations) == 1


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
