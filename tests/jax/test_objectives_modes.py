"""``score_matching_loss`` of ``ppl_score.jax`` in the modes users run it in (issue 10, items
3, 4, 7 and 14): no warning under jit, the x64 warning, the key checks of every public JAX
function, and the memory of the exact trace."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from ppl_score import NonFiniteWarning
from tests.helpers.objectives import D_BIG, RNG, X, _mlp_energy, _nan_energy, _quartic


def test_jax_no_warning_under_jit(jax_backend):
    import jax

    from ppl_score.jax import score_matching_loss

    fn = _nan_energy(jax_backend.ops(np.float64))
    with warnings.catch_warnings():
        warnings.simplefilter("error", NonFiniteWarning)
        out = jax.jit(lambda x: score_matching_loss(fn, x, "esm"))(jax_backend.jnp.asarray(X))
    assert not np.isfinite(out)


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
