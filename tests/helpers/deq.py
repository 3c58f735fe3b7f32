"""What the DEQ tests of several directories share: sizes and tolerances, the torch model
builder and the quantities (log p, score, Hessian-vector product, ``ssm_vr`` and its
gradients) computed in each backend, and the dtype helpers of the fault tests.
Framework imports happen inside the functions (``tests/conftest.py`` imports this module)."""

from __future__ import annotations

import numpy as np
import pytest

D, H, B = 3, 5, 4  # event size, width, batch
GAMMA = 0.8
TIGHT = dict(gamma=GAMMA, tol=1e-11, max_iter=300)  # converged far below the 1e-4 target
RTOL = 1e-7  # the target is 1e-4; observed agreement is ~1e-12


def _rel(a, b) -> float:
    a, b = np.asarray(a, float), np.asarray(b, float)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def _torch_energy(tdeq, seed=0, **options):
    import torch

    torch.manual_seed(seed)
    return tdeq.DEQEnergy(D, H, quadratic=0.5, **{**TIGHT, **options}).double()


def _set_backward(module, backward, **kw):
    module.deq.config = module.deq.config._replace(backward=backward, **kw)


def _torch_quantities(tdeq, model, x, v, backward, **kw):
    """log p, s, H v, ssm_vr and its parameter gradients (as one flat vector)."""
    import torch

    from ppl_score.torch import score_matching_loss

    _set_backward(model, backward, **kw)
    xg = torch.tensor(x, requires_grad=True)
    lp = model(xg)
    (s,) = torch.autograd.grad(lp.sum(), xg, create_graph=True)
    (hv,) = torch.autograd.grad((s * torch.tensor(v[0])).sum(), xg)
    model.zero_grad()
    loss = score_matching_loss(model, torch.tensor(x), "ssm_vr", projections=torch.tensor(v))
    loss.backward()
    grads = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in model.parameters()])
    return [t.detach().numpy() for t in (lp, s, hv, loss, grads)]


BAD_OPTIONS = [
    (dict(gamma=1.0), ValueError, "gamma"),
    (dict(gamma=0.0), ValueError, "gamma"),
    (dict(gamma="a"), TypeError, "gamma"),
    (dict(solver="broyden"), ValueError, "solver"),
    (dict(backward="neumann"), ValueError, "backward"),
    (dict(norm="nuclear"), ValueError, "norm"),
    (dict(activation="relu"), ValueError, "activation"),
    (dict(tol=0.0), ValueError, "tol"),
    (dict(tol=float("nan")), ValueError, "tol"),
    (dict(max_iter=0), ValueError, "max_iter"),
    (dict(max_iter=2.5), TypeError, "max_iter"),
    (dict(memory=0), ValueError, "memory"),
    (dict(phantom_steps=0), ValueError, "phantom_steps"),
    (dict(on_nonconvergence="panic"), ValueError, "on_nonconvergence"),
]


def _jax_params(tdeq, seed=0):
    """Weights of the torch model of the same seed, in the JAX layout."""
    import jax
    import jax.numpy as jnp

    return jax.tree.map(jnp.asarray, tdeq.deq_params(_torch_energy(tdeq, seed)))


def _jax_quantities_fn(jdeq, config):
    """A jitted ``(params, x, v) -> [log p, s, H v, ssm_vr, grads of ssm_vr]``."""
    import jax
    import jax.numpy as jnp

    from ppl_score.jax import score_matching_loss

    def energy(p, y):
        return jdeq.deq_energy_apply(p, y, config, quadratic=0.5)

    @jax.jit
    def quantities(p, x, v):
        score = jax.grad(lambda y: energy(p, y).sum())
        s, hv = jax.jvp(score, (x,), (v[0],))
        loss, grads = jax.value_and_grad(
            lambda q: score_matching_loss(lambda y: energy(q, y), x, "ssm_vr", projections=v)
        )(p)
        flat = jnp.concatenate([g.ravel() for g in jax.tree.leaves(grads)])
        return [energy(p, x), s, hv, loss, flat]

    return quantities


# ---------------------------------------------------------------------------------------
# the fault tests (tests/{torch,jax,parity}/test_deq_faults.py)
# ---------------------------------------------------------------------------------------

DTYPES = ["float32", "float64"]
SOLVERS = ["anderson", "iteration"]


def _tdtype(name):
    import torch

    return getattr(torch, name)


def _jdtype(name):
    import jax
    import jax.numpy as jnp

    if name == "float64" and not jax.config.jax_enable_x64:
        pytest.skip("JAX float64 needs x64")
    return getattr(jnp, name)


def _half_plus_one(z, *params):
    return 0.5 * z + 1
