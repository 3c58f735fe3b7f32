"""DEQ across backends, in float64 at tiny widths: with the same weights torch and JAX agree on
energy, score, Hessian-vector product, ``ssm_vr`` and its gradients (energy and score
models), on the spectral norm and its gradient, and the defaults are defined once
(``ppl_score.common.deq``) and shared by every backend and front end."""

from __future__ import annotations

import numpy as np
import pytest

from tests.helpers.deq import TIGHT, D, H, _rel, _torch_energy, _torch_quantities


def test_spectral_norm_value_and_gradient(tdeq):
    """``||W||_2`` as ``u1^T W v1`` with the singular pair held constant: the value and the
    gradient ``u1 v1^T`` of the exact (SVD) spectral norm, in both backends."""
    import torch

    w = torch.randn(H, H, dtype=torch.float64, generator=torch.Generator().manual_seed(4)).requires_grad_(True)
    (g_ref,) = torch.autograd.grad(torch.linalg.matrix_norm(w, ord=2), w)
    n = tdeq._spectral_norm(w)
    (g,) = torch.autograd.grad(n, w)
    assert abs(n.item() - torch.linalg.matrix_norm(w, ord=2).item()) < 1e-12
    assert _rel(g, g_ref) < 1e-10
    jax = pytest.importorskip("jax")
    from ppl_score.jax import deq as jdeq

    wj = jax.numpy.asarray(w.detach().numpy())
    n_j, g_j = jax.value_and_grad(jdeq._spectral_norm)(wj)
    assert abs(float(n_j) - n.item()) < 1e-12
    assert _rel(g_j, g_ref) < 1e-10


def test_backend_parity(tdeq, jdeq, data, jax_reference):
    """Same weights, same projections: torch and JAX agree to 1e-6 (observed ~1e-13)."""
    x, v = data
    _, jax_ref = jax_reference
    torch_imp = _torch_quantities(tdeq, _torch_energy(tdeq), x, v[:1], "implicit")
    # parameter order: torch (deq.weight, inject.weight, inject.bias, readout.weight), JAX
    # leaves (inject W, inject b, readout w, readout c, weight), transposed; torch's readout
    # has no bias c (a constant offset: deq_params gives JAX a zero one, whose gradient is 0)
    tw = torch_imp[4]
    sizes = [H * H, H * D, H, H]
    w, uw, ub, rw = np.split(tw, np.cumsum(sizes)[:-1])
    rb = np.zeros(1)
    torch_grads = np.concatenate(
        [uw.reshape(H, D).T.ravel(), ub, rw.reshape(1, H).T.ravel(), rb, w.reshape(H, H).T.ravel()]
    )
    for name, a, b in zip(["log p", "score", "Hv", "ssm_vr"], torch_imp[:4], jax_ref[:4]):
        assert _rel(a, b) < 1e-6, name
    assert _rel(torch_grads, jax_ref[4]) < 1e-6


def test_jax_score_model_matches_torch(jdeq, tdeq, data):
    """``kind="score"``: gradients of ``ssm_vr`` of a DEQ score network agree with torch's
    (whose implicit gradients are checked against unrolled ones above)."""
    import jax
    import jax.numpy as jnp
    import torch

    from ppl_score.jax import score_matching_loss as jloss
    from ppl_score.torch import score_matching_loss as tloss

    x, v = data
    torch.manual_seed(2)
    model = tdeq.DEQScore(D, H, **TIGHT).double()
    tloss(model, torch.tensor(x), "ssm_vr", kind="score", projections=torch.tensor(v)).backward()
    params = jax.tree.map(jnp.asarray, tdeq.deq_params(model))
    config = jdeq.deq_config(**TIGHT)
    loss = lambda p: jloss(  # noqa: E731
        lambda y: jdeq.deq_score_apply(p, y, config), jnp.asarray(x), "ssm_vr", kind="score", projections=jnp.asarray(v)
    )
    g = jax.jit(jax.grad(loss))(params)
    assert _rel(g["weight"], model.deq.weight.grad.T.numpy()) < 1e-6
    assert _rel(g["inject"][0], model.deq.inject.weight.grad.T.numpy()) < 1e-6
    assert _rel(g["readout"][0], model.readout.weight.grad.T.numpy()) < 1e-6


# ---------------------------------------------------------------------------------------
# Defaults (issue 11, item 4): defined once in ppl_score.common.deq, the same in every front end
# ---------------------------------------------------------------------------------------


def test_defaults_are_shared_by_every_backend(tdeq, jdeq):
    import inspect

    from ppl_score.common import deq as _deq

    # one class, one default instance, one set of values (benchmarks/deq_defaults.py)
    assert tdeq.DEQConfig is jdeq.DEQConfig is _deq.DEQConfig
    assert tdeq.SolverConfig is jdeq.SolverConfig is _deq.SolverConfig
    default = _deq.DEQConfig()
    assert (default.solver.solver, default.solver.tol, default.gamma) == ("iteration", 1e-4, 0.9)
    assert (
        default.solver.solver,
        default.solver.tol,
        default.gamma,
        default.solver.max_iter,
        default.solver.memory,
    ) == (_deq.DEFAULT_SOLVER, _deq.DEFAULT_TOL, _deq.DEFAULT_GAMMA, _deq.DEFAULT_MAX_ITER, _deq.DEFAULT_MEMORY)
    for mod in (tdeq, jdeq):
        assert (mod.DEFAULT_SOLVER, mod.DEFAULT_TOL, mod.DEFAULT_GAMMA) == (
            _deq.DEFAULT_SOLVER,
            _deq.DEFAULT_TOL,
            _deq.DEFAULT_GAMMA,
        )
    # the validating constructors' signatures spell the same defaults as the NamedTuples
    sig = inspect.signature(_deq.solver_config).parameters
    assert {k: sig[k].default for k in _deq.SolverConfig._fields} == _deq.SolverConfig()._asdict()
    sig = inspect.signature(_deq.deq_config).parameters
    flat = {**default._asdict(), **default.solver._asdict()}  # "solver": the solver's name
    assert {k: sig[k].default for k in flat} == flat
    assert tdeq.deq_config() == jdeq.deq_config() == default
    assert tdeq.solver_config() == jdeq.solver_config() == default.solver
    # every model built without options gets them
    assert tdeq.DEQLayer(D, H).config == default
    assert tdeq.DEQEnergy(D, H).deq.config == default and tdeq.DEQScore(D, H).deq.config == default
    for fn in (jdeq.deq_layer_apply, jdeq.deq_energy_apply, jdeq.deq_score_apply):
        assert inspect.signature(fn).parameters["config"].default == default
    assert inspect.signature(tdeq.solve).parameters["cfg"].default == default.solver
    assert inspect.signature(jdeq.solve).parameters["cfg"].default == default.solver
    if _has("pyro"):
        from ppl_score.pyro.deq import DEQEnergy, DEQScore

        assert DEQEnergy(D, H).deq.config == default and DEQScore(D, H).deq.config == default
    if _has("numpyro"):
        from ppl_score.numpyro.deq import deq_energy, deq_score

        assert deq_energy(H)[1].config == default and deq_score(H)[1].config == default


def _has(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None
