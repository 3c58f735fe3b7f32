"""Faults at the boundary of the Pyro and NumPyro front ends (issue 10, items 1, 3, 5, 13):
grad modes, observed data that is non-finite or of the wrong shape, masks of the wrong
shape, ``WAE(mmd_scales=...)``, non-finite losses, and pickling / copying every public
object. Both PPLs must give the same messages.
"""

from __future__ import annotations

import copy
import io
import pickle
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pyro = pytest.importorskip("pyro")
jax = pytest.importorskip("jax")
numpyro = pytest.importorskip("numpyro")

import jax.numpy as jnp  # noqa: E402
import numpyro.distributions as ndist  # noqa: E402
import pyro.distributions as pdist  # noqa: E402
from numpyro import handlers  # noqa: E402
from pyro import poutine  # noqa: E402
from pyro.infer import SVI  # noqa: E402
from pyro.nn import PyroModule  # noqa: E402
from pyro.optim import Adam  # noqa: E402

from ppl_score import validation  # noqa: E402
from ppl_score.jax.estimators import learned_score_estimator  # noqa: E402
from ppl_score.numpyro import ScoreMatching as NSM  # noqa: E402
from ppl_score.numpyro import Unnormalized as NUnnormalized  # noqa: E402
from ppl_score.numpyro.wae import WAE as NWAE  # noqa: E402
from ppl_score.pyro import ScoreMatching as PSM  # noqa: E402
from ppl_score.pyro import Unnormalized as PUnnormalized  # noqa: E402
from ppl_score.pyro.wae import WAE as PWAE  # noqa: E402
from ppl_score.spec import OBJECTIVES  # noqa: E402
from ppl_score.torch.estimators import LearnedScoreEstimator  # noqa: E402
from ppl_score.torch.nets import MLPEnergy  # noqa: E402

F64 = torch.float64
KEY = jax.random.PRNGKey(0)
X = np.random.default_rng(0).normal(size=(6, 2))


@pytest.fixture(autouse=True)
def _fresh():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    yield
    pyro.clear_param_store()
    torch.set_num_threads(n)


def empty_guide(*args, **kwargs):
    pass


def quadratic(y):
    """A module-level log density (picklable, unlike a lambda)."""
    return -0.5 * (y**2).sum(-1)


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


# --- the same models in both PPLs, selected by `ppl` ------------------------------------


def _pyro_model(kind):
    mask = torch.tensor([True, False, True])  # the plate has 6 data points

    def model(x):
        with pyro.plate("data", x.shape[0]):
            if kind == "plain":
                pyro.sample("obs", pdist.Normal(torch.zeros(2, dtype=F64), 1.0).to_event(1), obs=x)
            elif kind == "unnormalized_3":
                pyro.sample("obs", PUnnormalized(quadratic, (3,)), obs=x)
            elif kind == "handler_mask":
                with poutine.mask(mask=mask):
                    pyro.sample("obs", pdist.Normal(torch.zeros(2, dtype=F64), 1.0).to_event(1), obs=x)
            elif kind == "fn_mask":
                d = pdist.Normal(torch.zeros(2, dtype=F64), 1.0).to_event(1).mask(mask)
                pyro.sample("obs", d, obs=x)
            elif kind == "obs_mask":
                d = pdist.Normal(torch.zeros(2, dtype=F64), 1.0).to_event(1)
                pyro.sample("obs", d, obs=x, obs_mask=mask)
            elif kind == "gamma":
                pyro.sample("obs", pdist.Gamma(torch.tensor(2.0, dtype=F64), 1.0).expand([2]).to_event(1), obs=x)

    return model


def _numpyro_model(kind):
    mask = jnp.array([True, False, True])

    def model(x):
        with numpyro.plate("data", x.shape[0]):
            if kind == "plain":
                numpyro.sample("obs", ndist.Normal(jnp.zeros(2), 1.0).to_event(1), obs=x)
            elif kind == "unnormalized_3":
                numpyro.sample("obs", NUnnormalized(quadratic, (3,)), obs=x)
            elif kind == "handler_mask":
                with handlers.mask(mask=mask):
                    numpyro.sample("obs", ndist.Normal(jnp.zeros(2), 1.0).to_event(1), obs=x)
            elif kind == "fn_mask":
                numpyro.sample("obs", ndist.Normal(jnp.zeros(2), 1.0).to_event(1).mask(mask), obs=x)
            elif kind == "obs_mask":
                numpyro.sample("obs", ndist.Normal(jnp.zeros(2), 1.0).to_event(1), obs=x, obs_mask=mask)
            elif kind == "gamma":
                numpyro.sample("obs", ndist.Gamma(2.0, 1.0).expand([2]).to_event(1), obs=x)

    return model


def _loss(ppl, kind, x, method="esm"):
    if ppl == "pyro":
        return PSM(method).loss(_pyro_model(kind), empty_guide, torch.as_tensor(x, dtype=F64))
    return NSM(method).loss(KEY, {}, _numpyro_model(kind), empty_guide, jnp.asarray(x))


def _error(ppl, kind, x, exc=ValueError):
    with pytest.raises(exc) as info:
        _loss(ppl, kind, x)
    return str(info.value)


# ---------------------------------------------------------------------------------------
# Item 1: grad modes (Pyro)
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", sorted(OBJECTIVES))
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


# ---------------------------------------------------------------------------------------
# Item 13: errors name the site
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("ppl", ["pyro", "numpyro"])
def test_non_finite_observed_data_names_the_site(ppl):
    x = X.copy()
    x[1, 0] = np.nan
    msg = _error(ppl, "plain", x)
    assert "observed site 'obs' contains non-finite values" in msg and "'x'" not in msg
    x[1, 0] = np.inf
    assert "observed site 'obs' contains non-finite values" in _error(ppl, "plain", x)
    assert "observed site 'obs' has values outside its support" in _error(ppl, "gamma", -np.abs(X))


@pytest.mark.parametrize("ppl", ["pyro", "numpyro"])
def test_observations_of_the_wrong_event_shape_name_the_site_and_event_shape(ppl):
    msg = _error(ppl, "unnormalized_3", X)
    assert msg.startswith("observed site 'obs'") and "event_shape (3,)" in msg
    d = PUnnormalized(quadratic, (3,)) if ppl == "pyro" else NUnnormalized(quadratic, (3,))
    value = torch.zeros(4, 2) if ppl == "pyro" else jnp.zeros((4, 2))
    with pytest.raises(ValueError, match=r"Unnormalized\.log_prob.*event_shape \(3,\)"):
        d.log_prob(value)


@pytest.mark.parametrize("kind", ["handler_mask", "fn_mask", "obs_mask"])
@pytest.mark.parametrize("ppl", ["pyro", "numpyro"])
def test_a_mask_of_the_wrong_shape_names_the_mask_and_the_site(ppl, kind):
    msg = _error(ppl, kind, X)
    assert msg.startswith("the mask of site 'obs' has shape (3,)") and "(6,)" in msg


def test_the_front_ends_give_the_same_messages():
    x = X.copy()
    x[0, 0] = np.nan
    for kind, data in [
        ("plain", x),
        ("unnormalized_3", X),
        ("handler_mask", X),
        ("obs_mask", X),
        ("gamma", -np.abs(X)),
    ]:
        assert _error("pyro", kind, data) == _error("numpyro", kind, data), kind


@pytest.mark.parametrize("WAE", [PWAE, NWAE])
def test_wae_mmd_scales_is_checked(WAE):
    with pytest.raises(TypeError, match=r"argument 'mmd_scales' must be a sequence.*got float"):
        WAE("mmd", mmd_scales=1.0)
    with pytest.raises(TypeError, match="mmd_scales"):
        WAE("mmd", mmd_scales="1")
    with pytest.raises(ValueError, match="mmd_scales"):
        WAE("mmd", mmd_scales=())
    with pytest.raises(ValueError, match="mmd_scales"):
        WAE("mmd", mmd_scales=[1.0, -2.0])
    assert WAE("mmd", mmd_scales=[1]).mmd_scales == (1.0,)


# ---------------------------------------------------------------------------------------
# Item 3: a non-finite loss warns, naming the method and the site
# ---------------------------------------------------------------------------------------


def nan_density(y):
    return jnp.nan * (y**2).sum(-1) if isinstance(y, jax.Array) else torch.nan * (y**2).sum(-1)


def _nan_model(ppl):
    if ppl == "pyro":

        def model(x):
            with pyro.plate("data", x.shape[0]):
                pyro.sample("obs", PUnnormalized(nan_density, (2,)), obs=x)

    else:

        def model(x):
            with numpyro.plate("data", x.shape[0]):
                numpyro.sample("obs", NUnnormalized(nan_density, (2,)), obs=x)

    return model


@pytest.mark.parametrize("method", ["ssm", "fd_dsm"])
@pytest.mark.parametrize("ppl", ["pyro", "numpyro"])
def test_a_non_finite_loss_warns_naming_the_method_and_the_site(ppl, method):
    model = _nan_model(ppl)
    if ppl == "pyro":
        call = lambda: PSM(method).loss(model, empty_guide, torch.as_tensor(X, dtype=F64))
    else:
        call = lambda: NSM(method).loss(KEY, {}, model, empty_guide, jnp.asarray(X))
    with pytest.warns(
        validation.NonFiniteWarning, match=rf"ScoreMatching\(method='{method}'\) loss at site 'obs'.*likely cause"
    ):
        assert np.isnan(call())
    with validation.validation_enabled(False), warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.isnan(call())


def test_numpyro_non_finite_loss_under_jit_does_not_warn():
    model = _nan_model("numpyro")
    f = jax.jit(lambda x: NSM("ssm").loss(KEY, {}, model, empty_guide, x))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.isnan(f(jnp.asarray(X)))


# ---------------------------------------------------------------------------------------
# Item 5: every public object pickles, deep-copies and (Pyro) torch.saves
# ---------------------------------------------------------------------------------------


def _torch_roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


ROUNDTRIPS = {
    "pickle": lambda o: pickle.loads(pickle.dumps(o)),
    "deepcopy": copy.deepcopy,
    "torch.save": _torch_roundtrip,
}


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


@pytest.mark.parametrize("how", ["pickle", "deepcopy"])
def test_numpyro_objects_survive_pickle_and_deepcopy(how):
    roundtrip = ROUNDTRIPS[how]
    x = jnp.asarray(X)
    model = _numpyro_model("plain")
    for loss in (NSM("ssm", n_projections=2, beta=0.5), NSM("fd_dsm")):
        copied = roundtrip(loss)
        assert repr(copied) == repr(loss)
        assert copied.loss(KEY, {}, model, empty_guide, x) == loss.loss(KEY, {}, model, empty_guide, x)
    d = roundtrip(NUnnormalized(quadratic, (2,)))
    np.testing.assert_array_equal(d.log_prob(x), quadratic(x))
    wae = roundtrip(NWAE("mmd", mmd_scales=(0.5, 1.0), lam=2.0))
    assert (wae.regularizer, wae.lam, wae.mmd_scales) == ("mmd", 2.0, (0.5, 1.0))


@pytest.mark.parametrize("how", ["pickle", "deepcopy"])
def test_numpyro_wae_with_a_learned_estimator_survives_pickle_and_deepcopy(how):
    wae = NWAE(estimator=learned_score_estimator(2, hidden=(4,)))
    copied = ROUNDTRIPS[how](wae)
    assert copied.estimator.dim == 2
    state = copied.estimator.init(KEY)
    z = jnp.asarray(X)
    np.testing.assert_array_equal(copied.estimator.apply(state.params, z), wae.estimator.apply(state.params, z))
