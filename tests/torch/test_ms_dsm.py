"""``ms_dsm`` in the modes torch users run it in: ``no_grad`` evaluation (same value),
``inference_mode`` (a clear error), float32, and the noise-conditional networks through
``torch.save`` / ``pickle``."""

from __future__ import annotations

import io
import pickle

import pytest

torch = pytest.importorskip("torch")

from ppl_score.torch import score_matching_loss  # noqa: E402
from ppl_score.torch.langevin import annealed_langevin  # noqa: E402
from ppl_score.torch.nets import NoiseConditionalEnergy, NoiseConditionalScore  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SIGMAS = (1.0, 0.3)


@pytest.mark.parametrize("kind", ["score", "log_prob"])
def test_no_grad_and_inference_mode(kind):
    torch.manual_seed(0)
    net = NoiseConditionalScore(3, (8,)) if kind == "score" else NoiseConditionalEnergy(3, (8,))
    x = torch.randn(4, 3)
    kw = dict(kind=kind, sigmas=SIGMAS)
    with_grad = score_matching_loss(net, x, "ms_dsm", generator=torch.Generator().manual_seed(1), **kw)
    with torch.no_grad():
        without = score_matching_loss(net, x, "ms_dsm", generator=torch.Generator().manual_seed(1), **kw)
    assert not without.requires_grad and torch.equal(without, with_grad.detach())
    if kind == "log_prob":  # the score of a log density needs autograd
        with torch.inference_mode(), pytest.raises(RuntimeError, match="inference"):
            score_matching_loss(net, x, "ms_dsm", **kw)


def test_networks_survive_a_checkpoint():
    torch.manual_seed(0)
    net = NoiseConditionalScore(3, (8,), condition_on_sigma=False, divide_by_sigma=True)
    buffer = io.BytesIO()
    torch.save(net, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    again = pickle.loads(pickle.dumps(net))
    x, sigma = torch.randn(2, 3), torch.tensor([1.0, 0.3])
    for copy in (loaded, again):
        assert copy.divide_by_sigma and not copy.condition_on_sigma
        torch.testing.assert_close(copy(x, sigma), net(x, sigma))
    # x0 is not modified by the sampler, and a scalar sigma broadcasts in the network
    x0 = torch.rand(5, 3)
    before = x0.clone()
    with torch.no_grad():
        out = annealed_langevin(net, x0, SIGMAS, 2, 1e-3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(x0, before) and out.samples.shape == (5, 3) and out.levels.shape == (2, 5, 3)
    assert net(x, 0.5).shape == x.shape


@pytest.mark.parametrize("cls", [NoiseConditionalScore, NoiseConditionalEnergy])
def test_networks_check_the_shape_of_sigma(cls):
    """One level for the batch or one per row; any other shape is a ``ValueError`` naming ``sigma``."""
    net = cls(3, (8,))
    x = torch.randn(6, 3)
    assert net(x, torch.tensor(0.5)).shape == net(x, torch.full((6,), 0.5)).shape == net(x, 0.5).shape
    torch.testing.assert_close(net(x, torch.tensor([0.5])), net(x, torch.full((6,), 0.5)))
    for bad in (torch.full((6, 1), 0.5), torch.full((5,), 0.5)):
        with pytest.raises(ValueError, match=r"'sigma'.*\[B\] = \[6\].*got shape"):
            net(x, bad)
