"""``ppl_score.torch.langevin`` in torch's grad modes (issue 10, item 1)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
from ppl_score.torch import langevin as tl  # noqa: E402
from tests.helpers.mcmc import X0, _torch_gauss

# --------------------------------------------------------------------------------------
# item 1: grad modes (torch)


@pytest.mark.parametrize("sampler", ["mala", "ula"])
def test_torch_sampler_same_under_no_grad(sampler):
    run = getattr(tl, sampler)
    x0 = torch.as_tensor(X0)
    a = run(_torch_gauss, x0, 0.3, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        b = run(_torch_gauss, x0, 0.3, 4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a.samples, b.samples, rtol=0, atol=0)
    torch.testing.assert_close(a.accept_rate, b.accept_rate, rtol=0, atol=0)


@pytest.mark.parametrize("sampler", ["mala", "ula"])
def test_torch_sampler_under_inference_mode_is_a_clear_error(sampler):
    run = getattr(tl, sampler)
    with torch.inference_mode():
        x0 = torch.as_tensor(X0)
        with pytest.raises(RuntimeError, match=r"inference_mode.*no_grad"):
            run(_torch_gauss, x0, 0.3, 2)
    # a score network needs no autograd: ULA on kind="score" runs under inference_mode
    with torch.inference_mode():
        out = tl.ula(lambda x: -x, x0, 0.3, 2, kind="score")
    assert out.samples.shape == (2, 3, 2)
    # an inference tensor made earlier is a valid start outside inference_mode
    out = run(_torch_gauss, x0, 0.3, 2)
    assert torch.isfinite(out.samples).all()
