"""DEQ energy against residual explicit energies of growing depth on Fashion-MNIST (784-D).

``benchmarks/deq.py`` compares the DEQ energy with *plain* MLP energies, which stop training
past depth 10, so the depth axis there mixes two effects (memory and trainability). Here the
explicit energies are residual networks, which train at depth:

    h_0 = U x + b,    h_k = h_{k-1} + (W2_k softplus(W1_k h_{k-1} + b1_k) + b2_k) / depth,
    log p(x) = w^T softplus(h_depth) - quadratic/2 ||x||^2 + const     (k = 1..depth),

every residual branch scaled by a fixed ``1/depth`` (no parameter; the Euler step of an ODE
on [0, 1]) and its bias ``b2_k`` starting at zero: each block starts as a small perturbation
of the identity and the residual stream stays O(1) at any depth. (Only shrinking the
branch's *initial* weights, ``W2_k`` at 0.1 of the default, was tried first: with the same
Adam steps the stream grew to |h| ~ 100 within 250 steps, the loss spiked, and depth 8
ended at the held-out SM of an untrained energy, like the plain MLPs.) The quadratic term
is that of the library's energies (``nets.MLPEnergy``, ``deq.DEQEnergy``). The DEQ energy is
``ppl_score.torch.DEQEnergy`` (JAX: ``deq.deq_energy_init`` / ``deq_energy_apply``): one
weight-tied layer ``z = softplus(W_hat z + U x + b)`` of the same width, spectral norm of
``W_hat`` at most ``gamma``, implicit (exact, any order) backward, plain iteration.

Every model is trained by ``ssm_vr`` (one Rademacher projection): the objective the DEQ's
implicit backward is built for (score, Hessian-vector product and their parameter gradients
all go through adjoint fixed-point solves, at constant memory), and an unbiased estimate of
the held-out metric below. Same batches, same projections' generator seed, same number of
Adam steps and learning rate for all models.

Data: ``experiments/_common.load_images`` (dequantized pixels in (0, 1), 784-D), smoothed
by Gaussian noise of ``SIGMA = 0.1`` (``--sigma``), as in ``tutorials/deq_digits.py`` and
noise-conditional score models: each batch is ``x + sigma n`` with fresh noise, so the models
fit ``p_sigma = p * N(0, sigma^2 I)``, whose score matching loss is bounded below. On the
raw dequantized images (``--sigma 0``) the loss is not: the density concentrates on a thin
set, the fits chase ever sharper densities, the held-out SM swings by tens of thousands
between neighbouring depths (one depth ended at +4.9e4, its neighbours at -2.8e4 and -0.9e4)
and says little about depth.

Measured per model:

* ``peak_mb``: torch: bytes held by torch's allocator during one training step (loss,
  parameter gradients, Adam update) above the level at its start (``torch_peak_bytes``, the
  profiler's allocation events), after a warm-up step. JAX: the compiled step's
  ``memory_analysis()`` (temporaries + outputs - aliased), as ``benchmarks/objectives.py``
  ``jax_step_bytes``; JAX needs no training for it. The two methods differ: compare rows
  within a backend. Memory-only rows (deeper residual nets, untrained) extend the depth axis.
* ``test_sm``: exact score matching (``esm``: Hessian trace plus half the squared score) on
  a fixed subset of the test images (plus one fixed draw of the smoothing noise), mean per
  image. A DEQ is judged with a tight solve
  (``EVAL_TOL``); the exact trace's batched reverse passes run ``max_iter`` adjoint
  iterations, set so that ``gamma^max_iter`` is below ``EVAL_TOL``.
* ``train_ssm_vr``: mean training loss over the last tenth of the steps; ``step_ms``: median
  wall time of a step (JAX: the compiled step; a shared, loaded CPU: indicative only);
  ``iters``: the DEQ's mean forward solver iterations (training configuration) on the
  held-out batches after training.

JAX (``--jax train``, the default) trains the same models on the same batches (its
projections come from JAX keys) and reports the same metrics; ``--jax memory`` compiles the
steps for their memory only; ``--smoke`` runs torch alone (a JAX compile of a third-order
step takes seconds per model).

    python experiments/fmnist_deq.py --json experiments/results/fmnist_deq.json
    python experiments/fmnist_deq.py --smoke --json /tmp/fmnist_deq_smoke.json
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

import numpy as np

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))  # `experiments._common` and a checkout without `pip install -e .`

from experiments import _common as C  # noqa: E402  (imports neither torch nor JAX)

OBJECTIVE = "ssm_vr"
QUADRATIC = 1.0
BATCH = 128
LR = 1e-3
EVAL_TOL = 1e-6
SIGMA = 0.1  # Gaussian smoothing of the data, pixel units (see the module docstring)
MB = 2.0**20

FULL = dict(
    width=128,
    steps=1000,
    depths=(1, 2, 4, 8, 16),
    memory_depths=(32, 64),
    mlp_depths=(16,),
    gammas=(0.5,),
    n_train=None,
    n_test=100,
    sigma=SIGMA,
    eval_batch=25,
    deq_max_iter=50,
    jax="train",
)
SMOKE = dict(
    width=16,
    steps=3,
    depths=(1, 2),
    memory_depths=(4,),
    mlp_depths=(),
    gammas=(0.5,),
    n_train=64,
    n_test=8,
    sigma=SIGMA,
    eval_batch=8,
    deq_max_iter=30,
    jax="off",  # a JAX compile of the ssm_vr step takes seconds per model
)


def eval_max_iter(gamma: float) -> int:
    """Adjoint iterations of the exact trace's batched reverse passes: ``gamma^k <= EVAL_TOL / 10``."""
    return int(math.ceil(math.log(EVAL_TOL / 10) / math.log(gamma)))


# -------------------------------------------------------------------------------- torch


def residual_energy_class():
    """``ResidualEnergy`` (defined lazily: torch is imported after ``single_thread``)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class ResidualEnergy(nn.Module):
        """``log p(x) = w^T softplus(h_depth) - quadratic/2 ||x||^2`` with ``h_0 = U x + b``
        and ``depth`` residual blocks ``h <- h + branch_scale * (W2 softplus(W1 h + b1) + b2)``
        (``branch_scale``: a fixed multiplier, default ``1 / depth``); ``b2`` starts at zero,
        the weights at torch's default init."""

        def __init__(self, dim: int, width: int, depth: int, quadratic: float = QUADRATIC, branch_scale=None):
            super().__init__()
            self.inject = nn.Linear(dim, width)
            self.inner = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
            self.outer = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
            with torch.no_grad():
                for layer in self.outer:
                    layer.bias.zero_()
            self.branch_scale = 1.0 / max(depth, 1) if branch_scale is None else float(branch_scale)
            self.readout = nn.Linear(width, 1, bias=False)
            self.quadratic = float(quadratic)

        def forward(self, x):
            flat = x.reshape(x.shape[0], -1)
            h = self.inject(flat)
            for inner, outer in zip(self.inner, self.outer):
                h = h + self.branch_scale * outer(F.softplus(inner(h)))
            return self.readout(F.softplus(h)).squeeze(-1) - 0.5 * self.quadratic * (flat * flat).sum(-1)

    return ResidualEnergy


def torch_model(kind: str, depth: int, gamma, dim: int, cfg: dict, seed: int):
    """``kind``: ``"residual"``, ``"mlp"`` (plain ``nets.MLPEnergy``, for contrast) or ``"deq"``."""
    import torch

    from ppl_score.torch import DEQEnergy
    from ppl_score.torch.nets import MLPEnergy

    torch.manual_seed(seed)
    width = cfg["width"]
    if kind == "deq":
        return DEQEnergy(
            dim,
            width,
            quadratic=QUADRATIC,
            gamma=gamma,
            backward="implicit",
            solver="iteration",
            tol=1e-4,
            max_iter=cfg["deq_max_iter"],
            on_nonconvergence="ignore",
        )
    if kind == "mlp":
        return MLPEnergy(dim, (width,) * depth, quadratic=QUADRATIC)
    return residual_energy_class()(dim, width, depth)


def torch_step_fn(module, seed: int, lr: float = LR):
    """One training step ``xb -> loss`` (Adam, ``ssm_vr``, projections from a seeded generator)."""
    import torch

    from ppl_score.torch import score_matching_loss

    opt = torch.optim.Adam(module.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed + 5)

    def step(xb):
        opt.zero_grad(set_to_none=True)
        loss = score_matching_loss(module, xb, OBJECTIVE, generator=gen)
        loss.backward()
        opt.step()
        return loss.item()

    return step


def torch_step_bytes(module, xb, seed: int) -> int:
    """Peak allocator bytes of one training step of ``module`` on ``xb`` (fresh Adam, after a
    warm-up step so that its state exists before, as in every later step)."""
    step = torch_step_fn(module, seed)
    step(xb)
    return C.torch_peak_bytes(lambda: step(xb))


def torch_held_out_sm(module, test: np.ndarray, eval_batch: int) -> float:
    """Mean exact SM (``esm``) per image over ``test``."""
    import torch

    from ppl_score.torch import score_matching_loss

    x = torch.as_tensor(test)
    total = sum(score_matching_loss(module, xb, "esm", reduction="sum").item() for xb in x.split(eval_batch))
    return total / len(x)


def train_batches(train: np.ndarray, steps: int, seed: int, sigma: float):
    """``steps`` batches of ``BATCH`` training images plus fresh ``N(0, sigma^2)`` noise: the
    same sequence for every model."""
    rng = np.random.default_rng([seed, 3])
    for _ in range(steps):
        xb = train[rng.integers(0, len(train), BATCH)]
        yield (xb + sigma * rng.standard_normal(xb.shape)).astype(np.float32)


def first_batch(train: np.ndarray) -> np.ndarray:
    """``BATCH`` training images (repeated when there are fewer): the batch of the memory
    measurements and of the JAX compile."""
    return train[np.arange(BATCH) % len(train)]


def held_out(test: np.ndarray, seed: int, sigma: float) -> np.ndarray:
    """The test images plus one fixed draw of ``N(0, sigma^2)`` noise."""
    noise = np.random.default_rng([seed, 7]).standard_normal(test.shape)
    return (test + sigma * noise).astype(np.float32)


def smoothed(values, window: int = 20) -> list[float]:
    """Means over consecutive windows of ``window`` steps (the loss trace kept in the JSON)."""
    v = np.asarray(values, dtype=float)
    n = len(v) // window
    return v[: n * window].reshape(n, window).mean(1).tolist() if n else v.tolist()


def torch_row(kind: str, depth: int, gamma, train, test, cfg: dict, seed: int) -> dict:
    import torch

    module = torch_model(kind, depth, gamma, train.shape[1], cfg, seed)
    step = torch_step_fn(module, seed)
    losses, times = [], []
    for xb in train_batches(train, cfg["steps"], seed, cfg["sigma"]):
        xb = torch.as_tensor(xb)
        t0 = time.perf_counter()
        loss = step(xb)
        times.append(time.perf_counter() - t0)
        losses.append(loss)
        if not math.isfinite(loss):
            break
    tail = losses[-max(1, len(losses) // 10) :]
    iters = None
    if kind == "deq":  # forward iterations (training configuration) on the held-out batches
        with torch.no_grad():
            iters = []
            for xb in batched(test, cfg["eval_batch"]):
                module(torch.as_tensor(xb))
                iters.append(module.last_info.iterations)
        iters = float(np.mean(iters))
        # judged with a tight solve, exact derivatives
        c = module.deq.config
        module.deq.config = c._replace(solver=c.solver._replace(tol=EVAL_TOL, max_iter=eval_max_iter(gamma)))
    t0 = time.perf_counter()
    sm = torch_held_out_sm(module, test, cfg["eval_batch"]) if math.isfinite(losses[-1]) else float("nan")
    eval_s = time.perf_counter() - t0
    if kind == "deq":
        module.deq.config = c
    peak = torch_step_bytes(module, torch.as_tensor(first_batch(train)), seed)
    return {
        "peak_mb": peak / MB,
        "test_sm": sm,
        "train_ssm_vr": float(np.mean(tail)),
        "steps_done": len(losses),
        "step_ms": 1e3 * float(np.median(times[1:] if len(times) > 1 else times)),
        "iters": iters,
        "params": sum(p.numel() for p in module.parameters()),
        "eval_s": eval_s,
        "loss_trace": smoothed(losses),
    }


def torch_memory_row(kind: str, depth: int, gamma, train, cfg: dict, seed: int) -> dict:
    """An untrained model's step memory (the memory-only depths)."""
    import torch

    module = torch_model(kind, depth, gamma, train.shape[1], cfg, seed)
    peak = torch_step_bytes(module, torch.as_tensor(first_batch(train)), seed)
    return {"peak_mb": peak / MB, "params": sum(p.numel() for p in module.parameters())}


# ---------------------------------------------------------------------------------- JAX


def jax_residual_init(key, dim: int, width: int, depth: int):
    """Parameters of ``jax_residual_apply``, torch's ``nn.Linear`` init (uniform in
    +-1/sqrt(fan_in)); the blocks' weights stacked ``[depth, ...]`` for ``lax.scan``."""
    import jax
    import jax.numpy as jnp

    ks = jax.random.split(key, 6)
    u = lambda k, shape, fan_in: jax.random.uniform(k, shape, jnp.float32, -1, 1) / math.sqrt(fan_in)  # noqa: E731
    return {
        "inject": (u(ks[0], (dim, width), dim), u(ks[1], (width,), dim)),
        "inner": (u(ks[2], (depth, width, width), width), u(ks[3], (depth, width), width)),
        "outer": (u(ks[4], (depth, width, width), width), jnp.zeros((depth, width), jnp.float32)),
        "readout": u(ks[5], (width,), width),
    }


def jax_residual_apply(params, x, quadratic: float = QUADRATIC):
    """The JAX mirror of ``ResidualEnergy`` (``[in, out]`` matrices, branches scaled by
    ``1 / depth``)."""
    import jax

    flat = x.reshape(x.shape[0], -1)
    w, b = params["inject"]
    h = flat @ w + b
    scale = 1.0 / max(params["inner"][0].shape[0], 1)

    def block(h, p):
        w1, b1, w2, b2 = p
        return h + scale * (jax.nn.softplus(h @ w1 + b1) @ w2 + b2), None

    h, _ = jax.lax.scan(block, h, (*params["inner"], *params["outer"]))
    return jax.nn.softplus(h) @ params["readout"] - 0.5 * quadratic * (flat * flat).sum(-1)


def jax_deq_config(gamma: float, cfg: dict, evaluate: bool = False):
    """The DEQ's training configuration, or (``evaluate``) its tight-solve counterpart."""
    from ppl_score.jax import deq

    tol, max_iter = (EVAL_TOL, eval_max_iter(gamma)) if evaluate else (1e-4, cfg["deq_max_iter"])
    return deq.deq_config(
        gamma=gamma, backward="implicit", solver="iteration", tol=tol, max_iter=max_iter, on_nonconvergence="ignore"
    )


def jax_model(kind: str, depth: int, gamma, dim: int, cfg: dict, seed: int):
    """``(params, energy(params, x), eval_energy(params, x))``; they differ for a DEQ only
    (its tight solve for the held-out SM)."""
    import jax

    from ppl_score.jax import deq, nets

    key = jax.random.PRNGKey(seed)
    width = cfg["width"]
    if kind == "deq":
        energies = (
            lambda p, x, c=c: deq.deq_energy_apply(p, x, c, QUADRATIC)
            for c in (jax_deq_config(gamma, cfg), jax_deq_config(gamma, cfg, evaluate=True))
        )
        return deq.deq_energy_init(key, dim, width), *energies
    if kind == "mlp":
        energy = lambda p, x: nets.energy_apply(p, x, quadratic=QUADRATIC)  # noqa: E731
        return nets.energy_init(key, dim, (width,) * depth), energy, energy
    return jax_residual_init(key, dim, width, depth), jax_residual_apply, jax_residual_apply


def jax_compiled_step(kind: str, depth: int, gamma, x0: np.ndarray, cfg: dict, seed: int):
    """``(compiled step, params, opt_state, eval_energy, memory row)``: the jitted training step
    (``ssm_vr``, Adam), compiled for ``x0``'s shape, and its ``memory_analysis()``:
    temporaries plus outputs, less aliased buffers (``benchmarks/objectives.py``
    ``jax_step_bytes``)."""
    import jax
    import jax.numpy as jnp
    import optax

    from ppl_score.jax import score_matching_loss

    params, energy, eval_energy = jax_model(kind, depth, gamma, x0.shape[1], cfg, seed)
    opt = optax.adam(LR)
    state = opt.init(params)

    def train_step(params, state, x, key):
        loss, grads = jax.value_and_grad(lambda p: score_matching_loss(lambda y: energy(p, y), x, OBJECTIVE, key=key))(
            params
        )
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    t0 = time.perf_counter()
    compiled = jax.jit(train_step).lower(params, state, jnp.asarray(x0), jax.random.PRNGKey(seed + 5)).compile()
    m = compiled.memory_analysis()
    row = {
        "peak_mb": (m.temp_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes) / MB,
        "params": int(sum(np.size(a) for a in jax.tree_util.tree_leaves(params))),
        "compile_s": time.perf_counter() - t0,
    }
    return compiled, params, state, eval_energy, row


def jax_memory_row(kind: str, depth: int, gamma, train, cfg: dict, seed: int) -> dict:
    """An untrained model's compiled step memory (no training needed)."""
    return jax_compiled_step(kind, depth, gamma, first_batch(train), cfg, seed)[-1]


def jax_deq_iterations(params, test: np.ndarray, gamma, cfg: dict) -> float:
    """Mean forward solver iterations (training configuration) over the held-out batches."""
    import jax
    import jax.numpy as jnp

    from ppl_score.jax import deq

    config = jax_deq_config(gamma, cfg)
    f = jax.jit(lambda p, x: deq.deq_energy_apply(p, x, config, QUADRATIC, return_info=True)[1].iterations)
    return float(np.mean([int(f(params, jnp.asarray(xb))) for xb in batched(test, cfg["eval_batch"])]))


def batched(a: np.ndarray, size: int):
    return [a[i : i + size] for i in range(0, len(a), size)]


def jax_row(kind: str, depth: int, gamma, train, test, cfg: dict, seed: int) -> dict:
    """Train in JAX on the torch rows' batches (projections from JAX keys), then the held-out
    exact SM and the compiled step's memory."""
    import jax
    import jax.numpy as jnp

    from ppl_score.jax import score_matching_loss

    compiled, params, state, eval_energy, row = jax_compiled_step(kind, depth, gamma, first_batch(train), cfg, seed)
    key = jax.random.PRNGKey(seed + 5)
    losses, times = [], []
    for xb in train_batches(train, cfg["steps"], seed, cfg["sigma"]):
        key, sub = jax.random.split(key)
        xb = jnp.asarray(xb)
        t0 = time.perf_counter()
        params, state, loss = compiled(params, state, xb, sub)
        losses.append(float(loss))
        times.append(time.perf_counter() - t0)
        if not math.isfinite(losses[-1]):
            break
    tail = losses[-max(1, len(losses) // 10) :]
    esm = jax.jit(lambda p, x: score_matching_loss(lambda y: eval_energy(p, y), x, "esm", reduction="sum"))
    t0 = time.perf_counter()
    if math.isfinite(losses[-1]):
        sm = sum(float(esm(params, jnp.asarray(xb))) for xb in batched(test, cfg["eval_batch"])) / len(test)
    else:
        sm = float("nan")
    eval_s = time.perf_counter() - t0
    return {
        **row,
        "test_sm": sm,
        "train_ssm_vr": float(np.mean(tail)),
        "steps_done": len(losses),
        "step_ms": 1e3 * float(np.median(times[1:] if len(times) > 1 else times)),
        "iters": jax_deq_iterations(params, test, gamma, cfg) if kind == "deq" else None,
        "eval_s": eval_s,
        "loss_trace": smoothed(losses),
    }


# --------------------------------------------------------------------------------- output


def label(r: dict) -> str:
    if r["model"] == "deq":
        return f"DEQ (gamma {r['gamma']:g})"
    return {"residual": "residual", "mlp": "plain MLP (contrast)"}[r["model"]]


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    if not os.environ.get("MPLBACKEND"):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_m, ax_s, ax_t) = plt.subplots(1, 3, figsize=(15.0, 4.2))
    colors = {"torch": "C0", "jax": "C1"}
    for backend in ("torch", "jax"):
        rs = [r for r in rows if r["backend"] == backend]
        for kind, marker in (("residual", "o-"), ("mlp", "s--")):
            pts = sorted((r["depth"], r["peak_mb"]) for r in rs if r["model"] == kind and r["peak_mb"] is not None)
            if pts:
                ax_m.plot(*zip(*pts), marker, color=colors[backend], label=f"{backend}: {label({'model': kind})}")
        for i, r in enumerate(x for x in rs if x["model"] == "deq"):
            ax_m.axhline(r["peak_mb"], color=colors[backend], ls=":" if i else "-.", label=f"{backend}: {label(r)}")
        for kind, marker in (("residual", "o-"), ("mlp", "s--")):
            pts = sorted((r["depth"], r["test_sm"]) for r in rs if r["model"] == kind and r.get("test_sm") is not None)
            if pts:
                ax_s.plot(*zip(*pts), marker, color=colors[backend], label=f"{backend}: {label({'model': kind})}")
        for i, r in enumerate(x for x in rs if x["model"] == "deq" and x.get("test_sm") is not None):
            ax_s.axhline(
                r["test_sm"],
                color=colors[backend],
                ls=":" if i else "-.",
                label=f"{backend}: {label(r)}, {r['iters']:.1f} iterations",
            )
    trained = sorted((r for r in rows if r["backend"] == "torch" and r.get("loss_trace")), key=order)
    depths = sorted({r["depth"] for r in trained if r["model"] == "residual"})
    for r in trained:
        trace = np.asarray(r["loss_trace"], dtype=float)
        steps = (np.arange(len(trace)) + 1) * r["steps_done"] / max(len(trace), 1)
        if r["model"] == "residual":
            c = plt.cm.viridis(depths.index(r["depth"]) / max(len(depths) - 1, 1) * 0.85)
            ax_t.plot(steps, trace, color=c, lw=1, label=f"residual, depth {r['depth']}")
        else:
            c, ls = ("C3", "--") if r["model"] == "mlp" else ("C2", "-.")
            extra = f", depth {r['depth']}" if r["model"] == "mlp" else ""
            ax_t.plot(steps, trace, color=c, ls=ls, lw=1.2, label=label(r) + extra)
    if trained:
        lo, hi = np.nanpercentile(np.concatenate([r["loss_trace"] for r in trained]), [0, 99])
        ax_t.set_ylim(lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))
    ax_t.set_xlabel("training step")
    ax_t.set_ylabel(f"training {OBJECTIVE} (means over 20 steps)")
    ax_t.set_title("torch, training loss", fontsize=9)
    for ax in (ax_m, ax_s, ax_t):
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    for ax in (ax_m, ax_s):
        ax.set_xlabel("residual blocks (depth)")
    ax_s.set_xscale("log", base=2)
    ax_m.set_ylim(bottom=0)
    ax_m.set_ylabel("peak memory of one training step (MB)")
    ax_m.set_title(f"{OBJECTIVE} step, batch {BATCH}", fontsize=9)
    ax_s.set_ylabel("held-out exact SM per image (lower is better)")
    ax_s.set_title(f"after {rows[0].get('steps_done', 0)} steps", fontsize=9)
    fig.suptitle("Fashion-MNIST (784-D): DEQ energy vs residual energies", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def order(r: dict):
    """Table order: backend, then residual by depth, plain MLPs, DEQs."""
    return (r["backend"] != "torch", ("residual", "mlp", "deq").index(r["model"]), r["depth"], r["gamma"] or 0)


def table(rows: list[dict]) -> str:
    headers = ["backend", "model", "depth", "params", "peak MB", "held-out SM", "train ssm_vr", "step ms", "iters"]
    body = [
        [
            r["backend"],
            label(r),
            str(r["depth"]) if r["model"] != "deq" else "-",
            f"{r['params']:,}",
            C.fmt(r["peak_mb"], ".2f"),
            C.fmt(r.get("test_sm"), ".1f"),
            C.fmt(r.get("train_ssm_vr"), ".1f"),
            C.fmt(r.get("step_ms"), ".0f"),
            C.fmt(r.get("iters"), ".1f"),
        ]
        for r in sorted(rows, key=order)
    ]
    return C.markdown_table(headers, body)


# --------------------------------------------------------------------------------- main


def main(argv=None) -> dict:
    C.single_thread()  # before torch and JAX are imported
    p = C.make_parser(__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--depths", nargs="+", type=int, default=None, help="residual depths trained")
    p.add_argument("--memory-depths", nargs="*", type=int, default=None, help="residual depths, memory only")
    p.add_argument("--mlp-depths", nargs="*", type=int, default=None, help="plain MLP depths trained (contrast)")
    p.add_argument("--gammas", nargs="+", type=float, default=None, help="DEQ contraction bounds (a row each)")
    p.add_argument("--n-test", type=int, default=None, help="held-out images for the exact SM")
    p.add_argument("--n-train", type=int, default=None, help="training images (default: all)")
    p.add_argument("--sigma", type=float, default=None, help=f"data smoothing noise (default {SIGMA:g}; 0: none)")
    p.add_argument(
        "--jax",
        choices=("off", "memory", "train"),
        default=None,
        help="JAX rows: none, compiled-step memory only, or trained as in torch (default: train; --smoke: off)",
    )
    args = p.parse_args(argv)
    cfg = dict(SMOKE if args.smoke else FULL)
    names = ("width", "steps", "depths", "memory_depths", "mlp_depths", "gammas", "n_test", "n_train", "sigma")
    for name in names:
        if getattr(args, name) is not None:
            cfg[name] = getattr(args, name)
    if args.jax is not None:
        cfg["jax"] = args.jax
    if not all(0 < g < 1 for g in cfg["gammas"]):
        p.error(f"--gammas must lie in (0, 1), got {cfg['gammas']}")

    t_start = time.perf_counter()
    if not cfg["sigma"] >= 0:
        p.error(f"--sigma must be >= 0, got {cfg['sigma']}")
    train, test = C.load_images(cfg["n_train"], cfg["n_test"], seed=args.seed, path=args.data)
    test = held_out(test, args.seed, cfg["sigma"])
    print(f"data: train {train.shape}, held-out {test.shape} ({time.perf_counter() - t_start:.1f} s)", flush=True)

    rows = []

    def emit(row):
        rows.append(row)
        print(
            f"{row['backend']:5s} {label(row):18s} depth={row['depth']!s:>3s} params={row['params']:>9,} "
            f"mem={C.fmt(row['peak_mb'], '.2f')} MB SM={C.fmt(row.get('test_sm'), '.1f')} "
            f"train={C.fmt(row.get('train_ssm_vr'), '.1f')} step={C.fmt(row.get('step_ms'), '.0f')} ms "
            f"iters={C.fmt(row.get('iters'), '.1f')} ({time.perf_counter() - t_start:.0f} s)",
            flush=True,
        )

    models = [("residual", d, None) for d in cfg["depths"]]
    models += [("mlp", d, None) for d in cfg["mlp_depths"]]
    models += [("deq", 0, g) for g in cfg["gammas"]]
    memory_only = [("residual", d, None) for d in cfg["memory_depths"]]
    runs = [("torch", torch_row, torch_memory_row)]
    if cfg["jax"] != "off":
        runs.append(("jax", jax_row, jax_memory_row))
    for backend, row_fn, memory_fn in runs:
        trained = models if backend == "torch" or cfg["jax"] == "train" else []
        for kind, depth, gamma in trained:
            out = row_fn(kind, depth, gamma, train, test, cfg, args.seed)
            emit({"backend": backend, "model": kind, "depth": depth, "gamma": gamma, "trained": True, **out})
        for kind, depth, gamma in memory_only + [m for m in models if m not in trained]:
            out = memory_fn(kind, depth, gamma, train, cfg, args.seed)
            emit({"backend": backend, "model": kind, "depth": depth, "gamma": gamma, "trained": False, **out})
    wall = time.perf_counter() - t_start

    print()
    print(table(rows))
    print(f"\nwall {wall:.0f} s")
    fig_path = Path(args.figures) / "fmnist_deq.png"
    plot(rows, fig_path)
    print(f"figure: {fig_path}")
    meta = {
        **C.environment_meta(),
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()},
        "smoke": args.smoke,
        "seed": args.seed,
        "objective": OBJECTIVE,
        "batch": BATCH,
        "lr": LR,
        "quadratic": QUADRATIC,
        "branch_scale": "1/depth",
        "eval_tol": EVAL_TOL,
        "n_train": len(train),
        "n_test": len(test),
        "wall_s": wall,
        "memory_method": {
            "torch": "profiler allocation events: peak allocator bytes of a training step over its start",
            "jax": "compiled memory_analysis(): temp + output - alias",
        },
    }
    C.write_json_object(args.json, {"rows": rows, "meta": meta})
    return {"rows": rows, "meta": meta}


if __name__ == "__main__":
    main()
