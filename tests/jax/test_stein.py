"""``ppl_score.jax.stein``: what only the JAX backend has (``jit``, a traced
bandwidth, ``jax.grad`` through the statistic, the ``key``); the formulas, calibration,
power and errors are in ``tests/conformance/test_stein.py``."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

from ppl_score.jax import KSDTest, ksd, ksd_test  # noqa: E402


def _data(n=20, d=2, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    return jnp.asarray(x), jnp.asarray(-x + 0.2 * rng.normal(size=(n, d)))


def test_jit():
    x, s = _data()
    ref = ksd(x, s)
    np.testing.assert_allclose(jax.jit(ksd)(x, s), ref, rtol=1e-12)
    # a traced bandwidth
    h = 0.8
    ref_h = ksd(x, s, kernel="rbf", bandwidth=h)
    np.testing.assert_allclose(jax.jit(lambda b: ksd(x, s, kernel="rbf", bandwidth=b))(h), ref_h, rtol=1e-12)
    # jit(vmap(ksd_test)) over data sets and keys: tests/conformance/test_stein.py (calibration)


def test_grad():
    x, s = _data()
    g = jax.grad(lambda b: ksd(x, b))(s)
    e = 1e-6
    fd = (ksd(x, s.at[2, 1].add(e)) - ksd(x, s.at[2, 1].add(-e))) / (2 * e)
    np.testing.assert_allclose(g[2, 1], fd, rtol=1e-6)


def test_key_and_tracing_errors():
    x, s = _data()
    with pytest.raises(ValueError, match="'key' is required"):
        ksd_test(x, s)
    with pytest.raises(TypeError, match="'key'"):
        ksd_test(x, s, key=0)
    with pytest.raises(ValueError, match="'key'.*batch"):
        ksd_test(x, s, key=jax.random.split(jax.random.key(0), 2))
    # numpy inputs and raw keys work; the same key gives the same p-value
    a = ksd_test(np.asarray(x), np.asarray(s), key=jax.random.PRNGKey(1), n_bootstrap=50)
    b = ksd_test(x, s, key=jax.random.PRNGKey(1), n_bootstrap=50)
    assert isinstance(a, KSDTest) and float(a.p_value) == float(b.p_value)
    # a zero median bandwidth raises eagerly and is NaN under jit
    ones = jnp.ones((20, 2))
    with pytest.raises(ValueError, match="bandwidth 0"):
        ksd(ones, s, kernel="rbf")
    assert np.isnan(jax.jit(lambda a: ksd(a, s, kernel="rbf"))(ones))
