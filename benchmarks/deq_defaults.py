"""The DEQ solver defaults: cost of a training step against an MLP step, and what a looser
solve costs in quality, over solver in {anderson, iteration}, tol in {1e-6, 1e-4, 1e-3} and
gamma in {0.5, 0.9} (issue 11, item 4; the evidence for ``ppl_score.common.deq.DEFAULTS``).

Setting: ``benchmarks/deq.py``'s 16-D Gaussian mixture (its true score is known), ``ssm_vr``
(the objective that takes the most solves: the score, its Hessian-vector product and the
parameter gradients of both are implicit solves), batch 128, Adam at 1e-2, float32, the DEQ
energy of width ``--width`` with ``implicit`` backward, ``max_iter=100``,
``on_nonconvergence="ignore"``. Every DEQ starts from the same initial weights and sees the
same batches and projections, so the rows differ by their configuration only (``gamma``
changes the model too: it bounds how much of itself the layer feeds back).

Timing: every model (the 12 DEQs and explicit MLP energies of depth 2 and 5, the same width)
trains in the same process, one step each per round in a seeded random order per round
(round-robin, so all see the same load); ``step_ms`` is the median over the rounds, and
``x_mlp2`` the median over rounds of the per-round ratio to the depth-2 MLP's step (the
"MLP step" of the issue). JAX: the jitted step, compiled before timing.

Quality, per DEQ:
* ``iters``: mean forward solver iterations on the held-out batches with its own
  configuration, ``converged``: the fraction of those solves that reached ``tol``;
* ``test_sm`` / ``fisher``: held-out exact SM loss and Fisher divergence to the true score
  after ``--steps`` steps, judged with tight implicit solves whatever the training used
  (``deq.eval_config``); ``d_sm``: its difference to the tightest configuration of the same
  solver and gamma (``tol=1e-6``), which started from the same weights;
* ``grad_err``: relative error ``||g - g*|| / ||g*||`` of the ``ssm_vr`` parameter
  gradient on one training batch at the trained weights, in float64, ``g`` with the row's
  solver and ``tol``, ``g*`` with Anderson at ``tol=1e-12``: the error the solver alone
  puts into each step.

    python benchmarks/deq_defaults.py --quick
    # the committed runs (one process per backend, run twice: run1, run2)
    XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" \
      python benchmarks/deq_defaults.py --backends torch --json benchmarks/results/deq_defaults_torch_run1.json
    XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" \
      python benchmarks/deq_defaults.py --backends jax --json benchmarks/results/deq_defaults_jax_run1.json

Timings on a shared, loaded CPU move by 10-30%; ratios taken in one process move less.
Run it on a checkout that is not being edited: a backend imported late (JAX after torch)
reads the package as it is then.
"""

from __future__ import annotations

import os
import random
import sys
import time

import numpy as np

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
sys.path.append(os.path.dirname(_HERE))  # a checkout without `pip install -e .`

import _common as C  # noqa: E402
import deq as B  # noqa: E402  (benchmarks/deq.py: the task, batches, eval_config)

SOLVERS = ("anderson", "iteration")
TOLS = (1e-6, 1e-4, 1e-3)
GAMMAS = (0.5, 0.9)
MAX_ITER = 100
TIGHT = dict(solver="anderson", tol=1e-12, max_iter=1000, memory=5, on_nonconvergence="ignore")
OBJECTIVE = "ssm_vr"
TASK = "mixture16"
MLP_DEPTHS = (2, 5)
BACKENDS = ("torch", "jax")

FULL = dict(width=128, steps=200, n_eval=512)
QUICK = dict(width=32, steps=40, n_eval=256)


def configs():
    return [(s, t, g) for s in SOLVERS for g in GAMMAS for t in TOLS]


def name_of(cfg) -> str:
    if cfg[0] == "mlp":
        return f"mlp{cfg[1]}"
    s, t, g = cfg
    return f"{s}/tol={t:g}/gamma={g:g}"


# -------------------------------------------------------------------------------- torch


def torch_models(dim, width, seed):
    import torch

    from ppl_score.torch import deq, nets

    models = {}
    for d in MLP_DEPTHS:
        torch.manual_seed(seed)
        models[("mlp", d)] = nets.MLPEnergy(dim, (width,) * d, quadratic=B.QUADRATIC)
    for s, t, g in configs():
        torch.manual_seed(seed)  # the same initial weights for every DEQ
        models[(s, t, g)] = deq.DEQEnergy(
            dim, width, quadratic=B.QUADRATIC, solver=s, tol=t, gamma=g, max_iter=MAX_ITER, on_nonconvergence="ignore"
        )
    return models


def torch_grad_err(module, xb, seed):
    """float64 ssm_vr parameter gradient with the module's solver against a tight solve."""
    import copy

    import torch

    from ppl_score.torch import score_matching_loss
    from ppl_score.torch.deq import solver_config

    m = copy.deepcopy(module).double()
    x = torch.as_tensor(xb, dtype=torch.float64)

    def grad(cfg):
        m.deq.config = cfg
        gen = torch.Generator().manual_seed(seed + 11)
        loss = score_matching_loss(m, x, OBJECTIVE, generator=gen)
        ps = list(m.parameters())
        gs = torch.autograd.grad(loss, ps, allow_unused=True)  # the readout bias has none
        return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(ps, gs)])

    own = m.deq.config
    g = grad(own)
    g_star = grad(own._replace(solver=solver_config(**TIGHT)))
    return float((g - g_star).norm() / g_star.norm())


def torch_run(cfg_run, data, seed):
    import torch

    train, test, score_true = data
    models = torch_models(train.shape[1], cfg_run["width"], seed)
    steps = {k: B.torch_step_fn(m, OBJECTIVE, seed, B.LR) for k, m in models.items()}
    times = {k: [] for k in models}
    rng = random.Random(seed)
    order = list(models)
    for xb in B.batches(train, cfg_run["steps"], seed):
        xb = torch.as_tensor(xb)
        rng.shuffle(order)
        for k in order:
            t0 = time.perf_counter()
            steps[k](xb)
            times[k].append(time.perf_counter() - t0)
    rows = {}
    xg = next(B.batches(train, 1, seed + 99))
    for k, m in models.items():
        row = {}
        if k[0] != "mlp":
            its, conv = [], []
            with torch.no_grad():
                for xb in torch.as_tensor(test[: cfg_run["n_eval"]]).split(B.BATCH):
                    m(xb)
                    its.append(m.last_info.iterations)
                    conv.append(bool(m.last_info.converged))
            row["iters"], row["converged"] = float(np.mean(its)), float(np.mean(conv))
            row["grad_err"] = torch_grad_err(m, xg, seed)
            m.deq.config = B.eval_config(m.deq.config)
        row["test_sm"], row["fisher"] = B.torch_evaluate(m, test, score_true, cfg_run["n_eval"])
        rows[k] = row
    return times, rows


# ---------------------------------------------------------------------------------- JAX


def jax_run(cfg_run, data, seed):
    import jax
    import jax.numpy as jnp
    import optax

    from ppl_score.jax import deq, nets, score_matching_loss

    train, test, score_true = data
    dim, width = train.shape[1], cfg_run["width"]
    key = jax.random.PRNGKey(seed)
    models = {}
    for d in MLP_DEPTHS:
        models[("mlp", d)] = (nets.energy_init(key, dim, (width,) * d), None)
    for s, t, g in configs():
        config = deq.deq_config(solver=s, tol=t, gamma=g, max_iter=MAX_ITER, on_nonconvergence="ignore")
        models[(s, t, g)] = (deq.deq_energy_init(key, dim, width), config)

    def energy_fn(config):
        if config is None:
            return lambda p, x: nets.energy_apply(p, x, quadratic=B.QUADRATIC)
        return lambda p, x: deq.deq_energy_apply(p, x, config, quadratic=B.QUADRATIC)

    opt = optax.adam(B.LR)
    x0 = jnp.asarray(train[: B.BATCH])
    state, compiled = {}, {}
    for k, (params, config) in models.items():
        energy = energy_fn(config)

        def train_step(params, ostate, x, key, energy=energy):
            loss, grads = jax.value_and_grad(
                lambda p: score_matching_loss(lambda y: energy(p, y), x, OBJECTIVE, key=key)
            )(params)
            updates, ostate = opt.update(grads, ostate, params)
            return optax.apply_updates(params, updates), ostate, loss

        ostate = opt.init(params)
        compiled[k] = jax.jit(train_step).lower(params, ostate, x0, key).compile()
        state[k] = [params, ostate]
    times = {k: [] for k in models}
    rng = random.Random(seed)
    order = list(models)
    tkey = jax.random.PRNGKey(seed + 5)
    for xb in B.batches(train, cfg_run["steps"], seed):
        tkey, sub = jax.random.split(tkey)
        xb = jnp.asarray(xb)
        rng.shuffle(order)
        for k in order:
            t0 = time.perf_counter()
            p, o, loss = compiled[k](*state[k], xb, sub)
            jax.block_until_ready(loss)
            times[k].append(time.perf_counter() - t0)
            state[k] = [p, o]

    rows = {}
    x = test[: cfg_run["n_eval"]]
    for k, (_, config) in models.items():
        params = state[k][0]
        eval_energy = energy_fn(None if config is None else B.eval_config(config))

        @jax.jit
        def evaluate(p, xb, eval_energy=eval_energy):
            sm = score_matching_loss(lambda y: eval_energy(p, y), xb, "esm", reduction="sum")
            return sm, jax.grad(lambda y: eval_energy(p, y).sum())(xb)

        sm, fisher, its, conv, n = 0.0, 0.0, [], [], 0
        for i in range(0, len(x) - B.BATCH + 1, B.BATCH):
            xb = x[i : i + B.BATCH]
            total, s = evaluate(params, jnp.asarray(xb))
            sm += float(total)
            diff = np.asarray(s, np.float64) - score_true(xb.astype(np.float64))
            fisher += 0.5 * float((diff * diff).sum())
            n += len(xb)
            if config is not None:
                _, info = deq.deq_energy_apply(params, jnp.asarray(xb), config, quadratic=B.QUADRATIC, return_info=True)
                its.append(int(info.iterations))
                conv.append(bool(info.converged))
        row = {"test_sm": sm / n, "fisher": fisher / n}
        if config is not None:
            row["iters"], row["converged"] = float(np.mean(its)), float(np.mean(conv))
        rows[k] = row
    # float64 gradient agreement last: it switches x64 on for the rest of the process
    jax.config.update("jax_enable_x64", True)
    xg = jnp.asarray(next(B.batches(train, 1, seed + 99)), jnp.float64)
    gkey = jax.random.PRNGKey(seed + 11)
    for k, (_, config) in models.items():
        if config is None:
            continue
        p64 = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), state[k][0])

        def grad(cfg):
            e = energy_fn(cfg)
            g = jax.grad(lambda p: score_matching_loss(lambda y: e(p, y), xg, OBJECTIVE, key=gkey))(p64)
            return jnp.concatenate([a.reshape(-1) for a in jax.tree_util.tree_leaves(g)])

        g, g_star = grad(config), grad(config._replace(solver=deq.solver_config(**TIGHT)))
        rows[k]["grad_err"] = float(jnp.linalg.norm(g - g_star) / jnp.linalg.norm(g_star))
    jax.config.update("jax_enable_x64", False)
    return times, rows


# --------------------------------------------------------------------------------- main


def summarize(backend, times, rows, cfg_run):
    ref = np.asarray(times[("mlp", 2)][1:])
    out = []
    for k in times:
        t = np.asarray(times[k][1:])
        row = {
            "backend": backend,
            "model": "mlp" if k[0] == "mlp" else "deq",
            "name": name_of(k),
            "solver": None if k[0] == "mlp" else k[0],
            "tol": None if k[0] == "mlp" else k[1],
            "gamma": None if k[0] == "mlp" else k[2],
            "depth": k[1] if k[0] == "mlp" else None,
            "width": cfg_run["width"],
            "steps": cfg_run["steps"],
            "step_ms": 1e3 * float(np.median(t)),
            "x_mlp2": float(np.median(t / ref)),
            "iters": None,
            "converged": None,
            "grad_err": None,
            **rows[k],
        }
        out.append(row)
    tightest = {(r["solver"], r["gamma"]): r["test_sm"] for r in out if r["model"] == "deq" and r["tol"] == min(TOLS)}
    for r in out:
        r["d_sm"] = r["test_sm"] - tightest[(r["solver"], r["gamma"])] if r["model"] == "deq" else None
    return out


def main(argv=None) -> None:
    p = C.make_parser(__doc__.splitlines()[0])
    p.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    args = p.parse_args(argv)
    cfg_run = dict(QUICK if args.quick else FULL)
    for name in ("width", "steps"):
        if getattr(args, name) is not None:
            cfg_run[name] = getattr(args, name)
    data = B.load_task(TASK, args.seed)
    rows = []
    for backend in args.backends:
        t0 = time.perf_counter()
        if backend == "torch":
            import torch

            torch.set_num_threads(1)
            times, res = torch_run(cfg_run, data, args.seed)
        else:
            times, res = jax_run(cfg_run, data, args.seed)
        rows += summarize(backend, times, res, cfg_run)
        print(f"{backend}: {time.perf_counter() - t0:.0f} s", flush=True)
    headers = ["backend", "model", "step ms", "x MLP-2", "iters", "conv", "grad err", "test SM", "d SM", "Fisher"]
    table = [
        [
            r["backend"],
            r["name"],
            C.fmt(r["step_ms"], ".1f"),
            C.fmt(r["x_mlp2"], ".1f"),
            C.fmt(r["iters"], ".1f"),
            C.fmt(r["converged"], ".2f"),
            C.fmt(r["grad_err"], ".1e"),
            C.fmt(r["test_sm"], ".3f"),
            C.fmt(r["d_sm"], "+.3f"),
            C.fmt(r["fisher"], ".3f"),
        ]
        for r in rows
    ]
    print()
    print(C.markdown_table(headers, table))
    meta = {
        **C.environment_meta(),
        "task": TASK,
        "objective": OBJECTIVE,
        "config": cfg_run,
        "batch": B.BATCH,
        "lr": B.LR,
        "quadratic": B.QUADRATIC,
        "max_iter": MAX_ITER,
        "tight": TIGHT,
        "eval_solver": B.EVAL_SOLVER,
        "seed": args.seed,
        "threads": "torch 1 thread; XLA as set by XLA_FLAGS",
    }
    C.write_json(args.json, rows, meta)


if __name__ == "__main__":
    main()
