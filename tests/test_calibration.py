"""Calibrated generalized Bayes: ``calibrate_beta`` (``ppl_score.pyro``, ``ppl_score.numpyro``)
and the backends' sandwich (``ppl_score.torch.calibration``, ``ppl_score.jax.calibration``).

The model where everything is known: ``x_i ~ Gamma(A, theta)`` (shape ``A`` known, rate
``theta`` unknown), matched in ``u = log x``. The exact score-matching objective of a datum,
``SM_i(theta) = 1/2 (A - theta x_i)^2 - theta x_i``, is quadratic in ``theta``, so

- the estimator is ``theta_hat = (A + 1) sum x / sum x^2``; its sampling sd is simulated
  here over many data sets (asymptotically ``theta sqrt((A + 3) / (n A (A + 1)))``);
- ``H = sum x_i^2``, ``J = sum_i x_i^2 (theta_hat x_i - A - 1)^2``, and both rules give
  ``beta = H / J`` (about ``1 / (A + 3)``);
- the generalized posterior ``p(theta) exp(-beta sum_i SM_i(theta))`` is integrated on a grid,
  its log density taken from ``ScoreMatching("esm", beta=beta).loss`` with a point-mass guide.

The calibrated posterior's sd must match the estimator's sampling sd within 15%; with
``beta = 1`` it is about ``1 / sqrt(A + 3)`` of it; exact Bayes (conjugate Gamma posterior)
lies in between.
"""

from __future__ import annotations

import numpy as np
import pytest

A = 3.0  # known Gamma shape
THETA = 2.0  # true rate
N = 1500  # the sandwich sd from one data set is within 15% of the truth for ~99% of seeds
PRIOR = (2.0, 1.0)  # Gamma(shape, rate) prior on theta
N_SIM = 4000  # data sets for the estimator's sampling sd

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------------------------------
# closed forms (numpy)
# ---------------------------------------------------------------------------------------


def gamma_data(n=N, seed=0):
    return np.random.default_rng(seed).gamma(A, 1.0 / THETA, size=n)


def theta_hat(x):
    return (A + 1.0) * x.sum(-1) / (x**2).sum(-1)


def closed_beta(x):
    th = theta_hat(x)
    h = (x**2).sum()
    j = ((x * (th * x - A - 1.0)) ** 2).sum()
    return h / j


def sampling_sd(n=N, sims=N_SIM, seed=1):
    """The score-matching estimator's sd over ``sims`` simulated data sets."""
    xs = np.random.default_rng(seed).gamma(A, 1.0 / THETA, size=(sims, n))
    return float(theta_hat(xs).std())


def exact_bayes_sd(x):
    shape, rate = PRIOR[0] + len(x) * A, PRIOR[1] + x.sum()
    return float(np.sqrt(shape) / rate)


def grid_sd(grid, neg_log_post):
    """sd of the density ``exp(-neg_log_post)`` on an even grid."""
    lp = -(neg_log_post - neg_log_post.min())
    p = np.exp(lp)
    p /= p.sum()
    m = (grid * p).sum()
    return float(np.sqrt(((grid - m) ** 2 * p).sum()))


def theta_grid(x, width=6.0, points=161):
    th = theta_hat(x)
    sd = np.sqrt(1.0 / ((x**2).sum() * closed_beta(x)))  # the calibrated sd, roughly
    return np.linspace(th - width * sd, th + width * sd, points)


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
# Pyro
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tp():
    torch = pytest.importorskip("torch")
    pyro = pytest.importorskip("pyro")
    import pyro.distributions as dist

    from ppl_score.pyro import ScoreMatching, calibrate_beta

    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    f64 = torch.float64

    def t(a):
        return torch.as_tensor(np.asarray(a), dtype=f64)

    def gamma_model(data):
        theta = pyro.sample("theta", dist.Gamma(t(PRIOR[0]), t(PRIOR[1])))
        with pyro.plate("data", data.shape[0]):
            pyro.sample("x", dist.Gamma(t(A), theta), obs=data)

    def normal_model(data):
        mu = pyro.sample("mu", dist.Normal(t(0.0), t(10.0)))
        sigma = pyro.sample("sigma", dist.LogNormal(t(0.0), t(2.0)))
        with pyro.plate("data", data.shape[0]):
            pyro.sample("x", dist.Normal(mu, sigma), obs=data)

    def normal_model_log(data):  # the same, in (mu, log sigma)
        mu = pyro.sample("mu", dist.Normal(t(0.0), t(10.0)))
        log_sigma = pyro.sample("log_sigma", dist.Normal(t(0.0), t(2.0)))
        with pyro.plate("data", data.shape[0]):
            pyro.sample("x", dist.Normal(mu, log_sigma.exp()), obs=data)

    def delta_guide(**values):
        def guide(*args, **kwargs):
            for name, v in values.items():
                pyro.sample(name, dist.Delta(v))

        return guide

    def neg_log_post(loss, grid, data):
        with torch.no_grad():
            return np.array([loss.loss(gamma_model, delta_guide(theta=t(th)), data) for th in grid])

    from types import SimpleNamespace

    return SimpleNamespace(
        torch=torch,
        pyro=pyro,
        dist=dist,
        t=t,
        ScoreMatching=ScoreMatching,
        calibrate_beta=calibrate_beta,
        gamma_model=gamma_model,
        normal_model=normal_model,
        normal_model_log=normal_model_log,
        neg_log_post=neg_log_post,
    )


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


# ---------------------------------------------------------------------------------------
# NumPyro
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def npo():
    jax = pytest.importorskip("jax")
    pytest.importorskip("numpyro")
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as dist

    from ppl_score.numpyro import ScoreMatching, calibrate_beta

    def gamma_model(data):
        theta = numpyro.sample("theta", dist.Gamma(PRIOR[0], PRIOR[1]))
        with numpyro.plate("data", data.shape[0]):
            numpyro.sample("x", dist.Gamma(A, theta), obs=data)

    def normal_model(data):
        mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))
        sigma = numpyro.sample("sigma", dist.LogNormal(0.0, 2.0))
        with numpyro.plate("data", data.shape[0]):
            numpyro.sample("x", dist.Normal(mu, sigma), obs=data)

    def normal_model_log(data):
        mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))
        log_sigma = numpyro.sample("log_sigma", dist.Normal(0.0, 2.0))
        with numpyro.plate("data", data.shape[0]):
            numpyro.sample("x", dist.Normal(mu, jnp.exp(log_sigma)), obs=data)

    def neg_log_post(loss, grid, data):
        def one(th):
            def guide(data):
                numpyro.sample("theta", dist.Delta(th))

            return loss.loss(jax.random.PRNGKey(0), {}, gamma_model, guide, data)

        return np.asarray(jax.jit(jax.vmap(one))(jnp.asarray(grid)))

    from types import SimpleNamespace

    return SimpleNamespace(
        jax=jax,
        jnp=jnp,
        numpyro=numpyro,
        dist=dist,
        ScoreMatching=ScoreMatching,
        calibrate_beta=calibrate_beta,
        gamma_model=gamma_model,
        normal_model=normal_model,
        normal_model_log=normal_model_log,
        neg_log_post=neg_log_post,
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


# ---------------------------------------------------------------------------------------
# backends
# ---------------------------------------------------------------------------------------


def _gamma_fn_torch(x):
    import torch

    from ppl_score.torch import score_matching_loss

    u = torch.as_tensor(np.log(x))[:, None]

    def fn(z):
        return score_matching_loss(lambda v: (A * v - z[0] * v.exp()).sum(-1), u, "esm", reduction="none")

    return fn


def _gamma_fn_jax(x):
    import jax.numpy as jnp

    from ppl_score.jax import score_matching_loss

    u = jnp.asarray(np.log(x))[:, None]

    def fn(z):
        return score_matching_loss(lambda v: (A * v - z[0] * jnp.exp(v)).sum(-1), u, "esm", reduction="none")

    return fn


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


def tc_tensor(a):
    import torch

    return torch.as_tensor(a, dtype=torch.float64)


@pytest.mark.parametrize("name", ["torch", "jax"])
def test_backend_errors(name):
    pytest.importorskip(name)
    import importlib

    be = importlib.import_module(f"ppl_score.{name}.calibration")
    arr = tc_tensor if name == "torch" else (lambda a: __import__("jax.numpy").numpy.asarray(a, dtype="float64"))
    x = gamma_data(n=10)
    fn = _gamma_fn_torch(x) if name == "torch" else _gamma_fn_jax(x)
    eye = arr(np.eye(2))
    with pytest.raises(ValueError, match="'rule'"):
        be.sandwich_beta(eye, eye, rule="det")
    with pytest.raises(TypeError, match="'rule'"):
        be.sandwich_beta(eye, eye, rule=1)
    with pytest.raises(ValueError, match="'meat'"):
        be.sandwich_beta(eye, arr(np.eye(3)))
    with pytest.raises(ValueError, match="'hessian'"):
        be.sandwich_beta(arr(np.ones(3)), arr(np.ones(3)))
    with pytest.raises(ValueError, match="not positive definite"):
        be.sandwich_beta(arr(np.diag([1.0, -1.0])), eye)
    with pytest.raises(ValueError, match="singular"):
        be.sandwich_beta(eye, arr(np.diag([1.0, 0.0])))
    assert float(be.sandwich_beta(eye, arr(np.diag([1.0, 0.0])), rule="magnitude")) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="'z'"):
        be.sandwich(fn, arr(np.ones((1, 1))))
    with pytest.raises(ValueError, match="do not depend"):
        be.sandwich(lambda z: arr(np.ones(5)) + 0.0 * z.sum(), arr([1.0]))
    with pytest.raises(ValueError, match="'fn'"):
        be.sandwich(lambda z: z * arr(np.ones((3, 1))), arr([1.0]))
    with pytest.raises(ValueError, match="at least 2"):
        be.sandwich(lambda z: z**2, arr([1.0]))


# ---------------------------------------------------------------------------------------
# the tutorial
# ---------------------------------------------------------------------------------------


def test_tutorial_smoke(tmp_path, capsys):
    """``tutorials/calibrated_bayes.py --smoke`` in this process (the frameworks are loaded
    already): it prints finite numbers and writes its figure."""
    for name in ("torch", "pyro", "numpyro", "matplotlib", "scipy"):
        pytest.importorskip(name)
    import importlib.util
    import re
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "tutorials" / "calibrated_bayes.py"
    spec = importlib.util.spec_from_file_location("calibrated_bayes_tutorial", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    report = module.main(["--smoke", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    for line in (
        "exact Bayes (conjugate Gamma posterior)",
        "Pyro: SVI, calibrated beta",
        "NumPyro: SVI, beta = 1",
        "calibrated  ",
    ):
        assert line in out, out
    assert not re.search(r"\bnan\b|\binf\b", out, re.IGNORECASE), out
    assert report["Pyro"]["beta"] > 0 and report["NumPyro"]["beta"] > 0
    figure = tmp_path / "calibrated_bayes.png"
    assert f"figure: {figure}" in out
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and figure.stat().st_size > 10_000
