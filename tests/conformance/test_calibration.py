"""The backends' sandwich (``ppl_score.{torch,jax}.calibration``) reject bad inputs with the
same errors, one body run per backend."""

from __future__ import annotations

import numpy as np
import pytest

from tests.helpers.calibration import _gamma_fn_jax, _gamma_fn_torch, gamma_data, tc_tensor

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("name", ["torch", "jax"])
def test_backend_errors(name):
    pytest.importorskip(name)
    import importlib

    be = importlib.import_module(f"ppl_score.{name}.calibration")
    arr = tc_tensor if name == "torch" else (lambda a: __import__("jax.numpy").numpy.asarray(a, dtype="float64"))
    x = gamma_data(n=10)
    fn = _gamma_fn_torch(x) if name == "torch" else _gamma_fn_jax(x)
    eye = arr(np.eye(2))
    with pytest.raises(ValueError, match="'rule'"):
        be.sandwich_beta(eye, eye, rule="det")
    with pytest.raises(TypeError, match="'rule'"):
        be.sandwich_beta(eye, eye, rule=1)
    with pytest.raises(ValueError, match="'meat'"):
        be.sandwich_beta(eye, arr(np.eye(3)))
    with pytest.raises(ValueError, match="'hessian'"):
        be.sandwich_beta(arr(np.ones(3)), arr(np.ones(3)))
    with pytest.raises(ValueError, match="not positive definite"):
        be.sandwich_beta(arr(np.diag([1.0, -1.0])), eye)
    with pytest.raises(ValueError, match="singular"):
        be.sandwich_beta(eye, arr(np.diag([1.0, 0.0])))
    assert float(be.sandwich_beta(eye, arr(np.diag([1.0, 0.0])), rule="magnitude")) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="'z'"):
        be.sandwich(fn, arr(np.ones((1, 1))))
    with pytest.raises(ValueError, match="do not depend"):
        be.sandwich(lambda z: arr(np.ones(5)) + 0.0 * z.sum(), arr([1.0]))
    with pytest.raises(ValueError, match="'fn'"):
        be.sandwich(lambda z: z * arr(np.ones((3, 1))), arr([1.0]))
    with pytest.raises(ValueError, match="at least 2"):
        be.sandwich(lambda z: z**2, arr([1.0]))
