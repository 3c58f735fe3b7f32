"""Calibration across implementations: with two latents ``(mu, sigma)`` Pyro and NumPyro match
a hand-computed sandwich and each other, and the torch and JAX sandwiches
(``ppl_score.{torch,jax}.calibration``) agree with each other and the closed form."""

from __future__ import annotations

import numpy as np
import pytest

from tests.helpers.calibration import _gamma_fn_jax, _gamma_fn_torch, closed_beta, gamma_data, tc_tensor, theta_hat

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# Normal(mu, sigma) with both unknown: two latent dimensions, H and J by hand.
# SM_i = tau^2 (x - mu)^2 / 2 - tau, tau = sigma^-2; minimizer mu = mean, sigma^2 = var.


def normal_data(n=60, seed=3):
    return np.random.default_rng(seed).normal(0.5, 1.5, size=n)


def normal_hat(x):
    return x.mean(), x.std()


def normal_grads(x, mu, sigma):
    tau = sigma**-2
    return np.stack([-(tau**2) * (x - mu), (tau * (x - mu) ** 2 - 1.0) * (-2.0 * sigma**-3)], -1)


def normal_sandwich(x, mu, sigma, eps=1e-5):
    g = normal_grads(x, mu, sigma)
    gc = g - g.mean(0)
    j = gc.T @ gc
    h = np.empty((2, 2))
    for k, (dm, ds) in enumerate([(eps, 0.0), (0.0, eps)]):
        h[k] = (normal_grads(x, mu + dm, sigma + ds).sum(0) - normal_grads(x, mu - dm, sigma - ds).sum(0)) / (2 * eps)
    return 0.5 * (h + h.T), j


def rules(h, j):
    return {
        "lyddon": np.trace(h @ np.linalg.solve(j, h)) / np.trace(h),
        "magnitude": 2.0 / np.trace(np.linalg.solve(h, j)),
    }


# ---------------------------------------------------------------------------------------
# two latents (mu, sigma), both PPLs: each beta computed once per module
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def normal_betas(request):
    """``{ppl: {"lyddon", "magnitude", "magnitude_log"}}`` at the estimate (mu_hat, sigma_hat);
    ``magnitude_log`` in the coordinates (mu, log sigma)."""
    x = normal_data()
    mu, sigma = normal_hat(x)
    out = {}
    for ppl in ("pyro", "numpyro"):
        try:
            m = request.getfixturevalue("tp" if ppl == "pyro" else "npo")
        except pytest.skip.Exception:
            continue
        if ppl == "pyro":
            data, v, log_v = (
                m.t(x),
                {"mu": m.t(mu), "sigma": m.t(sigma)},
                {"mu": m.t(mu), "log_sigma": m.t(np.log(sigma))},
            )
        else:
            data, v, log_v = m.jnp.asarray(x), {"mu": mu, "sigma": sigma}, {"mu": mu, "log_sigma": np.log(sigma)}
        loss = m.ScoreMatching("esm")
        out[ppl] = {
            "lyddon": m.calibrate_beta(loss, m.normal_model, v, data),
            "magnitude": m.calibrate_beta(loss, m.normal_model, v, data, rule="magnitude"),
            "magnitude_log": m.calibrate_beta(loss, m.normal_model_log, log_v, data, rule="magnitude"),
        }
    return out


@pytest.mark.parametrize("ppl", ["pyro", "numpyro"])
def test_two_latents_match_hand_sandwich(normal_betas, ppl):
    if ppl not in normal_betas:
        pytest.skip(f"{ppl} not installed")
    x = normal_data()
    h, j = normal_sandwich(x, *normal_hat(x))
    expected = rules(h, j)
    for rule in ("lyddon", "magnitude"):
        np.testing.assert_allclose(normal_betas[ppl][rule], expected[rule], rtol=1e-6, err_msg=rule)
    # "magnitude" depends on H^{-1} J only through its eigenvalues: the same in (mu, log sigma)
    np.testing.assert_allclose(normal_betas[ppl]["magnitude_log"], normal_betas[ppl]["magnitude"], rtol=1e-8)
    assert normal_betas[ppl]["lyddon"] != pytest.approx(normal_betas[ppl]["magnitude"], rel=1e-3)


def test_pyro_and_numpyro_agree(normal_betas):
    if len(normal_betas) < 2:
        pytest.skip("needs both Pyro and NumPyro")
    for key, value in normal_betas["pyro"].items():
        np.testing.assert_allclose(value, normal_betas["numpyro"][key], rtol=1e-10, err_msg=key)


def test_backends_sandwich_agree():
    pytest.importorskip("torch")
    jax = pytest.importorskip("jax")
    from ppl_score.jax import calibration as jc
    from ppl_score.torch import calibration as tc

    x = gamma_data(n=50)
    z = np.array([theta_hat(x)])
    st = tc.sandwich(_gamma_fn_torch(x), tc_tensor(z))
    sj = jax.jit(lambda v: jc.sandwich(_gamma_fn_jax(x), v))(z)  # traceable, and faster than eager
    np.testing.assert_allclose(st.hessian.numpy(), [[(x**2).sum()]], rtol=1e-10)
    np.testing.assert_allclose(np.asarray(sj.hessian), st.hessian.numpy(), rtol=1e-10)
    np.testing.assert_allclose(np.asarray(sj.meat), st.meat.numpy(), rtol=1e-10)
    np.testing.assert_allclose(np.asarray(sj.covariance()), st.covariance().numpy(), rtol=1e-10)
    for rule in ("lyddon", "magnitude"):
        bt = float(tc.calibrate_beta(_gamma_fn_torch(x), tc_tensor(z), rule=rule))
        bj = float(jax.jit(lambda v: jc.calibrate_beta(_gamma_fn_jax(x), v, rule=rule))(z))
        np.testing.assert_allclose([bt, bj], closed_beta(x), rtol=1e-10)
