"""Overhead of the Pyro and NumPyro front ends: one SVI step with ``ScoreMatching`` against a
direct call of the backend's ``score_matching_loss`` plus an optimizer step, same energy.

The model is an energy-based model, ``x ~ Unnormalized(E_theta)`` observed in a plate of
``B = 128`` data points of dimension ``D = 16``, ``E_theta`` an MLP (softplus): torch
``MLPEnergy`` as a ``PyroModule``; JAX ``energy_apply`` with its weights in a ``numpyro.param``
site. The guide is empty, so the front end's work beyond the backend is tracing the
guide and the model, finding the matched site, the per-datum weights and the optimizer's
parameter handling. Variants, float32:

* ``pyro``: ``SVI.step`` (``pyro.optim.Adam``), validation on (Pyro's default: it adds the
  model/guide checks); ``pyro-noval``: the same under ``pyro.enable_validation(False)``;
* ``torch``: ``score_matching_loss(energy, x, reduction="sum")``, ``backward``,
  ``torch.optim.Adam.step`` on a copy of the same network;
* ``numpyro``: ``jax.jit(svi.update)`` (``optax.adam``);
* ``jax``: a jitted step of ``jax.value_and_grad`` of ``score_matching_loss`` and
  ``optax.adam``, splitting the PRNG key as ``svi.update`` does.

Each row reports the medians of wall-clock samples (interleaved round-robin,
``_common.interleaved_timings``) and the overhead ratio front end / direct; the targets are
<= 1.2 for Pyro, <= 1.1 for NumPyro. On a shared machine wall time measures the queue as
much as the work, so each row also has the ratio of process CPU time (``time.process_time``
medians, also interleaved; torch runs one intra-op thread unless ``--threads`` says otherwise),
and for NumPyro the ratio of the compiled steps' FLOPs and bytes accessed (XLA's
``cost_analysis``, timing-free). Before timing, each front end's loss is checked to equal
the direct call on the same random draws (the same energy, the same objective).

    python benchmarks/frontends.py --quick --json out/bench/frontends.json
"""

from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
sys.path.append(os.path.dirname(_HERE))  # a checkout without `pip install -e .`

import _common as C  # noqa: E402

D, BATCH = 16, 128
TARGETS = {"pyro": 1.2, "numpyro": 1.1}


def cpu_medians(fns: dict, repeats: int, inner: int, seed: int) -> dict:
    """Median process CPU seconds per call of each ``fns[name]()``, round-robin in a seeded
    random order per repeat (``_common.interleaved_timings`` times wall clock)."""
    import random
    import statistics
    import time

    rng = random.Random(seed)
    names, samples = list(fns), {name: [] for name in fns}
    for _ in range(repeats):
        rng.shuffle(names)
        for name in names:
            t0 = time.process_time()
            for _ in range(inner):
                fns[name]()
            samples[name].append((time.process_time() - t0) / inner)
    return {name: statistics.median(v) for name, v in samples.items()}


def _cost(compiled) -> dict:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return {"flops": float(cost.get("flops", float("nan"))), "bytes": float(cost.get("bytes accessed", float("nan")))}


def _torch_variants(method: str, hidden: tuple, seed: int) -> dict:
    import pyro
    import torch
    from pyro.infer import SVI
    from pyro.nn import PyroModule

    from ppl_score.pyro import ScoreMatching, Unnormalized
    from ppl_score.torch import score_matching_loss
    from ppl_score.torch.nets import MLPEnergy

    torch.manual_seed(seed)
    pyro.clear_param_store()
    x = torch.randn(BATCH, D)
    energy = PyroModule[MLPEnergy](D, hidden=hidden, quadratic=1.0)
    direct_energy = MLPEnergy(D, hidden=hidden, quadratic=1.0)
    direct_energy.load_state_dict(energy.state_dict())

    def model(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", Unnormalized(energy, (D,)), obs=x)

    def guide(x):
        pass

    elbo = ScoreMatching(method)
    torch.manual_seed(seed + 1)
    front = elbo.loss(model, guide, x)
    torch.manual_seed(seed + 1)
    direct = score_matching_loss(direct_energy, x, method, reduction="sum").item()
    if abs(front - direct) > 1e-4 * max(1.0, abs(direct)):
        raise RuntimeError(f"pyro front end and direct call disagree: {front} vs {direct}")

    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-4}), loss=elbo)
    opt = torch.optim.Adam(direct_energy.parameters(), lr=1e-4)

    def pyro_step():
        svi.step(x)

    def pyro_noval_step():
        with pyro.validation_enabled(False):
            svi.step(x)

    def torch_step():
        opt.zero_grad()
        score_matching_loss(direct_energy, x, method, reduction="sum").backward()
        opt.step()

    return {"pyro": pyro_step, "pyro-noval": pyro_noval_step, "torch": torch_step}


def _jax_variants(method: str, hidden: tuple, seed: int, costs: dict) -> dict:
    from functools import partial

    import jax
    import numpyro
    import optax
    from numpyro.infer import SVI

    from ppl_score.jax import score_matching_loss
    from ppl_score.jax.nets import energy_apply, energy_init
    from ppl_score.numpyro import ScoreMatching, Unnormalized

    key_init, key_x, key_run = jax.random.split(jax.random.PRNGKey(seed), 3)
    x = jax.random.normal(key_x, (BATCH, D))
    init = energy_init(key_init, D, hidden=hidden)

    def model(x):
        params = numpyro.param("energy", init)
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("x", Unnormalized(partial(energy_apply, params, quadratic=1.0), (D,)), obs=x)

    def guide(x):
        pass

    def direct_loss(params, x, key):
        fn = partial(energy_apply, params, quadratic=1.0)
        return score_matching_loss(fn, x, method, key=key, reduction="sum")

    elbo = ScoreMatching(method)
    front = float(jax.jit(lambda p, x: elbo.loss(key_run, p, model, guide, x))({"energy": init}, x))
    # the loss splits its key into (model, guide, objective) keys
    direct = float(jax.jit(direct_loss)(init, x, jax.random.split(key_run, 3)[2]))
    if abs(front - direct) > 1e-4 * max(1.0, abs(direct)):
        raise RuntimeError(f"numpyro front end and direct call disagree: {front} vs {direct}")

    svi = SVI(model, guide, optax.adam(1e-4), loss=elbo)
    update = jax.jit(svi.update)
    state = {"svi": svi.init(key_run, x)}

    optimizer = optax.adam(1e-4)

    @jax.jit
    def step(params, opt_state, key, x):
        key, key_step = jax.random.split(key)
        loss, grads = jax.value_and_grad(direct_loss)(params, x, jax.random.split(key_step, 3)[2])
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, key, loss

    state["direct"] = (init, optimizer.init(init), key_run)
    costs["numpyro"] = _cost(update.lower(state["svi"], x).compile())
    costs["jax"] = _cost(step.lower(*state["direct"], x).compile())

    def numpyro_step():
        state["svi"], loss = update(state["svi"], x)
        loss.block_until_ready()

    def jax_step():
        params, opt_state, key, loss = step(*state["direct"], x)
        state["direct"] = (params, opt_state, key)
        loss.block_until_ready()

    return {"numpyro": numpyro_step, "jax": jax_step}


def main(argv=None) -> None:
    p = C.make_parser(__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=None, help="objectives (default: ssm_vr dsm; quick: ssm_vr)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: the comparison is of per-step overhead, and idle "
        "threads spinning on a shared machine swamp it; 0 keeps torch's default)",
    )
    args = p.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    methods = args.methods or (["ssm_vr"] if args.quick else ["ssm_vr", "dsm"])
    hiddens = [(64, 64)] if args.quick else [(64, 64), (512, 512, 512)]
    repeats = args.repeats or (7 if args.quick else 21)

    rows = []
    for hidden in hiddens:
        for method in methods:
            costs = {}
            fns = {**_torch_variants(method, hidden, args.seed), **_jax_variants(method, hidden, args.seed, costs)}
            timings = C.interleaved_timings(fns, repeats, warmup=3, seed=args.seed)
            inner = {name: t.inner for name, t in timings.items()}
            cpu = cpu_medians(fns, repeats, max(inner.values()), args.seed)
            for front, direct in (("pyro", "torch"), ("pyro-noval", "torch"), ("numpyro", "jax")):
                tf, td = timings[front], timings[direct]
                ratio = tf.median / td.median
                target = TARGETS[front.split("-")[0]]
                row = {
                    "frontend": front,
                    "direct": direct,
                    "method": method,
                    "hidden": list(hidden),
                    "D": D,
                    "batch": BATCH,
                    "frontend_ms": 1e3 * tf.median,
                    "direct_ms": 1e3 * td.median,
                    "frontend_spread": tf.spread,
                    "direct_spread": td.spread,
                    "overhead": ratio,
                    "frontend_cpu_ms": 1e3 * cpu[front],
                    "direct_cpu_ms": 1e3 * cpu[direct],
                    "overhead_cpu": cpu[front] / cpu[direct],
                    "target": target,
                    "meets_target": bool(ratio <= target),
                }
                if front in costs:
                    row["flops_ratio"] = costs[front]["flops"] / costs[direct]["flops"]
                    row["bytes_ratio"] = costs[front]["bytes"] / costs[direct]["bytes"]
                rows.append(row)

    headers = [
        "front end",
        "vs",
        "method",
        "hidden",
        "front end ms",
        "direct ms",
        "overhead",
        "overhead (CPU)",
        "FLOPs ratio",
        "target",
    ]
    print(
        C.markdown_table(
            headers,
            (
                [
                    r["frontend"],
                    r["direct"],
                    r["method"],
                    "x".join(map(str, r["hidden"])),
                    C.fmt(r["frontend_ms"]),
                    C.fmt(r["direct_ms"]),
                    C.fmt(r["overhead"]) + ("" if r["meets_target"] else " (!)"),
                    C.fmt(r["overhead_cpu"]),
                    C.fmt(r.get("flops_ratio"), ".4f"),
                    f"<= {r['target']}",
                ]
                for r in rows
            ),
        )
    )
    meta = {
        **C.environment_meta(),
        "quick": args.quick,
        "repeats": repeats,
        "threads": args.threads,
        "note": (
            "medians of interleaved samples; overhead = front end / direct wall time, "
            "overhead_cpu = the same with process CPU time; flops_ratio from XLA cost_analysis"
        ),
    }
    C.write_json(args.json, rows, meta)


if __name__ == "__main__":
    main()
