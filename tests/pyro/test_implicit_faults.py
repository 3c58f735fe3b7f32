"""``ppl_score.pyro.ImplicitELBO`` survives ``pickle``, ``copy.deepcopy`` and ``torch.save`` (issue 10, item 5)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pyro = pytest.importorskip("pyro")
import pyro.distributions as pdist  # noqa: E402

from ppl_score.pyro.implicit import ImplicitELBO as PImplicitELBO  # noqa: E402
from ppl_score.torch import estimators as te  # noqa: E402
from tests.helpers.estimators import _torch_roundtrips


def _pyro_pair():
    def model():
        pyro.sample("z", pdist.Normal(torch.zeros(2, dtype=torch.float64), 1.0).to_event(1))

    def guide():
        eps = torch.as_tensor([[0.3, -0.2], [-0.5, 0.9], [1.0, 0.1]], dtype=torch.float64)
        guide.i = (getattr(guide, "i", -1) + 1) % 3
        pyro.sample("z", pdist.Delta(pyro.param("m", torch.zeros(2, dtype=torch.float64)) + eps[guide.i], event_dim=1))

    return model, guide


def test_pyro_implicit_elbo_roundtrips():
    model, guide = _pyro_pair()
    for est in ("stein", te.LearnedScoreEstimator(2, hidden=(4,), dtype=torch.float64)):
        pyro.clear_param_store()
        elbo = PImplicitELBO(est, num_particles=3, update_estimator=False)
        want = elbo.loss(model, guide)
        elbo.loss_and_grads(model, guide)
        for other in _torch_roundtrips(elbo):
            guide.i = -1
            assert other.loss(model, guide) == pytest.approx(want, rel=1e-12)
            guide.i = -1
            other.loss_and_grads(model, guide)
    pyro.clear_param_store()
