"""Kernel score estimators of ``ppl_score.{torch,jax}.estimators``, one body run per backend
through the ``est`` adapter: the formulas against independent numpy references (float64),
the out-of-sample extension against the augmented estimator, SSGE's eigenpair rule,
accuracy on Gaussians, no input mutation and argument validation."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

from ppl_score.torch import estimators as te  # noqa: E402
from tests.helpers.estimators import JaxEst, TorchEst

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(params=["torch", "jax"])
def est(request):
    return TorchEst() if request.param == "torch" else JaxEst()


# --------------------------------------------------------------------------------------
# numpy references, written from the papers' formulas with explicit [N, N, D] tensors


def np_median_bandwidth(x):
    i, j = np.triu_indices(len(x), k=1)
    return float(np.median(np.linalg.norm(x[i] - x[j], axis=-1)))


def np_kernel(x, y, h):
    return np.exp(-((x[:, None, :] - y[None, :, :]) ** 2).sum(-1) / (2 * h * h))


def np_grad_first(x, y, h):
    """``grad_x k(x_i, y_m)`` as ``[N, M, D]``."""
    return -(x[:, None, :] - y[None, :, :]) / h**2 * np_kernel(x, y, h)[..., None]


def np_stein(x, eta, h):
    # <grad, K>_i = sum_m grad_{x_m} k(x_m, x_i)
    grad = np_grad_first(x, x, h).sum(0)
    return -np.linalg.solve(np_kernel(x, x, h) + eta * np.eye(len(x)), grad)


def np_ssge(x, at, h, n_keep):
    m = len(x)
    lam, u = np.linalg.eigh(np_kernel(x, x, h))
    lam, u = lam[::-1][:n_keep], u[:, ::-1][:, :n_keep]
    psi = np.sqrt(m) / lam * (np_kernel(at, x, h) @ u)  # [K, J]
    # beta_j = -mean_m grad psi_j(x_m),  grad psi_j(x) = sqrt(M)/lambda_j sum_l u_lj grad_x k(x, x_l)
    grad_psi = np.sqrt(m) / lam[None, :, None] * np.einsum("mld,lj->mjd", np_grad_first(x, x, h), u)
    beta = -grad_psi.mean(0)  # [J, D]
    return psi @ beta


# --------------------------------------------------------------------------------------


def test_median_bandwidth(est, rng):
    x = rng.normal(size=(31, 3)) + 100.0  # far from 0: exercises the centring
    got = float(np.asarray(est.mod.median_bandwidth(torch.as_tensor(x) if est.name == "torch" else jnp.asarray(x))))
    np.testing.assert_allclose(got, np_median_bandwidth(x), rtol=1e-10)
    x = rng.normal(size=(30, 2))  # even number of pairs: average of the two middle values
    got = float(np.asarray(est.mod.median_bandwidth(torch.as_tensor(x) if est.name == "torch" else jnp.asarray(x))))
    np.testing.assert_allclose(got, np_median_bandwidth(x), rtol=1e-10)


@pytest.mark.parametrize("eta", [0.1, 1.0])
def test_stein_in_sample_matches_reference(est, rng, eta):
    x = rng.normal(size=(25, 3))
    h = np_median_bandwidth(x)
    np.testing.assert_allclose(est.call("stein_scores", x, eta=eta), np_stein(x, eta, h), rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(
        est.call("stein_scores", x, eta=eta, bandwidth=0.7), np_stein(x, eta, 0.7), rtol=1e-9, atol=1e-11
    )


def test_stein_out_of_sample_is_augmented_estimator(est, rng):
    """Li & Turner section 3.4: the estimate at x* equals x*'s row of the Stein estimator
    computed on {x*} u samples (same bandwidth)."""
    x, at = rng.normal(size=(30, 2)), rng.normal(size=(5, 2)) * 1.5
    h = np_median_bandwidth(x)
    got = est.call("stein_scores", x, at, eta=0.3, bandwidth=h)
    want = np.stack([np_stein(np.concatenate([a[None], x]), 0.3, h)[0] for a in at])
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("threshold", [0.9, 0.99])
def test_spectral_matches_reference_and_counts_eigenpairs(est, rng, threshold):
    x, at = rng.normal(size=(40, 2)), rng.normal(size=(6, 2))
    h = np_median_bandwidth(x)
    lam = np.sort(np.linalg.eigvalsh(np_kernel(x, x, h)))[::-1]
    n_keep = int(np.argmax(np.cumsum(lam) >= threshold * lam.sum())) + 1
    assert 1 < n_keep < len(x)
    for a in (None, at):
        got = est.call("spectral_scores", x, a, threshold=threshold)
        want = np_ssge(x, x if a is None else a, h, n_keep)
        np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-10)
    # n_eigen wins over threshold
    got = est.call("spectral_scores", x, at, n_eigen=3, threshold=threshold)
    np.testing.assert_allclose(got, np_ssge(x, at, h, 3), rtol=1e-8, atol=1e-10)


def test_spectral_eigenpair_count_is_recomputed_per_call(est, rng):
    """The public SSGE code caches the count from the first call; here a second sample set
    with a different spectrum gets its own count."""
    x1 = rng.normal(size=(40, 2))
    x2 = np.concatenate([rng.normal(size=(20, 2)) * 0.05, rng.normal(size=(20, 2)) * 0.05 + 4.0])
    for x in (x1, x2, x1):
        h = np_median_bandwidth(x)
        lam = np.sort(np.linalg.eigvalsh(np_kernel(x, x, h)))[::-1]
        n_keep = int(np.argmax(np.cumsum(lam) >= 0.99 * lam.sum())) + 1
        np.testing.assert_allclose(est.call("spectral_scores", x), np_ssge(x, x, h, n_keep), rtol=1e-8, atol=1e-10)


def test_spectral_with_all_eigenpairs_is_stein_without_ridge(est, rng):
    # both reduce to -K^{-1} <grad, K> at the samples; a spread-out set keeps K well conditioned
    x = rng.normal(size=(8, 2)) * 3.0
    np.testing.assert_allclose(
        est.call("spectral_scores", x, n_eigen=8, bandwidth=1.0),
        np_stein(x, 0.0, 1.0),
        rtol=1e-7,
        atol=1e-9,
    )


@pytest.mark.parametrize("fname,tol", [("stein_scores", 0.2), ("spectral_scores", 0.1)])
def test_kernel_accuracy_on_gaussian(est, fname, tol):
    """Relative Fisher divergence E||g - s||^2 / E||s||^2 of N(mu, S), D = 2, N = 400, at the
    samples and at fresh points. Measured: Stein about 0.08, SSGE about 0.03 (fixed seed);
    the tolerances leave room for the estimators' bias, not for a wrong sign or scale."""
    r = np.random.default_rng(7)
    mu, chol = np.array([1.0, -2.0]), np.array([[1.0, 0.0], [0.6, 0.5]])
    prec = np.linalg.inv(chol @ chol.T)
    x = r.normal(size=(400, 2)) @ chol.T + mu
    fresh = r.normal(size=(100, 2)) @ chol.T + mu
    for at, pts in ((None, x), (fresh, fresh)):
        s = -(pts - mu) @ prec
        g = est.call(fname, x, at)
        rel = ((g - s) ** 2).sum(1).mean() / (s**2).sum(1).mean()
        assert rel < tol, (fname, rel)


def test_inputs_not_mutated(est, rng):
    x, at = rng.normal(size=(20, 2)), rng.normal(size=(3, 2))
    xs, ats = x.copy(), at.copy()
    if est.name == "torch":
        tx, tat = torch.as_tensor(x).clone(), torch.as_tensor(at).clone()
        te.stein_scores(tx, tat)
        te.spectral_scores(tx, tat)
        np.testing.assert_array_equal(tx.numpy(), xs)
        np.testing.assert_array_equal(tat.numpy(), ats)
    else:
        est.call("stein_scores", x, at)
        est.call("spectral_scores", x, at)
        np.testing.assert_array_equal(x, xs)
        np.testing.assert_array_equal(at, ats)


@pytest.mark.parametrize(
    "fname,kwargs,exc,match",
    [
        ("stein_scores", dict(eta=0.0), ValueError, "'eta'"),
        ("stein_scores", dict(eta=-1.0), ValueError, "'eta'"),
        ("stein_scores", dict(eta="a"), TypeError, "'eta'"),
        ("stein_scores", dict(bandwidth=0.0), ValueError, "'bandwidth'"),
        ("stein_scores", dict(bandwidth=float("nan")), ValueError, "'bandwidth'"),
        ("spectral_scores", dict(threshold=0.0), ValueError, "'threshold'"),
        ("spectral_scores", dict(threshold=1.5), ValueError, "'threshold'"),
        ("spectral_scores", dict(n_eigen=0), ValueError, "'n_eigen'"),
        ("spectral_scores", dict(n_eigen=11), ValueError, "'n_eigen'"),
        ("spectral_scores", dict(n_eigen=2.0), TypeError, "'n_eigen'"),
        ("spectral_scores", dict(bandwidth=-1.0), ValueError, "'bandwidth'"),
    ],
)
def test_option_validation(est, rng, fname, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        est.call(fname, rng.normal(size=(10, 2)), **kwargs)


@pytest.mark.parametrize("fname", ["stein_scores", "spectral_scores"])
def test_input_validation(est, rng, fname):
    x = rng.normal(size=(10, 2))
    with pytest.raises(ValueError, match="'samples'.*\\[N, D\\]"):
        est.call(fname, x[:, :, None])
    with pytest.raises(ValueError, match="'samples'.*N >= 2"):
        est.call(fname, x[:1])
    with pytest.raises(ValueError, match="'at'"):
        est.call(fname, x, rng.normal(size=(3, 3)))
    bad = x.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="'samples'.*non-finite"):
        est.call(fname, bad)
    with pytest.raises(ValueError, match="'at'.*non-finite"):
        est.call(fname, x, np.full((2, 2), np.inf))
    with pytest.raises(ValueError, match="'samples'.*bandwidth 0"):
        est.call(fname, np.zeros((5, 2)))
    with pytest.raises(TypeError, match="'samples'"):
        est.call(fname, x.astype(np.int64))
    with pytest.raises(TypeError, match="'samples'"):
        getattr(est.mod, fname)(x.tolist())


def test_spectral_drops_numerically_null_eigenpairs(est, rng):
    """threshold=1 or n_eigen=N on a sample set with duplicated points (K of rank 12, not 18)
    keeps only the 12 non-null eigenpairs: null ones are never inverted."""
    x = rng.normal(size=(12, 2))
    x = np.concatenate([x, x[:6]])
    want = est.call("spectral_scores", x, n_eigen=12)
    for kw in (dict(threshold=1.0), dict(n_eigen=18)):
        np.testing.assert_allclose(est.call("spectral_scores", x, **kw), want, rtol=1e-6, atol=1e-8)
