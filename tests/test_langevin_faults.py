"""Langevin samplers under faults (issue 10): grad modes, compiled-``fn`` lifetime, MALA
that accepts nothing, diverged ULA in the Pyro front end, NUTS run-length validation, and
pickling of the result objects. Tiny shapes: every test runs in about a second."""

from __future__ import annotations

import copy
import gc
import io
import pickle
import weakref

import numpy as np
import pytest

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
pyro = pytest.importorskip("pyro")
numpyro = pytest.importorskip("numpyro")

import jax.numpy as jnp  # noqa: E402
import pyro.distributions as pdist  # noqa: E402

from ppl_score.jax import langevin as jl  # noqa: E402
from ppl_score.numpyro import sampling as nsampling  # noqa: E402
from ppl_score.pyro import sampling as psampling  # noqa: E402
from ppl_score.torch import langevin as tl  # noqa: E402


def _torch_gauss(x):
    return -0.5 * (x * x).sum(-1)


def _jax_energy(w, x):
    return -0.5 * ((x * w) ** 2).sum(-1)


def _pyro_model(x):
    with pyro.plate("data", x.shape[0]):
        pyro.sample("x", pdist.Normal(0.0, 1.0).expand([2]).to_event(1), obs=x)


def _pyro_positive_model(x):
    with pyro.plate("data", x.shape[0]):
        pyro.sample("x", pdist.Gamma(2.0, 1.0).expand([2]).to_event(1), obs=x)


def _numpyro_model(x):
    import numpyro.distributions as ndist

    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("x", ndist.Normal(0.0, 1.0).expand([2]).to_event(1), obs=x)


X0 = np.array([[0.5, -0.3], [1.0, 0.2], [-0.7, 0.1]])


# --------------------------------------------------------------------------------------
# item 1: grad modes (torch)


@pytest.mark.parametrize("sampler", ["mala", "ula"])
def test_torch_sampler_same_under_no_grad(sampler):
    run = getattr(tl, sampler)
    x0 = torch.as_tensor(X0)
    a = run(_torch_gauss, x0, 0.3, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        b = run(_torch_gauss, x0, 0.3, 4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a.samples, b.samples, rtol=0, atol=0)
    torch.testing.assert_close(a.accept_rate, b.accept_rate, rtol=0, atol=0)


@pytest.mark.parametrize("sampler", ["mala", "ula"])
def test_torch_sampler_under_inference_mode_is_a_clear_error(sampler):
    run = getattr(tl, sampler)
    with torch.inference_mode():
        x0 = torch.as_tensor(X0)
        with pytest.raises(RuntimeError, match=r"inference_mode.*no_grad"):
            run(_torch_gauss, x0, 0.3, 2)
    # a score network needs no autograd: ULA on kind="score" runs under inference_mode
    with torch.inference_mode():
        out = tl.ula(lambda x: -x, x0, 0.3, 2, kind="score")
    assert out.samples.shape == (2, 3, 2)
    # an inference tensor made earlier is a valid start outside inference_mode
    out = run(_torch_gauss, x0, 0.3, 2)
    assert torch.isfinite(out.samples).all()


def test_pyro_langevin_grad_modes():
    x = torch.zeros(1, 2)
    kw = dict(num_chains=3, num_steps=3, step_size=0.3)
    a = psampling.langevin(_pyro_model, "x", x, generator=torch.Generator().manual_seed(0), **kw)
    with torch.no_grad():
        b = psampling.langevin(_pyro_model, "x", x, generator=torch.Generator().manual_seed(0), **kw)
    torch.testing.assert_close(a.samples, b.samples, rtol=0, atol=0)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="no_grad"):
        psampling.langevin(_pyro_model, "x", x, **kw)


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


# --------------------------------------------------------------------------------------
# item 12: MALA that accepts nothing warns; ULA divergence first; NUTS run length


def test_mala_accepting_nothing_warns_with_the_rate():
    with pytest.warns(RuntimeWarning, match=r"acceptance rate 0\b.*step_size"):
        out = tl.mala(_torch_gauss, torch.as_tensor(X0), 1e4, 3, generator=torch.Generator().manual_seed(0))
    assert float(out.accept_rate.max()) < 1e-3
    with pytest.warns(RuntimeWarning, match=r"acceptance rate 0\b.*step_size"):
        jl.mala(jax.tree_util.Partial(_jax_energy, jnp.ones(2)), jnp.asarray(X0), 1e4, 3, key=jax.random.PRNGKey(0))


def test_front_end_mala_accepting_nothing_warns():
    with pytest.warns(RuntimeWarning, match="acceptance rate"):
        psampling.langevin(_pyro_model, "x", torch.zeros(1, 2), num_chains=2, num_steps=3, step_size=1e4)
    with pytest.warns(RuntimeWarning, match="acceptance rate"):
        nsampling.langevin(
            _numpyro_model, "x", jnp.zeros((1, 2)), key=jax.random.PRNGKey(0), num_chains=2, num_steps=3, step_size=1e4
        )


def test_pyro_ula_divergence_reported_before_pyro_support_check():
    """A diverged chain on a positive site used to surface as Pyro's support-validation
    error from inside the model; the sampler reports its own step_size advice first."""
    with pytest.raises(ValueError, match="step_size") as err:
        psampling.langevin(
            _pyro_positive_model,
            "x",
            torch.ones(1, 2),
            num_chains=2,
            num_steps=60,
            step_size=1e3,
            adjusted=False,
            generator=torch.Generator().manual_seed(0),
        )
    assert "support" not in str(err.value)


@pytest.mark.parametrize("bad", [0, -1])
def test_nuts_num_samples_validated(bad):
    with pytest.raises(ValueError, match="num_samples"):
        psampling.nuts(_pyro_model, "x", torch.zeros(1, 2), num_samples=bad, warmup_steps=2)
    with pytest.raises(ValueError, match="num_samples"):
        nsampling.nuts(_numpyro_model, "x", jnp.zeros((1, 2)), key=jax.random.PRNGKey(0), num_samples=bad, num_warmup=2)
    with pytest.raises(ValueError, match="warmup_steps"):
        psampling.nuts(_pyro_model, "x", torch.zeros(1, 2), num_samples=2, warmup_steps=-1)
    with pytest.raises(TypeError, match="num_warmup"):
        nsampling.nuts(_numpyro_model, "x", jnp.zeros((1, 2)), key=jax.random.PRNGKey(0), num_samples=2, num_warmup=1.5)


# --------------------------------------------------------------------------------------
# item 5: result objects survive pickle, deepcopy and torch.save


def _roundtrips(obj):
    yield pickle.loads(pickle.dumps(obj))
    yield copy.deepcopy(obj)


def test_result_objects_pickle():
    t = tl.mala(_torch_gauss, torch.as_tensor(X0), 0.3, 2, generator=torch.Generator().manual_seed(0))
    for other in [*_roundtrips(t)]:
        assert type(other) is type(t)
        torch.testing.assert_close(other.samples, t.samples, rtol=0, atol=0)
    buf = io.BytesIO()
    torch.save(t, buf)
    buf.seek(0)
    other = torch.load(buf, weights_only=False)
    torch.testing.assert_close(other.samples, t.samples, rtol=0, atol=0)
    j = jl.mala(jax.tree_util.Partial(_jax_energy, jnp.ones(2)), jnp.asarray(X0), 0.3, 2, key=jax.random.PRNGKey(0))
    for other in _roundtrips(j):
        np.testing.assert_array_equal(np.asarray(other.samples), np.asarray(j.samples))
    s = psampling.langevin(_pyro_model, "x", torch.zeros(1, 2), num_chains=2, num_steps=2, step_size=0.3)
    for other in _roundtrips(s):
        torch.testing.assert_close(other.accept_rate, s.accept_rate, rtol=0, atol=0)
    state = tl.init(_torch_gauss, torch.as_tensor(X0))
    for other in _roundtrips(state):
        torch.testing.assert_close(other.score, state.score, rtol=0, atol=0)


def test_pyro_nuts_grad_modes():
    x = torch.zeros(1, 2)
    pyro.set_rng_seed(0)
    a = psampling.nuts(_pyro_model, "x", x, num_samples=3, warmup_steps=3)
    pyro.set_rng_seed(0)
    with torch.no_grad():
        b = psampling.nuts(_pyro_model, "x", x, num_samples=3, warmup_steps=3)
    torch.testing.assert_close(a.samples, b.samples, rtol=0, atol=0)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="no_grad"):
        psampling.nuts(_pyro_model, "x", x, num_samples=3, warmup_steps=3)


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


@pytest.mark.parametrize("bad, exc", [(0, TypeError), ("batch", ValueError)])
def test_numpyro_samplers_check_key(bad, exc):
    import numpyro
    import numpyro.distributions as dist

    from ppl_score import numpyro as pnp

    def model(y):
        numpyro.sample("y", dist.Normal(0.0, 1.0), obs=y)

    if bad == "batch":
        bad = jax.random.split(jax.random.key(0), 2)
    y = jnp.zeros(())
    with pytest.raises(exc, match="argument 'key'"):
        pnp.langevin(model, "y", y, num_chains=2, num_steps=2, step_size=0.1, key=bad)
    with pytest.raises(exc, match="argument 'key'"):
        pnp.nuts(model, "y", y, num_samples=2, num_warmup=2, key=bad)
