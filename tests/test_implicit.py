"""``ImplicitELBO`` and ``WAE`` in Pyro and NumPyro.

* The exact-score identity: with ``grad_z log q`` itself in place of the estimator, the
  implicit gradient is ``Trace_ELBO``'s for a reparameterized Gaussian guide, up to the
  zero-mean score-function term ``mean_p grad_phi log q_phi(z_p)|_{z_p}`` (computed here
  in closed form by autodiff); with noise whose sample mean is 0 and second moment 1 that
  term vanishes and the gradients are equal.
* An implicit guide ``z = mu + L eps`` on a conjugate Gaussian model recovers the exact
  posterior mean and covariance (kernel and learned estimators, both PPLs; NumPyro inside
  the jitted ``SVI.run``).
* ``WAE`` (score and MMD regularizers) decreases its reconstruction term and the
  divergence of the codes from the prior.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pyro = pytest.importorskip("pyro")
jax = pytest.importorskip("jax")
numpyro = pytest.importorskip("numpyro")
optax = pytest.importorskip("optax")

import jax.numpy as jnp  # noqa: E402
import numpyro.distributions as ndist  # noqa: E402
import pyro.distributions as pdist  # noqa: E402

from ppl_score.jax.estimators import learned_score_estimator  # noqa: E402
from ppl_score.numpyro.implicit import ImplicitELBO as NImplicitELBO  # noqa: E402
from ppl_score.numpyro.implicit import score_state  # noqa: E402
from ppl_score.pyro.implicit import ImplicitELBO as PImplicitELBO  # noqa: E402
from ppl_score.torch.estimators import LearnedScoreEstimator  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def _fresh_param_store():
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()


# --------------------------------------------------------------------------------------
# exact-score gradient identity

D, P = 3, 6
X_OBS = np.array([[0.3, -1.2, 0.8], [1.1, 0.4, -0.5]])


def _pyro_model(x):
    z = pyro.sample("z", pdist.Normal(torch.zeros(D, dtype=x.dtype), 1.5).to_event(1))
    with pyro.plate("data", x.shape[0]):
        # non-linear likelihood: the gradient identity does not rely on conjugacy
        pyro.sample("x", pdist.Normal(torch.tanh(z) + 0.3 * z, 0.7).to_event(1), obs=x)


class _FixedNoiseNormal(pdist.Normal):
    """``rsample = loc + scale * eps`` with a given ``eps`` (to pair Trace_ELBO's draws with
    the implicit guide's)."""

    def __init__(self, loc, scale, eps):
        super().__init__(loc, scale)
        self._eps = eps

    def rsample(self, sample_shape=torch.Size()):
        return self.loc + self.scale * self._eps


def _pyro_grads(loss, guide_kind, eps_rows, x):
    pyro.clear_param_store()
    rows = iter(eps_rows)

    def guide(x):
        loc = pyro.param("loc", torch.tensor([0.2, -0.1, 0.4], dtype=torch.float64))
        scale = pyro.param(
            "scale", torch.tensor([0.8, 1.3, 0.6], dtype=torch.float64), constraint=pdist.constraints.positive
        )
        eps = next(rows)
        if guide_kind == "implicit":
            pyro.sample("z", pdist.Delta(loc + scale * eps, event_dim=1))
        else:
            pyro.sample("z", _FixedNoiseNormal(loc, scale, eps).to_event(1))

    loss.loss_and_grads(_pyro_model, guide, x)
    params = pyro.get_param_store()
    out = {name: params.get_param(name).unconstrained().grad.clone() for name in ("loc", "scale")}
    return out, dict(loc=params["loc"].detach(), scale=params["scale"].detach())


def _exact_score(z, context):
    loc, scale = pyro.param("loc").detach(), pyro.param("scale").detach()
    return -(z - loc) / scale**2


@pytest.mark.parametrize("standardize", [True, False])
def test_pyro_exact_score_gradient_equals_trace_elbo(standardize):
    x = torch.as_tensor(X_OBS)
    eps = torch.as_tensor(np.random.default_rng(3).normal(size=(P, D)))
    if standardize:  # sample mean 0, sample second moment 1 per coordinate
        eps = eps - eps.mean(0)
        eps = eps / eps.pow(2).mean(0).sqrt()
    g_imp, values = _pyro_grads(PImplicitELBO(_exact_score, num_particles=P), "implicit", eps, x)
    g_tr, _ = _pyro_grads(pyro.infer.Trace_ELBO(num_particles=P), "normal", eps, x)
    # the zero-mean term: mean_p grad_phi log N(z_p; loc, scale) at fixed z_p, in the
    # unconstrained coordinates of the param store (log scale)
    loc = values["loc"].clone().requires_grad_(True)
    log_scale = values["scale"].log().clone().requires_grad_(True)
    z = values["loc"] + values["scale"] * eps
    lq = pdist.Normal(loc, log_scale.exp()).log_prob(z).sum() / P
    c_loc, c_log_scale = torch.autograd.grad(lq, [loc, log_scale])
    # loss = -ELBO: implicit = trace - c
    torch.testing.assert_close(g_imp["loc"], g_tr["loc"] - c_loc, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_imp["scale"], g_tr["scale"] - c_log_scale, rtol=1e-10, atol=1e-12)
    if standardize:
        torch.testing.assert_close(g_imp["loc"], g_tr["loc"], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(g_imp["scale"], g_tr["scale"], rtol=1e-10, atol=1e-12)
    else:
        assert c_log_scale.abs().max() > 1e-3  # the term the identity accounts for is there


def test_pyro_implicit_loss_value_and_module_route():
    """``loss`` is the negative ELBO without the implicit entropy; the ``ELBOModule`` route
    (``differentiable_loss``) gives the same value and the same gradients as ``loss_and_grads``."""
    x = torch.as_tensor(X_OBS)
    eps = torch.as_tensor(np.random.default_rng(4).normal(size=(P, D)))

    def guide(x):
        loc = pyro.param("loc", torch.zeros(D, dtype=torch.float64))
        pyro.sample("z", pdist.Delta(loc + eps[guide.i % P], event_dim=1))
        guide.i += 1

    guide.i = 0
    elbo = PImplicitELBO("stein", num_particles=P)
    value = elbo.loss(_pyro_model, guide, x)
    loc = pyro.param("loc").detach()
    want = -np.mean(
        [
            (
                pdist.Normal(torch.zeros(D, dtype=torch.float64), 1.5).log_prob(loc + e).sum()
                + pdist.Normal(torch.tanh(loc + e) + 0.3 * (loc + e), 0.7).log_prob(x).sum()
            ).item()
            for e in eps
        ]
    )
    np.testing.assert_allclose(value, want, rtol=1e-12)
    guide.i = 0
    pyro.clear_param_store()
    v1 = elbo.loss_and_grads(_pyro_model, guide, x)
    g1 = pyro.get_param_store().get_param("loc").grad.clone()
    guide.i = 0
    pyro.clear_param_store()
    v2 = elbo(_pyro_model, guide)(x)
    v2.backward()
    g2 = pyro.get_param_store().get_param("loc").grad
    np.testing.assert_allclose(v1, v2.item(), rtol=1e-12)
    torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(v1, want, rtol=1e-12)


def _numpyro_model(x):
    z = numpyro.sample("z", ndist.Normal(jnp.zeros(D), 1.5).to_event(1))
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("x", ndist.Normal(jnp.tanh(z) + 0.3 * z, 0.7).to_event(1), obs=x)


def test_numpyro_exact_score_gradient_equals_trace_elbo():
    x = jnp.asarray(X_OBS)

    def implicit_guide(x):
        loc = numpyro.param("loc", jnp.array([0.2, -0.1, 0.4]))
        scale = numpyro.param("scale", jnp.array([0.8, 1.3, 0.6]), constraint=ndist.constraints.positive)
        eps = jax.random.normal(numpyro.prng_key(), (D,))
        numpyro.sample("z", ndist.Delta(loc + scale * eps, event_dim=1))

    def normal_guide(x):
        loc = numpyro.param("loc", jnp.array([0.2, -0.1, 0.4]))
        scale = numpyro.param("scale", jnp.array([0.8, 1.3, 0.6]), constraint=ndist.constraints.positive)
        # Normal.sample(k) = loc + scale * normal(k): the same draws as the implicit guide
        numpyro.sample("z", ndist.Normal(loc, scale).to_event(1), rng_key=numpyro.prng_key())

    def exact_score(z, context):
        return -(z - numpyro.param("loc")) / numpyro.param("scale") ** 2

    key = jax.random.PRNGKey(11)
    params = {"loc": jnp.array([0.2, -0.1, 0.4]), "scale": jnp.array([0.8, 1.3, 0.6])}
    imp = NImplicitELBO(exact_score, num_particles=P)
    trace = numpyro.infer.Trace_ELBO(num_particles=P)

    def grads(elbo, guide):
        # in the unconstrained coordinates (log scale), as SVI differentiates
        f = lambda u: elbo.loss(key, {"loc": u["loc"], "scale": jnp.exp(u["scale"])}, _numpyro_model, guide, x)
        return jax.grad(f)({"loc": params["loc"], "scale": jnp.log(params["scale"])})

    g_imp, g_tr = grads(imp, implicit_guide), grads(trace, normal_guide)
    # the particles' z, recorded by a (non-differentiated) evaluation with a recording estimator
    seen = []
    NImplicitELBO(lambda z, c: seen.append(z) or jnp.zeros_like(z), num_particles=P).loss(
        key, params, _numpyro_model, implicit_guide, x
    )
    z = np.asarray(seen[0])

    def lq(u):
        return ndist.Normal(u["loc"], jnp.exp(u["scale"])).log_prob(z).sum() / P

    c = jax.grad(lq)({"loc": params["loc"], "scale": jnp.log(params["scale"])})
    for k in ("loc", "scale"):
        np.testing.assert_allclose(np.asarray(g_imp[k]), np.asarray(g_tr[k] - c[k]), rtol=1e-9, atol=1e-11)
    assert np.abs(np.asarray(c["scale"])).max() > 1e-3


# --------------------------------------------------------------------------------------
# conjugate Gaussian: the implicit guide z = mu + L eps recovers the posterior

A = np.array([[1.0, 0.5], [0.0, 1.0]])
N_OBS = 5
X_CONJ = np.array([0.5, -1.0]) @ A.T + np.random.default_rng(0).normal(size=(N_OBS, 2))
POST_COV = np.linalg.inv(np.eye(2) + N_OBS * A.T @ A)
POST_MEAN = POST_COV @ (A.T @ X_CONJ.sum(0))
# Posterior sds are about 0.4; the final iterate of a noisy optimization (and, for the
# kernel estimator, the ridge eta's bias) gives mean errors of a few 0.01 and covariance
# errors of 5-15% (measured); the tolerances are well inside what a missing entropy term
# (covariance -> 0) or a wrong sign (covariance blows up) would give.
MEAN_TOL, COV_RTOL = 0.1, 0.3


def _check_posterior(mu, cov):
    mu, cov = np.asarray(mu, float), np.asarray(cov, float)
    assert np.abs(mu - POST_MEAN).max() < MEAN_TOL, (mu, POST_MEAN)
    assert np.linalg.norm(cov - POST_COV) / np.linalg.norm(POST_COV) < COV_RTOL, (cov, POST_COV)


def _pyro_conjugate(loss, steps):
    torch.manual_seed(0)
    a, x = torch.as_tensor(A, dtype=torch.float32), torch.as_tensor(X_CONJ, dtype=torch.float32)

    def model(x):
        z = pyro.sample("z", pdist.Normal(torch.zeros(2), 1.0).to_event(1))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", pdist.Normal(z @ a.T, 1.0).to_event(1), obs=x)

    def guide(x):
        mu = pyro.param("mu", torch.zeros(2))
        L = pyro.param("L", torch.eye(2))
        eps = pyro.sample("eps", pdist.Normal(torch.zeros(2), 1.0).to_event(1), infer={"is_auxiliary": True})
        pyro.sample("z", pdist.Delta(mu + eps @ torch.tril(L).T, event_dim=1))

    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 0.02}), loss)
    for _ in range(steps):
        svi.step(x)
    mu, L = pyro.param("mu").detach(), torch.tril(pyro.param("L").detach())
    return mu.numpy(), (L @ L.T).numpy()


def test_pyro_conjugate_posterior_stein():
    _check_posterior(*_pyro_conjugate(PImplicitELBO("stein", num_particles=32, vectorize_particles=True), 400))


def test_pyro_conjugate_posterior_learned():
    torch.manual_seed(1)
    est = LearnedScoreEstimator(2, hidden=(32, 32), lr=1e-2, n_steps=3)
    _check_posterior(*_pyro_conjugate(PImplicitELBO(est, num_particles=128, vectorize_particles=True), 400))


def _numpyro_conjugate(kind, steps, particles):
    est = learned_score_estimator(2, hidden=(32, 32), optimizer=optax.adam(1e-2), n_steps=3)
    x = jnp.asarray(X_CONJ)

    def model(x):
        z = numpyro.sample("z", ndist.Normal(jnp.zeros(2), 1.0).to_event(1))
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("x", ndist.Normal(z @ A.T, 1.0).to_event(1), obs=x)

    def guide(x):
        if kind == "learned":
            score_state("z", est)
        mu = numpyro.param("mu", jnp.zeros(2))
        L = numpyro.param("L", jnp.eye(2))
        eps = jax.random.normal(numpyro.prng_key(), (2,))
        numpyro.sample("z", ndist.Delta(mu + jnp.tril(L) @ eps, event_dim=1))

    loss = NImplicitELBO(est if kind == "learned" else kind, num_particles=particles)
    svi = numpyro.infer.SVI(model, guide, optax.adam(0.02), loss)
    res = svi.run(jax.random.PRNGKey(0), steps, x, progress_bar=False)  # jitted scan
    if kind == "learned":
        # the estimator's state was carried (and changed) through the jitted updates
        state = res.state.mutable_state["z_score_state"]
        assert int(np.asarray(state.opt_state[0].count)) == 3 * steps
    L = jnp.tril(res.params["L"])
    return res.params["mu"], L @ L.T


@pytest.mark.parametrize("kind,particles", [("stein", 32), ("spectral", 32), ("learned", 128)])
def test_numpyro_conjugate_posterior_under_jit(kind, particles):
    _check_posterior(*_numpyro_conjugate(kind, 400, particles))


# --------------------------------------------------------------------------------------
# validation


def test_implicit_validation():
    with pytest.raises(ValueError, match="'num_particles'.*>= 2"):
        PImplicitELBO("stein")
    with pytest.raises(ValueError, match="'num_particles'.*>= 2"):
        NImplicitELBO("spectral", num_particles=1)
    with pytest.raises(ValueError, match="'estimator'"):
        PImplicitELBO("ksd", num_particles=4)
    with pytest.raises(TypeError, match="'estimator'"):
        NImplicitELBO(3.0)
    with pytest.raises(ValueError, match="'num_particles'"):
        PImplicitELBO("stein", num_particles=0)
    with pytest.raises(TypeError, match="'context'"):
        NImplicitELBO("stein", num_particles=4, context=3)

    def model():
        pyro.sample("z", pdist.Normal(0.0, 1.0))

    def guide():
        pyro.sample("z", pdist.Normal(pyro.param("m", torch.tensor(0.0)), 1.0))

    with pytest.raises(ValueError, match="'sites'.*'z' is not implicit"):
        PImplicitELBO("stein", num_particles=2, sites=["z"]).loss(model, guide)

    est = learned_score_estimator(1, hidden=(4,))

    def nmodel():
        numpyro.sample("z", ndist.Normal(0.0, 1.0).expand([1]).to_event(1))

    def nguide():
        numpyro.sample("z", ndist.Delta(numpyro.param("m", jnp.zeros(1)), event_dim=1))

    with pytest.raises(ValueError, match="z_score_state.*score_state"):
        NImplicitELBO(est).loss(jax.random.PRNGKey(0), {"m": jnp.zeros(1)}, nmodel, nguide)


# --------------------------------------------------------------------------------------
# amortized guide: local latents, the learned estimator conditioned on the guide's input
#   z_i ~ N(0, 1), x_i ~ N(z_i, s^2)  =>  z_i | x_i ~ N(x_i / (1 + s^2), s^2 / (1 + s^2))

S2 = 0.5
X_LOCAL = np.random.default_rng(5).normal(size=(256, 1)) * np.sqrt(1 + S2)
AMORT_SLOPE, AMORT_VAR = 1 / (1 + S2), S2 / (1 + S2)


def _check_amortized(a, b, scale):
    # Measured: slope and variance within a few percent after 300 steps.
    assert abs(a - AMORT_SLOPE) < 0.1, a
    assert abs(b) < 0.1, b
    assert abs(scale**2 - AMORT_VAR) / AMORT_VAR < 0.3, scale**2


def test_pyro_amortized_learned_with_context():
    torch.manual_seed(0)
    x = torch.as_tensor(X_LOCAL, dtype=torch.float32)

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", pdist.Normal(torch.zeros(1), 1.0).to_event(1))
            pyro.sample("x", pdist.Normal(z, S2**0.5).to_event(1), obs=x)

    def guide(x):
        a, b = pyro.param("a", torch.tensor(0.0)), pyro.param("b", torch.tensor(0.5))
        s = pyro.param("s", torch.tensor(1.0), constraint=pdist.constraints.positive)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", pdist.Delta(a * x + b + s * torch.randn_like(x), event_dim=1))

    est = LearnedScoreEstimator(1, context_dim=1, hidden=(32, 32), lr=1e-2, n_steps=2)
    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 0.02}), PImplicitELBO(est, context=lambda x: x))
    for _ in range(300):
        svi.step(x)
    _check_amortized(pyro.param("a").item(), pyro.param("b").item(), pyro.param("s").item())


def test_numpyro_amortized_learned_with_context():
    x = jnp.asarray(X_LOCAL)
    est = learned_score_estimator(1, context_dim=1, hidden=(32, 32), optimizer=optax.adam(1e-2), n_steps=2)

    def model(x):
        with numpyro.plate("data", x.shape[0]):
            z = numpyro.sample("z", ndist.Normal(jnp.zeros(1), 1.0).to_event(1))
            numpyro.sample("x", ndist.Normal(z, S2**0.5).to_event(1), obs=x)

    def guide(x):
        score_state("z", est)
        a, b = numpyro.param("a", 0.0), numpyro.param("b", 0.5)
        s = numpyro.param("s", 1.0, constraint=ndist.constraints.positive)
        with numpyro.plate("data", x.shape[0]):
            eps = jax.random.normal(numpyro.prng_key(), x.shape)
            numpyro.sample("z", ndist.Delta(a * x + b + s * eps, event_dim=1))

    svi = numpyro.infer.SVI(model, guide, optax.adam(0.02), NImplicitELBO(est, context=lambda x: x))
    res = svi.run(jax.random.PRNGKey(0), 300, x, progress_bar=False)
    _check_amortized(float(res.params["a"]), float(res.params["b"]), float(res.params["s"]))


# --------------------------------------------------------------------------------------
# WAE: both terms decrease (codes start far from the prior: the encoder's output bias is 3)

from ppl_score.numpyro.wae import WAE as NWAE  # noqa: E402
from ppl_score.numpyro.wae import imq_mmd2 as n_imq_mmd2  # noqa: E402
from ppl_score.pyro.wae import WAE as PWAE  # noqa: E402
from ppl_score.pyro.wae import imq_mmd2 as p_imq_mmd2  # noqa: E402

_R = np.random.default_rng(0)
X_WAE = (np.tanh(_R.normal(size=(512, 2)) @ _R.normal(size=(2, 6))) + 0.05 * _R.normal(size=(512, 6))).astype(
    np.float32
)
WAE_CASES = [("mmd", "stein"), ("score", "stein"), ("score", "spectral"), ("score", "learned")]


def _check_wae(before, after, learned):
    # Measured after 300 steps: reconstruction 3.0 -> 0.05-0.25, MMD^2 to the prior 7.0 ->
    # below 0.05 (kernel estimators, MMD) and below 1 (the learned estimator, one SSM-VR step
    # per SVI step, lags behind the moving codes).
    assert after["reconstruction"] < 0.25 * before["reconstruction"], (before, after)
    assert after["mmd"] < (0.25 if learned else 0.1) * before["mmd"], (before, after)


@pytest.mark.parametrize("regularizer,estimator", WAE_CASES)
def test_pyro_wae_decreases_both_terms(regularizer, estimator):
    from torch import nn

    torch.manual_seed(0)
    x_all = torch.as_tensor(X_WAE)
    enc = nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 2))
    with torch.no_grad():
        enc[2].bias.fill_(3.0)
    dec = nn.Sequential(nn.Linear(2, 32), nn.Tanh(), nn.Linear(32, 6))

    def model(x):
        pyro.module("dec", dec)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", pdist.Normal(torch.zeros(2), 1.0).to_event(1))
            pyro.sample("x", pdist.Normal(dec(z), 0.1).to_event(1), obs=x)

    def guide(x):
        pyro.module("enc", enc)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", pdist.Delta(enc(x), event_dim=1))

    if estimator == "learned":
        estimator = LearnedScoreEstimator(2, hidden=(32, 32), lr=5e-3, n_steps=1)
    loss = PWAE(regularizer, lam=10.0, estimator=estimator, reconstruction="squared_error")
    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 3e-3}), loss)
    before = loss.terms(model, guide, x_all[:256])
    g = torch.Generator().manual_seed(1)
    for _ in range(300):
        svi.step(x_all[torch.randint(0, 512, (128,), generator=g)])
    after = loss.terms(model, guide, x_all[:256])
    _check_wae(before, after, not isinstance(estimator, str))
    assert np.isfinite(svi.evaluate_loss(x_all[:128]))


def _mlp_params(key, sizes, bias_last=0.0):
    params = []
    for k, (a, b) in zip(jax.random.split(key, len(sizes) - 1), zip(sizes[:-1], sizes[1:])):
        w = jax.random.uniform(k, (a, b), jnp.float32, minval=-1, maxval=1) / np.float32(np.sqrt(a))
        params.append((w, jnp.zeros(b, jnp.float32)))
    params[-1] = (params[-1][0], params[-1][1] + np.float32(bias_last))
    return params


def _mlp(params, h):
    for w, b in params[:-1]:
        h = jnp.tanh(h @ w + b)
    return h @ params[-1][0] + params[-1][1]


# float32 (as a user would train): XLA's float64 Cholesky / eigh on CPU are many times
# slower; SSGE inside NumPyro's jitted update is exercised by the conjugate test above.
@pytest.mark.parametrize("regularizer,estimator", [c for c in WAE_CASES if c[1] != "spectral"])
def test_numpyro_wae_decreases_both_terms_under_jit(regularizer, estimator):
    x_all = jnp.asarray(X_WAE)
    enc0 = _mlp_params(jax.random.PRNGKey(0), (6, 32, 2), bias_last=3.0)
    dec0 = _mlp_params(jax.random.PRNGKey(1), (2, 32, 6))
    est = (
        learned_score_estimator(2, hidden=(32, 32), optimizer=optax.adam(5e-3), n_steps=1)
        if estimator == "learned"
        else estimator
    )

    def model(x):
        dec = numpyro.param("dec", dec0)
        with numpyro.plate("data", x.shape[0]):
            z = numpyro.sample("z", ndist.Normal(jnp.zeros(2), 1.0).to_event(1))
            numpyro.sample("x", ndist.Normal(_mlp(dec, z), 0.1).to_event(1), obs=x)

    def guide(x):
        if estimator == "learned":
            score_state("z", est)
        enc = numpyro.param("enc", enc0)
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("z", ndist.Delta(_mlp(enc, x), event_dim=1))

    loss = NWAE(regularizer, lam=10.0, estimator=est, reconstruction="squared_error")
    svi = numpyro.infer.SVI(model, guide, optax.adam(3e-3), loss)
    state = svi.init(jax.random.PRNGKey(2), x_all[:128])
    probe = lambda s: loss.terms(
        jax.random.PRNGKey(3), {**svi.get_params(s), **(s.mutable_state or {})}, model, guide, x_all[:256]
    )
    before = {k: float(v) for k, v in probe(state).items()}

    @jax.jit
    def steps(state, key):
        def body(s, k):
            idx = jax.random.randint(k, (128,), 0, 512)
            return svi.update(s, x_all[idx])[0], None

        return jax.lax.scan(body, state, jax.random.split(key, 300))[0]

    state = steps(state, jax.random.PRNGKey(4))
    after = {k: float(v) for k, v in probe(state).items()}
    _check_wae(before, after, estimator == "learned")


def test_imq_mmd_backend_parity_and_value():
    r = np.random.default_rng(9)
    x, y = r.normal(size=(20, 3)), r.normal(size=(15, 3)) + 0.5
    t = float(p_imq_mmd2(torch.as_tensor(x), torch.as_tensor(y), 6.0))
    j = float(n_imq_mmd2(jnp.asarray(x), jnp.asarray(y), 6.0))
    c = 6.0 * np.array([0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0])
    k = lambda a, b: (c / (c + ((a[:, None, :, None] - b[None, :, :, None]) ** 2).sum(2))).sum(-1)
    kxx, kyy = k(x, x), k(y, y)
    want = (kxx.sum() - np.trace(kxx)) / 380 + (kyy.sum() - np.trace(kyy)) / 210 - 2 * k(x, y).mean()
    np.testing.assert_allclose(t, want, rtol=1e-10)
    np.testing.assert_allclose(j, want, rtol=1e-10)


def test_wae_prior_variance_analytic_or_from_draws():
    """The IMQ scale uses the prior's variance where the distribution has one and the variance
    of the prior draws where it has none (a log-normal built by a transform), both front ends."""
    import numpyro.distributions as ndist
    import pyro.distributions as pdist
    from torch.distributions.transforms import ExpTransform

    from ppl_score.jax.mmd import prior_variance as n_var
    from ppl_score.torch.mmd import prior_variance as p_var

    draws = np.random.default_rng(2).lognormal(size=(50, 2))
    from_draws = float(draws.var(axis=0).mean())
    td, jd = torch.as_tensor(draws), jnp.asarray(draws)
    assert p_var(pdist.Normal(torch.zeros(2), 2.0 * torch.ones(2)), td) == pytest.approx(4.0)
    assert float(n_var(ndist.Normal(jnp.zeros(2), 2.0), jd)) == pytest.approx(4.0)
    p_lognormal = pdist.TransformedDistribution(pdist.Normal(torch.zeros(2), 1.0), [ExpTransform()])
    n_lognormal = ndist.TransformedDistribution(ndist.Normal(jnp.zeros(2), 1.0), [ndist.transforms.ExpTransform()])
    assert p_var(p_lognormal, td) == pytest.approx(from_draws, rel=1e-6)
    assert float(n_var(n_lognormal, jd)) == pytest.approx(from_draws, rel=1e-6)


def test_wae_validation():
    with pytest.raises(ValueError, match="'regularizer'"):
        PWAE("kl")
    with pytest.raises(ValueError, match="'lam'"):
        NWAE("mmd", lam=0.0)
    with pytest.raises(ValueError, match="'reconstruction'"):
        PWAE("mmd", reconstruction="l1")
    with pytest.raises(ValueError, match="context"):
        PWAE("score", estimator=LearnedScoreEstimator(2, context_dim=1, hidden=(4,)))
    with pytest.raises(ValueError, match="context"):
        NWAE("score", estimator=learned_score_estimator(2, context_dim=1, hidden=(4,)))
