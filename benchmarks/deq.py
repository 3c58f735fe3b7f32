"""Memory, speed and fit of DEQ energies against explicit MLP energies of growing depth.

Score models ``log p(x) = f(x) - quadratic/2 ||x||^2`` trained by score matching (``ssm_vr``
and ``fd_ssm``) for the same number of Adam steps (lr 1e-3, batch 128, float32) on

* ``mixture16``: a 16-D Gaussian mixture (4 components, seeded) whose score is known, so the
  held-out Fisher divergence ``1/2 E||s_model - s_true||^2`` is reported too;
* ``digits``: scikit-learn's bundled 8x8 digits (64-D, dequantized, pixel values in [0, 1]).

Models: explicit MLP energies (``nets.MLPEnergy`` / ``nets.energy_init``) with ``depth`` hidden
layers of ``width`` units, depth in {2, 5, 10, 20, 40}, and the DEQ energy
(``deq.DEQEnergy`` / ``deq.deq_energy_init``, one weight-tied layer of the same width,
``gamma=0.9``, ``tol=1e-4``) with ``implicit`` and ``phantom`` (K=2) backward and plain
iteration or Anderson acceleration (history 5: it keeps ``2 * 5`` copies of the batch's
hidden state per solve, which is most of a DEQ step's memory). A DEQ row's ``depth`` is the
mean number of forward solver iterations on the held-out batches.

Measured per row:
* ``step_ms``: median wall time of one training step (loss and parameter gradients and the
  Adam update) over the training run (JAX: the jitted step, compiled before timing).
* ``peak_mem_mb``: torch, in a fresh subprocess per row: ``ru_maxrss`` after two steps on
  the full batch minus ``ru_maxrss`` after one warm-up step on a 2-example batch (so lazy
  one-time allocations, LAPACK and autograd threads, are not charged; CPU tensors are
  invisible to ``tracemalloc``). JAX: the compiled step's ``memory_analysis()``, temporaries
  plus outputs less aliased buffers. The two methods differ: compare rows within a backend.
* ``test_sm_loss``: exact score matching (``esm``: Hessian trace plus half the squared score
  norm) on held-out data, mean; ``fisher``: the Fisher divergence where the score is known.

Targets (per backend, task, objective): DEQ peak memory <= 1.5x the depth-2 explicit net's
and <= 1/4 of the depth-40 net's; DEQ held-out SM loss no worse than the depth-5 net's.

    python benchmarks/deq.py --quick --json out/bench/deq.json
    python benchmarks/deq.py --json benchmarks/results/deq.json          # the full table

Timings taken on a shared, loaded CPU are not reliable; memory and losses are.
"""

from __future__ import annotations

import math
import os
import sys
import time

import numpy as np

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
sys.path.append(os.path.dirname(_HERE))  # a checkout without `pip install -e .`

import _common as C  # noqa: E402

TASKS = ("mixture16", "digits")
OBJECTIVES = ("ssm_vr", "fd_ssm")
BACKENDS = ("torch", "jax")
DEPTHS = (2, 5, 10, 20, 40)
DEQ_BACKWARDS = ("implicit", "phantom")
DEQ_SOLVERS = ("iteration", "anderson")
BATCH = 128
LR = 1e-3
QUADRATIC = 0.5
DEQ_OPTIONS = dict(gamma=0.9, tol=1e-4, max_iter=50, phantom_steps=2, on_nonconvergence="ignore")

FULL = dict(width=128, steps=1000, n_eval=1000, depths=DEPTHS, tasks=TASKS, backwards=DEQ_BACKWARDS, solvers=DEQ_SOLVERS)
QUICK = dict(width=32, steps=30, n_eval=128, depths=(2, 5, 40), tasks=("mixture16",), backwards=("implicit",),
             solvers=DEQ_SOLVERS)


# --------------------------------------------------------------------------------- data


def mixture16(seed: int = 0):
    """A seeded 16-D mixture of 4 Gaussians with random SPD covariances."""
    from ppl_score import datasets

    rng = np.random.default_rng([seed, 16])
    k, d = 4, 16
    means = 1.5 * rng.normal(size=(k, d))
    a = rng.normal(size=(k, d, d)) / math.sqrt(d)
    covs = 0.3 * np.einsum("kij,klj->kil", a, a) + 0.2 * np.eye(d)
    return datasets.make_mixture(np.full(k, 1.0 / k), means, covs)


def load_task(task: str, seed: int):
    """``(train, test, true_score or None)``, float32 arrays ``[N, D]``."""
    from ppl_score import datasets

    if task == "mixture16":
        mix = mixture16(seed)
        rng = np.random.default_rng([seed, 17])
        train = datasets.mixture_sample(rng, 20_000, mix)
        test = datasets.mixture_sample(rng, 5_000, mix)
        return train.astype(np.float32), test.astype(np.float32), lambda x: datasets.mixture_score(x, mix)
    if task == "digits":
        ds = datasets.load_digits(scaling="unit", seed=seed)
        return ds.train.reshape(len(ds.train), -1).astype(np.float32), ds.test.reshape(len(ds.test), -1).astype(np.float32), None
    raise ValueError(f"unknown task {task!r}")


def batches(train: np.ndarray, steps: int, seed: int):
    rng = np.random.default_rng([seed, 3])
    for _ in range(steps):
        yield train[rng.integers(0, len(train), BATCH)]


# -------------------------------------------------------------------------------- torch


def torch_model(model: str, depth: int, backward: str, solver: str, dim: int, width: int, seed: int):
    import torch

    from ppl_score.torch import deq, nets

    torch.manual_seed(seed)
    if model == "deq":
        return deq.DEQEnergy(dim, width, quadratic=QUADRATIC, backward=backward, solver=solver, **DEQ_OPTIONS)
    return nets.MLPEnergy(dim, (width,) * depth, quadratic=QUADRATIC)


def torch_step_fn(module, objective: str, seed: int):
    import torch

    from ppl_score.torch import score_matching_loss

    opt = torch.optim.Adam(module.parameters(), lr=LR)
    gen = torch.Generator().manual_seed(seed + 5)

    def step(xb):
        opt.zero_grad(set_to_none=True)
        loss = score_matching_loss(module, xb, objective, generator=gen)
        loss.backward()
        opt.step()
        return loss.item()

    return step


def torch_evaluate(module, test: np.ndarray, score_true, n_eval: int):
    import torch

    from ppl_score.torch import score_matching_loss

    x = torch.as_tensor(test[:n_eval])
    sm, fisher, iters = [], [], []
    for xb in x.split(BATCH):
        sm.append(score_matching_loss(module, xb, "esm", reduction="sum").item())
        iters.append(getattr(module, "last_info", None) and module.last_info.iterations)
        if score_true is not None:
            xg = xb.clone().requires_grad_(True)
            (s,) = torch.autograd.grad(module(xg).sum(), xg)
            diff = s.double().numpy() - score_true(xb.double().numpy())
            fisher.append(0.5 * (diff * diff).sum())
    n = len(x)
    return sum(sm) / n, (sum(fisher) / n if fisher else None), (float(np.mean(iters)) if iters[0] else None)


def torch_memory_worker(task, objective, model, depth, backward, solver, width, seed) -> None:
    """Run in a fresh process: peak RSS of two full-batch steps over the RSS after a warm-up
    step on a 2-example batch."""
    import torch

    train, _, _ = load_task(task, seed)
    module = torch_model(model, depth, backward, solver, train.shape[1], width, seed)
    step = torch_step_fn(module, objective, seed)
    step(torch.as_tensor(train[:2]))
    baseline = C.maxrss_bytes()
    xb = torch.as_tensor(train[:BATCH])
    for _ in range(2):
        step(xb)
    C.emit_worker_result({"baseline_bytes": baseline, "peak_bytes": C.maxrss_bytes()})


def torch_row(task, objective, model, depth, backward, solver, cfg, data, seed):
    import torch

    train, test, score_true = data
    module = torch_model(model, depth, backward, solver, train.shape[1], cfg["width"], seed)
    step = torch_step_fn(module, objective, seed)
    times = []
    for xb in batches(train, cfg["steps"], seed):
        xb = torch.as_tensor(xb)
        t0 = time.perf_counter()
        step(xb)
        times.append(time.perf_counter() - t0)
    sm, fisher, iters = torch_evaluate(module, test, score_true, cfg["n_eval"])
    worker = C.run_worker(
        __file__,
        ["--worker-memory", task, objective, model, str(depth), backward, solver, str(cfg["width"]), "--seed", str(seed)],
    )
    return {
        "peak_mem_mb": (worker["peak_bytes"] - worker["baseline_bytes"]) / C.MB,
        "step_ms": 1e3 * float(np.median(times[1:] if len(times) > 1 else times)),
        "test_sm_loss": sm,
        "fisher": fisher,
        "solver_iters": iters,
    }


# ---------------------------------------------------------------------------------- JAX


def jax_model(model: str, depth: int, backward: str, solver: str, dim: int, width: int, seed: int):
    """``(params, energy(params, x))``."""
    import jax

    from ppl_score.jax import deq, nets

    key = jax.random.PRNGKey(seed)
    if model == "deq":
        config = deq.deq_config(backward=backward, solver=solver, **DEQ_OPTIONS)
        return deq.deq_energy_init(key, dim, width), lambda p, x: deq.deq_energy_apply(p, x, config, quadratic=QUADRATIC)
    return nets.energy_init(key, dim, (width,) * depth), lambda p, x: nets.energy_apply(p, x, quadratic=QUADRATIC)


def jax_row(task, objective, model, depth, backward, solver, cfg, data, seed):
    import jax
    import jax.numpy as jnp
    import optax

    from ppl_score.jax import deq, score_matching_loss

    train, test, score_true = data
    params, energy = jax_model(model, depth, backward, solver, train.shape[1], cfg["width"], seed)
    opt = optax.adam(LR)
    state = opt.init(params)

    def train_step(params, state, x, key):
        loss, grads = jax.value_and_grad(lambda p: score_matching_loss(lambda y: energy(p, y), x, objective, key=key))(params)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    x0 = jnp.asarray(train[:BATCH])
    key = jax.random.PRNGKey(seed + 5)
    compiled = jax.jit(train_step).lower(params, state, x0, key).compile()
    mem = compiled.memory_analysis()
    peak = (mem.temp_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes) / C.MB
    times = []
    for xb in batches(train, cfg["steps"], seed):
        key, sub = jax.random.split(key)
        xb = jnp.asarray(xb)
        t0 = time.perf_counter()
        params, state, loss = compiled(params, state, xb, sub)
        jax.block_until_ready(loss)
        times.append(time.perf_counter() - t0)

    @jax.jit
    def evaluate(p, x):
        sm = score_matching_loss(lambda y: energy(p, y), x, "esm", reduction="sum")
        s = jax.grad(lambda y: energy(p, y).sum())(x)
        return sm, s

    x = test[: cfg["n_eval"]]
    sm, fisher, iters = 0.0, 0.0, []
    for i in range(0, len(x), BATCH):
        xb = x[i : i + BATCH]
        if len(xb) < BATCH:  # one compiled shape
            break
        total, s = evaluate(params, jnp.asarray(xb))
        sm += float(total)
        if score_true is not None:
            diff = np.asarray(s, np.float64) - score_true(xb.astype(np.float64))
            fisher += 0.5 * float((diff * diff).sum())
        if model == "deq":
            config = deq.deq_config(backward=backward, solver=solver, **DEQ_OPTIONS)
            _, info = deq.deq_energy_apply(params, jnp.asarray(xb), config, quadratic=QUADRATIC, return_info=True)
            iters.append(int(info.iterations))
    n = (len(x) // BATCH) * BATCH
    return {
        "peak_mem_mb": peak,
        "step_ms": 1e3 * float(np.median(times[1:] if len(times) > 1 else times)),
        "test_sm_loss": sm / n,
        "fisher": fisher / n if score_true is not None else None,
        "solver_iters": float(np.mean(iters)) if iters else None,
    }


# --------------------------------------------------------------------------------- main


def check_targets(rows):
    """Per (backend, task, objective): the three targets of issue 5, as printable lines."""
    lines = []
    groups = sorted({(r["backend"], r["task"], r["objective"]) for r in rows})
    for g in groups:
        rs = [r for r in rows if (r["backend"], r["task"], r["objective"]) == g]
        explicit = {r["depth"]: r for r in rs if r["model"] == "explicit"}
        for d in (r for r in rs if r["model"] == "deq"):
            parts = []
            if 2 in explicit:
                ok = d["peak_mem_mb"] <= 1.5 * max(explicit[2]["peak_mem_mb"], 1e-9)
                parts.append(f"mem <= 1.5x depth-2: {'PASS' if ok else 'FAIL'}")
            if 40 in explicit:
                ok = d["peak_mem_mb"] <= 0.25 * explicit[40]["peak_mem_mb"]
                parts.append(f"mem <= 1/4 depth-40: {'PASS' if ok else 'FAIL'}")
            if 5 in explicit:
                ok = d["test_sm_loss"] <= explicit[5]["test_sm_loss"]
                parts.append(f"SM <= depth-5: {'PASS' if ok else 'FAIL'}")
            lines.append(f"{'/'.join(g)} deq[{d['backward']}, {d['solver']}]: " + "; ".join(parts))
    return lines


def main(argv=None) -> None:
    p = C.make_parser(__doc__.splitlines()[0])
    p.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    p.add_argument("--tasks", nargs="+", choices=TASKS, default=None)
    p.add_argument("--objectives", nargs="+", choices=OBJECTIVES, default=list(OBJECTIVES))
    p.add_argument("--depths", nargs="+", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--solvers", nargs="+", choices=DEQ_SOLVERS, default=None, help="DEQ forward/adjoint solvers")
    p.add_argument("--worker-memory", nargs=7, metavar=("TASK", "OBJ", "MODEL", "DEPTH", "BACKWARD", "SOLVER", "WIDTH"))
    args = p.parse_args(argv)
    if args.worker_memory:
        task, obj, model, depth, backward, solver, width = args.worker_memory
        torch_memory_worker(task, obj, model, int(depth), backward, solver, int(width), args.seed)
        return
    cfg = dict(QUICK if args.quick else FULL)
    for name in ("tasks", "depths", "width", "steps", "solvers"):
        if getattr(args, name) is not None:
            cfg[name] = getattr(args, name)
    if "torch" in args.backends:
        import torch

        torch.set_num_threads(1)  # tiny batched LAPACK calls (Anderson) stall on a shared CPU
    rows = []
    for task in cfg["tasks"]:
        data = load_task(task, args.seed)
        for backend in args.backends:
            run_row = torch_row if backend == "torch" else jax_row
            for objective in args.objectives:
                models = [("explicit", d, "autograd", "-") for d in cfg["depths"]]
                models += [("deq", 0, b, s) for b in cfg["backwards"] for s in cfg["solvers"]]
                for model, depth, backward, solver in models:
                    t0 = time.perf_counter()
                    r = run_row(task, objective, model, depth, backward, solver, cfg, data, args.seed)
                    row = {"backend": backend, "task": task, "objective": objective, "model": model,
                           "depth": r["solver_iters"] if model == "deq" else depth, "backward": backward,
                           "solver": solver, "width": cfg["width"], "steps": cfg["steps"],
                           **{k: v for k, v in r.items() if k != "solver_iters"}}
                    rows.append(row)
                    print(
                        f"{backend:5s} {task:9s} {objective:6s} {model:8s} depth={C.fmt(float(row['depth']), '.1f'):>5s} "
                        f"{backward:8s} {solver:9s} mem={C.fmt(row['peak_mem_mb'], '.2f')} MB step={C.fmt(row['step_ms'], '.1f')} ms "
                        f"SM={C.fmt(row['test_sm_loss'], '.3f')} fisher={C.fmt(row['fisher'], '.3f')} "
                        f"({time.perf_counter() - t0:.0f} s)",
                        flush=True,
                    )
    headers = ["backend", "task", "objective", "model", "depth", "backward", "solver", "peak MB", "step ms", "test SM",
               "Fisher"]
    table = [
        [r["backend"], r["task"], r["objective"], r["model"], C.fmt(r["depth"], ".1f" if r["model"] == "deq" else "d"),
         r["backward"], r["solver"], C.fmt(r["peak_mem_mb"], ".2f"), C.fmt(r["step_ms"], ".1f"), C.fmt(r["test_sm_loss"], ".3f"),
         C.fmt(r["fisher"], ".3f")]
        for r in rows
    ]
    print()
    print(C.markdown_table(headers, table))
    print()
    for line in check_targets(rows):
        print(line)
    meta = {**C.environment_meta(), "config": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()},
            "batch": BATCH, "lr": LR, "quadratic": QUADRATIC, "deq_options": DEQ_OPTIONS,
            "memory_method": {"torch": "ru_maxrss delta in a fresh subprocess (2 steps over a 2-example warm-up step)",
                              "jax": "compiled memory_analysis(): temp + output - alias"},
            "targets": check_targets(rows)}
    C.write_json(args.json, rows, meta)


if __name__ == "__main__":
    main()
