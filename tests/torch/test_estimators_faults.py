"""``ppl_score.torch.estimators`` under faults (issue 10): a learned-estimator step on
overflowing samples is refused, and the learned estimator survives ``pickle``,
``copy.deepcopy`` and ``torch.save`` and keeps computing."""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from ppl_score import validation_enabled  # noqa: E402
from ppl_score.torch import estimators as te  # noqa: E402
from tests.helpers.estimators import _torch_roundtrips

# --------------------------------------------------------------------------------------
# item 11: a learned-estimator step on overflowing samples is refused


@pytest.mark.filterwarnings("ignore::ppl_score.NonFiniteWarning")
def test_torch_learned_update_refuses_a_nonfinite_step():
    est = te.LearnedScoreEstimator(2, hidden=(8,), generator=torch.Generator().manual_seed(0))
    x = torch.as_tensor(np.random.default_rng(0).normal(size=(16, 2)), dtype=torch.float32)
    est.update(x)
    net = copy.deepcopy(est.net.state_dict())
    opt = copy.deepcopy(est.optimizer.state_dict())
    with pytest.raises(ValueError, match="'samples'.*refused"):
        est.update(x * 1e30)  # finite, but the network's loss overflows
    for k, v in est.net.state_dict().items():
        torch.testing.assert_close(v, net[k], rtol=0, atol=0)
    assert est.optimizer.state_dict()["state"][0]["step"] == opt["state"][0]["step"]
    with validation_enabled(False):
        value = est.update(x * 1e30)  # skipped, state unchanged, non-finite loss returned
    assert not np.isfinite(value)
    for k, v in est.net.state_dict().items():
        torch.testing.assert_close(v, net[k], rtol=0, atol=0)
    assert np.isfinite(est.update(x))


def test_torch_learned_estimator_roundtrips_and_keeps_computing():
    est = te.LearnedScoreEstimator(2, context_dim=1, hidden=(8,), generator=torch.Generator().manual_seed(0))
    x = torch.as_tensor(np.random.default_rng(0).normal(size=(16, 2)), dtype=torch.float32)
    c = torch.ones(16, 1)
    est.update(x, c)
    for other in _torch_roundtrips(est):
        torch.testing.assert_close(other(x, c), est(x, c), rtol=0, atol=0)
        # the optimizer and generator state came along: the next step is the same
        twin = copy.deepcopy(est)
        assert other.update(x, c) == twin.update(x, c)
        torch.testing.assert_close(other(x, c), twin(x, c), rtol=0, atol=0)
