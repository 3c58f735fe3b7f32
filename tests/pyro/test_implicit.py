"""``ppl_score.pyro.ImplicitELBO``.

* The exact-score identity: with ``grad_z log q`` itself in place of the estimator, the
  implicit gradient is ``Trace_ELBO``'s for a reparameterized Gaussian guide, up to the
  zero-mean score-function term ``mean_p grad_phi log q_phi(z_p)|_{z_p}`` (computed here
  in closed form by autodiff); with noise whose sample mean is 0 and second moment 1 that
  term vanishes and the gradients are equal.
* An implicit guide ``z = mu + L eps`` on a conjugate Gaussian model recovers the exact
  posterior mean and covariance (kernel and learned estimators).
* An amortized guide with a context-conditioned learned estimator.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pyro = pytest.importorskip("pyro")
import pyro.distributions as pdist  # noqa: E402

from ppl_score.pyro.implicit import ImplicitELBO as PImplicitELBO  # noqa: E402
from ppl_score.torch.estimators import LearnedScoreEstimator  # noqa: E402
from tests.helpers.implicit import S2, X_CONJ, X_LOCAL, X_OBS, A, D, P, _check_amortized, _check_posterior

pytestmark = pytest.mark.usefixtures("one_torch_thread", "pyro_param_store")


def _pyro_model(x):
    z = pyro.sample("z", pdist.Normal(torch.zeros(D, dtype=x.dtype), 1.5).to_event(1))
    with pyro.plate("data", x.shape[0]):
        # non-linear likelihood: the gradient identity does not rely on conjugacy
        pyro.sample("x", pdist.Normal(torch.tanh(z) + 0.3 * z, 0.7).to_event(1), obs=x)


class _FixedNoiseNormal(pdist.Normal):
    """``rsample = loc + scale * eps`` with a given ``eps`` (to pair Trace_ELBO's draws with
    the implicit guide's)."""

    def __init__(self, loc, scale, eps):
        super().__init__(loc, scale)
        self._eps = eps

    def rsample(self, sample_shape=torch.Size()):
        return self.loc + self.scale * self._eps


def _pyro_grads(loss, guide_kind, eps_rows, x):
    pyro.clear_param_store()
    rows = iter(eps_rows)

    def guide(x):
        loc = pyro.param("loc", torch.tensor([0.2, -0.1, 0.4], dtype=torch.float64))
        scale = pyro.param(
            "scale", torch.tensor([0.8, 1.3, 0.6], dtype=torch.float64), constraint=pdist.constraints.positive
        )
        eps = next(rows)
        if guide_kind == "implicit":
            pyro.sample("z", pdist.Delta(loc + scale * eps, event_dim=1))
        else:
            pyro.sample("z", _FixedNoiseNormal(loc, scale, eps).to_event(1))

    loss.loss_and_grads(_pyro_model, guide, x)
    params = pyro.get_param_store()
    out = {name: params.get_param(name).unconstrained().grad.clone() for name in ("loc", "scale")}
    return out, dict(loc=params["loc"].detach(), scale=params["scale"].detach())


def _exact_score(z, context):
    loc, scale = pyro.param("loc").detach(), pyro.param("scale").detach()
    return -(z - loc) / scale**2


@pytest.mark.parametrize("standardize", [True, False])
def test_pyro_exact_score_gradient_equals_trace_elbo(standardize):
    x = torch.as_tensor(X_OBS)
    eps = torch.as_tensor(np.random.default_rng(3).normal(size=(P, D)))
    if standardize:  # sample mean 0, sample second moment 1 per coordinate
        eps = eps - eps.mean(0)
        eps = eps / eps.pow(2).mean(0).sqrt()
    g_imp, values = _pyro_grads(PImplicitELBO(_exact_score, num_particles=P), "implicit", eps, x)
    g_tr, _ = _pyro_grads(pyro.infer.Trace_ELBO(num_particles=P), "normal", eps, x)
    # the zero-mean term: mean_p grad_phi log N(z_p; loc, scale) at fixed z_p, in the
    # unconstrained coordinates of the param store (log scale)
    loc = values["loc"].clone().requires_grad_(True)
    log_scale = values["scale"].log().clone().requires_grad_(True)
    z = values["loc"] + values["scale"] * eps
    lq = pdist.Normal(loc, log_scale.exp()).log_prob(z).sum() / P
    c_loc, c_log_scale = torch.autograd.grad(lq, [loc, log_scale])
    # loss = -ELBO: implicit = trace - c
    torch.testing.assert_close(g_imp["loc"], g_tr["loc"] - c_loc, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_imp["scale"], g_tr["scale"] - c_log_scale, rtol=1e-10, atol=1e-12)
    if standardize:
        torch.testing.assert_close(g_imp["loc"], g_tr["loc"], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(g_imp["scale"], g_tr["scale"], rtol=1e-10, atol=1e-12)
    else:
        assert c_log_scale.abs().max() > 1e-3  # the term the identity accounts for is there


def test_pyro_implicit_loss_value_and_module_route():
    """``loss`` is the negative ELBO without the implicit entropy; the ``ELBOModule`` route
    (``differentiable_loss``) gives the same value and the same gradients as ``loss_and_grads``."""
    x = torch.as_tensor(X_OBS)
    eps = torch.as_tensor(np.random.default_rng(4).normal(size=(P, D)))

    def guide(x):
        loc = pyro.param("loc", torch.zeros(D, dtype=torch.float64))
        pyro.sample("z", pdist.Delta(loc + eps[guide.i % P], event_dim=1))
        guide.i += 1

    guide.i = 0
    elbo = PImplicitELBO("stein", num_particles=P)
    value = elbo.loss(_pyro_model, guide, x)
    loc = pyro.param("loc").detach()
    want = -np.mean(
        [
            (
                pdist.Normal(torch.zeros(D, dtype=torch.float64), 1.5).log_prob(loc + e).sum()
                + pdist.Normal(torch.tanh(loc + e) + 0.3 * (loc + e), 0.7).log_prob(x).sum()
            ).item()
            for e in eps
        ]
    )
    np.testing.assert_allclose(value, want, rtol=1e-12)
    guide.i = 0
    pyro.clear_param_store()
    v1 = elbo.loss_and_grads(_pyro_model, guide, x)
    g1 = pyro.get_param_store().get_param("loc").grad.clone()
    guide.i = 0
    pyro.clear_param_store()
    v2 = elbo(_pyro_model, guide)(x)
    v2.backward()
    g2 = pyro.get_param_store().get_param("loc").grad
    np.testing.assert_allclose(v1, v2.item(), rtol=1e-12)
    torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(v1, want, rtol=1e-12)


def _pyro_conjugate(loss, steps):
    torch.manual_seed(0)
    a, x = torch.as_tensor(A, dtype=torch.float32), torch.as_tensor(X_CONJ, dtype=torch.float32)

    def model(x):
        z = pyro.sample("z", pdist.Normal(torch.zeros(2), 1.0).to_event(1))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", pdist.Normal(z @ a.T, 1.0).to_event(1), obs=x)

    def guide(x):
        mu = pyro.param("mu", torch.zeros(2))
        L = pyro.param("L", torch.eye(2))
        eps = pyro.sample("eps", pdist.Normal(torch.zeros(2), 1.0).to_event(1), infer={"is_auxiliary": True})
        pyro.sample("z", pdist.Delta(mu + eps @ torch.tril(L).T, event_dim=1))

    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 0.02}), loss)
    for _ in range(steps):
        svi.step(x)
    mu, L = pyro.param("mu").detach(), torch.tril(pyro.param("L").detach())
    return mu.numpy(), (L @ L.T).numpy()


def test_pyro_conjugate_posterior_stein():
    _check_posterior(*_pyro_conjugate(PImplicitELBO("stein", num_particles=32, vectorize_particles=True), 400))


def test_pyro_conjugate_posterior_learned():
    torch.manual_seed(1)
    est = LearnedScoreEstimator(2, hidden=(32, 32), lr=1e-2, n_steps=3)
    _check_posterior(*_pyro_conjugate(PImplicitELBO(est, num_particles=128, vectorize_particles=True), 400))


def test_pyro_amortized_learned_with_context():
    torch.manual_seed(0)
    x = torch.as_tensor(X_LOCAL, dtype=torch.float32)

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", pdist.Normal(torch.zeros(1), 1.0).to_event(1))
            pyro.sample("x", pdist.Normal(z, S2**0.5).to_event(1), obs=x)

    def guide(x):
        a, b = pyro.param("a", torch.tensor(0.0)), pyro.param("b", torch.tensor(0.5))
        s = pyro.param("s", torch.tensor(1.0), constraint=pdist.constraints.positive)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", pdist.Delta(a * x + b + s * torch.randn_like(x), event_dim=1))

    est = LearnedScoreEstimator(1, context_dim=1, hidden=(32, 32), lr=1e-2, n_steps=2)
    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 0.02}), PImplicitELBO(est, context=lambda x: x))
    for _ in range(300):
        svi.step(x)
    _check_amortized(pyro.param("a").item(), pyro.param("b").item(), pyro.param("s").item())
