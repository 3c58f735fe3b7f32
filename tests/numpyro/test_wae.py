"""``ppl_score.numpyro.WAE`` decreases its reconstruction term and the divergence of the codes
from the prior under jit (score and MMD regularizers)."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
numpyro = pytest.importorskip("numpyro")
optax = pytest.importorskip("optax")
import jax.numpy as jnp  # noqa: E402
import numpyro.distributions as ndist  # noqa: E402

from ppl_score.jax.estimators import learned_score_estimator  # noqa: E402
from ppl_score.numpyro.implicit import score_state  # noqa: E402
from ppl_score.numpyro.wae import WAE as NWAE  # noqa: E402
from tests.helpers.implicit import WAE_CASES, X_WAE, _check_wae


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
