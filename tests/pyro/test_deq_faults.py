"""``ppl_score.pyro.deq`` and the torch DEQ modules under faults (issue 10): a NaN weight and
float32 through the front end, and every module survives ``pickle``, ``copy.deepcopy`` and
``torch.save``."""

from __future__ import annotations

import copy
import pickle

import pytest

torch = pytest.importorskip("torch")
from ppl_score.torch import deq as tdeq  # noqa: E402
from tests.helpers.shared import _torch_save_load

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _torch_modules():
    from ppl_score.pyro import deq as pdeq

    torch.manual_seed(0)
    return {
        "DEQEnergy": tdeq.DEQEnergy(3, 4, quadratic=0.5),
        "DEQScore": tdeq.DEQScore(3, 4, activation="tanh"),
        "pyro.DEQEnergy": pdeq.DEQEnergy(3, 4, quadratic=0.5),
        "pyro.DEQScore": pdeq.DEQScore(3, 4),
    }


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
