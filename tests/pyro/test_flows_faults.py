"""The torch flow and the Pyro transform and MLE survive ``pickle``, ``copy.deepcopy`` and ``torch.save`` (issue 10, item 5)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from ppl_score.torch.flows import InvertibleMLP as TorchFlow  # noqa: E402
from tests.helpers.flows_faults import COPIES, D, _pair
from tests.helpers.shared import _torch_save_load

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("how", ["pickle", "deepcopy", "torch.save"])
def test_torch_and_pyro_flow_objects_survive_copies(how):
    import pyro.distributions as dist

    from ppl_score.pyro.flows import InvertibleMLPTransform, RelativeGradientMLE

    copy_of = COPIES.get(how, _torch_save_load)
    tflow, _, _ = _pair()
    x = torch.from_numpy(np.random.default_rng(2).normal(size=(4, D)))
    clone = copy_of(tflow)
    assert type(clone) is TorchFlow and clone.extra_repr() == tflow.extra_repr()
    torch.testing.assert_close(clone.log_prob(x), tflow.log_prob(x), rtol=0, atol=0)
    torch.testing.assert_close(clone.inverse(x), tflow.inverse(x), rtol=0, atol=0)
    # the copy owns its parameters
    with torch.no_grad():
        clone.weights[0].mul_(2.0)
    assert not torch.equal(clone.weights[0], tflow.weights[0])

    transform = InvertibleMLPTransform(flow=_pair()[0], max_iter=50)
    t_clone = copy_of(transform)
    assert type(t_clone) is InvertibleMLPTransform and t_clone.inverse_kwargs == {"max_iter": 50}
    base = dist.Normal(torch.zeros(D, dtype=torch.float64), 1.0).to_event(1)
    lp = dist.TransformedDistribution(base, [transform]).log_prob(x)
    torch.testing.assert_close(dist.TransformedDistribution(base, [t_clone]).log_prob(x), lp, rtol=0, atol=0)
    torch.testing.assert_close(t_clone(x), transform(x), rtol=0, atol=0)
    if how != "torch.save":
        assert isinstance(copy_of(RelativeGradientMLE()), RelativeGradientMLE)
