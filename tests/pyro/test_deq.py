"""``ppl_score.pyro.deq``: the PyroModule DEQ energy as the ``Unnormalized`` energy of a model."""

from __future__ import annotations

import pytest

from tests.helpers.deq import TIGHT, B, D, H, _torch_energy


def test_pyro_module_in_model(tdeq, data):
    """The PyroModule energy equals the torch one, its weights are Pyro params, and as the
    ``Unnormalized`` energy of a model ``ScoreMatching("esm")`` gives ``B`` times the
    per-example ``esm`` of the plain module (SPEC.md section 3), with gradients reaching
    the tied weight."""
    pyro = pytest.importorskip("pyro")
    import torch

    from ppl_score.pyro import ScoreMatching, Unnormalized
    from ppl_score.pyro.deq import DEQEnergy
    from ppl_score.torch import score_matching_loss

    pyro.clear_param_store()
    torch.manual_seed(0)
    energy = DEQEnergy(D, H, quadratic=0.5, **TIGHT).double()
    plain = _torch_energy(tdeq)
    plain.load_state_dict(energy.state_dict())
    x = torch.tensor(data[0])
    assert torch.allclose(energy(x), plain(x))
    with pyro.poutine.trace(param_only=True) as tr:
        energy(x)
    assert {"deq.weight", "deq.inject.weight", "readout.weight"} <= set(tr.trace.nodes)

    def model(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", Unnormalized(energy, event_shape=(D,)), obs=x)

    loss = ScoreMatching("esm").differentiable_loss(model, lambda x: None, x)
    assert torch.allclose(loss, B * score_matching_loss(plain, x, "esm"), rtol=1e-9)
    loss.backward()
    grad = pyro.get_param_store().get_param("deq.weight").unconstrained().grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    pyro.clear_param_store()
