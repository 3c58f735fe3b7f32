"""``score_matching_loss`` in the modes users run it in (issue 10, items 1-4, 7, 14 and the
validation switch): grad modes, extreme scales of the finite-difference directions,
non-finite results, the JAX key and x64 checks, and memory of the exact trace.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import ppl_score
from ppl_score import NonFiniteWarning
from ppl_score.spec import OBJECTIVES

METHODS = tuple(OBJECTIVES)
FD = ("fd_ssm", "fd_dsm")
RNG = np.random.default_rng(0)
X = RNG.normal(size=(4, 3))
W = RNG.normal(size=(3, 5))


def _mlp_energy(ops, w=W):
    """A non-quadratic log density ``-sum softplus(x W) - 1/2 ||x||^2``."""
    wc = ops.const(w)

    def fn(x):
        return -ops.softplus(x @ wc).sum(-1) - 0.5 * (x * x).sum(-1)

    return fn


def _exp(ops):
    if ops.name == "torch":
        import torch

        return torch.exp
    import jax.numpy as jnp

    return jnp.exp


def _builder(kind):
    if kind == "log_prob":
        return _mlp_energy

    def score(ops):
        wc = ops.const(W)
        exp = _exp(ops)
        return lambda x: -(1.0 / (1.0 + exp(-(x @ wc)))) @ wc.T - x

    return score


def _explicit(method, m=2, dtype=np.float64, scale=1.0):
    rng = np.random.default_rng(1)
    kw = {}
    if OBJECTIVES[method].uses_projections:
        kw["projections"] = (scale * rng.normal(size=(m, *X.shape))).astype(dtype)
    if OBJECTIVES[method].uses_noise:
        kw["noise"] = rng.normal(size=X.shape).astype(dtype)
    return kw


# ------------------------------------------------------------------ 1. torch grad modes


@pytest.mark.parametrize("kind", ["log_prob", "score"])
@pytest.mark.parametrize("method", METHODS)
def test_torch_no_grad_gives_the_same_value(torch_backend, method, kind):
    import torch

    from ppl_score.torch import score_matching_loss

    fn = _builder(kind)(torch_backend.ops(np.float64))
    x = torch.as_tensor(X)
    kw = {k: torch.as_tensor(v) for k, v in _explicit(method).items()}
    ref = score_matching_loss(fn, x, method, kind=kind, **kw)
    with torch.no_grad():
        got = score_matching_loss(fn, x, method, kind=kind, **kw)
    assert not got.requires_grad  # no graph kept in an evaluation loop
    assert float(ref.detach()) != 0.0
    torch.testing.assert_close(got, ref.detach(), rtol=1e-12, atol=1e-12)


def test_torch_no_grad_keeps_parameter_graph_outside(torch_backend):
    """Outside no_grad the loss still reaches the parameters of a module."""
    import torch

    from ppl_score.torch import score_matching_loss

    lin = torch.nn.Linear(3, 1, dtype=torch.float64)
    fn = lambda x: -torch.nn.functional.softplus(lin(x)).squeeze(-1) - 0.5 * (x * x).sum(-1)  # noqa: E731
    loss = score_matching_loss(fn, torch.as_tensor(X), "esm")
    (g,) = torch.autograd.grad(loss, lin.weight)
    assert torch.isfinite(g).all() and g.abs().sum() > 0


@pytest.mark.parametrize("method", METHODS)
def test_torch_inference_mode_raises(torch_backend, method):
    import torch

    from ppl_score.torch import score_matching_loss

    fn = _mlp_energy(torch_backend.ops(np.float64))
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode.*no_grad"):
        score_matching_loss(
            fn, torch.as_tensor(X), method, **{k: torch.as_tensor(v) for k, v in _explicit(method).items()}
        )


def test_torch_inference_tensor_used_outside_inference_mode(torch_backend):
    """Data loaded under inference_mode (an inference tensor) is still accepted later."""
    import torch

    from ppl_score.torch import score_matching_loss

    fn = _mlp_energy(torch_backend.ops(np.float64))
    with torch.inference_mode():
        xi = torch.as_tensor(X).clone()
    ref = score_matching_loss(fn, torch.as_tensor(X), "esm")
    torch.testing.assert_close(score_matching_loss(fn, xi, "esm"), ref)


# ------------------------------------------------------------ 2. scale-invariant directions


@pytest.mark.parametrize("scale", [1e25, 1e-25])
@pytest.mark.parametrize("kind", ["log_prob", "score"])
@pytest.mark.parametrize("method", FD)
def test_fd_directions_are_scale_invariant(backend, method, kind, scale):
    kw = _explicit(method, dtype=np.float32)
    ref = backend.loss(_builder(kind), X.astype(np.float32), method, kind=kind, **kw)
    kw["projections"] = kw["projections"] * np.float32(scale)
    got = backend.loss(_builder(kind), X.astype(np.float32), method, kind=kind, **kw)
    assert np.isfinite(got) and got != 0.0
    np.testing.assert_allclose(got, ref, rtol=1e-5)


def test_fd_directions_scale_invariant_float64(backend):
    kw = _explicit("fd_ssm")
    ref = backend.loss(_mlp_energy, X, "fd_ssm", **kw)
    for scale in (1e200, 1e-200):
        got = backend.loss(_mlp_energy, X, "fd_ssm", projections=kw["projections"] * scale)
        np.testing.assert_allclose(got, ref, rtol=1e-12)


def test_sampling_unit_directions_tiny_and_huge(backend):
    if backend.name == "torch":
        import torch

        from ppl_score.torch.sampling import unit_directions

        conv = lambda a: torch.as_tensor(a)  # noqa: E731
    else:
        from ppl_score.jax.sampling import unit_directions

        conv = backend.jnp.asarray
    u = RNG.normal(size=(2, 3, 4)).astype(np.float32)
    ref = np.asarray(unit_directions(conv(u)))
    for scale in (1e30, 1e-30):  # squares overflow / underflow in float32
        got = np.asarray(unit_directions(conv(u * np.float32(scale))))
        np.testing.assert_allclose(np.linalg.norm(got.reshape(2, 3, -1), axis=-1), 1.0, rtol=1e-5)
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------ 3. non-finite results


def _nan_energy(ops):
    wc = ops.const(np.full_like(W, np.nan))
    return lambda x: -ops.softplus(x @ wc).sum(-1) - 0.5 * (x * x).sum(-1)


@pytest.mark.parametrize("method", METHODS)
def test_nan_parameter_warns_naming_the_method(backend, method):
    with pytest.warns(NonFiniteWarning, match=f"method='{method}'.*nan/inf parameter"):
        out = backend.loss(_nan_energy, X, method, **_explicit(method))
    assert not np.isfinite(out)


def test_huge_eps_and_tiny_sigma_warn(backend):
    with pytest.warns(NonFiniteWarning, match="eps=1e\\+30"):
        backend.loss(_mlp_energy, X.astype(np.float32), "fd_ssm", eps=1e30, **_explicit("fd_ssm", dtype=np.float32))
    with pytest.warns(NonFiniteWarning, match="sigma=1e-30"):
        backend.loss(_mlp_energy, X.astype(np.float32), "dsm", sigma=1e-30, **_explicit("dsm", dtype=np.float32))


@pytest.mark.parametrize("eps", [1e-170, 1e170])
def test_eps_whose_square_is_out_of_range_is_a_value_error(backend, eps):
    with pytest.raises(ValueError, match="option 'eps'"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        backend.loss(_mlp_energy, X, "fd_ssm", eps=eps, **_explicit("fd_ssm"))


@pytest.mark.parametrize("kind", ["log_prob", "score"])
@pytest.mark.parametrize("method", METHODS)
def test_integer_fn_output_is_a_type_error(backend, method, kind):
    def builder(ops):
        if kind == "log_prob":
            return lambda x: (x * 0).sum(-1).astype("int32") if ops.name == "jax" else (x * 0).sum(-1).long()
        return lambda x: (x * 0).astype("int32") if ops.name == "jax" else (x * 0).long()

    with pytest.raises(TypeError, match="argument 'fn' must return a floating"):
        backend.loss(builder, X, method, kind=kind, **_explicit(method))


def test_jax_no_warning_under_jit(jax_backend):
    import jax

    from ppl_score.jax import score_matching_loss

    fn = _nan_energy(jax_backend.ops(np.float64))
    with warnings.catch_warnings():
        warnings.simplefilter("error", NonFiniteWarning)
        out = jax.jit(lambda x: score_matching_loss(fn, x, "esm"))(jax_backend.jnp.asarray(X))
    assert not np.isfinite(out)


# ------------------------------------------------------------------- the validation switch


def test_validation_switch(backend):
    assert ppl_score.is_validation_enabled()
    bad = X.copy()
    bad[0, 0] = np.nan
    with ppl_score.validation_enabled(False):
        assert not ppl_score.is_validation_enabled()
        with warnings.catch_warnings():
            warnings.simplefilter("error", NonFiniteWarning)
            out = backend.loss(_mlp_energy, bad, "esm")  # no host-syncing check, no warning
        assert np.isnan(out)
        with pytest.raises(ValueError, match="unknown method"):  # value-free checks stay
            backend.loss(_mlp_energy, X, "nope")
    assert ppl_score.is_validation_enabled()
    with pytest.raises(ValueError, match="argument 'x' contains non-finite"):
        backend.loss(_mlp_energy, bad, "esm")


def test_set_validation_type():
    with pytest.raises(TypeError, match="enabled"):
        ppl_score.set_validation("no")
    assert ppl_score.is_validation_enabled()


# ------------------------------------------------------------------------ 4. JAX x64


def test_jax_float64_without_x64_warns_once(jax_backend):
    import jax

    from ppl_score.jax import objectives, score_matching_loss

    fn = _mlp_energy(jax_backend.ops(np.float32))
    objectives._X64_WARNED = False
    try:
        with jax.enable_x64(False):
            with pytest.warns(UserWarning, match="x64 mode is off"):
                out = score_matching_loss(fn, X, "esm")
            assert out.dtype == np.float32
            with warnings.catch_warnings():
                warnings.simplefilter("error", UserWarning)
                score_matching_loss(fn, X, "esm")  # once per process
    finally:
        objectives._X64_WARNED = False


# ---------------------------------------------------------------------------- 14. JAX keys


@pytest.mark.parametrize(
    "make_key, exc",
    [
        (lambda jax: 0, TypeError),
        (lambda jax: "seed", TypeError),
        (lambda jax: np.zeros(2, np.float32), TypeError),
        (lambda jax: jax.random.split(jax.random.key(0), 3), ValueError),
        (lambda jax: jax.random.split(jax.random.PRNGKey(0), 3), ValueError),
        (lambda jax: np.zeros(5, np.uint32), ValueError),
    ],
    ids=["int", "str", "float-array", "typed-batch", "raw-batch", "raw-wrong-shape"],
)
def test_jax_invalid_key(jax_backend, make_key, exc):
    import jax

    with pytest.raises(exc, match="argument 'key'"):
        jax_backend.call(_mlp_energy(jax_backend.ops(np.float64)), jax_backend.jnp.asarray(X), "ssm", key=make_key(jax))


def test_jax_valid_keys(jax_backend):
    import jax

    fn = _mlp_energy(jax_backend.ops(np.float64))
    x = jax_backend.jnp.asarray(X)
    for key in (jax.random.key(0), jax.random.PRNGKey(0), np.asarray(jax.random.PRNGKey(0))):
        assert np.isfinite(jax_backend.call(fn, x, "ssm", key=key))


# --------------------------------------------------------------- 7. memory of the exact trace


def _quartic(ops):
    return lambda x: -0.25 * (x**4).reshape(x.shape[0], -1).sum(-1) - x.reshape(x.shape[0], -1).sum(-1)


D_BIG = 96


def test_torch_esm_memory_bounded_by_chunk(torch_backend, monkeypatch):
    """No tensor of the exact trace holds D^2 elements (a D x D identity used to)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from ppl_score.torch import derivatives, score_matching_loss

    monkeypatch.setattr(derivatives, "ESM_MEMORY_BUDGET", 4 * 2 * 512)  # chunk = 4 at B = 2
    x = torch.as_tensor(RNG.normal(size=(2, D_BIG)))

    class Largest(TorchDispatchMode):
        numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    self.numel = max(self.numel, t.numel())
            return out

    fn = _quartic(torch_backend.ops(np.float64))
    with Largest() as mode:
        val = score_matching_loss(fn, x, "esm", reduction="none")
    expected = (-3 * x**2).sum(-1) + 0.5 * ((-(x**3) - 1) ** 2).sum(-1)
    torch.testing.assert_close(val, expected)
    assert mode.numel <= 4 * 2 * D_BIG < D_BIG**2


def test_torch_esm_fallback_for_functions_vmap_cannot_run(torch_backend):
    """A fn with data-dependent Python control flow still gets the exact trace."""
    import torch

    from ppl_score.torch import score_matching_loss

    fn0 = _quartic(torch_backend.ops(np.float64))

    def fn(x):
        if bool((x.abs() > 1e6).any()):  # data-dependent: not allowed under torch.func.vmap
            raise AssertionError
        return fn0(x)

    calls = []
    fn1 = fn

    def fn(x):  # noqa: F811 - counts the evaluations
        calls.append(1)
        return fn1(x)

    x = torch.as_tensor(RNG.normal(size=(3, 5)))
    torch.testing.assert_close(score_matching_loss(fn, x, "esm"), score_matching_loss(fn0, x, "esm"))
    first = len(calls)
    score_matching_loss(fn, x, "esm")
    assert len(calls) - first == first - 1  # the failed vmap attempt is not repeated


def _largest_intermediate(jaxpr) -> int:
    import jax.extend

    best = 0
    for eqn in jaxpr.eqns:
        for v in eqn.outvars:
            best = max(best, int(np.prod(v.aval.shape)) if hasattr(v.aval, "shape") else 0)
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            best = max(best, _largest_intermediate(sub))
    return best


def test_jax_esm_memory_bounded_by_chunk(jax_backend, monkeypatch):
    import jax

    from ppl_score.jax import derivatives, score_matching_loss

    monkeypatch.setattr(derivatives, "ESM_MEMORY_BUDGET", 4 * 2 * 512)
    fn = _quartic(jax_backend.ops(np.float64))
    x = jax_backend.jnp.asarray(RNG.normal(size=(2, D_BIG)))
    jaxpr = jax.make_jaxpr(lambda x: score_matching_loss(fn, x, "esm", reduction="none"))(x)
    assert _largest_intermediate(jaxpr.jaxpr) <= 4 * 2 * D_BIG < D_BIG**2
    val = np.asarray(score_matching_loss(fn, x, "esm", reduction="none"))
    xn = np.asarray(x)
    np.testing.assert_allclose(val, (-3 * xn**2).sum(-1) + 0.5 * ((-(xn**3) - 1) ** 2).sum(-1), rtol=1e-12)


@pytest.mark.parametrize("chunk_budget", [1, 3 * 512, 2**30])
def test_esm_chunking_does_not_change_the_value(backend, monkeypatch, chunk_budget):
    mod = __import__(f"ppl_score.{backend.name}.derivatives", fromlist=["x"])
    ref = backend.loss(_mlp_energy, X, "esm", reduction="none")
    monkeypatch.setattr(mod, "ESM_MEMORY_BUDGET", chunk_budget)
    np.testing.assert_allclose(backend.loss(_mlp_energy, X, "esm", reduction="none"), ref, rtol=1e-12)


def _key_takers():
    """Every public JAX / NumPyro function that takes a PRNG key, called with ``key``."""
    import jax.numpy as jnp

    from ppl_score.jax import deq, estimators, flows, langevin, nets

    x0 = jnp.zeros((2, 2))
    state = langevin.init(lambda x: -(x * x).sum(-1), x0)
    est = estimators.LearnedScoreEstimator(2, hidden=(4,))
    flow = flows.InvertibleMLP(2, 1)
    return {
        "ula": lambda key: langevin.ula(lambda x: -(x * x).sum(-1), x0, 0.1, 2, key=key),
        "mala": lambda key: langevin.mala(lambda x: -(x * x).sum(-1), x0, 0.1, 2, key=key),
        "langevin.step": lambda key: langevin.step(key, state, lambda x: -(x * x).sum(-1), 0.1),
        "mlp_init": lambda key: nets.mlp_init(key, (2, 3, 1)),
        "deq_energy_init": lambda key: deq.deq_energy_init(key, 2, 4),
        "estimator.init": lambda key: est.init(key),
        "estimator.update": lambda key: est.update(est.init(__import__("jax").random.PRNGKey(0)), key, x0 + 1.0),
        "flow.init": lambda key: flow.init(key),
        "flow.sample": lambda key: flow.sample(flow.init(__import__("jax").random.PRNGKey(0)), key, 2),
    }


@pytest.mark.parametrize("bad, exc", [(0, TypeError), ("seed", TypeError), ("batch", ValueError)])
def test_every_jax_key_argument_is_checked(jax_backend, bad, exc):
    import jax

    if bad == "batch":
        bad = jax.random.split(jax.random.key(0), 2)
    for name, call in _key_takers().items():
        with pytest.raises(exc, match="argument 'key'"):
            call(bad)
        call(jax.random.PRNGKey(1))  # and a valid key works
