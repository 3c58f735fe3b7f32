"""Faults at the boundary of the Pyro and NumPyro front ends (issue 10, items 3 and 13), one
body run per PPL: observed data that is non-finite or of the wrong shape, masks of the wrong
shape, ``WAE(mmd_scales=...)`` and non-finite losses name the site, the mask or the method."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

from ppl_score.common import validate as validation  # noqa: E402
from ppl_score.numpyro import ScoreMatching as NSM  # noqa: E402
from ppl_score.numpyro import Unnormalized as NUnnormalized  # noqa: E402
from ppl_score.numpyro.wae import WAE as NWAE  # noqa: E402
from ppl_score.pyro import ScoreMatching as PSM  # noqa: E402
from ppl_score.pyro import Unnormalized as PUnnormalized  # noqa: E402
from ppl_score.pyro.wae import WAE as PWAE  # noqa: E402
from tests.helpers.frontends import F64, KEY, X, _error, _nan_model, quadratic
from tests.helpers.shared import empty_guide

pytestmark = pytest.mark.usefixtures("one_torch_thread", "fresh_pyro")


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
