"""Calibrated generalized Bayes in NumPyro (``ppl_score.numpyro.calibrate_beta``) on the Gamma
model of ``tests/helpers/calibration.py``: the calibrated posterior's sd matches the
estimator's sampling sd within 15% (with ``beta = 1`` it is about ``1 / sqrt(A + 3)`` of
it; exact Bayes lies in between), masked data count as absent, and bad arguments raise."""

from __future__ import annotations

import numpy as np
import pytest

from tests.helpers.calibration import (
    PRIOR,
    A,
    closed_beta,
    exact_bayes_sd,
    gamma_data,
    grid_sd,
    sampling_sd,
    theta_grid,
    theta_hat,
)


def test_numpyro_gamma_calibrated_sd_matches_sampling_sd(npo):
    x = gamma_data()
    data = npo.jnp.asarray(x)
    loss = npo.ScoreMatching("esm")
    beta = npo.calibrate_beta(loss, npo.gamma_model, {"theta": theta_hat(x)}, data)
    np.testing.assert_allclose(beta, closed_beta(x), rtol=1e-8)
    assert beta == pytest.approx(
        npo.calibrate_beta(loss, npo.gamma_model, {"theta": theta_hat(x)}, data, rule="magnitude"), rel=1e-10
    )

    grid = theta_grid(x)
    sd_cal = grid_sd(grid, npo.neg_log_post(npo.ScoreMatching("esm", beta=beta), grid, data))
    sd_one = grid_sd(grid, npo.neg_log_post(npo.ScoreMatching("esm"), grid, data))
    sd_sim = sampling_sd()
    assert abs(sd_cal / sd_sim - 1.0) < 0.15, (sd_cal, sd_sim)
    assert sd_one < 0.6 * sd_sim, (sd_one, sd_sim)
    assert sd_one < exact_bayes_sd(x) < sd_sim


def test_numpyro_masked_data_count_as_absent(npo):
    numpyro, dist = npo.numpyro, npo.dist
    x = gamma_data(n=40)
    keep = np.arange(40) % 3 != 0

    def masked(data, mask):
        theta = numpyro.sample("theta", dist.Gamma(PRIOR[0], PRIOR[1]))
        with numpyro.plate("data", data.shape[0]), numpyro.handlers.mask(mask=mask):
            numpyro.sample("x", dist.Gamma(A, theta), obs=data)

    beta = npo.calibrate_beta(
        npo.ScoreMatching("esm"), masked, {"theta": theta_hat(x[keep])}, npo.jnp.asarray(x), npo.jnp.asarray(keep)
    )
    np.testing.assert_allclose(beta, closed_beta(x[keep]), rtol=1e-8)


def test_numpyro_errors(npo):
    x = npo.jnp.asarray(gamma_data(n=20))
    loss = npo.ScoreMatching("esm")
    good = {"theta": 2.0}
    with pytest.raises(TypeError, match="'loss'"):
        npo.calibrate_beta(object(), npo.gamma_model, good, x)
    with pytest.raises(TypeError, match="'latents'"):
        npo.calibrate_beta(loss, npo.gamma_model, [2.0], x)
    with pytest.raises(ValueError, match="'latents'"):
        npo.calibrate_beta(loss, npo.gamma_model, {}, x)
    with pytest.raises(TypeError, match="'latents'.*'theta'"):
        npo.calibrate_beta(loss, npo.gamma_model, {"theta": 2}, x)
    with pytest.raises(ValueError, match="'rule'"):
        npo.calibrate_beta(loss, npo.gamma_model, good, x, rule="trace")
    with pytest.raises(TypeError, match="'params'"):
        npo.calibrate_beta(loss, npo.gamma_model, good, x, params=[1.0])
    with pytest.raises(TypeError, match="'key'"):
        npo.calibrate_beta(loss, npo.gamma_model, good, x, key=0)
    with pytest.raises(ValueError, match="'latents'.*'extra'"), pytest.warns(UserWarning):
        npo.calibrate_beta(loss, npo.gamma_model, {"theta": 2.0, "extra": 1.0}, x)
    with pytest.raises(ValueError, match="'key'"):  # a stochastic method needs a key
        npo.calibrate_beta(npo.ScoreMatching("ssm_vr"), npo.gamma_model, good, x)
    with pytest.warns(UserWarning, match="esm"):
        npo.calibrate_beta(npo.ScoreMatching("ssm_vr"), npo.gamma_model, good, x, key=npo.jax.random.PRNGKey(1))
