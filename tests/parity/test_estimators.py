"""The score estimators across backends: the kernel estimators agree to round-off, and the
learned estimators validate their arguments alike."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

from ppl_score.jax import estimators as je  # noqa: E402
from ppl_score.torch import estimators as te  # noqa: E402
from tests.helpers.estimators import JaxEst, TorchEst

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("fname", ["stein_scores", "spectral_scores"])
@pytest.mark.parametrize("with_at", [False, True])
@pytest.mark.parametrize("bandwidth", [None, 0.8])
def test_backend_parity(rng, fname, with_at, bandwidth):
    x = rng.normal(size=(60, 4)) @ rng.normal(size=(4, 4))
    at = rng.normal(size=(7, 4)) if with_at else None
    t = TorchEst().call(fname, x, at, bandwidth=bandwidth)
    j = JaxEst().call(fname, x, at, bandwidth=bandwidth)
    np.testing.assert_allclose(t, j, rtol=1e-6, atol=1e-10)


def test_learned_validation():
    with pytest.raises(ValueError, match="'method'"):
        te.LearnedScoreEstimator(2, method="esm")
    with pytest.raises(ValueError, match="'method'"):
        je.learned_score_estimator(2, method="ssm")
    with pytest.raises(ValueError, match="unknown option"):
        te.LearnedScoreEstimator(2, method="dsm", eps=0.1)
    with pytest.raises(ValueError, match="'sigma'"):
        je.learned_score_estimator(2, method="dsm", sigma=-1.0)
    with pytest.raises(ValueError, match="'dim'"):
        te.LearnedScoreEstimator(0)
    est = te.LearnedScoreEstimator(2, context_dim=1, hidden=(8,))
    with pytest.raises(ValueError, match="'context'.*required"):
        est.update(torch.randn(5, 2))
    with pytest.raises(ValueError, match="'samples'.*\\[N, 2\\]"):
        est.update(torch.randn(5, 3), torch.randn(5, 1))
    with pytest.raises(ValueError, match="'context'.*\\[5, 1\\]"):
        est(torch.randn(5, 2), torch.randn(4, 1))
    with pytest.raises(ValueError, match="non-finite"):
        est.update(torch.full((5, 2), float("nan")), torch.randn(5, 1))
    jest = je.learned_score_estimator(2, hidden=(8,))
    st = jest.init(jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="'context'.*unconditional"):
        jest.apply(st.params, jnp.zeros((3, 2)), jnp.zeros((3, 1)))
    with pytest.raises(ValueError, match="non-finite"):
        jest.update(st, jax.random.PRNGKey(0), jnp.full((3, 2), jnp.nan))
