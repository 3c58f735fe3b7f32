"""Calibrated generalized Bayes in Pyro (``ppl_score.pyro.calibrate_beta``) on the Gamma model
of ``tests/helpers/calibration.py``: the calibrated posterior's sd matches the estimator's
sampling sd within 15% (with ``beta = 1`` it is about ``1 / sqrt(A + 3)`` of it; exact
Bayes lies in between), masked data count as absent, and bad arguments raise."""

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

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_pyro_gamma_calibrated_sd_matches_sampling_sd(tp):
    x = gamma_data()
    data = tp.t(x)
    loss = tp.ScoreMatching("esm")
    beta = tp.calibrate_beta(loss, tp.gamma_model, {"theta": tp.t(theta_hat(x))}, data)
    np.testing.assert_allclose(beta, closed_beta(x), rtol=1e-8)
    assert beta == pytest.approx(
        tp.calibrate_beta(loss, tp.gamma_model, {"theta": theta_hat(x)}, data, rule="magnitude"), rel=1e-10
    )

    grid = theta_grid(x)
    sd_cal = grid_sd(grid, tp.neg_log_post(tp.ScoreMatching("esm", beta=beta), grid, data))
    sd_one = grid_sd(grid, tp.neg_log_post(tp.ScoreMatching("esm"), grid, data))
    sd_sim = sampling_sd()
    assert abs(sd_cal / sd_sim - 1.0) < 0.15, (sd_cal, sd_sim)
    assert sd_one < 0.6 * sd_sim, (sd_one, sd_sim)  # beta = 1: overconfident, about 1/sqrt(A + 3)
    assert sd_one < exact_bayes_sd(x) < sd_sim


def test_pyro_masked_data_count_as_absent(tp):
    pyro, dist, t = tp.pyro, tp.dist, tp.t
    x = gamma_data(n=40)
    keep = np.arange(40) % 3 != 0

    def masked(data, mask):
        theta = pyro.sample("theta", dist.Gamma(t(PRIOR[0]), t(PRIOR[1])))
        with pyro.plate("data", data.shape[0]), pyro.poutine.mask(mask=mask):
            pyro.sample("x", dist.Gamma(t(A), theta), obs=data)

    th = theta_hat(x[keep])
    beta = tp.calibrate_beta(tp.ScoreMatching("esm"), masked, {"theta": t(th)}, t(x), tp.torch.as_tensor(keep))
    np.testing.assert_allclose(beta, closed_beta(x[keep]), rtol=1e-8)


def test_pyro_errors(tp):
    x = tp.t(gamma_data(n=20))
    loss = tp.ScoreMatching("esm")
    good = {"theta": tp.t(2.0)}
    with pytest.raises(TypeError, match="'loss'"):
        tp.calibrate_beta(object(), tp.gamma_model, good, x)
    with pytest.raises(TypeError, match="'latents'"):
        tp.calibrate_beta(loss, tp.gamma_model, [2.0], x)
    with pytest.raises(ValueError, match="'latents'"):
        tp.calibrate_beta(loss, tp.gamma_model, {}, x)
    with pytest.raises(TypeError, match="'latents'.*'theta'"):
        tp.calibrate_beta(loss, tp.gamma_model, {"theta": tp.torch.tensor(2)}, x)
    with pytest.raises(ValueError, match="'rule'"):
        tp.calibrate_beta(loss, tp.gamma_model, good, x, rule="trace")
    with pytest.raises(ValueError, match="theta"):  # the latent site has no value
        tp.calibrate_beta(loss, tp.gamma_model, {"rate": tp.t(2.0)}, x)
    with pytest.raises(ValueError, match="'latents'.*'extra'"), pytest.warns(UserWarning):
        tp.calibrate_beta(loss, tp.gamma_model, {"theta": tp.t(2.0), "extra": tp.t(1.0)}, x)
    with pytest.warns(UserWarning, match="esm"):
        tp.calibrate_beta(tp.ScoreMatching("ssm_vr"), tp.gamma_model, good, x)
    with tp.torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        tp.calibrate_beta(loss, tp.gamma_model, good, x)
    with tp.torch.no_grad():  # supported: grad is switched back on inside
        assert tp.calibrate_beta(loss, tp.gamma_model, good, x) > 0
