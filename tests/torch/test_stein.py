"""``ppl_score.torch.stein``: what only the torch backend has (``torch.no_grad`` and
``torch.inference_mode``, autograd through the statistic, the ``generator``); the formulas,
calibration, power and errors are in ``tests/conformance/test_stein.py``."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from ppl_score.torch import KSDTest, ksd, ksd_test  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

F64 = torch.float64


def _data(n=20, d=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=F64)
    return x, -x + 0.2 * torch.randn(n, d, generator=g, dtype=F64)


@pytest.mark.parametrize("kernel", ["imq", "rbf"])
def test_no_grad_and_inference_mode(kernel):
    x, s = _data()
    ref = ksd(x, s, kernel=kernel)
    ref_test = ksd_test(x, s, kernel=kernel, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(ksd(x, s, kernel=kernel), ref)
    with torch.inference_mode():
        xi, si = x.clone(), s.clone()
        assert torch.equal(ksd(xi, si, kernel=kernel), ref)
        out = ksd_test(xi, si, kernel=kernel, generator=torch.Generator().manual_seed(1))
    assert isinstance(out, KSDTest) and out == ref_test


@pytest.mark.parametrize("kernel, bandwidth", [("imq", None), ("rbf", 0.9)])
def test_differentiable(kernel, bandwidth):
    x, s = _data(n=6)
    x.requires_grad_(True)
    s.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: ksd(a, b, kernel=kernel, bandwidth=bandwidth), (x, s))


def test_generator_and_inputs_untouched():
    x, s = _data()
    x0, s0 = x.clone(), s.clone()
    a = ksd_test(x, s, n_bootstrap=100, generator=torch.Generator().manual_seed(5))
    b = ksd_test(x, s, n_bootstrap=100, generator=torch.Generator().manual_seed(5))
    assert a == b
    assert torch.equal(x, x0) and torch.equal(s, s0)
    # integer multipliers are accepted; float32 and float64 inputs are promoted
    w = torch.randint(0, 2, (100, 20), generator=torch.Generator().manual_seed(5)) * 2 - 1
    out = ksd_test(x.float(), s, n_bootstrap=100, weights=w)
    assert out.statistic.dtype == F64 and out.p_value.dtype == F64
    with pytest.raises(TypeError, match="'generator'"):
        ksd_test(x, s, generator=5)
