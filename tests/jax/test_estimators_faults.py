"""``ppl_score.jax.estimators`` under faults (issue 10): a singular Stein system under jit,
a learned-estimator step on overflowing samples refused, and pickling / deep-copying of the
learned estimator and its state."""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

from ppl_score.jax import estimators as je  # noqa: E402
from tests.helpers.estimators import DUP


def test_stein_singular_under_jit_is_nan_not_garbage():
    out = jax.jit(lambda s: je.kernel_scores_batched("stein", s, eta=1e-30))(jnp.asarray(DUP)[None])
    assert np.isnan(np.asarray(out)).all()


def test_jax_learned_update_refuses_a_nonfinite_step():
    est = je.learned_score_estimator(2, hidden=(8,), n_steps=2, method="dsm")
    x = jnp.asarray(np.random.default_rng(0).normal(size=(16, 2)), jnp.float32)
    state, _ = est.update(est.init(jax.random.PRNGKey(0)), jax.random.PRNGKey(1), x)
    with pytest.raises(ValueError, match="'samples'.*refused"):
        est.update(state, jax.random.PRNGKey(2), x * 1e30)
    new, loss = jax.jit(est.update)(state, jax.random.PRNGKey(2), x * 1e30)  # traced: skipped, no error
    assert not np.isfinite(float(loss))
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert np.isfinite(float(est.update(new, jax.random.PRNGKey(3), x)[1]))


def test_jax_learned_estimator_and_state_roundtrip():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(16, 2)), jnp.float32)
    est = je.learned_score_estimator(2, hidden=(8,), method="dsm", sigma=0.3)  # default jax.nn.softplus
    state, _ = est.update(est.init(jax.random.PRNGKey(0)), jax.random.PRNGKey(1), x)
    other, ostate = pickle.loads(pickle.dumps(est)), pickle.loads(pickle.dumps(state))
    np.testing.assert_array_equal(np.asarray(other.apply(ostate.params, x)), np.asarray(est.apply(state.params, x)))
    assert float(other.update(ostate, jax.random.PRNGKey(2), x)[1]) == float(
        est.update(state, jax.random.PRNGKey(2), x)[1]
    )
    deep, dstate = copy.deepcopy(est), copy.deepcopy(state)
    np.testing.assert_array_equal(np.asarray(deep.apply(dstate.params, x)), np.asarray(est.apply(state.params, x)))
    tanh = pickle.loads(pickle.dumps(je.learned_score_estimator(2, hidden=(8,), activation=jax.nn.tanh)))
    assert tanh.activation is jax.nn.tanh
    import functools

    import optax

    est = je.learned_score_estimator(2, hidden=(4,), optimizer=functools.partial(optax.sgd, 1e-2))
    assert pickle.loads(pickle.dumps(est)).optimizer is not None
    with pytest.raises(TypeError, match="'optimizer'.*functools.partial"):
        pickle.dumps(je.learned_score_estimator(2, hidden=(4,), optimizer=optax.sgd(1e-2)))
