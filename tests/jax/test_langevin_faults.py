"""The JAX Langevin drivers (issue 10, item 6) neither keep ``fn`` alive nor compile again for
a new ``Partial`` or a new closure over new arrays."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

from ppl_score.jax import langevin as jl  # noqa: E402
from tests.helpers.mcmc import X0, _jax_energy

# --------------------------------------------------------------------------------------
# item 6: the JAX drivers neither keep fn alive nor compile again for a new Partial


class _Box:
    pass


def _closure(scale):
    box = _Box()
    box.w = jnp.full((2,), scale)
    return (lambda x: -0.5 * ((x * box.w) ** 2).sum(-1)), weakref.ref(box)


def test_jax_closures_are_released_and_the_cache_does_not_grow():
    x0, key = jnp.asarray(X0), jax.random.PRNGKey(0)
    gc.collect()
    before = len(jl._COMPILED)
    refs = []
    for i in range(4):
        fn, ref = _closure(1.0 + i)
        jl.mala(fn, x0, 0.2, 3, key=key)
        jl.ula(fn, x0, 0.2, 3, key=key)
        refs.append(ref)
        del fn
    gc.collect()
    assert all(ref() is None for ref in refs), "a closure passed as fn is kept alive"
    assert len(jl._COMPILED) == before


def test_jax_same_fn_and_partial_reuse_the_compilation():
    x0, key = jnp.asarray(X0), jax.random.PRNGKey(0)
    outs = [jl.mala(jax.tree_util.Partial(_jax_energy, jnp.full((2,), 1.0 + i)), x0, 0.2, 3, key=key) for i in range(3)]
    drivers, _ = jl._drivers(jax.tree_util.Partial(_jax_energy, jnp.ones(2)))
    assert drivers.traces == 2  # init and one scan, for all three calls
    # the Partial's arguments are live data, not baked constants
    assert not np.allclose(np.asarray(outs[0].samples), np.asarray(outs[2].samples))
    # and a Partial computes what the equivalent closure computes
    ref = jl.mala(lambda x: _jax_energy(jnp.full((2,), 3.0), x), x0, 0.2, 3, key=key)
    np.testing.assert_allclose(np.asarray(ref.samples), np.asarray(outs[2].samples), rtol=1e-12)


def _fresh_closure(scale):
    w = {"w": jnp.full((2,), scale)}  # a new array (in a pytree) per call, as in a training loop

    def energy(p, x):
        return -0.5 * ((x * p["w"]) ** 2).sum(-1)

    return lambda x: energy(w, x)


def test_jax_new_closures_over_new_arrays_reuse_one_compilation():
    """``lambda x: energy(params, x)`` made afresh per call: compiled once, arrays not kept."""
    x0, key = jnp.asarray(X0), jax.random.PRNGKey(0)
    fns = [_fresh_closure(1.0 + i) for i in range(3)]
    outs = [jl.mala(fn, x0, 0.2, 3, key=key) for fn in fns]
    drivers, leaves = jl._drivers(fns[0])
    assert drivers is jl._drivers(fns[2])[0]  # one cache entry for the closure's code
    assert drivers.traces == 2  # init and one scan, for all three closures
    assert len(leaves) == 1
    # the closed-over arrays are live data, not baked constants
    assert not np.allclose(np.asarray(outs[0].samples), np.asarray(outs[2].samples))
    ref = jl.mala(lambda x: -0.5 * ((x * jnp.full((2,), 3.0)) ** 2).sum(-1), x0, 0.2, 3, key=key)
    np.testing.assert_allclose(np.asarray(outs[2].samples), np.asarray(ref.samples), rtol=1e-6)
    # the cache holds none of the arrays: they die with the closures
    refs = [weakref.ref(leaf) for fn in fns for leaf in jl._drivers(fn)[1]]
    del fns, outs, leaves
    gc.collect()
    assert all(r() is None for r in refs)
