"""Langevin samplers (``ppl_score.{torch,jax}.langevin``) and the PPL adapters
(``ppl_score.{pyro,numpyro}.mcmc``), including NUTS through ``potential_fn``, one body run
per backend (``sampler``) or per PPL (``ppl``).

Statistical checks use the final states of many independent chains, which are i.i.d. draws
once the chains have mixed; tolerances are ``Z`` Monte-Carlo standard errors: for ``C``
Gaussian draws, ``se(mean_i) = sqrt(S_ii / C)`` and ``se(cov_ij) = sqrt((S_ij^2 + S_ii S_jj) / C)``.
Closed forms: MALA is exact; ULA on ``N(mu, S)`` with precision ``P`` and step ``h`` is
stationary at ``N(mu, S (I - h P / 2)^{-1})`` (the fixed point of
``Sigma = (I - h P) Sigma (I - h P) + 2 h I``).
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.helpers.mcmc import COV, MU, PREC, Z, assert_moments

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def ula_cov(cov, h):
    prec = np.linalg.inv(cov)
    return cov @ np.linalg.inv(np.eye(len(cov)) - 0.5 * h * prec)


# ---------------------------------------------------------------------------------------
# Backends: one numpy-in / numpy-out interface over ppl_score.torch.langevin and
# ppl_score.jax.langevin.
# ---------------------------------------------------------------------------------------


class TorchSampler:
    name = "torch"

    def __init__(self):
        import torch

        from ppl_score.torch import langevin

        self.torch, self.mod = torch, langevin

    def gaussian(self, mu=MU, prec=PREC, kind="log_prob"):
        t = self.torch
        mu, prec = t.as_tensor(mu), t.as_tensor(prec)
        if kind == "score":
            return lambda x: -(x - mu) @ prec
        return lambda x: -0.5 * (((x - mu) @ prec) * (x - mu)).sum(-1)

    def one_step(self, fn, x, h, seed):
        """One MALA step; returns (new x, acceptance probability, the proposal's noise z)."""
        t = self.torch
        state = self.mod.init(fn, t.as_tensor(x))
        new, info = self.mod.step(state, fn, h, generator=t.Generator().manual_seed(seed))
        z = t.randn(x.shape, generator=t.Generator().manual_seed(seed), dtype=t.float64)  # drawn first
        return np.asarray(new.x), np.asarray(info.accept_prob), np.asarray(z)

    def run(self, adjusted, fn, x0, h, n, seed=0, **kw):
        gen = self.torch.Generator().manual_seed(seed)
        sampler = self.mod.mala if adjusted else self.mod.ula
        out = sampler(fn, self.torch.as_tensor(x0), h, n, generator=gen, **kw)
        return np.asarray(out.samples), np.asarray(out.accept_rate)


class JaxSampler:
    name = "jax"

    def __init__(self):
        import jax
        import jax.numpy as jnp

        from ppl_score.jax import langevin

        self.jax, self.jnp, self.mod = jax, jnp, langevin
        # one function object per density so the jitted scan is compiled once per shape
        self._fns = {}

    def gaussian(self, mu=MU, prec=PREC, kind="log_prob"):
        key = (kind, np.asarray(mu).tobytes(), np.asarray(prec).tobytes())
        if key not in self._fns:
            jnp = self.jnp
            mu_, prec_ = jnp.asarray(mu), jnp.asarray(prec)
            if kind == "score":
                self._fns[key] = lambda x: -(x - mu_) @ prec_
            else:
                self._fns[key] = lambda x: -0.5 * (((x - mu_) @ prec_) * (x - mu_)).sum(-1)
        return self._fns[key]

    def one_step(self, fn, x, h, seed):
        jax = self.jax
        key = jax.random.PRNGKey(seed)
        state = self.mod.init(fn, self.jnp.asarray(x))
        new, info = jax.jit(lambda k, st: self.mod.step(k, st, fn, h))(key, state)
        z = jax.random.normal(jax.random.split(key)[0], x.shape, self.jnp.float64)  # the noise key
        return np.asarray(new.x), np.asarray(info.accept_prob), np.asarray(z)

    def run(self, adjusted, fn, x0, h, n, seed=0, **kw):
        sampler = self.mod.mala if adjusted else self.mod.ula
        out = sampler(fn, self.jnp.asarray(x0), h, n, key=self.jax.random.PRNGKey(seed), **kw)
        return np.asarray(out.samples), np.asarray(out.accept_rate)


_SAMPLERS = {"torch": TorchSampler, "jax": JaxSampler}
_CACHE: dict = {}


@pytest.fixture(params=sorted(_SAMPLERS), scope="module")
def sampler(request):
    pytest.importorskip(request.param)
    if request.param not in _CACHE:
        _CACHE[request.param] = _SAMPLERS[request.param]()
    return _CACHE[request.param]


def overdispersed(c, seed=1):
    return 3.0 * np.random.default_rng(seed).normal(size=(c, 2))


# Shared run shapes, so each backend compiles (JAX) as few scans as possible.
C, N = 3000, 100


def test_mala_gaussian_moments_and_acceptance(sampler):
    """MALA from an overdispersed start: the final states have the target's mean and
    covariance; the reported acceptance rate equals the fraction of moves made."""
    samples, accept = sampler.run(True, sampler.gaussian(), overdispersed(C), 0.6, N)
    assert samples.shape == (N, C, 2) and accept.shape == (C,)
    assert_moments(samples[-1], MU, COV)
    # a state changes iff its proposal was accepted: E[moved] = E[accept_prob]
    moved = np.any(samples[1:] != samples[:-1], axis=-1)
    assert 0.3 < accept.mean() < 0.99
    assert abs(moved.mean() - accept.mean()) < Z * np.sqrt(0.25 / moved.size)


def test_mala_acceptance_falls_with_step_size(sampler):
    fn, x0 = sampler.gaussian(), overdispersed(C)
    rates = [sampler.run(True, fn, x0, h, N)[1].mean() for h in (0.1, 1.0, 3.0)]
    assert rates[0] > rates[1] > rates[2]
    assert rates[0] > 0.9 and rates[2] < 0.5


def test_ula_bias_small_step_and_closed_form(sampler):
    """ULA at a small step keeps the target (its O(h) bias is below the Monte-Carlo error);
    at a large one it reaches its own biased stationary law, measurably off the target."""
    fn = sampler.gaussian()
    start = np.random.default_rng(2).multivariate_normal(MU, COV, size=C)
    small, accept = sampler.run(False, fn, start, 0.01, N, thin=N)
    assert small.shape == (1, C, 2)
    np.testing.assert_array_equal(accept, np.ones(C))
    assert np.abs(ula_cov(COV, 0.01) - COV).max() < 0.015
    assert_moments(small[-1], MU, COV)
    big, _ = sampler.run(False, fn, overdispersed(C), 0.6, N, thin=N)
    biased = ula_cov(COV, 0.6)
    assert_moments(big[-1], MU, biased)
    # the bias is far outside the Monte-Carlo error: ULA != MALA at this step
    se_00 = np.sqrt(2 * COV[0, 0] ** 2 / C)
    assert np.cov(big[-1].T)[0, 0] - COV[0, 0] > 2 * Z * se_00


def test_ula_score_kind_matches_log_prob_kind(sampler):
    """A score network and the log density it differentiates give the same chains."""
    x0 = overdispersed(C)
    a, _ = sampler.run(False, sampler.gaussian(kind="log_prob"), x0, 0.1, N, seed=3, thin=N)
    b, _ = sampler.run(False, sampler.gaussian(kind="score"), x0, 0.1, N, seed=3, thin=N, kind="score")
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_warmup_and_thin_layout(sampler):
    """``samples[k]`` is the state after ``num_warmup + (k + 1) * thin`` steps: each step
    draws the same noise whatever the warmup / thinning split (torch: one generator stream;
    JAX: per-step keys split up front, here also run in progress-bar chunks of one warmup
    step and one thinned block), and the same seed gives the same chains."""
    fn, x0 = sampler.gaussian(), overdispersed(C)
    full, _ = sampler.run(True, fn, x0, 0.3, N, seed=5)
    again, _ = sampler.run(True, fn, x0, 0.3, N, seed=5)
    np.testing.assert_array_equal(full, again)
    thinned, accept = sampler.run(True, fn, x0, 0.3, 80, seed=5, num_warmup=20, thin=40, progress_bar=True)
    assert thinned.shape == (2, C, 2) and accept.shape == (C,)
    np.testing.assert_array_equal(thinned, full[[59, 99]])


def test_event_shape_beyond_1d(sampler):
    """``x[C, 2, 3]``: an isotropic Gaussian on a matrix-shaped event."""
    if sampler.name == "torch":
        fn = lambda x: -0.5 * (x * x).sum((-1, -2))  # noqa: E731
    else:
        fn = _jax_matrix_gaussian
    x0 = np.zeros((C, 2, 3))
    samples, _ = sampler.run(True, fn, x0, 0.8, N, thin=N)
    assert samples.shape == (1, C, 2, 3)
    assert_moments(samples[-1].reshape(C, 6), np.zeros(6), np.eye(6))


def _jax_matrix_gaussian(x):
    return -0.5 * (x * x).sum((-1, -2))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(step_size=0.0), "step_size"),
        (dict(step_size=float("nan")), "step_size"),
        (dict(num_steps=0), "num_steps"),
        (dict(num_steps=10, thin=3), "thin"),
        (dict(num_warmup=-1), "num_warmup"),
    ],
)
def test_bad_run_arguments(sampler, kwargs, match):
    args = dict(step_size=0.1, num_steps=4)
    args.update(kwargs)
    h, n = args.pop("step_size"), args.pop("num_steps")
    with pytest.raises(ValueError, match=match):
        sampler.run(True, sampler.gaussian(), np.zeros((2, 2)), h, n, **args)


def test_bad_inputs(sampler):
    fn = sampler.gaussian()
    with pytest.raises(ValueError, match="x0"):
        sampler.run(True, fn, np.array([[0.0, np.nan]]), 0.1, 2)
    with pytest.raises(ValueError, match="x0"):
        sampler.run(True, fn, np.zeros((0, 2)), 0.1, 2)
    with pytest.raises(ValueError, match="kind"):
        sampler.run(False, fn, np.zeros((2, 2)), 0.1, 2, kind="energy")
    with pytest.raises(ValueError, match="fn"):  # [C, D] out where [C] is expected
        sampler.run(True, sampler.gaussian(kind="score"), np.zeros((2, 2)), 0.1, 2)


def test_ula_divergence_is_an_error(sampler):
    """ULA on a Gaussian is unstable for h > 2 / lambda_max(P): a clear error, not NaNs."""
    with pytest.raises(ValueError, match="step_size"):  # |1 - h lambda_max| ~ 2e4: overflow in < 100 steps
        sampler.run(False, sampler.gaussian(), overdispersed(C), 1e4, N, thin=N)


def test_mala_zero_density_start_is_an_error(sampler):
    if sampler.name == "torch":
        t = sampler.torch
        fn = lambda x: t.where(x[:, 0] > 0, -0.5 * (x * x).sum(-1), -t.inf)  # noqa: E731
    else:
        fn = _jax_half_gaussian
    with pytest.raises(ValueError, match="x0"):
        sampler.run(True, fn, -np.ones((3, 2)), 0.1, 2)


def _jax_half_gaussian(x):
    import jax.numpy as jnp

    return jnp.where(x[:, 0] > 0, -0.5 * (x * x).sum(-1), -jnp.inf)


def test_mala_step_acceptance_probability(sampler):
    """One MALA step against numpy: proposal ``x + h s(x) + sqrt(2h) z`` and acceptance
    probability ``min(1, p(x') q(x|x') / (p(x) q(x'|x)))``, ``q(b|a) = N(b; a + h s(a), 2h I)``;
    each chain moves to its proposal or stays."""
    h = 0.7
    x = overdispersed(200, seed=6)
    new, accept, z = sampler.one_step(sampler.gaussian(), x, h, seed=9)

    def log_p(v):
        r = v - MU
        return -0.5 * np.einsum("ci,ij,cj->c", r, PREC, r)

    def score(v):
        return -(v - MU) @ PREC

    def log_q(b, a):
        return -((b - a - h * score(a)) ** 2).sum(-1) / (4 * h)

    prop = x + h * score(x) + np.sqrt(2 * h) * z
    expected = np.minimum(1.0, np.exp(log_p(prop) - log_p(x) + log_q(x, prop) - log_q(prop, x)))
    np.testing.assert_allclose(accept, expected, rtol=1e-9, atol=1e-12)
    moved = np.all(np.isclose(new, prop, rtol=1e-12, atol=1e-12), -1)
    stayed = np.all(new == x, -1)
    assert np.all(moved | stayed) and 0 < moved.mean() < 1


# ---------------------------------------------------------------------------------------
# PPL adapters. The model: x ~ Unnormalized(Gaussian energy N(MU, COV)) with an observed
# child y ~ N(x, I) and a factor -1/2 ||x||^2, so x's conditional given the rest is N(m, V),
# V = (P + 2 I)^{-1}, m = V (P MU + y): the sampled density includes the other terms.
# ---------------------------------------------------------------------------------------

Y = np.array([0.5, 2.0])
POST_COV = np.linalg.inv(PREC + 2 * np.eye(2))
POST_MEAN = POST_COV @ (PREC @ MU + Y)
# Gamma(3, 2) through an unnormalized positive site: log p(x) = 2 log x - 2 x
GAMMA_MEAN, GAMMA_VAR = 1.5, 0.75


class PyroAdapter:
    name = "pyro"

    def __init__(self):
        self.torch = pytest.importorskip("torch")
        pytest.importorskip("pyro")
        import pyro
        import pyro.distributions as dist

        from ppl_score.pyro import Unnormalized, mcmc

        self.pyro, self.dist, self.Unnormalized, self.mod = pyro, dist, Unnormalized, mcmc

    def t(self, a):
        return self.torch.as_tensor(np.asarray(a), dtype=self.torch.float64)

    def gaussian_model(self):
        pyro, dist, t = self.pyro, self.dist, self.t
        mu, prec = t(MU), t(PREC)

        def energy(x):
            return -0.5 * (((x - mu) @ prec) * (x - mu)).sum(-1)

        def model(x, y):
            with pyro.plate("data", x.shape[0]):
                x = pyro.sample("x", self.Unnormalized(energy, event_shape=(2,)), obs=x)
                pyro.sample("y", dist.Normal(x, 1.0).to_event(1), obs=y)
                pyro.factor("shrink", -0.5 * (x * x).sum(-1))

        return model, (t(np.zeros((1, 2))), t(Y[None]))

    def gamma_model(self):
        pyro, dist, t = self.pyro, self.dist, self.t
        from torch.distributions import constraints

        def model(x):
            rate = pyro.sample("rate", dist.LogNormal(0.0, 1.0))
            with pyro.plate("data", x.shape[0]):
                pyro.sample("x", self.Unnormalized(lambda v: 2 * v.log() - rate * v, (), constraints.positive), obs=x)

        return model, (t(np.ones(1)),)

    def loc_model(self):
        pyro, dist, t = self.pyro, self.dist, self.t

        def model(x):
            loc = pyro.sample("loc", dist.Normal(0.0, 10.0))
            with pyro.plate("data", x.shape[0]):
                pyro.sample("x", dist.Normal(loc, 1.0), obs=x)

        def guide(x):
            pyro.sample("loc", dist.Normal(t(2.0), t(1.0)))

        return model, guide, (t(np.zeros(1)),)

    def subsample_model(self, data, loc, batch):
        pyro, dist, t = self.pyro, self.dist, self.t
        data, loc = t(data), t(loc)

        def model():
            with pyro.plate("data", len(data), subsample_size=batch) as idx:
                pyro.sample("x", dist.Normal(loc[idx], 1.0), obs=data[idx])

        return model

    def site_mala(self, model, site, num_chains, step_size, num_steps):
        """The site's density object, then the backend MALA on it (public pieces)."""
        from ppl_score.torch.langevin import mala

        dens = self.mod.site_log_density(model, site, num_chains=num_chains)
        out = mala(
            dens.log_prob,
            dens.init_unconstrained(None),
            step_size,
            num_steps,
            thin=num_steps,
            generator=self.torch.Generator().manual_seed(0),
        )
        return np.asarray(dens.value), np.asarray(dens.transform(out.samples[-1]))

    def discrete_model(self):
        pyro, dist, t = self.pyro, self.dist, self.t

        def model(k):
            pyro.sample("k", dist.Poisson(3.0), obs=k)

        return model, (t(1.0),)

    def langevin(self, model, site, args, seed=0, **kw):
        self.pyro.set_rng_seed(seed)
        if "latents" in kw:
            kw["latents"] = {k: self.t(v) for k, v in kw["latents"].items()}
        kw.setdefault("num_warmup", 0)
        out = self.mod.langevin(model, site, *args, generator=self.torch.Generator().manual_seed(seed), **kw)
        return np.asarray(out.samples), np.asarray(out.accept_rate)

    def potential(self, model, site, args, u):
        pot = self.mod.potential_fn(model, site, *args)
        return float(pot({site: self.t(u)}))

    def nuts(self, model, site, args, seed=0, **kw):
        self.pyro.set_rng_seed(seed)
        num_warmup = kw.pop("num_warmup")
        out = self.mod.nuts(model, site, *args, warmup_steps=num_warmup, **kw)
        assert out.accept_rate.shape == (kw.get("num_chains", 1),) and out.layout.mode == "site"
        return np.asarray(out.samples)

    def ess(self, x):
        from pyro.ops.stats import effective_sample_size

        return np.asarray(effective_sample_size(self.torch.as_tensor(x), chain_dim=1, sample_dim=0))


class NumPyroAdapter:
    name = "numpyro"

    def __init__(self):
        self.jax = pytest.importorskip("jax")
        pytest.importorskip("numpyro")
        import jax.numpy as jnp
        import numpyro
        import numpyro.distributions as dist

        from ppl_score.numpyro import Unnormalized, mcmc

        self.jnp, self.numpyro, self.dist, self.Unnormalized, self.mod = jnp, numpyro, dist, Unnormalized, mcmc

    def t(self, a):
        return self.jnp.asarray(np.asarray(a, dtype=np.float64))

    def gaussian_model(self):
        numpyro, dist, t = self.numpyro, self.dist, self.t
        mu, prec = t(MU), t(PREC)

        def energy(x):
            return -0.5 * (((x - mu) @ prec) * (x - mu)).sum(-1)

        def model(x, y):
            with numpyro.plate("data", x.shape[0]):
                x = numpyro.sample("x", self.Unnormalized(energy, event_shape=(2,)), obs=x)
                numpyro.sample("y", dist.Normal(x, 1.0).to_event(1), obs=y)
                numpyro.factor("shrink", -0.5 * (x * x).sum(-1))

        return model, (t(np.zeros((1, 2))), t(Y[None]))

    def gamma_model(self):
        numpyro, dist, t, jnp = self.numpyro, self.dist, self.t, self.jnp
        from numpyro.distributions import constraints

        def model(x):
            rate = numpyro.sample("rate", dist.LogNormal(0.0, 1.0))
            with numpyro.plate("data", x.shape[0]):
                numpyro.sample(
                    "x", self.Unnormalized(lambda v: 2 * jnp.log(v) - rate * v, (), constraints.positive), obs=x
                )

        return model, (t(np.ones(1)),)

    def loc_model(self):
        numpyro, dist, t = self.numpyro, self.dist, self.t

        def model(x):
            loc = numpyro.sample("loc", dist.Normal(0.0, 10.0))
            with numpyro.plate("data", x.shape[0]):
                numpyro.sample("x", dist.Normal(loc, 1.0), obs=x)

        def guide(x):
            numpyro.sample("loc", dist.Normal(2.0, 1.0))

        return model, guide, (t(np.zeros(1)),)

    def subsample_model(self, data, loc, batch):
        numpyro, dist, t = self.numpyro, self.dist, self.t
        data, loc = t(data), t(loc)

        def model():
            with numpyro.plate("data", len(data), subsample_size=batch) as idx:
                numpyro.sample("x", dist.Normal(loc[idx], 1.0), obs=data[idx])

        return model

    def site_mala(self, model, site, num_chains, step_size, num_steps):
        from ppl_score.jax.langevin import mala

        dens = self.mod.site_log_density(model, site, num_chains=num_chains)
        out = mala(
            dens.log_prob,
            dens.init_unconstrained(None),
            step_size,
            num_steps,
            thin=num_steps,
            key=self.jax.random.PRNGKey(0),
        )
        return np.asarray(dens.value), np.asarray(dens.transform(out.samples[-1]))

    def discrete_model(self):
        numpyro, dist, t = self.numpyro, self.dist, self.t

        def model(k):
            numpyro.sample("k", dist.Poisson(3.0), obs=k)

        return model, (t(1.0),)

    def langevin(self, model, site, args, seed=0, **kw):
        if "latents" in kw:
            kw["latents"] = {k: self.t(v) for k, v in kw["latents"].items()}
        kw.setdefault("num_warmup", 0)
        out = self.mod.langevin(model, site, *args, key=self.jax.random.PRNGKey(seed), **kw)
        return np.asarray(out.samples), np.asarray(out.accept_rate)

    def potential(self, model, site, args, u):
        pot = self.mod.potential_fn(model, site, *args)
        return float(pot({site: self.t(u)}))

    def nuts(self, model, site, args, seed=0, **kw):
        out = self.mod.nuts(model, site, *args, key=self.jax.random.PRNGKey(seed), **kw)
        assert out.accept_rate.shape == (kw.get("num_chains", 1),) and out.layout.mode == "site"
        return np.asarray(out.samples)

    def ess(self, x):
        from numpyro.diagnostics import effective_sample_size

        return np.asarray(effective_sample_size(np.swapaxes(np.asarray(x), 0, 1)))


_ADAPTERS = {"pyro": PyroAdapter, "numpyro": NumPyroAdapter}


@pytest.fixture(params=sorted(_ADAPTERS), scope="module")
def ppl(request):
    if request.param not in _CACHE:
        _CACHE[request.param] = _ADAPTERS[request.param]()
    return _CACHE[request.param]


def test_adapter_unnormalized_site_with_child(ppl):
    """MALA on an ``Unnormalized`` Gaussian-energy site samples its conditional given the
    observed child and the factor: ``N(m, (P + 2 I)^{-1})``, not the energy's own ``N(MU, COV)``."""
    model, args = ppl.gaussian_model()
    samples, accept = ppl.langevin(model, "x", args, num_chains=2000, num_steps=60, step_size=0.25, thin=60)
    assert samples.shape == (1, 2000, 1, 2) and accept.shape == (2000,)
    assert 0.5 < accept.mean() < 1.0
    assert_moments(samples[-1, :, 0], POST_MEAN, POST_COV)


def test_adapter_potential_is_the_conditional_energy(ppl):
    """``potential_fn`` at ``u`` equals ``-log p(x = u | y)`` up to the normalizers
    (Unnormalized and the factor add none; the child's Normal adds ``D/2 log 2 pi``)."""
    model, args = ppl.gaussian_model()
    u = np.array([[0.3, -0.7]])
    r = u[0] - MU
    expected = 0.5 * r @ PREC @ r + 0.5 * np.sum((Y - u[0]) ** 2) + np.log(2 * np.pi) + 0.5 * u[0] @ u[0]
    np.testing.assert_allclose(ppl.potential(model, "x", args, u), expected, rtol=1e-12)


def test_adapter_positive_site_through_the_log_transform(ppl):
    """A positive ``Unnormalized`` site is sampled in ``log x`` with the Jacobian: the
    draws are ``Gamma(3, rate)`` with the latent rate fixed by ``latents``."""
    model, args = ppl.gamma_model()
    samples, _ = ppl.langevin(
        model, "x", args, num_chains=3000, num_steps=80, step_size=0.3, thin=80, latents={"rate": 2.0}
    )
    x = samples[-1, :, 0]
    assert (x > 0).all()
    assert_moments(x[:, None], GAMMA_MEAN, [[GAMMA_VAR]])


def test_adapter_guide_draws_latents_per_chain(ppl):
    """With a guide ``loc ~ N(2, 1)`` each chain gets its own ``loc``: across chains the
    draws follow the predictive ``N(2, 1 + 1)`` (a single shared draw would give variance 1)."""
    model, guide, args = ppl.loc_model()
    samples, _ = ppl.langevin(model, "x", args, num_chains=3000, num_steps=40, step_size=0.8, thin=40, guide=guide)
    assert_moments(samples[-1, :, 0][:, None], 2.0, [[2.0]])


def test_adapter_subsampled_plate_keeps_its_indices(ppl):
    """In a subsampled plate the site is the minibatch; every evaluation of the density
    must use the traced indices (replayed / same seed), or the target moves under the chains."""
    rng = np.random.default_rng(4)
    loc = 3.0 * np.arange(20.0)
    data = loc + rng.normal(size=20)
    value, samples = ppl.site_mala(ppl.subsample_model(data, loc, 5), "x", 400, 0.8, 40)
    idx = np.abs(value[:, None] - data[None]).argmin(1)  # which data the traced minibatch holds
    assert value.shape == (5,) and samples.shape == (400, 5)
    np.testing.assert_array_less(np.abs(samples.mean(0) - loc[idx]), Z / np.sqrt(400))


def test_adapter_errors(ppl):
    model, args = ppl.gaussian_model()
    with pytest.raises(ValueError, match="'nope'"):
        ppl.langevin(model, "nope", args, num_steps=2)
    with pytest.raises(ValueError, match="init"):
        ppl.langevin(model, "x", args, num_steps=2, num_chains=3, init=ppl.t(np.zeros((2, 1, 2))))
    gmodel, gargs = ppl.gamma_model()
    with pytest.raises(ValueError, match="'rate'"):  # a latent with no value
        ppl.langevin(gmodel, "x", gargs, num_steps=2)
    with pytest.raises(ValueError, match="support"):
        ppl.langevin(gmodel, "x", gargs, num_steps=2, latents={"rate": 1.0}, init=ppl.t(-np.ones(1)))
    dmodel, dargs = ppl.discrete_model()
    with pytest.raises(ValueError, match="'k'.*discrete"):
        ppl.langevin(dmodel, "k", dargs, num_steps=2)


def test_nuts_through_potential_fn(ppl):
    """The PPL's own NUTS on ``potential_fn``: moments within ``Z`` standard errors computed
    from the effective sample size."""
    model, args = ppl.gaussian_model()
    x = ppl.nuts(model, "x", args, num_samples=200, num_warmup=100)
    assert x.shape == (200, 1, 1, 2)
    x = x[:, :, 0]
    ess = ppl.ess(x)
    flat = x.reshape(-1, 2)
    sd = np.sqrt(np.diag(POST_COV))
    np.testing.assert_array_less(np.abs(flat.mean(0) - POST_MEAN), Z * sd / np.sqrt(ess))
    np.testing.assert_array_less(np.abs(flat.var(0) - sd**2), Z * sd**2 * np.sqrt(2 / ess))
