"""Shared fixtures: a backend adapter so one case (numpy in, numpy out) feeds both the
torch and the JAX implementation of ``score_matching_loss``.

JAX runs with ``jax_enable_x64`` so that float64 closed forms and cross-backend parity can
be checked to ``rtol=1e-6`` and tighter; float32 stays available by passing float32 arrays.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

from tests.helpers.calibration import PRIOR, A
from tests.helpers.deq import TIGHT, B, D, _jax_params, _jax_quantities_fn

try:  # must happen before any JAX array is created
    import jax

    jax.config.update("jax_enable_x64", True)
except ImportError:  # pragma: no cover - the JAX half of the suite is then skipped
    jax = None


class TorchBackend:
    """``score_matching_loss`` of ``ppl_score.torch`` behind a numpy interface."""

    name = "torch"

    def __init__(self):
        import torch

        from ppl_score.torch import score_matching_loss

        self.torch = torch
        self._loss = score_matching_loss

    def asarray(self, a, dtype=np.float64):
        return self.torch.as_tensor(np.asarray(a, dtype=dtype))

    def to_numpy(self, t):
        return t.detach().cpu().numpy()

    def ops(self, dtype):
        """What a ``fn_builder`` needs to write a density once for both frameworks."""
        torch = self.torch
        return SimpleNamespace(
            name=self.name,
            const=lambda a: torch.as_tensor(np.asarray(a, dtype=dtype)),
            tanh=torch.tanh,
            logaddexp=torch.logaddexp,
            softplus=torch.nn.functional.softplus,
        )

    def call(self, fn, x, method, *, seed=None, **kw):
        """The raw backend call (backend arrays in and out)."""
        if seed is not None:
            kw["generator"] = self.torch.Generator().manual_seed(seed)
        return self._loss(fn, x, method, **kw)

    def loss(
        self, fn_builder, x, method, *, projections=None, noise=None, noise_levels=None, seed=None, dtype=None, **kw
    ):
        """``score_matching_loss(fn_builder(ops), x, method, ...)`` with numpy in and out.

        ``dtype`` (default: ``x``'s numpy dtype, float64 for Python floats) is the dtype of
        every array handed to the backend; ``seed`` seeds a fresh generator / key.
        """
        dtype = np.dtype(dtype or np.asarray(x).dtype)
        conv = lambda a: None if a is None else self.asarray(a, dtype)
        fn = fn_builder(self.ops(dtype))
        if noise_levels is not None:
            kw["noise_levels"] = conv(noise_levels)
        out = self.call(fn, conv(x), method, seed=seed, projections=conv(projections), noise=conv(noise), **kw)
        return self.to_numpy(out)


class JaxBackend:
    """``score_matching_loss`` of ``ppl_score.jax`` behind a numpy interface."""

    name = "jax"

    def __init__(self):
        import jax.numpy as jnp

        from ppl_score.jax import score_matching_loss

        self.jax = jax
        self.jnp = jnp
        self._loss = score_matching_loss

    def asarray(self, a, dtype=np.float64):
        return self.jnp.asarray(np.asarray(a, dtype=dtype))

    def to_numpy(self, t):
        return np.asarray(t)

    def ops(self, dtype):
        jnp = self.jnp
        return SimpleNamespace(
            name=self.name,
            const=lambda a: jnp.asarray(np.asarray(a, dtype=dtype)),
            tanh=jnp.tanh,
            logaddexp=jnp.logaddexp,
            softplus=self.jax.nn.softplus,
        )

    def call(self, fn, x, method, *, seed=None, **kw):
        if seed is not None:
            kw["key"] = self.jax.random.PRNGKey(seed)
        return self._loss(fn, x, method, **kw)

    def loss(
        self, fn_builder, x, method, *, projections=None, noise=None, noise_levels=None, seed=None, dtype=None, **kw
    ):
        dtype = np.dtype(dtype or np.asarray(x).dtype)
        conv = lambda a: None if a is None else self.asarray(a, dtype)
        fn = fn_builder(self.ops(dtype))
        if noise_levels is not None:
            kw["noise_levels"] = conv(noise_levels)
        out = self.call(fn, conv(x), method, seed=seed, projections=conv(projections), noise=conv(noise), **kw)
        return self.to_numpy(out)


_BACKENDS = {"torch": TorchBackend, "jax": JaxBackend}
_CACHE: dict = {}


@pytest.fixture(params=sorted(_BACKENDS), scope="session")
def backend(request):
    """Each test taking ``backend`` runs once per backend."""
    name = request.param
    pytest.importorskip(name)
    if name not in _CACHE:
        _CACHE[name] = _BACKENDS[name]()
    return _CACHE[name]


@pytest.fixture(scope="session")
def torch_backend():
    pytest.importorskip("torch")
    return _CACHE.setdefault("torch", TorchBackend())


@pytest.fixture(scope="session")
def jax_backend():
    pytest.importorskip("jax")
    return _CACHE.setdefault("jax", JaxBackend())


# ---------------------------------------------------------------------------------------
# Densities written once for both frameworks, with numpy references for s and H.
# All work on the flattened event: x[B, *event] -> flat[B, D].
# ---------------------------------------------------------------------------------------


class Gaussian:
    """``log p = -1/2 (x - mu)^T P (x - mu)``: ``s = -P (x - mu)``, ``H = -P``."""

    quadratic = True

    def __init__(self, mu, prec):
        self.mu, self.prec = np.asarray(mu, float), np.asarray(prec, float)
        self.dim = self.mu.size

    @classmethod
    def random(cls, dim, rng):
        a = rng.normal(size=(dim, dim))
        return cls(rng.normal(size=dim), a @ a.T / dim + 0.5 * np.eye(dim))

    def log_prob_fn(self, ops):
        mu, prec = ops.const(self.mu), ops.const(self.prec)

        def fn(x):
            r = x.reshape(x.shape[0], -1) - mu
            return -0.5 * ((r @ prec) * r).sum(-1)

        return fn

    def score_fn(self, ops):
        mu, prec = ops.const(self.mu), ops.const(self.prec)
        return lambda x: -((x.reshape(x.shape[0], -1) - mu) @ prec).reshape(x.shape)

    def builder(self, kind):
        return self.log_prob_fn if kind == "log_prob" else self.score_fn

    def score(self, flat):
        return -(flat - self.mu) @ self.prec

    def hessian(self, flat):
        return np.broadcast_to(-self.prec, (flat.shape[0], self.dim, self.dim))


class LogCosh:
    """Non-quadratic: ``log p = -sum_k logcosh(a_k^T x + b_k) - 1/2 x^T Q x``.

    ``s = -A^T tanh(z) - Q x`` and ``H = -A^T diag(1 - tanh(z)^2) A - Q`` with ``z = A x + b``.
    """

    quadratic = False

    def __init__(self, a, b, q):
        self.a, self.b, self.q = (np.asarray(t, float) for t in (a, b, q))
        self.dim = self.a.shape[1]

    @classmethod
    def random(cls, dim, rng, k=None):
        k = k or dim + 1
        return cls(1.5 * rng.normal(size=(k, dim)), rng.normal(size=k), 0.2 * np.eye(dim))

    def log_prob_fn(self, ops):
        a_t, b, q = ops.const(self.a.T), ops.const(self.b), ops.const(self.q)

        def fn(x):
            flat = x.reshape(x.shape[0], -1)
            z = flat @ a_t + b
            return -(ops.logaddexp(z, -z) - math.log(2.0)).sum(-1) - 0.5 * ((flat @ q) * flat).sum(-1)

        return fn

    def score_fn(self, ops):
        a, a_t, b, q = ops.const(self.a), ops.const(self.a.T), ops.const(self.b), ops.const(self.q)

        def fn(x):
            flat = x.reshape(x.shape[0], -1)
            return (-(ops.tanh(flat @ a_t + b) @ a) - flat @ q).reshape(x.shape)

        return fn

    def builder(self, kind):
        return self.log_prob_fn if kind == "log_prob" else self.score_fn

    def score(self, flat):
        return -np.tanh(flat @ self.a.T + self.b) @ self.a - flat @ self.q

    def hessian(self, flat):
        sech2 = 1.0 - np.tanh(flat @ self.a.T + self.b) ** 2  # [B, K]
        return -np.einsum("ki,bk,kj->bij", self.a, sech2, self.a) - self.q


# ---------------------------------------------------------------------------------------
# Reference per-example values from s and H (numpy, float64), SPEC.md section 1.
# ---------------------------------------------------------------------------------------


def flatten(a, lead):
    a = np.asarray(a, float)
    return a.reshape(*a.shape[:lead], -1)


def as_m(proj, x):
    """Projections ``[B, *event]`` or ``[M, B, *event]`` -> ``[M, B, D]``."""
    proj = np.asarray(proj, float)
    if proj.shape == np.shape(x):
        proj = proj[None]
    return flatten(proj, 2)


def ref_esm(s, h):
    return np.trace(h, axis1=1, axis2=2) + 0.5 * (s * s).sum(-1)


def ref_ssm(s, h, v):
    vhv = np.einsum("mbi,bij,mbj->mb", v, h, v)
    return (vhv + 0.5 * np.einsum("mbi,bi->mb", v, s) ** 2).mean(0)


def ref_ssm_vr(s, h, v):
    return np.einsum("mbi,bij,mbj->mb", v, h, v).mean(0) + 0.5 * (s * s).sum(-1)


def ref_dsm_residual(score, flat, noise, sigma):
    """``r = s(x~) + (x~ - x)/sigma^2`` with ``x~ = x + sigma n``."""
    return score(flat + sigma * noise) + noise / sigma


def sphere_scale(u):
    """``w = sqrt(D) u/||u||`` for ``u[M, B, D]``: the eps -> 0 limit's projection."""
    return math.sqrt(u.shape[-1]) * u / np.linalg.norm(u, axis=-1, keepdims=True)


def reference(density, method, kind, x, *, projections=None, noise=None, sigma=0.1):
    """Per-example ``[B]`` value of ``method`` (fd_*: its eps -> 0 limit) from ``s``, ``H``."""
    flat = flatten(x, 1)
    s, h = density.score(flat), density.hessian(flat)
    if method == "esm":
        return ref_esm(s, h)
    if method == "ssm":
        return ref_ssm(s, h, as_m(projections, x))
    if method == "ssm_vr":
        return ref_ssm_vr(s, h, as_m(projections, x))
    n = None if noise is None else flatten(noise, 1)
    if method == "dsm":
        return 0.5 * (ref_dsm_residual(density.score, flat, n, sigma) ** 2).sum(-1)
    w = sphere_scale(as_m(projections, x))
    if method == "fd_ssm":
        return ref_ssm(s, h, w) if kind == "log_prob" else ref_ssm_vr(s, h, w)
    if method == "fd_dsm":
        r = ref_dsm_residual(density.score, flat, n, sigma)
        return (0.5 * np.einsum("mbi,bi->mb", w, r) ** 2).mean(0)
    raise KeyError(method)


@pytest.fixture
def rng():
    return np.random.default_rng(20240601)


@pytest.fixture(scope="session")
def refs():
    """The densities and reference formulas above, for the test modules."""
    return SimpleNamespace(
        Gaussian=Gaussian,
        LogCosh=LogCosh,
        reference=reference,
        flatten=flatten,
        as_m=as_m,
        sphere_scale=sphere_scale,
        ref_esm=ref_esm,
        ref_ssm=ref_ssm,
        ref_ssm_vr=ref_ssm_vr,
        ref_dsm_residual=ref_dsm_residual,
    )


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny torch shapes gain nothing from threads and lose a lot on a shared machine: a
    module that uses this (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``)
    runs torch on one thread and restores the setting afterwards."""
    try:
        import torch
    except ImportError:  # pragma: no cover - JAX-only environment
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fresh_pyro():
    """Pyro's global state reset around a test: an empty param store and seed 0 (``pyro``
    tests that use it: ``pytestmark = pytest.mark.usefixtures("fresh_pyro")``)."""
    pyro = pytest.importorskip("pyro")
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    yield
    pyro.clear_param_store()


@pytest.fixture
def pyro_param_store():
    """An empty Pyro param store before and after a test (no reseeding)."""
    pyro = pytest.importorskip("pyro")
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()


# ---------------------------------------------------------------------------------------
# Calibration (tests/{pyro,numpyro,parity}/test_calibration.py): the models of
# tests/helpers/calibration.py in each PPL, built once per module.
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


# ---------------------------------------------------------------------------------------
# DEQ (tests/{torch,jax,parity,pyro,numpyro}/test_deq.py): the data, the backend modules
# and the unrolled JAX reference quantities, once per module.
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data():
    """``x [B, D]`` and two projections ``v [2, B, D]`` of the DEQ tests."""
    rng = np.random.default_rng(5)
    return rng.normal(size=(B, D)), rng.normal(size=(2, B, D))


@pytest.fixture(scope="module")
def tdeq():
    torch = pytest.importorskip("torch")
    from ppl_score.torch import deq

    # Anderson solves tiny batched linear systems; with 2 OpenMP threads on a loaded CPU
    # each such LAPACK call waits milliseconds for the second thread.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield deq
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def jdeq():
    pytest.importorskip("jax")
    from ppl_score.jax import deq

    return deq


@pytest.fixture(scope="module")
def jax_reference(tdeq, jdeq, data):
    """The unrolled quantities (compiled once for the module)."""
    import jax.numpy as jnp

    x, v = data
    params = _jax_params(tdeq)
    fn = _jax_quantities_fn(jdeq, jdeq.deq_config(backward="unrolled", **TIGHT))
    return params, [np.asarray(a) for a in fn(params, jnp.asarray(x), jnp.asarray(v[:1]))]
