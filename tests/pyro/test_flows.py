"""``ppl_score.pyro.flows`` (issue 6), float64: the transform in a ``TransformedDistribution``,
the relative-gradient MLE's gradients and value (subsampled), SVI reducing the NLL, and its
errors."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from tests.helpers.flows import F64, D, data, gaussian_data, make_torch_flow

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ----------------------------------------------------------------------------------------
# Pyro
# ----------------------------------------------------------------------------------------


def pyro_model_and_flow(seed=0, n_layers=2):
    import pyro
    import pyro.distributions as dist

    from ppl_score.pyro.flows import InvertibleMLPTransform

    transform = InvertibleMLPTransform(flow=make_torch_flow(dim=2, n_layers=n_layers, seed=seed))

    def model(x, subsample=None):
        pyro.module("flow", transform)
        base = dist.Normal(torch.zeros(2, dtype=F64), 1.0).to_event(1)
        with pyro.plate("data", x.shape[0] if subsample is None else 2000, subsample=subsample):
            pyro.sample("x", dist.TransformedDistribution(base, [transform]), obs=x)

    return model, (lambda x, subsample=None: None), transform


def test_pyro_transform_in_transformed_distribution():
    import pyro.distributions as dist

    from ppl_score.pyro.flows import InvertibleMLPTransform

    tflow = make_torch_flow()
    transform = InvertibleMLPTransform(flow=tflow)
    base = dist.Normal(torch.zeros(D, dtype=F64), 1.0).to_event(1)
    d = dist.TransformedDistribution(base, [transform])
    x = torch.as_tensor(data())
    np.testing.assert_allclose(d.log_prob(x).detach().numpy(), tflow.log_prob(x).detach().numpy(), rtol=1e-12)
    s = d.rsample((5,))
    assert s.shape == (5, D)
    np.testing.assert_allclose(transform.inv(s).detach().numpy(), tflow(s).detach().numpy())
    s.sum().backward()  # sampling is reparameterized in the flow's parameters
    assert all(torch.isfinite(w.grad).all() for w in tflow.weights)
    with pytest.raises(ValueError, match="'dim'"):
        InvertibleMLPTransform()
    with pytest.raises(TypeError, match="'flow'"):
        InvertibleMLPTransform(flow=torch.nn.Linear(2, 2))


def test_pyro_relative_gradient_mle_grads_and_loss_value():
    import pyro
    from pyro.infer import Trace_ELBO

    from ppl_score.pyro.flows import RelativeGradientMLE

    pyro.clear_param_store()
    model, guide, transform = pyro_model_and_flow(n_layers=3)
    x = gaussian_data(50, 0)
    idx = torch.arange(50)
    elbo = RelativeGradientMLE()
    # subsampled plate: scale N/B = 40 on every term, the placeholder's too
    exact = Trace_ELBO().differentiable_loss(model, guide, x, idx)
    weights = list(transform.flow.weights)
    grads = torch.autograd.grad(exact, weights)
    value = elbo.loss_and_grads(model, guide, x, idx)
    for w, g in zip(weights, grads):
        np.testing.assert_allclose(w.grad.numpy(), (g @ w.detach().T @ w.detach()).numpy(), rtol=1e-10, atol=1e-9)
    np.testing.assert_allclose(elbo.exact_nll(model, guide, x, idx), exact.item(), rtol=1e-12)
    logdet = transform.flow.log_abs_det_weights().item()
    np.testing.assert_allclose(value, exact.item() + 2000 * logdet, rtol=1e-12)
    np.testing.assert_allclose(elbo.loss(model, guide, x, idx), value, rtol=1e-12)
    # the ELBOModule route
    np.testing.assert_allclose(elbo(model, guide)(x, idx).item(), value, rtol=1e-12)


def test_pyro_svi_with_relative_gradient_mle_reduces_nll():
    import pyro
    from pyro.infer import SVI

    from ppl_score.pyro.flows import RelativeGradientMLE

    pyro.clear_param_store()
    model, guide, _ = pyro_model_and_flow()
    x = gaussian_data(300, 0)
    elbo = RelativeGradientMLE()
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 5e-2}), elbo)
    nll0 = elbo.exact_nll(model, guide, x) / 300
    for _ in range(60):
        svi.step(x)
    nll1 = elbo.exact_nll(model, guide, x) / 300
    # optimum per point: 2.145, the entropy of the data's Gaussian
    assert nll1 < nll0 - 1.0 and nll1 < 2.35
    assert isinstance(svi.evaluate_loss(x), float)


def test_pyro_relative_gradient_mle_errors():
    import pyro
    import pyro.distributions as dist

    from ppl_score.pyro.flows import RelativeGradientMLE

    x = gaussian_data(10, 0)

    def no_flow(x):
        with pyro.plate("data", 10):
            pyro.sample("x", dist.Normal(torch.zeros(2, dtype=F64), 1.0).to_event(1), obs=x)

    with pytest.raises(ValueError, match="no observed site"):
        RelativeGradientMLE().loss(no_flow, lambda x: None, x)
    model, guide, _ = pyro_model_and_flow()

    def latent(x):
        pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=F64), 1.0))
        model(x)

    with pytest.raises(ValueError, match="'mu' is latent"):
        RelativeGradientMLE().loss(latent, guide, x)
