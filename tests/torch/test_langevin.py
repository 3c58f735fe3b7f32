"""``ppl_score.torch.langevin`` leaves its inputs alone and gives parameters no gradients."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_torch_inputs_untouched_and_no_param_grads():
    torch = pytest.importorskip("torch")
    from ppl_score.torch.langevin import mala

    w = torch.nn.Parameter(torch.tensor(1.0, dtype=torch.float64))
    fn = lambda x: -0.5 * w * (x * x).sum(-1)  # noqa: E731
    x0 = torch.zeros(4, 2, dtype=torch.float64)
    before = x0.clone()
    with torch.no_grad():  # the sampler turns grad on for x only
        out = mala(fn, x0, 0.5, 3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(x0, before) and w.grad is None and not out.samples.requires_grad
