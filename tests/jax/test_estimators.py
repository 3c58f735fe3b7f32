"""``ppl_score.jax.estimators``: the kernel estimators under jit (batched internals included)
and the learned estimator (accuracy on a Gaussian, one jittable update, state dict round
trip through ``np.savez``)."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

from ppl_score.jax import estimators as je  # noqa: E402
from tests.helpers.estimators import LEARNED_TOL, METHODS, _gaussian_data, _rel_fisher


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
