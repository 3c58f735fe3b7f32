"""``ppl_score.pyro.ScoreMatching`` on the joint log density (SPEC.md section 3), Pyro only:
the whole Hessian of the held-out case, and regressions found in review (deterministic
sites, integer and grad-carrying data, distributions of non-tensor parts, models that do
not broadcast over the copies)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pyro = pytest.importorskip("pyro")
import pyro.distributions as pdist  # noqa: E402

import ppl_score.pyro as spy  # noqa: E402
import ppl_score.torch as storch  # noqa: E402
from tests.helpers.joint_density import F64, D, N, _esm, held_out_pyro, t
from tests.helpers.shared import empty_guide

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_held_out_case_hessian_is_minus_two_identity(rng):
    """Sliced score matching with Gaussian projections ``v``: ``v' H v + (v' s)^2 / 2``, with
    the same ``v`` as the backend draws, pins the whole Hessian (not only its trace)."""
    x, y = rng.normal(size=(N, D)), rng.normal(size=(N, D))
    pyro.set_rng_seed(5)
    value = spy.ScoreMatching("ssm", sites=["x"], projection="gaussian").datum_losses(
        held_out_pyro, empty_guide, t(x), t(y)
    )[0]
    pyro.set_rng_seed(5)
    v = torch.randn((1, N, D), dtype=F64)[0].numpy()  # what the backend draws (M = 1, gaussian)
    s = y - 2 * x
    expected = (-2 * (v * v).sum(-1)) + 0.5 * ((v * s).sum(-1)) ** 2
    np.testing.assert_allclose(value.detach().numpy(), expected, rtol=1e-10)


def test_deterministic_sites_are_recomputed_not_matched(rng):
    x, y = t(rng.normal(size=N)), t(rng.normal(size=N))

    def model(x, y):
        with pyro.plate("d", N):
            xs = pyro.sample("x", pdist.Normal(t(0.0), t(1.0)), obs=x)
            h = pyro.deterministic("h", xs**2, event_dim=0)
            pyro.sample("y", pdist.Normal(h, t(1.0)), obs=y)

    only_x = _esm(
        lambda r: pdist.Normal(t(0.0), t(1.0)).log_prob(r[:, 0]) + pdist.Normal(r[:, 0] ** 2, t(1.0)).log_prob(y),
        x[:, None],
    )
    assert spy.ScoreMatching("esm", sites=["x"]).loss(model, empty_guide, x, y) == pytest.approx(only_x, rel=1e-10)

    def joint(r):
        return pdist.Normal(t(0.0), t(1.0)).log_prob(r[:, 0]) + pdist.Normal(r[:, 0] ** 2, t(1.0)).log_prob(r[:, 1])

    both_sites = _esm(joint, torch.stack([x, y], -1))
    assert spy.ScoreMatching("esm").loss(model, empty_guide, x, y) == pytest.approx(both_sites, rel=1e-10)


def test_integer_data_and_data_that_requires_grad_keep_their_dependencies(rng):
    y = t(rng.normal(size=N))

    def model(x, y):
        with pyro.plate("d", N):
            xs = pyro.sample("x", pdist.Normal(t(0.0), t(1.0)), obs=x)
            pyro.sample("y", pdist.Normal(xs**2, t(1.0)), obs=y)

    elbo = spy.ScoreMatching("esm", sites=["x"])
    # integer data are read in the default float dtype (float32 here): compare at its precision
    for x, rel in (
        (torch.tensor([1, -2, 0, 3, 1, 2]), 1e-6),
        (t(rng.normal(size=N)) * torch.tensor(2.0, dtype=F64, requires_grad=True), 1e-10),
    ):
        xf = x.detach().to(F64)
        expected = _esm(
            lambda r: pdist.Normal(t(0.0), t(1.0)).log_prob(r[:, 0]) + pdist.Normal(r[:, 0] ** 2, t(1.0)).log_prob(y),
            xf[:, None],
        )
        assert elbo.loss(model, empty_guide, x, y) == pytest.approx(expected, rel=rel)


def test_a_dependent_distribution_made_of_non_tensor_parts(rng):
    """``GaussianHMM`` keeps its parameters in Gaussian objects: asked through autograd."""
    x, y = t(rng.normal(size=1)), t(rng.normal(size=(3, 1)))

    def hmm(loc):
        init = pdist.Normal(loc.reshape(-1, 1), t(1.0)).to_event(1)
        return pdist.GaussianHMM(
            init,
            torch.eye(1, dtype=F64),
            pdist.Normal(torch.zeros(1, dtype=F64), t(1.0)).to_event(1),
            torch.eye(1, dtype=F64),
            pdist.Normal(torch.zeros(1, dtype=F64), t(0.5)).to_event(1),
            duration=3,
        )

    def model(x, y):
        xs = pyro.sample("x", pdist.Normal(t(0.0), t(1.0)).expand([1]).to_event(1), obs=x)
        pyro.sample("y", hmm(xs), obs=y)

    expected = _esm(lambda r: pdist.Normal(t(0.0), t(1.0)).log_prob(r).sum(-1) + hmm(r).log_prob(y), x[None])
    assert spy.ScoreMatching("esm", sites=["x"]).loss(model, empty_guide, x, y) == pytest.approx(expected, rel=1e-10)


def test_a_model_that_does_not_broadcast_over_the_copies_runs_one_copy_at_a_time(rng):
    """``y ~ N(sum(x), 1)`` outside the plate: its loc drops the plate dim, so the perturbed
    copies of ``fd_ssm`` would meet in one batch; they are re-executed one at a time."""
    x, y = t(rng.normal(size=N)), t(rng.normal(size=1))

    def model(x, y):
        with pyro.plate("d", N):
            xs = pyro.sample("x", pdist.Normal(t(0.0), t(1.0)), obs=x)
        pyro.sample("y", pdist.Normal(xs.sum(-1), t(1.0)), obs=y[0])

    def joint(r):  # r [k, N]
        return pdist.Normal(t(0.0), t(1.0)).log_prob(r).sum(-1) + pdist.Normal(r.sum(-1), t(1.0)).log_prob(y[0])

    for method in ("fd_ssm", "ssm_vr"):
        opts = {"n_projections": 3} if method == "fd_ssm" else {}
        pyro.set_rng_seed(4)
        value = spy.ScoreMatching(method, sites=["x"], **opts).loss(model, empty_guide, x, y)
        pyro.set_rng_seed(4)
        direct = storch.score_matching_loss(joint, x[None], method, reduction="sum", **opts).item()
        assert value == pytest.approx(direct, rel=1e-10)
