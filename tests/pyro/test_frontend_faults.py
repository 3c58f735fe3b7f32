"""Faults at the boundary of the Pyro front end (issue 10, items 1 and 5): grad modes
(``no_grad``, ``inference_mode``), and pickling / deep-copying / ``torch.save`` of every
public object."""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pyro = pytest.importorskip("pyro")
import pyro.distributions as pdist  # noqa: E402
from pyro.infer import SVI  # noqa: E402
from pyro.nn import PyroModule  # noqa: E402
from pyro.optim import Adam  # noqa: E402

from ppl_score.pyro import ScoreMatching as PSM  # noqa: E402
from ppl_score.pyro import Unnormalized as PUnnormalized  # noqa: E402
from ppl_score.pyro.wae import WAE as PWAE  # noqa: E402
from ppl_score.spec import UNCONDITIONAL_METHODS  # noqa: E402
from ppl_score.torch.estimators import LearnedScoreEstimator  # noqa: E402
from ppl_score.torch.nets import MLPEnergy  # noqa: E402
from tests.helpers.frontends import F64, ROUNDTRIPS, X, _pyro_model, quadratic
from tests.helpers.shared import empty_guide

pytestmark = pytest.mark.usefixtures("one_torch_thread", "fresh_pyro")


def plain_pyro_model(x):
    """A module-level model (the ELBOModule route pickles it)."""
    with pyro.plate("data", x.shape[0]):
        pyro.sample("obs", pdist.Normal(torch.zeros(2, dtype=F64), 1.0).to_event(1), obs=x)


class EnergyModel:
    """A picklable model observing ``Unnormalized(energy)``."""

    def __init__(self, energy):
        self.energy = energy

    def __call__(self, x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("obs", PUnnormalized(self.energy, (2,)), obs=x)


# ---------------------------------------------------------------------------------------
# Item 1: grad modes (Pyro)
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", sorted(UNCONDITIONAL_METHODS))
def test_pyro_loss_under_no_grad_equals_the_loss_outside(method):
    energy = PyroModule[MLPEnergy](2, hidden=(4,), quadratic=1.0).double()

    def model(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("obs", PUnnormalized(energy, (2,)), obs=x)

    x = torch.as_tensor(X, dtype=F64)
    pyro.set_rng_seed(3)
    outside = PSM(method).loss(model, empty_guide, x)
    pyro.set_rng_seed(3)
    with torch.no_grad():
        inside = PSM(method).loss(model, empty_guide, x)
    assert inside == pytest.approx(outside, rel=1e-12) and inside != 0.0


def test_pyro_loss_under_inference_mode_is_a_clear_error():
    model, x = _pyro_model("plain"), torch.as_tensor(X, dtype=F64)
    module = PSM("esm")(model, empty_guide)
    for call in (
        lambda: PSM("esm").loss(model, empty_guide, x),
        lambda: PSM("ssm").differentiable_loss(model, empty_guide, x),
        lambda: PSM("dsm").loss_and_grads(model, empty_guide, x),
        lambda: module(x),
    ):
        with torch.inference_mode(), pytest.raises(RuntimeError, match=r"inference_mode.*torch\.no_grad\(\)"):
            call()


def _wae_pyro_case():
    dec = torch.nn.Linear(2, 3)

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", pdist.Normal(torch.zeros(2), 1.0).to_event(1))
            pyro.sample("x", pdist.Normal(dec(z), 1.0).to_event(1), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", pdist.Delta(x[:, :2], event_dim=1))

    return model, guide, torch.randn(6, 3)


def test_pyro_wae_with_a_learned_estimator_under_inference_mode_is_a_clear_error():
    model, guide, x = _wae_pyro_case()
    wae = PWAE(estimator=LearnedScoreEstimator(2, hidden=(4,)))
    with torch.inference_mode():
        assert np.isfinite(wae.loss(model, guide, x))  # no estimator update: no derivatives
        with pytest.raises(RuntimeError, match=r"WAE.*learned estimator.*inference_mode.*no_grad"):
            wae.differentiable_loss(model, guide, x)
    with torch.no_grad():  # the update switches grad back on
        assert torch.isfinite(wae.differentiable_loss(model, guide, x))


@pytest.mark.parametrize("how", sorted(ROUNDTRIPS))
def test_pyro_objects_survive_pickle_deepcopy_and_torch_save(how):
    roundtrip = ROUNDTRIPS[how]
    x = torch.as_tensor(X, dtype=F64)
    energy = PyroModule[MLPEnergy](2, hidden=(4,), quadratic=1.0).double()
    model = EnergyModel(energy)
    for loss in (PSM("ssm", n_projections=2, beta=0.5), PSM("dsm", sigma=0.3)):
        copied = roundtrip(loss)
        assert repr(copied) == repr(loss)
        pyro.set_rng_seed(1)
        a = loss.loss(model, empty_guide, x)
        pyro.set_rng_seed(1)
        assert copied.loss(model, empty_guide, x) == a
    d = roundtrip(PUnnormalized(energy, (2,)))
    torch.testing.assert_close(d.log_prob(x), PUnnormalized(energy, (2,)).log_prob(x))
    assert roundtrip(PUnnormalized(quadratic, (2,))).log_prob(x).shape == (6,)
    # the ELBOModule route: the module (the energy inside the model) is saved whole
    module = PSM("esm")(plain_pyro_model, empty_guide)
    assert roundtrip(module)(x).item() == module(x).item()
    # WAE, with a learned estimator holding a network and an optimizer
    wmodel, wguide, wx = _wae_pyro_case()
    for wae in (PWAE("mmd", mmd_scales=(0.5, 1.0)), PWAE(estimator=LearnedScoreEstimator(2, hidden=(4,)))):
        copied = roundtrip(wae)
        torch.manual_seed(2)
        a = wae.loss(wmodel, wguide, wx)
        torch.manual_seed(2)
        assert copied.loss(wmodel, wguide, wx) == pytest.approx(a, rel=1e-6)


def test_pyro_svi_with_score_matching_deep_copies():
    x = torch.as_tensor(X, dtype=F64)
    energy = PyroModule[MLPEnergy](2, hidden=(4,), quadratic=1.0).double()
    svi = SVI(EnergyModel(energy), empty_guide, Adam({"lr": 1e-2}), loss=PSM("esm"))
    svi.step(x)
    twin = copy.deepcopy(svi)
    assert twin.evaluate_loss(x) == svi.evaluate_loss(x)
    # (both train the parameters of Pyro's global param store, as Pyro's own SVI copies do)
    assert np.isfinite(twin.step(x))
