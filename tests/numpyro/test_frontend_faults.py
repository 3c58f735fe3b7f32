"""Faults at the boundary of the NumPyro front end (issue 10, items 3 and 5): a non-finite loss
does not warn under jit, and every public object pickles and deep-copies."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

from ppl_score.jax.estimators import learned_score_estimator  # noqa: E402
from ppl_score.numpyro import ScoreMatching as NSM  # noqa: E402
from ppl_score.numpyro import Unnormalized as NUnnormalized  # noqa: E402
from ppl_score.numpyro.wae import WAE as NWAE  # noqa: E402
from tests.helpers.frontends import KEY, ROUNDTRIPS, X, _nan_model, _numpyro_model, quadratic
from tests.helpers.shared import empty_guide


def test_numpyro_non_finite_loss_under_jit_does_not_warn():
    model = _nan_model("numpyro")
    f = jax.jit(lambda x: NSM("ssm").loss(KEY, {}, model, empty_guide, x))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.isnan(f(jnp.asarray(X)))


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
