"""``ppl_score.numpyro.ImplicitELBO``: with the exact score in place of the estimator the
gradient is ``Trace_ELBO``'s up to the zero-mean score-function term; an implicit guide
recovers the conjugate Gaussian posterior inside the jitted ``SVI.run`` (kernel and learned
estimators); an amortized guide with a context-conditioned learned estimator."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
numpyro = pytest.importorskip("numpyro")
optax = pytest.importorskip("optax")
import jax.numpy as jnp  # noqa: E402
import numpyro.distributions as ndist  # noqa: E402

from ppl_score.jax.estimators import learned_score_estimator  # noqa: E402
from ppl_score.numpyro.implicit import ImplicitELBO as NImplicitELBO  # noqa: E402
from ppl_score.numpyro.implicit import score_state  # noqa: E402
from tests.helpers.implicit import S2, X_CONJ, X_LOCAL, X_OBS, A, D, P, _check_amortized, _check_posterior


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
