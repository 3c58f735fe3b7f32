"""``ppl_score.pyro.WAE`` decreases its reconstruction term and the divergence of the codes from
the prior (score and MMD regularizers; codes start far from the prior: the encoder's output
bias is 3)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pyro = pytest.importorskip("pyro")
import pyro.distributions as pdist  # noqa: E402

from ppl_score.pyro.wae import WAE as PWAE  # noqa: E402
from ppl_score.torch.estimators import LearnedScoreEstimator  # noqa: E402
from tests.helpers.implicit import WAE_CASES, X_WAE, _check_wae

pytestmark = pytest.mark.usefixtures("one_torch_thread", "pyro_param_store")


@pytest.mark.parametrize("regularizer,estimator", WAE_CASES)
def test_pyro_wae_decreases_both_terms(regularizer, estimator):
    from torch import nn

    torch.manual_seed(0)
    x_all = torch.as_tensor(X_WAE)
    enc = nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 2))
    with torch.no_grad():
        enc[2].bias.fill_(3.0)
    dec = nn.Sequential(nn.Linear(2, 32), nn.Tanh(), nn.Linear(32, 6))

    def model(x):
        pyro.module("dec", dec)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", pdist.Normal(torch.zeros(2), 1.0).to_event(1))
            pyro.sample("x", pdist.Normal(dec(z), 0.1).to_event(1), obs=x)

    def guide(x):
        pyro.module("enc", enc)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", pdist.Delta(enc(x), event_dim=1))

    if estimator == "learned":
        estimator = LearnedScoreEstimator(2, hidden=(32, 32), lr=5e-3, n_steps=1)
    loss = PWAE(regularizer, lam=10.0, estimator=estimator, reconstruction="squared_error")
    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 3e-3}), loss)
    before = loss.terms(model, guide, x_all[:256])
    g = torch.Generator().manual_seed(1)
    for _ in range(300):
        svi.step(x_all[torch.randint(0, 512, (128,), generator=g)])
    after = loss.terms(model, guide, x_all[:256])
    _check_wae(before, after, not isinstance(estimator, str))
    assert np.isfinite(svi.evaluate_loss(x_all[:128]))
