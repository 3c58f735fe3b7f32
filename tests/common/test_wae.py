"""``wae_terms`` (``ppl_score.common.wae``) runs on plain numpy: it needs neither torch nor
JAX (issue 11); its MMD agrees with the torch backend's ``imq_mmd2`` on the same numbers."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from ppl_score.common import wae  # noqa: E402
from ppl_score.torch import mmd as tmmd  # noqa: E402
from tests.helpers.wae import W, X

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class _NumpyNormal:
    """A standard normal prior written with numpy only."""

    has_rsample = True
    event_shape = (2,)
    variance = np.ones(2)

    def log_prob(self, z):
        return -0.5 * (z**2).sum(-1) - np.log(2 * np.pi)


class _NumpyObs:
    has_rsample = False
    event_shape = (3,)

    def __init__(self, mean):
        self.mean = mean

    def log_prob(self, x):
        return -0.5 * ((x - self.mean) ** 2).sum(-1)


def test_wae_terms_is_framework_free():
    """``wae_terms`` on numpy arrays and duck-typed distributions, with a numpy backend."""
    codes = np.tanh(X @ W)
    draws = np.random.default_rng(2).normal(size=codes.shape)
    delta = SimpleNamespace(has_rsample=True, event_shape=(2,))
    guide = {"z": {"type": "sample", "is_observed": False, "fn": delta, "value": codes}}
    model = {
        "z": {"type": "sample", "is_observed": False, "fn": _NumpyNormal(), "value": codes},
        "x": {"type": "sample", "is_observed": True, "fn": _NumpyObs(codes @ W.T), "value": X},
    }

    def np_mmd2(x, y, c, scales):
        k = lambda a, b: sum(c * s / (c * s + ((a[:, None] - b[None]) ** 2).sum(-1)) for s in scales)  # noqa: E731
        kxx, kyy = k(x, x), k(y, y)
        n, m = len(x), len(y)
        return (
            (kxx.sum() - np.trace(kxx)) / (n * (n - 1))
            + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
            - 2 * k(x, y).mean()
        )

    backend = SimpleNamespace(
        stop_gradient=lambda a: a, imq_mmd2=np_mmd2, imq_constant=lambda fn, d: 2.0 * d.shape[1] * fn.variance.mean()
    )
    common = dict(
        sites=None,
        reconstruction="squared_error",
        mmd_scales=(1.0,),
        backend=backend,
        draw=lambda prior, i, c: draws,
        scores=lambda name, i, c: -c,
        check_scores=lambda name, s: None,
    )
    t = wae.wae_terms(model, guide, regularizer="mmd", **common)
    assert t["names"] == ["z"]
    np.testing.assert_allclose(t["reconstruction"], ((X - codes @ W.T) ** 2).sum() / 6, rtol=1e-12)
    np.testing.assert_allclose(t["divergence"], np_mmd2(codes, draws, 4.0, (1.0,)), rtol=1e-12)
    np.testing.assert_allclose(t["mmd"], t["reported"], rtol=1e-12)
    # the same with the torch backend's imq_mmd2 on the same numbers
    np.testing.assert_allclose(
        float(tmmd.imq_mmd2(torch.as_tensor(codes), torch.as_tensor(draws), 4.0, (1.0,))), t["mmd"], rtol=1e-12
    )
    s = wae.wae_terms(model, guide, regularizer="score", **common)
    np.testing.assert_allclose(s["reported"], 0.5 * (codes**2).sum(1).mean() + np.log(2 * np.pi), rtol=1e-12)
