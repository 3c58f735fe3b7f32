"""``ppl_score.jax.training``: ``fit_energy`` rejects bad arguments; the evaluators compile once per ``apply_fn``."""

from __future__ import annotations

import numpy as np
import pytest

from tests.helpers.demo import _require


def test_jax_fit_energy_rejects_bad_arguments():
    _require("jax")
    import jax
    import jax.numpy as jnp

    from ppl_score.jax.nets import energy_apply, energy_init
    from ppl_score.jax.training import fit_energy

    params = energy_init(jax.random.PRNGKey(0), 2, (4,))
    x = np.zeros((10, 2))
    with pytest.raises(ValueError, match="method"):
        fit_energy(energy_apply, params, x, "nope", steps=1, progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        fit_energy(energy_apply, params, x, batch_size=0, progress=False)
    with pytest.raises(ValueError, match="lr"):
        fit_energy(energy_apply, params, x, lr=float("inf"), progress=False)
    with pytest.raises(ValueError, match="data"):
        fit_energy(energy_apply, params, np.full((10, 2), np.inf), steps=1, progress=False)
    with pytest.raises(TypeError, match="apply_fn"):
        fit_energy(None, params, x, steps=1, progress=False)
    with pytest.raises(FloatingPointError, match="non-finite by step 1"):
        fit_energy(lambda p, y: energy_apply(p, y) * jnp.nan, params, x, steps=2, progress=False)


def test_jax_evaluators_compile_once_per_apply_fn_and_release_it():
    """Two models of one ``apply_fn`` share the evaluators' compilations (the parameters are
    an argument, not a constant), their values are each model's own (closed form), and the
    cache does not keep an ``apply_fn`` alive once its evaluators are gone."""
    _require("jax")
    import gc
    import weakref

    import jax.numpy as jnp

    from ppl_score.jax import training

    def apply(p, y):  # a Gaussian energy with mean p: score p - y, esm -D + ||p - y||^2 / 2
        return -0.5 * jnp.sum((y - p) ** 2, axis=-1)

    x = np.random.default_rng(0).normal(size=(7, 3))
    fits = [training.evaluator(apply, jnp.full(3, m), jnp.float64) for m in (0.0, 1.0)]
    for m, (log_prob, score, esm) in zip((0.0, 1.0), fits):
        np.testing.assert_allclose(log_prob(x), -0.5 * ((x - m) ** 2).sum(-1), rtol=1e-12)
        np.testing.assert_allclose(score(x), m - x, rtol=1e-12)
        np.testing.assert_allclose(esm(x), -3 + 0.5 * ((x - m) ** 2).sum(-1), rtol=1e-12, atol=1e-12)
    assert [f._cache_size() for f in training._COMPILED[apply]] == [1, 1, 1]

    def make():
        def f(p, y):
            return -0.5 * jnp.sum((y * p) ** 2, axis=-1)

        ev = training.evaluator(f, jnp.ones(3))
        ev[2](x)
        return weakref.ref(f), ev

    ref, ev = make()
    gc.collect()
    assert ref() is not None
    del ev
    gc.collect()
    assert ref() is None
