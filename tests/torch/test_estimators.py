"""``ppl_score.torch.estimators``: the batched kernel estimators and the learned estimator
(accuracy on a Gaussian, with a context, ``state_dict`` round trips and devices)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from ppl_score.torch import estimators as te  # noqa: E402
from tests.helpers.estimators import LEARNED_TOL, METHODS, _gaussian_data, _rel_fisher

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_torch_batched_matches_single(rng):
    xb = torch.as_tensor(rng.normal(size=(3, 20, 2)))
    for kind, f in (("stein", te.stein_scores), ("spectral", te.spectral_scores)):
        got = te.kernel_scores_batched(kind, xb)
        for b in range(3):
            torch.testing.assert_close(got[b], f(xb[b]), rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("method,opts", METHODS)
def test_learned_torch_accuracy(method, opts):
    torch.manual_seed(0)
    x = torch.as_tensor(_gaussian_data())
    est = te.LearnedScoreEstimator(
        2, hidden=(32, 32), method=method, lr=5e-3, generator=torch.Generator().manual_seed(1), **opts
    )
    losses = est.fit(x, n_steps=400, batch_size=128, generator=torch.Generator().manual_seed(2))
    assert np.mean(losses[-50:]) < np.mean(losses[:50])
    z = x[:500]
    with torch.no_grad():
        assert _rel_fisher(est(z).numpy(), z.numpy()) < LEARNED_TOL


def test_learned_conditional_torch():
    """With a context: q(z | c) = N(c a, 0.25 I); the network must use c."""
    torch.manual_seed(0)
    c = torch.randn(2000, 1)
    a = torch.tensor([1.0, -2.0])
    z = c * a + 0.5 * torch.randn(2000, 2)
    est = te.LearnedScoreEstimator(2, context_dim=1, hidden=(32, 32), lr=5e-3)
    est.fit(z, c, n_steps=500, batch_size=128)
    with torch.no_grad():
        s = -(z - c * a) / 0.25
        rel = (((est(z, c) - s) ** 2).sum(1).mean() / (s**2).sum(1).mean()).item()
    assert rel < 0.15


# --------------------------------------------------------------------------------------
# learned estimator state: save and restore (state_dict / load_state_dict), device


def _torch_twin(**kw):
    return te.LearnedScoreEstimator(2, context_dim=1, hidden=(8,), dtype=torch.float64, n_steps=2, **kw)


def test_torch_learned_state_dict_round_trip():
    """A fresh estimator loaded with another's state gives the same scores and takes the
    same next step (Adam's moments and step counts, and the generator, come along), also
    through torch.save / torch.load; the snapshot does not follow later updates."""
    import io

    x = torch.as_tensor(np.random.default_rng(0).normal(size=(16, 2)))
    c = torch.as_tensor(np.random.default_rng(1).normal(size=(16, 1)))
    torch.manual_seed(0)
    est = _torch_twin(generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        est.update(x, c)
    sd = est.state_dict()
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    for source in (sd, loaded):
        torch.manual_seed(1)  # other initial weights: everything must come from the state
        other = _torch_twin(generator=torch.Generator().manual_seed(5))
        before = {k: v.clone() for k, v in source["net"].items()}
        other.load_state_dict(source)
        assert other.dtype == torch.float64 and other.device == est.device
        torch.testing.assert_close(other(x, c), est(x, c), rtol=0, atol=0)
        twin = _torch_twin(generator=torch.Generator())
        twin.load_state_dict(sd)
        assert other.update(x, c) == twin.update(x, c)
        torch.testing.assert_close(other(x, c), twin(x, c), rtol=0, atol=0)
        for k, v in source["net"].items():  # the dict given was not modified
            torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    step_count = sd["optimizer"]["state"][0]["step"]
    assert float(step_count) == 6.0  # 3 updates of n_steps=2
    est.update(x, c)  # later updates do not change the snapshot
    assert float(sd["optimizer"]["state"][0]["step"]) == 6.0
    # a round trip through the estimator itself
    state = est.state_dict()
    est2 = _torch_twin(generator=torch.Generator())
    est2.load_state_dict(state)
    assert est.update(x, c) == est2.update(x, c)


def test_torch_learned_state_dict_validation_and_device():
    est = _torch_twin()
    with pytest.raises(TypeError, match="'state_dict'"):
        est.load_state_dict([1, 2])
    with pytest.raises(ValueError, match="'state_dict'.*keys"):
        est.load_state_dict({"net": {}})
    other = te.LearnedScoreEstimator(2, context_dim=1, hidden=(4,), dtype=torch.float64, n_steps=2)
    with pytest.raises(ValueError, match="'state_dict'.*network"):
        est.load_state_dict(other.state_dict())
    with pytest.raises(ValueError, match="'state_dict'.*generator"):
        est.load_state_dict(_torch_twin(generator=torch.Generator()).state_dict())
    with pytest.raises(TypeError, match="'device'"):
        est.to(3)
    x, c = torch.randn(6, 2, dtype=torch.float64), torch.randn(6, 1, dtype=torch.float64)
    est.update(x, c)
    assert est.to("cpu") is est and est.device == torch.device("cpu") and est.dtype == torch.float64
    assert est.optimizer.state[next(est.net.parameters())]["exp_avg"].dtype == torch.float64
    assert np.isfinite(est.update(x, c))
    # scores come back in the dtype and on the device of z
    assert est(x.float(), c.float()).dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_torch_learned_to_cuda_keeps_float64_and_optimizer_state():
    x, c = torch.randn(6, 2, dtype=torch.float64), torch.randn(6, 1, dtype=torch.float64)
    est = _torch_twin()
    est.update(x, c)
    ref = _torch_twin()
    ref.load_state_dict(est.state_dict())
    est.to("cuda")
    assert est.device.type == "cuda" and est.dtype == torch.float64
    assert est.optimizer.state[next(est.net.parameters())]["exp_avg"].device.type == "cuda"
    est.update(x.cuda(), c.cuda())
    ref.update(x, c)
    out = est(x.cuda(), c.cuda())
    assert out.device.type == "cuda"
    torch.testing.assert_close(out.cpu(), ref(x, c), rtol=1e-10, atol=1e-12)
    back = _torch_twin()
    back.load_state_dict(est.state_dict())  # a CUDA state loads onto a CPU estimator
    torch.testing.assert_close(back(x, c), ref(x, c), rtol=1e-10, atol=1e-12)
