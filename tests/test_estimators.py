"""Score estimators of ``ppl_score.{torch,jax}.estimators``: kernel formulas against independent
numpy references (float64), the out-of-sample extension against the augmented estimator,
SSGE's eigenpair rule, cross-backend parity, accuracy on Gaussians (kernel and learned),
argument validation, and jit."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

from ppl_score.jax import estimators as je  # noqa: E402
from ppl_score.torch import estimators as te  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class TorchEst:
    name = "torch"
    mod = te

    def call(self, fname, samples, at=None, **kw):
        a = None if at is None else torch.as_tensor(at)
        return getattr(te, fname)(torch.as_tensor(samples), a, **kw).numpy()


class JaxEst:
    name = "jax"
    mod = je

    def call(self, fname, samples, at=None, **kw):
        a = None if at is None else jnp.asarray(at)
        return np.asarray(getattr(je, fname)(jnp.asarray(samples), a, **kw))


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


@pytest.mark.parametrize("fname", ["stein_scores", "spectral_scores"])
@pytest.mark.parametrize("with_at", [False, True])
@pytest.mark.parametrize("bandwidth", [None, 0.8])
def test_backend_parity(rng, fname, with_at, bandwidth):
    x = rng.normal(size=(60, 4)) @ rng.normal(size=(4, 4))
    at = rng.normal(size=(7, 4)) if with_at else None
    t = TorchEst().call(fname, x, at, bandwidth=bandwidth)
    j = JaxEst().call(fname, x, at, bandwidth=bandwidth)
    np.testing.assert_allclose(t, j, rtol=1e-6, atol=1e-10)


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


def test_jax_kernel_estimators_under_jit(rng):
    x, at = jnp.asarray(rng.normal(size=(30, 3))), jnp.asarray(rng.normal(size=(4, 3)))
    for f in (je.stein_scores, je.spectral_scores):
        eager = f(x, at)
        jitted = jax.jit(lambda s, a: f(s, a))(x, at)
        np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), rtol=1e-10, atol=1e-12)
    # batched internals (used by the implicit ELBO across particles) equal per-set calls
    xb = jnp.asarray(rng.normal(size=(3, 20, 2)))
    for kind, f in (("stein", je.stein_scores), ("spectral", je.spectral_scores)):
        got = jax.jit(lambda s: je.kernel_scores_batched(kind, s))(xb)
        for b in range(3):
            np.testing.assert_allclose(np.asarray(got[b]), np.asarray(f(xb[b])), rtol=1e-9, atol=1e-11)


def test_torch_batched_matches_single(rng):
    xb = torch.as_tensor(rng.normal(size=(3, 20, 2)))
    for kind, f in (("stein", te.stein_scores), ("spectral", te.spectral_scores)):
        got = te.kernel_scores_batched(kind, xb)
        for b in range(3):
            torch.testing.assert_close(got[b], f(xb[b]), rtol=1e-9, atol=1e-11)


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


# --------------------------------------------------------------------------------------
# learned estimator

MU = np.array([1.0, -1.0])
CHOL = np.array([[1.0, 0.0], [0.8, 0.5]])
PREC = np.linalg.inv(CHOL @ CHOL.T)


def _gaussian_data(n=2000, seed=0):
    r = np.random.default_rng(seed)
    return (r.normal(size=(n, 2)) @ CHOL.T + MU).astype(np.float32)


def _rel_fisher(scores, z):
    s = -(z - MU) @ PREC
    return float(((scores - s) ** 2).sum(1).mean() / (s**2).sum(1).mean())


# Measured with these seeds: about 0.02-0.05 for every method (dsm learns the score of the
# sigma-smoothed density, slightly biased); a useless estimator (s = 0) scores 1.
LEARNED_TOL = 0.15
METHODS = [("ssm_vr", {}), ("fd_ssm", {}), ("dsm", {"sigma": 0.1})]


@pytest.mark.parametrize("method,opts", METHODS)
def test_learned_torch_accuracy(method, opts):
    torch.manual_seed(0)
    x = torch.as_tensor(_gaussian_data())
    est = te.LearnedScoreEstimator(
        2, hidden=(32, 32), method=method, lr=5e-3, generator=torch.Generator().manual_seed(1), **opts
    )
    losses = est.fit(x, n_steps=400, batch_size=128, generator=torch.Generator().manual_seed(2))
    assert np.mean(losses[-50:]) < np.mean(losses[:50])
    z = x[:500]
    with torch.no_grad():
        assert _rel_fisher(est(z).numpy(), z.numpy()) < LEARNED_TOL


@pytest.mark.parametrize("method,opts", METHODS)
def test_learned_jax_accuracy(method, opts):
    import optax

    x = jnp.asarray(_gaussian_data())
    est = je.learned_score_estimator(2, hidden=(32, 32), method=method, optimizer=optax.adam(5e-3), **opts)
    state = est.init(jax.random.PRNGKey(0))
    state, losses = je.fit_score_estimator(est, state, jax.random.PRNGKey(1), x, n_steps=400, batch_size=128)
    losses = np.asarray(losses)
    assert losses[-50:].mean() < losses[:50].mean()
    z = x[:500]
    assert _rel_fisher(np.asarray(est.apply(state.params, z)), np.asarray(z)) < LEARNED_TOL


def test_learned_conditional_torch():
    """With a context: q(z | c) = N(c a, 0.25 I); the network must use c."""
    torch.manual_seed(0)
    c = torch.randn(2000, 1)
    a = torch.tensor([1.0, -2.0])
    z = c * a + 0.5 * torch.randn(2000, 2)
    est = te.LearnedScoreEstimator(2, context_dim=1, hidden=(32, 32), lr=5e-3)
    est.fit(z, c, n_steps=500, batch_size=128)
    with torch.no_grad():
        s = -(z - c * a) / 0.25
        rel = (((est(z, c) - s) ** 2).sum(1).mean() / (s**2).sum(1).mean()).item()
    assert rel < 0.15


def test_learned_update_is_one_step_and_jittable():
    x = jnp.asarray(_gaussian_data(256))
    est = je.learned_score_estimator(2, hidden=(16,), n_steps=3)
    state = est.init(jax.random.PRNGKey(0), jnp.float64)
    upd = jax.jit(est.update)
    s1, l1 = upd(state, jax.random.PRNGKey(1), x)
    s2, l2 = est.update(state, jax.random.PRNGKey(1), x)
    for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s2)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-10)
    assert not np.allclose(np.asarray(s1.params[0][0]), np.asarray(state.params[0][0]))
    assert np.isfinite(float(l1))


def test_learned_validation():
    with pytest.raises(ValueError, match="'method'"):
        te.LearnedScoreEstimator(2, method="esm")
    with pytest.raises(ValueError, match="'method'"):
        je.learned_score_estimator(2, method="ssm")
    with pytest.raises(ValueError, match="unknown option"):
        te.LearnedScoreEstimator(2, method="dsm", eps=0.1)
    with pytest.raises(ValueError, match="'sigma'"):
        je.learned_score_estimator(2, method="dsm", sigma=-1.0)
    with pytest.raises(ValueError, match="'dim'"):
        te.LearnedScoreEstimator(0)
    est = te.LearnedScoreEstimator(2, context_dim=1, hidden=(8,))
    with pytest.raises(ValueError, match="'context'.*required"):
        est.update(torch.randn(5, 2))
    with pytest.raises(ValueError, match="'samples'.*\\[N, 2\\]"):
        est.update(torch.randn(5, 3), torch.randn(5, 1))
    with pytest.raises(ValueError, match="'context'.*\\[5, 1\\]"):
        est(torch.randn(5, 2), torch.randn(4, 1))
    with pytest.raises(ValueError, match="non-finite"):
        est.update(torch.full((5, 2), float("nan")), torch.randn(5, 1))
    jest = je.learned_score_estimator(2, hidden=(8,))
    st = jest.init(jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="'context'.*unconditional"):
        jest.apply(st.params, jnp.zeros((3, 2)), jnp.zeros((3, 1)))
    with pytest.raises(ValueError, match="non-finite"):
        jest.update(st, jax.random.PRNGKey(0), jnp.full((3, 2), jnp.nan))


def test_spectral_drops_numerically_null_eigenpairs(est, rng):
    """threshold=1 or n_eigen=N on a sample set with duplicated points (K of rank 12, not 18)
    keeps only the 12 non-null eigenpairs: null ones are never inverted."""
    x = rng.normal(size=(12, 2))
    x = np.concatenate([x, x[:6]])
    want = est.call("spectral_scores", x, n_eigen=12)
    for kw in (dict(threshold=1.0), dict(n_eigen=18)):
        np.testing.assert_allclose(est.call("spectral_scores", x, **kw), want, rtol=1e-6, atol=1e-8)


# --------------------------------------------------------------------------------------
# learned estimator state: save and restore (state_dict / load_state_dict), device


def _torch_twin(**kw):
    return te.LearnedScoreEstimator(2, context_dim=1, hidden=(8,), dtype=torch.float64, n_steps=2, **kw)


def test_torch_learned_state_dict_round_trip():
    """A fresh estimator loaded with another's state gives the same scores and takes the
    same next step (Adam's moments and step counts, and the generator, come along), also
    through torch.save / torch.load; the snapshot does not follow later updates."""
    import io

    x = torch.as_tensor(np.random.default_rng(0).normal(size=(16, 2)))
    c = torch.as_tensor(np.random.default_rng(1).normal(size=(16, 1)))
    torch.manual_seed(0)
    est = _torch_twin(generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        est.update(x, c)
    sd = est.state_dict()
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    for source in (sd, loaded):
        torch.manual_seed(1)  # other initial weights: everything must come from the state
        other = _torch_twin(generator=torch.Generator().manual_seed(5))
        before = {k: v.clone() for k, v in source["net"].items()}
        other.load_state_dict(source)
        assert other.dtype == torch.float64 and other.device == est.device
        torch.testing.assert_close(other(x, c), est(x, c), rtol=0, atol=0)
        twin = _torch_twin(generator=torch.Generator())
        twin.load_state_dict(sd)
        assert other.update(x, c) == twin.update(x, c)
        torch.testing.assert_close(other(x, c), twin(x, c), rtol=0, atol=0)
        for k, v in source["net"].items():  # the dict given was not modified
            torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    step_count = sd["optimizer"]["state"][0]["step"]
    assert float(step_count) == 6.0  # 3 updates of n_steps=2
    est.update(x, c)  # later updates do not change the snapshot
    assert float(sd["optimizer"]["state"][0]["step"]) == 6.0
    # a round trip through the estimator itself
    state = est.state_dict()
    est2 = _torch_twin(generator=torch.Generator())
    est2.load_state_dict(state)
    assert est.update(x, c) == est2.update(x, c)


def test_torch_learned_state_dict_validation_and_device():
    est = _torch_twin()
    with pytest.raises(TypeError, match="'state_dict'"):
        est.load_state_dict([1, 2])
    with pytest.raises(ValueError, match="'state_dict'.*keys"):
        est.load_state_dict({"net": {}})
    other = te.LearnedScoreEstimator(2, context_dim=1, hidden=(4,), dtype=torch.float64, n_steps=2)
    with pytest.raises(ValueError, match="'state_dict'.*network"):
        est.load_state_dict(other.state_dict())
    with pytest.raises(ValueError, match="'state_dict'.*generator"):
        est.load_state_dict(_torch_twin(generator=torch.Generator()).state_dict())
    with pytest.raises(TypeError, match="'device'"):
        est.to(3)
    x, c = torch.randn(6, 2, dtype=torch.float64), torch.randn(6, 1, dtype=torch.float64)
    est.update(x, c)
    assert est.to("cpu") is est and est.device == torch.device("cpu") and est.dtype == torch.float64
    assert est.optimizer.state[next(est.net.parameters())]["exp_avg"].dtype == torch.float64
    assert np.isfinite(est.update(x, c))
    # scores come back in the dtype and on the device of z
    assert est(x.float(), c.float()).dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_torch_learned_to_cuda_keeps_float64_and_optimizer_state():
    x, c = torch.randn(6, 2, dtype=torch.float64), torch.randn(6, 1, dtype=torch.float64)
    est = _torch_twin()
    est.update(x, c)
    ref = _torch_twin()
    ref.load_state_dict(est.state_dict())
    est.to("cuda")
    assert est.device.type == "cuda" and est.dtype == torch.float64
    assert est.optimizer.state[next(est.net.parameters())]["exp_avg"].device.type == "cuda"
    est.update(x.cuda(), c.cuda())
    ref.update(x, c)
    out = est(x.cuda(), c.cuda())
    assert out.device.type == "cuda"
    torch.testing.assert_close(out.cpu(), ref(x, c), rtol=1e-10, atol=1e-12)
    back = _torch_twin()
    back.load_state_dict(est.state_dict())  # a CUDA state loads onto a CPU estimator
    torch.testing.assert_close(back(x, c), ref(x, c), rtol=1e-10, atol=1e-12)


def test_jax_learned_state_dict_round_trip(tmp_path):
    """The state as a flat dict of numpy arrays: through np.savez / np.load it restores the
    same scores and the same next step (Adam's count included)."""
    x = jnp.asarray(np.random.default_rng(0).normal(size=(16, 2)))
    est = je.learned_score_estimator(2, hidden=(8,), n_steps=2)
    state = est.init(jax.random.PRNGKey(0), jnp.float64)
    state, _ = est.update(state, jax.random.PRNGKey(1), x)
    sd = est.state_dict(state)
    assert all(isinstance(v, np.ndarray) for v in sd.values())
    np.savez(tmp_path / "state.npz", **sd)
    loaded = dict(np.load(tmp_path / "state.npz"))
    fresh = je.learned_score_estimator(2, hidden=(8,), n_steps=2)  # built alike
    for source in (sd, loaded):
        restored = fresh.load_state_dict(source)
        assert jax.tree.structure(restored) == jax.tree.structure(state)
        for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        np.testing.assert_array_equal(
            np.asarray(fresh.apply(restored.params, x)), np.asarray(est.apply(state.params, x))
        )
        s1, l1 = fresh.update(restored, jax.random.PRNGKey(2), x)
        s2, l2 = est.update(state, jax.random.PRNGKey(2), x)
        assert float(l1) == float(l2)
        for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s2)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(TypeError, match="'state'"):
        est.state_dict(sd)
    with pytest.raises(TypeError, match="'state_dict'"):
        est.load_state_dict([1])
    with pytest.raises(ValueError, match="'state_dict'.*shape"):
        je.learned_score_estimator(2, hidden=(4,), n_steps=2).load_state_dict(sd)
    with pytest.raises(ValueError, match="'state_dict'.*does not know"):
        est.load_state_dict({**sd, "extra": np.zeros(1)})
