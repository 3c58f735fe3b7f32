"""Memory, speed and fit of DEQ energies against explicit MLP energies of growing depth.

Score models ``log p(x) = f(x) - quadratic/2 ||x||^2`` trained by score matching (``ssm_vr``
and ``fd_ssm``) for the same number of Adam steps (every model: the same learning rate, batch
128, float32) on

* ``mixture16``: a 16-D Gaussian mixture (4 components, seeded) whose score is known, so the
  held-out Fisher divergence ``1/2 E||s_model - s_true||^2`` is reported too;
* ``digits``: scikit-learn's bundled 8x8 digits (64-D, dequantized, pixel values in [0, 1]).

Models: explicit MLP energies (``nets.MLPEnergy`` / ``nets.energy_init``) with ``depth`` hidden
layers of ``width`` units, depth in {2, 5, 10, 20, 40}, and the DEQ energy
(``deq.DEQEnergy`` / ``deq.deq_energy_init``, one weight-tied layer of the same width,
``tol=1e-4``; a row per contraction bound ``gamma`` in {0.5, 0.9}, the DEQ's counterpart of
the depth sweep: a lower ``gamma`` converges in fewer iterations, a higher one lets the
layer feed more of itself back) with ``implicit`` and ``phantom`` (K=2) backward and plain
iteration or Anderson acceleration (history 5: it keeps ``2 * 5`` copies of the batch's
hidden state per solve). A DEQ row's ``depth`` is the mean number of forward solver
iterations on the held-out batches. Each row is trained once per seed of ``--seeds``
(initialization, batches, projections; the data are fixed by ``--seed``).

Measured per row:
* ``step_ms``: median wall time of one training step (loss and parameter gradients and the
  Adam update) over the training run (JAX: the jitted step, compiled before timing); the
  median over seeds.
* ``peak_mem_mb``: torch: the peak of the bytes held by torch's allocator during one
  full-batch training step, above the level at its start (the profiler's allocation events;
  the CPU counterpart of ``torch.cuda.max_memory_allocated``), so it counts the activations
  and graphs kept for the backward, the gradients and the temporaries. JAX: the compiled
  step's ``memory_analysis()``, temporaries plus outputs less aliased buffers. The two
  methods differ: compare rows within a backend.
* ``test_sm_loss``: exact score matching (``esm``: Hessian trace plus half the squared score
  norm) on held-out data, mean over seeds (with its standard error); ``fisher``: the Fisher
  divergence where the score is known. A DEQ is judged with exact derivatives from tight
  solves whatever it was trained with (``eval_config``).

Targets (per backend, task, objective): DEQ peak memory <= 1.5x the depth-2 explicit net's
and <= 1/4 of the depth-40 net's; DEQ held-out SM loss no worse than the depth-5 net's.

    python benchmarks/deq.py --quick --json out/bench/deq.json
    python benchmarks/deq.py --solvers iteration --json benchmarks/results/deq.json   # the README's table

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
LR = 1e-2
QUADRATIC = 0.5
GAMMAS = (0.5, 0.9)
DEQ_OPTIONS = dict(tol=1e-4, max_iter=50, phantom_steps=2, on_nonconvergence="ignore")
EVAL_SOLVER = dict(tol=1e-5, max_iter=500, on_nonconvergence="warn")  # see eval_config

FULL = dict(
    lr=LR,
    seeds=(0, 1, 2),
    gammas=GAMMAS,
    width=128,
    steps=500,
    n_eval=1000,
    depths=DEPTHS,
    tasks=TASKS,
    backwards=DEQ_BACKWARDS,
    solvers=DEQ_SOLVERS,
)
QUICK = dict(
    lr=LR,
    seeds=(0,),
    gammas=(0.9,),
    width=32,
    steps=30,
    n_eval=128,
    depths=(2, 5, 40),
    tasks=("mixture16",),
    backwards=("implicit",),
    solvers=DEQ_SOLVERS,
)


# --------------------------------------------------------------------------------- data


def mixture16(seed: int = 0):
    """A seeded 16-D mixture of 4 Gaussians with random SPD covariances."""
    from ppl_score.demo import datasets

    rng = np.random.default_rng([seed, 16])
    k, d = 4, 16
    means = 1.5 * rng.normal(size=(k, d))
    a = rng.normal(size=(k, d, d)) / math.sqrt(d)
    covs = 0.3 * np.einsum("kij,klj->kil", a, a) + 0.2 * np.eye(d)
    return datasets.make_mixture(np.full(k, 1.0 / k), means, covs)


def load_task(task: str, seed: int):
    """``(train, test, true_score or None)``, float32 arrays ``[N, D]``."""
    from ppl_score.demo import datasets

    if task == "mixture16":
        mix = mixture16(seed)
        rng = np.random.default_rng([seed, 17])
        train = datasets.mixture_sample(rng, 20_000, mix)
        test = datasets.mixture_sample(rng, 5_000, mix)
        return train.astype(np.float32), test.astype(np.float32), lambda x: datasets.mixture_score(x, mix)
    if task == "digits":
        ds = datasets.load_digits(scaling="unit", seed=seed)
        return (
            ds.train.reshape(len(ds.train), -1).astype(np.float32),
            ds.test.reshape(len(ds.test), -1).astype(np.float32),
            None,
        )
    raise ValueError(f"unknown task {task!r}")


def eval_config(config):
    """The configuration a DEQ is judged with, whatever it was trained with: exact (implicit)
    derivatives from tight solves, so ``phantom`` rows are scored on the model they fitted,
    not on their truncated derivatives."""
    return config._replace(backward="implicit", solver=config.solver._replace(**EVAL_SOLVER))


def batches(train: np.ndarray, steps: int, seed: int):
    rng = np.random.default_rng([seed, 3])
    for _ in range(steps):
        yield train[rng.integers(0, len(train), BATCH)]


# -------------------------------------------------------------------------------- torch


def torch_model(model: str, depth: int, backward: str, solver: str, gamma, dim: int, width: int, seed: int):
    import torch

    from ppl_score.torch import deq, nets

    torch.manual_seed(seed)
    if model == "deq":
        return deq.DEQEnergy(
            dim, width, quadratic=QUADRATIC, backward=backward, solver=solver, gamma=gamma, **DEQ_OPTIONS
        )
    return nets.MLPEnergy(dim, (width,) * depth, quadratic=QUADRATIC)


def torch_step_fn(module, objective: str, seed: int, lr: float):
    import torch

    from ppl_score.torch import score_matching_loss

    opt = torch.optim.Adam(module.parameters(), lr=lr)
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
    sm, fisher = [], []
    for xb in x.split(BATCH):
        sm.append(score_matching_loss(module, xb, "esm", reduction="sum").item())
        if score_true is not None:
            xg = xb.clone().requires_grad_(True)
            (s,) = torch.autograd.grad(module(xg).sum(), xg)
            diff = s.double().numpy() - score_true(xb.double().numpy())
            fisher.append(0.5 * (diff * diff).sum())
    n = len(x)
    return sum(sm) / n, (sum(fisher) / n if fisher else None)


def torch_peak_mb(task, objective, model, depth, backward, solver, gamma, width, lr, data, seed) -> float:
    """Peak allocator bytes of one full-batch training step of a fresh model, after a
    warm-up step (so Adam's state exists before, as in every later step)."""
    import torch

    train = data[0]
    module = torch_model(model, depth, backward, solver, gamma, train.shape[1], width, seed)
    step = torch_step_fn(module, objective, seed, lr)
    xb = torch.as_tensor(train[:BATCH])
    step(xb)
    return C.torch_peak_bytes(lambda: step(xb)) / C.MB


def torch_row(task, objective, model, depth, backward, solver, gamma, cfg, data, seed, measure_memory=True):
    import torch

    train, test, score_true = data
    module = torch_model(model, depth, backward, solver, gamma, train.shape[1], cfg["width"], seed)
    step = torch_step_fn(module, objective, seed, cfg["lr"])
    times = []
    for xb in batches(train, cfg["steps"], seed):
        xb = torch.as_tensor(xb)
        t0 = time.perf_counter()
        step(xb)
        times.append(time.perf_counter() - t0)
    iters = None
    if model == "deq":
        with torch.no_grad():
            iters = float(
                np.mean(
                    [
                        module(xb) is not None and module.last_info.iterations
                        for xb in torch.as_tensor(test[: cfg["n_eval"]]).split(BATCH)
                    ]
                )
            )
        module.deq.config = eval_config(module.deq.config)
    sm, fisher = torch_evaluate(module, test, score_true, cfg["n_eval"])
    return {
        "peak_mem_mb": torch_peak_mb(
            task, objective, model, depth, backward, solver, gamma, cfg["width"], cfg["lr"], data, seed
        )
        if measure_memory
        else None,
        "step_ms": 1e3 * float(np.median(times[1:] if len(times) > 1 else times)),
        "test_sm_loss": sm,
        "fisher": fisher,
        "solver_iters": iters,
    }


# ---------------------------------------------------------------------------------- JAX


def jax_model(model: str, depth: int, backward: str, solver: str, gamma, dim: int, width: int, seed: int):
    """``(params, energy(params, x), eval_energy(params, x))``; they differ for a DEQ only (see
    ``eval_config``)."""
    import jax

    from ppl_score.jax import deq, nets

    key = jax.random.PRNGKey(seed)
    if model == "deq":
        config = deq.deq_config(backward=backward, solver=solver, gamma=gamma, **DEQ_OPTIONS)
        energies = (
            lambda p, x, c=c: deq.deq_energy_apply(p, x, c, quadratic=QUADRATIC) for c in (config, eval_config(config))
        )
        return deq.deq_energy_init(key, dim, width), *energies
    energy = lambda p, x: nets.energy_apply(p, x, quadratic=QUADRATIC)  # noqa: E731
    return nets.energy_init(key, dim, (width,) * depth), energy, energy


def jax_row(task, objective, model, depth, backward, solver, gamma, cfg, data, seed, measure_memory=True):
    import jax
    import jax.numpy as jnp
    import optax

    from ppl_score.jax import deq, score_matching_loss

    train, test, score_true = data
    params, energy, eval_energy = jax_model(model, depth, backward, solver, gamma, train.shape[1], cfg["width"], seed)
    opt = optax.adam(cfg["lr"])
    state = opt.init(params)

    def train_step(params, state, x, key):
        loss, grads = jax.value_and_grad(lambda p: score_matching_loss(lambda y: energy(p, y), x, objective, key=key))(
            params
        )
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
        sm = score_matching_loss(lambda y: eval_energy(p, y), x, "esm", reduction="sum")
        s = jax.grad(lambda y: eval_energy(p, y).sum())(x)
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
            config = deq.deq_config(backward=backward, solver=solver, gamma=gamma, **DEQ_OPTIONS)
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


def seed_summary(name: str, values) -> dict:
    """``{name: mean, name_se: standard error, name + "_seeds": values}`` over training seeds
    (``None`` throughout where the metric does not exist)."""
    if any(v is None for v in values):
        return {name: None, f"{name}_se": None, f"{name}_seeds": None}
    v = np.asarray(values, dtype=float)
    se = float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else None
    return {name: float(v.mean()), f"{name}_se": se, f"{name}_seeds": v.tolist()}


def check_targets(rows):
    """Per (backend, task, objective): the three targets of issue 5, as printable lines. The
    SM comparison is on the mean over seeds; with several seeds the paired difference
    (same seeds: same batches and projections) and its standard error are printed too."""
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
                e5 = explicit[5]
                ok = d["test_sm_loss"] <= e5["test_sm_loss"]
                part = f"SM <= depth-5: {'PASS' if ok else 'FAIL'}"
                if d["test_sm_loss_seeds"] and len(d["test_sm_loss_seeds"]) > 1:
                    diff = np.subtract(d["test_sm_loss_seeds"], e5["test_sm_loss_seeds"])
                    se = diff.std(ddof=1) / math.sqrt(len(diff))
                    part += f" (DEQ - depth-5: {diff.mean():+.3f} +- {se:.3f} over {len(diff)} seeds)"
                parts.append(part)
            lines.append(
                f"{'/'.join(g)} deq[{d['backward']}, {d['solver']}, gamma={d['gamma']:g}]: " + "; ".join(parts)
            )
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
    p.add_argument("--gammas", nargs="+", type=float, default=None, help="DEQ contraction bounds (one row each)")
    p.add_argument("--lr", type=float, default=None, help=f"Adam learning rate, every model (default {LR:g})")
    p.add_argument(
        "--seeds",
        nargs="+",
        type=int,
        default=None,
        help="training seeds (initialization, batches, projections); the data use --seed",
    )
    args = p.parse_args(argv)
    if args.lr is not None and not args.lr > 0:
        p.error(f"--lr must be > 0, got {args.lr}")
    if args.gammas is not None and not all(0 < g < 1 for g in args.gammas):
        p.error(f"--gammas must lie in (0, 1) (a contraction), got {args.gammas}")
    cfg = dict(QUICK if args.quick else FULL)
    for name in ("tasks", "depths", "width", "steps", "solvers", "gammas", "lr", "seeds"):
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
                models = [("explicit", d, "autograd", "-", None) for d in cfg["depths"]]
                models += [("deq", 0, b, s, g) for g in cfg["gammas"] for b in cfg["backwards"] for s in cfg["solvers"]]
                for model, depth, backward, solver, gamma in models:
                    t0 = time.perf_counter()
                    runs = [
                        run_row(task, objective, model, depth, backward, solver, gamma, cfg, data, seed, i == 0)
                        for i, seed in enumerate(cfg["seeds"])
                    ]
                    row = {
                        "backend": backend,
                        "task": task,
                        "objective": objective,
                        "model": model,
                        "depth": float(np.mean([r["solver_iters"] for r in runs])) if model == "deq" else depth,
                        "backward": backward,
                        "solver": solver,
                        "gamma": gamma,
                        "width": cfg["width"],
                        "steps": cfg["steps"],
                        "lr": cfg["lr"],
                        "seeds": list(cfg["seeds"]),
                        "peak_mem_mb": runs[0]["peak_mem_mb"],
                        "step_ms": float(np.median([r["step_ms"] for r in runs])),
                        **seed_summary("test_sm_loss", [r["test_sm_loss"] for r in runs]),
                        **seed_summary("fisher", [r["fisher"] for r in runs]),
                    }
                    rows.append(row)
                    print(
                        f"{backend:5s} {task:9s} {objective:6s} {model:8s} depth={C.fmt(float(row['depth']), '.1f'):>5s} "
                        f"{backward:8s} {solver:9s} gamma={C.fmt(gamma, '.2f')} mem={C.fmt(row['peak_mem_mb'], '.2f')} MB step={C.fmt(row['step_ms'], '.1f')} ms "
                        f"SM={C.fmt(row['test_sm_loss'], '.3f')}+-{C.fmt(row['test_sm_loss_se'], '.3f')} "
                        f"fisher={C.fmt(row['fisher'], '.3f')} ({time.perf_counter() - t0:.0f} s)",
                        flush=True,
                    )
    headers = [
        "backend",
        "task",
        "objective",
        "model",
        "depth",
        "backward",
        "solver",
        "gamma",
        "peak MB",
        "step ms",
        "test SM (± se)",
        "Fisher (± se)",
    ]

    def pm(r, name):
        return C.fmt(r[name], ".3f") + ("" if r[f"{name}_se"] is None else f" ± {r[f'{name}_se']:.3f}")

    table = [
        [
            r["backend"],
            r["task"],
            r["objective"],
            r["model"],
            C.fmt(r["depth"], ".1f" if r["model"] == "deq" else "d"),
            r["backward"],
            r["solver"],
            C.fmt(r["gamma"], ".1f"),
            C.fmt(r["peak_mem_mb"], ".2f"),
            C.fmt(r["step_ms"], ".1f"),
            pm(r, "test_sm_loss"),
            pm(r, "fisher"),
        ]
        for r in rows
    ]
    print()
    print(C.markdown_table(headers, table))
    print()
    for line in check_targets(rows):
        print(line)
    meta = {
        **C.environment_meta(),
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()},
        "batch": BATCH,
        "quadratic": QUADRATIC,
        "deq_options": DEQ_OPTIONS,
        "eval_solver": EVAL_SOLVER,
        "memory_method": {
            "torch": "profiler allocation events: peak allocator bytes of a training step over its start",
            "jax": "compiled memory_analysis(): temp + output - alias",
        },
        "targets": check_targets(rows),
    }
    C.write_json(args.json, rows, meta)


if __name__ == "__main__":
    main()
