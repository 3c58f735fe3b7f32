"""The kernel Stein discrepancy of ``ppl_score.{torch,jax}.stein``, one body run per backend
through the ``ks`` adapter: the closed-form Stein kernel against a double loop whose kernel
derivatives are finite differences (float64, both kernels, U and V), the wild bootstrap
against its formula, chunking, float32, the calibration of the test on draws of the model,
its power against a shifted and a rescaled model, and argument validation."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class TorchKS:
    name = "torch"

    def __init__(self):
        import torch

        from ppl_score.torch import stein

        self.torch, self.mod = torch, stein

    def arr(self, a, dtype=np.float64):
        return self.torch.as_tensor(np.asarray(a, dtype=dtype))

    def ksd(self, x, s, **kw):
        return float(self.mod.ksd(self.arr(x), self.arr(s), **kw))

    def test(self, x, s, seed=0, dtype=np.float64, **kw):
        if "weights" in kw:
            kw["weights"] = self.arr(kw["weights"])
        else:
            kw["generator"] = self.torch.Generator().manual_seed(seed)
        out = self.mod.ksd_test(self.arr(x, dtype), self.arr(s, dtype), **kw)
        return float(out.statistic), float(out.p_value)

    def p_values(self, xs, **kw):
        """The p-value of each data set ``xs [S, N, D]`` under the standard Gaussian."""
        gen = self.torch.Generator().manual_seed(0)
        xs = self.arr(xs)
        return np.array([float(self.mod.ksd_test(x, -x, generator=gen, **kw).p_value) for x in xs])

    def raw(self, a):
        return self.torch.as_tensor(a)


class JaxKS:
    name = "jax"

    def __init__(self):
        import jax
        import jax.numpy as jnp

        from ppl_score.jax import stein

        self.jax, self.jnp, self.mod = jax, jnp, stein

    def arr(self, a, dtype=np.float64):
        return self.jnp.asarray(np.asarray(a, dtype=dtype))

    def ksd(self, x, s, **kw):
        return float(self.mod.ksd(self.arr(x), self.arr(s), **kw))

    def test(self, x, s, seed=0, dtype=np.float64, **kw):
        if "weights" in kw:
            kw["weights"] = self.arr(kw["weights"])
        else:
            kw["key"] = self.jax.random.key(seed)
        out = self.mod.ksd_test(self.arr(x, dtype), self.arr(s, dtype), **kw)
        return float(out.statistic), float(out.p_value)

    def p_values(self, xs, **kw):
        jax = self.jax
        keys = jax.random.split(jax.random.key(0), len(xs))
        one = lambda key, x: self.mod.ksd_test(x, -x, key=key, **kw).p_value
        return np.asarray(jax.jit(jax.vmap(one))(keys, self.arr(xs)))

    def raw(self, a):
        return self.jnp.asarray(a)


_CACHE: dict = {}


@pytest.fixture(params=["torch", "jax"], scope="module")
def ks(request):
    pytest.importorskip(request.param)
    if request.param not in _CACHE:
        _CACHE[request.param] = TorchKS() if request.param == "torch" else JaxKS()
    return _CACHE[request.param]


# --------------------------------------------------------------------------------------
# reference: the Stein kernel by its definition, kernel derivatives by central differences


def np_median_bandwidth(x):
    i, j = np.triu_indices(len(x), k=1)
    return float(np.median(np.linalg.norm(x[i] - x[j], axis=-1)))


def np_stein_matrix(x, s, kernel, c=1.0, beta=-0.5, h=None, eps=1e-4):
    """``u(x_i, x_j)`` for every pair, ``[N, N]``."""
    n, d = x.shape

    def k(a, b):
        r2 = ((a - b) ** 2).sum()
        return (c * c + r2) ** beta if kernel == "imq" else np.exp(-r2 / (2 * h * h))

    e = np.eye(d) * eps
    u = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            a, b = x[i], x[j]
            gx = np.array([k(a + e[m], b) - k(a - e[m], b) for m in range(d)]) / (2 * eps)
            gy = np.array([k(a, b + e[m]) - k(a, b - e[m]) for m in range(d)]) / (2 * eps)
            tr = sum(
                k(a + e[m], b + e[m]) - k(a + e[m], b - e[m]) - k(a - e[m], b + e[m]) + k(a - e[m], b - e[m])
                for m in range(d)
            ) / (4 * eps * eps)
            u[i, j] = s[i] @ s[j] * k(a, b) + s[i] @ gy + s[j] @ gx + tr
    return u


def np_statistic(u, statistic):
    n = len(u)
    if statistic == "v":
        return u.sum() / n**2
    return (u.sum() - np.trace(u)) / (n * (n - 1))


# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kernel, opts, statistic",
    [
        ("imq", {}, "u"),
        ("imq", {"c": 0.7, "beta": -0.3}, "v"),
        ("rbf", {"bandwidth": 1.3}, "v"),
        ("rbf", {}, "u"),  # median heuristic
    ],
)
def test_matches_double_loop(ks, rng, kernel, opts, statistic):
    x = rng.normal(size=(9, 3)) + 5.0  # away from 0: exercises the centring
    s = rng.normal(size=(9, 3))
    h = opts.get("bandwidth", np_median_bandwidth(x))
    ref = np_statistic(np_stein_matrix(x, s, kernel, c=opts.get("c", 1.0), beta=opts.get("beta", -0.5), h=h), statistic)
    got = ks.ksd(x, s, kernel=kernel, statistic=statistic, **opts)
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-8)
    # chunks (here 4 + 4 + 1 padded to 12 rows) give the same value
    chunked = ks.ksd(x, s, kernel=kernel, statistic=statistic, chunk_size=4, **opts)
    np.testing.assert_allclose(chunked, got, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("statistic", ["u", "v"])
def test_bootstrap_matches_formula(ks, rng, statistic):
    n, b = 11, 200
    x = rng.normal(size=(n, 2))
    s = -x + 0.3 * rng.normal(size=(n, 2))
    w = rng.choice([-1.0, 1.0], size=(b, n))
    u = np_stein_matrix(x, s, "imq")
    if statistic == "u":
        u = u - np.diag(np.diag(u))
    norm = n * (n - 1) if statistic == "u" else n * n
    stat = u.sum() / norm
    boot = np.einsum("bi,ij,bj->b", w, u, w) / norm
    p = (1 + (boot >= stat).sum()) / (1 + b)
    for chunk in (None, 3):
        got_stat, got_p = ks.test(x, s, n_bootstrap=b, weights=w, statistic=statistic, chunk_size=chunk)
        np.testing.assert_allclose(got_stat, stat, rtol=1e-6, atol=1e-8)
        assert got_p == pytest.approx(p, abs=1e-12)
    # drawn multipliers: the same seed, the same p-value; p in [1/(1+B), 1]
    p1 = ks.test(x, s, seed=3, n_bootstrap=b)[1]
    assert p1 == ks.test(x, s, seed=3, n_bootstrap=b)[1]
    assert 1 / (1 + b) <= p1 <= 1


def test_float32(ks, rng):
    x = rng.normal(size=(9, 3))  # the shape of test_matches_double_loop: no new float64 compilation
    s = -x + 0.1 * rng.normal(size=(9, 3))
    for kernel in ("imq", "rbf"):
        ref = ks.ksd(x, s, kernel=kernel)
        out = ks.mod.ksd(ks.arr(x, np.float32), ks.arr(s, np.float32), kernel=kernel)
        assert str(out.dtype).endswith("float32")
        np.testing.assert_allclose(float(out), ref, rtol=1e-3, atol=1e-5)


def test_v_statistic_nonnegative_u_unbiased(ks, rng):
    x = rng.normal(size=(9, 3))
    assert ks.ksd(x, rng.normal(size=(9, 3)), statistic="v") >= 0.0
    # U and V differ by the diagonal only
    s = -x
    n = len(x)
    u = ks.ksd(x, s, statistic="u")
    v = ks.ksd(x, s, statistic="v")
    # u_ii = phi(0) ||s_i||^2 - 2 D phi'(0), with phi(0) = 1 and phi'(0) = -1/2 (c = 1, beta = -1/2)
    diag = (s * s).sum(-1) + 2 * x.shape[1] * 0.5
    np.testing.assert_allclose(v * n * n, u * n * (n - 1) + diag.sum(), rtol=1e-10)


# --------------------------------------------------------------------------------------
# calibration and power


N_SEEDS, ALPHA = 50, 0.05
MAX_REJECTIONS = 9  # P(Binomial(50, 0.05) >= 10) = 1.6e-4


@pytest.mark.parametrize("kernel", ["imq", "rbf"])
def test_calibrated_on_draws_of_the_model(ks, kernel):
    """Standard Gaussian data (D = 2, N = 100), 50 seeds: the rejections at 0.05 stay within
    binomial bounds and the p-values average about 1/2 (uniform: sd of the mean 0.041).
    The RBF kernel runs in torch only: the bootstrap is the same code for both kernels, and
    test_matches_double_loop checks JAX's RBF Stein kernel (a compilation saved)."""
    if kernel == "rbf" and ks.name == "jax":
        pytest.skip("the JAX RBF Stein kernel is checked by test_matches_double_loop")
    xs = np.random.default_rng(7).normal(size=(N_SEEDS, 100, 2))
    p = ks.p_values(xs, kernel=kernel, n_bootstrap=500)
    rejections = int((p <= ALPHA).sum())
    assert rejections <= MAX_REJECTIONS, p
    assert 0.36 < p.mean() < 0.64, p


@pytest.mark.parametrize("mean, sd", [(0.5, 1.0), (0.0, 1.5)], ids=["shifted", "scaled"])
def test_power(ks, mean, sd):
    """Draws of N(mean, sd^2 I) tested against the standard Gaussian (N = 500) are rejected."""
    x = mean + sd * np.random.default_rng(11).normal(size=(500, 2))
    stat, p = ks.test(x, -x, n_bootstrap=500)
    assert stat > 0 and p <= 0.01


# --------------------------------------------------------------------------------------
# errors


def test_errors(ks, rng):
    x, s = rng.normal(size=(6, 2)), rng.normal(size=(6, 2))
    X, S = ks.arr(x), ks.arr(s)
    ksd = ks.mod.ksd
    with pytest.raises(TypeError, match="'samples'"):
        ksd(x.tolist(), S)
    with pytest.raises(TypeError, match="'scores'.*floating"):
        ksd(X, ks.raw(np.ones((6, 2), dtype=np.int32)))
    with pytest.raises(ValueError, match="'samples'.*\\[N, D\\]"):
        ksd(ks.arr(x[:, 0]), ks.arr(s[:, 0]))
    with pytest.raises(ValueError, match="'samples'.*at least 2"):
        ksd(X[:1], S[:1])
    with pytest.raises(ValueError, match="'scores'.*shape"):
        ksd(X, S[:5])
    with pytest.raises(ValueError, match="'samples'.*non-finite"):
        ksd(ks.arr(np.where(np.arange(12).reshape(6, 2) == 3, np.nan, x)), S)
    with pytest.raises(ValueError, match="'scores'.*non-finite"):
        ksd(X, ks.arr(np.full((6, 2), np.inf)))
    with pytest.raises(ValueError, match="'kernel'"):
        ksd(X, S, kernel="gaussian")
    with pytest.raises(TypeError, match="'kernel'"):
        ksd(X, S, kernel=1)
    with pytest.raises(ValueError, match="'statistic'"):
        ksd(X, S, statistic="w")
    with pytest.raises(ValueError, match="'c'"):
        ksd(X, S, c=0.0)
    with pytest.raises(TypeError, match="'c'"):
        ksd(X, S, c="1")
    with pytest.raises(ValueError, match="'beta'.*\\(-1, 0\\)"):
        ksd(X, S, beta=-1.0)
    with pytest.raises(ValueError, match="'beta'"):
        ksd(X, S, beta=0.5)
    with pytest.raises(TypeError, match="'beta'"):
        ksd(X, S, beta=None)
    with pytest.raises(ValueError, match="'bandwidth'.*rbf"):
        ksd(X, S, bandwidth=1.0)
    with pytest.raises(ValueError, match="'bandwidth'"):
        ksd(X, S, kernel="rbf", bandwidth=-1.0)
    with pytest.raises(TypeError, match="'bandwidth'"):
        ksd(X, S, kernel="rbf", bandwidth="median")
    with pytest.raises(ValueError, match="'bandwidth'.*0 in float32"):
        ksd(ks.arr(x, np.float32), ks.arr(s, np.float32), kernel="rbf", bandwidth=1e-50)
    with pytest.raises(ValueError, match="'chunk_size'"):
        ksd(X, S, chunk_size=0)
    with pytest.raises(TypeError, match="'chunk_size'"):
        ksd(X, S, chunk_size=2.0)
    with pytest.raises(ValueError, match="median heuristic gives bandwidth 0"):
        ksd(ks.arr(np.ones((6, 2))), S, kernel="rbf")
    with pytest.raises(ValueError, match="'n_bootstrap'"):
        ks.test(x, s, n_bootstrap=0)
    with pytest.raises(TypeError, match="'n_bootstrap'"):
        ks.test(x, s, n_bootstrap=10.0)
    with pytest.raises(ValueError, match="'weights'.*\\[10, 6\\]"):
        ks.test(x, s, n_bootstrap=10, weights=np.ones((10, 5)))
    with pytest.raises(ValueError, match="'weights'.*non-finite"):
        ks.test(x, s, n_bootstrap=2, weights=np.full((2, 6), np.nan))


def test_nonfinite_statistic_warns_and_has_no_p_value(ks, rng):
    """Finite float32 scores whose Stein kernel overflows: the statistic is nan or inf, the
    function warns (``NonFiniteWarning``), and the p-value is nan, not ``1 / (B + 1)`` (a nan
    statistic exceeds no bootstrap draw, which would read as the strongest rejection)."""
    from ppl_score import NonFiniteWarning

    x = rng.normal(size=(20, 2))
    s = -x.copy()
    s[:4] = [[1e20, 1e20], [1e20, 1e20], [-1e20, -1e20], [-1e20, -1e20]]  # inf - inf: nan
    X, S = ks.arr(x, np.float32), ks.arr(s, np.float32)
    with pytest.warns(NonFiniteWarning, match="ksd is not finite.*overflow"):
        assert not np.isfinite(float(ks.mod.ksd(X, S)))
    with pytest.warns(NonFiniteWarning, match="ksd_test is not finite"):
        statistic, p_value = ks.test(x, s, dtype=np.float32, n_bootstrap=50)
    assert np.isnan(statistic) and np.isnan(p_value)
    s[2:4] = -x[2:4]  # only +1e20 rows: the statistic is +inf
    with pytest.warns(NonFiniteWarning, match="ksd_test is not finite"):
        statistic, p_value = ks.test(x, s, dtype=np.float32, n_bootstrap=50)
    assert statistic == np.inf and np.isnan(p_value)
