"""Cost of one training step of each score-matching objective, torch and JAX.

For each objective (``esm``, ``ssm``, ``ssm_vr``, ``dsm``, ``fd_ssm``, ``fd_dsm``), backend
and ``D`` in {2, 64, 784}: an MLP energy (3 hidden layers of 512, softplus), batch 128,
float32. A *step* is the loss plus its gradient in the network parameters (torch:
``torch.autograd.grad``; JAX: ``jax.jit(jax.value_and_grad(loss))``, compiled before timing,
``block_until_ready``). Each is reported as a ratio to the **base step** (``-mean log p``
forward plus parameter gradient, same batch, same backend), beside the naive formulations
of the original papers' code:

* torch ``ssm`` / ``ssm_vr``: double backward with ``create_graph`` (Song et al., 2019):
  ``s = grad(log p)``, then ``grad(s . v)``;
* torch ``esm``: a Python loop of ``D`` backward passes, one per diagonal entry;
* JAX ``ssm`` / ``ssm_vr``: reverse-over-reverse, ``jax.grad`` of ``s . v``;
* JAX ``esm``: the diagonal of the per-example ``jax.hessian``.

and beside the **plain** formulation a user would write by hand with the library's default
draws and options (rademacher ``v``, directions uniform on the sphere, standard normal
noise, ``sigma = eps = 0.1``, one projection) and no input checks: torch ``ssm`` /
``ssm_vr`` / ``dsm`` by (double) backward with ``create_graph``, ``esm`` by
``torch.func.vmap(jacrev(grad))``; JAX ``ssm`` / ``ssm_vr`` by ``jvp`` of ``grad``, ``esm`` by
``vmap(jacrev(grad))``, ``dsm`` by ``jax.grad``; ``fd_*`` by the formulas in one batched call.
Column "x plain" is library step / plain step (medians of the same interleaved repeats;
"paired": the median and IQR of the per-repeat ratios); the target is <= 1.0 within noise,
read as <= ``PLAIN_NOISE`` = 1.05.

Timing: all variants of one ``D`` (both backends) in one process, round-robin in a fresh
random order per repeat (each library step back to back with its plain counterpart),
medians. Peak memory, the memory a step needs beyond the
parameters and the batch: torch, a fresh subprocess per variant, its peak RSS after two
steps minus its peak RSS once torch is imported, the model and batch are built and a no-grad
forward and a tiny backward have run (CPU torch allocations are invisible to
``tracemalloc``); JAX, the compiled step's ``memory_analysis()``: temporaries plus outputs
(gradients), less aliased buffers. Matmul FLOPs, a timing-free measure of the formulation's
cost: torch, counted by a dispatch mode; JAX, summed over the ``dot_general`` equations of the
step's jaxpr.

    python benchmarks/objectives.py --quick --json out/bench/objectives.json

``--explore`` adds alternative formulations (torch ``esm`` chunk sizes of the batched
double-backward trace, torch ``ssm_vr`` by ``torch.func`` forward-over-reverse, JAX ``esm``
by forward-over-forward) and every torch objective with ``ppl_score.set_validation(False)``
("unvalidated": the cost of the host-syncing checks). On a loaded
machine torch's two OpenMP threads wait on each other at every op (5-10x slower than one
thread); ``--torch-threads 1`` keeps such runs comparable, timings on a quiet machine don't
need it.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
sys.path.append(os.path.dirname(_HERE))  # a checkout without `pip install -e .`

import _common as C  # noqa: E402

METHODS = ("esm", "ssm", "ssm_vr", "dsm", "fd_ssm", "fd_dsm")
NAIVE = ("esm", "ssm", "ssm_vr")
BACKENDS = ("torch", "jax")
BATCH = 128
HIDDEN = (512, 512, 512)
ESM_MAX_D = 64  # exact esm needs D Hessian-vector products per step: not run above this

# Alternative formulations timed with --explore: (backend, method) -> names.
ALTERNATIVES = {
    ("torch", "esm"): ("chunk=8", "chunk=32", "chunk=64"),
    ("torch", "ssm_vr"): ("torch.func fwd-over-rev",),
    ("jax", "esm"): ("fwd-over-fwd",),
}
# With --explore, every torch objective is also timed with ppl_score.set_validation(False):
# the cost of the host-syncing checks (JAX runs them outside the compiled step).
UNVALIDATED = "unvalidated"

PLAIN_NOISE = 1.05  # lib/plain at or below 1.0 "within noise": the medians' ratio <= this

TARGETS_TEXT = (
    "ssm_vr and ssm <= 3.0x base at D=784 (both backends); fd_ssm <= 2.5x base; "
    "esm at D=64 >= 4x faster than the naive formulation; JAX step <= torch step; "
    f"every objective, both backends: library step / plain step <= 1.0 within noise "
    f"(median ratio <= {PLAIN_NOISE})"
)


# ------------------------------------------------------------------------------- torch


def torch_setup(d: int, seed: int):
    import torch

    from ppl_score.torch.nets import MLPEnergy

    torch.manual_seed(seed)
    model = MLPEnergy(d, HIDDEN)
    x = torch.randn(BATCH, d, generator=torch.Generator().manual_seed(seed + 1))
    return model, x


def _torch_naive_loss(model, x, method, gen):
    """The papers' code: double backward with ``create_graph``; ``esm`` by ``D`` backward
    passes (Song et al. 2019, ``sliced_score_estimation`` / ``exact_score_matching``)."""
    import torch

    xg = x.detach().requires_grad_(True)
    logp = model(xg).sum()
    s = torch.autograd.grad(logp, xg, create_graph=True)[0]
    if method == "esm":
        trace = torch.zeros(x.shape[0])
        for i in range(x.shape[1]):
            trace = trace + torch.autograd.grad(s[:, i].sum(), xg, create_graph=True)[0][:, i]
        return (trace + 0.5 * (s * s).sum(-1)).mean()
    v = torch.randn(x.shape, generator=gen)
    sv = (s * v).sum(-1)
    hv = torch.autograd.grad(sv.sum(), xg, create_graph=True)[0]
    second = 0.5 * (s * s).sum(-1) if method == "ssm_vr" else 0.5 * sv**2
    return ((hv * v).sum(-1) + second).mean()


def _torch_plain_loss(model, x, method, gen, sigma=0.1, eps=0.1):
    """The straightforward formulation a user would write by hand, with the library's default
    draws (rademacher ``v``; directions uniform on the sphere; standard normal noise; one
    projection) and no input checks: ``ssm`` / ``ssm_vr`` and ``dsm`` by (double) backward
    with ``create_graph``, ``esm`` by ``torch.func.vmap(jacrev(grad))`` (the score shared as
    ``jacrev``'s aux output), ``fd_*`` by the formulas with one batched network call."""
    import torch

    if method == "esm":
        f1 = lambda xi: model(xi[None])[0]  # noqa: E731
        g = torch.func.grad(f1)

        def score_twice(xi):  # jacrev differentiates the first, returns the second as is
            s = g(xi)
            return s, s

        hess, s = torch.func.vmap(torch.func.jacrev(score_twice, has_aux=True))(x)
        trace = torch.diagonal(hess, dim1=-2, dim2=-1).sum(-1)
        return (trace + 0.5 * (s * s).sum(-1)).mean()
    if method in ("ssm", "ssm_vr"):
        v = torch.randint(0, 2, x.shape, generator=gen).to(x.dtype) * 2 - 1
        xg = x.detach().requires_grad_(True)
        s = torch.autograd.grad(model(xg).sum(), xg, create_graph=True)[0]
        sv = (s * v).sum(-1)
        hv = torch.autograd.grad(sv.sum(), xg, create_graph=True)[0]
        second = 0.5 * (s * s).sum(-1) if method == "ssm_vr" else 0.5 * sv**2
        return ((hv * v).sum(-1) + second).mean()
    if method == "dsm":
        noise = torch.randn(x.shape, generator=gen, dtype=x.dtype)
        xt = (x + sigma * noise).detach().requires_grad_(True)
        s = torch.autograd.grad(model(xt).sum(), xt, create_graph=True)[0]
        return (0.5 * ((s + noise / sigma) ** 2).sum(-1)).mean()
    d, b = x.shape[1], x.shape[0]
    u = torch.randn(x.shape, generator=gen, dtype=x.dtype)
    v = eps * u / u.norm(dim=-1, keepdim=True)
    c = d / eps**2
    if method == "fd_ssm":
        out = model(torch.cat([x, x + v, x - v]))
        l0, lp, lm = out[:b], out[b : 2 * b], out[2 * b :]
        return (c * (lp + lm - 2 * l0 + 0.125 * (lp - lm) ** 2)).mean()
    noise = torch.randn(x.shape, generator=gen, dtype=x.dtype)  # fd_dsm
    xt = x + sigma * noise
    out = model(torch.cat([xt + v, xt - v]))
    inner = 0.5 * (out[:b] - out[b:]) + (v * noise).sum(-1) / sigma
    return (0.5 * c * inner**2).mean()


def _torch_alt_loss(model, x, method, alt, gen):
    import torch

    if method == "esm":  # the library's chunked is_grads_batched trace at another chunk size
        from ppl_score.torch import derivatives as d

        xg = x.detach().requires_grad_(True)
        s = d.score(model, "log_prob", xg)
        return (d.hessian_trace(s, xg, int(alt.split("=")[1])) + 0.5 * (s * s).sum(-1)).mean()
    # ssm_vr by forward-over-reverse: jvp of torch.func.grad, parameters closed over
    v = torch.randint(0, 2, x.shape, generator=gen).to(x.dtype) * 2 - 1
    score = torch.func.grad(lambda y: model(y).sum())
    s, hv = torch.func.jvp(score, (x,), (v,))
    return ((hv * v).sum(-1) + 0.5 * (s * s).sum(-1)).mean()


def torch_step(model, x, method: str, impl: str, seed: int):
    """``() -> parameter gradients`` of one training step."""
    import torch

    from ppl_score.torch import score_matching_loss

    params = tuple(model.parameters())
    gen = torch.Generator().manual_seed(seed + 2)
    if method == "base":
        loss = lambda: -model(x).mean()  # noqa: E731
    elif impl == "lib":
        loss = lambda: score_matching_loss(model, x, method, generator=gen)  # noqa: E731
    elif impl == "naive":
        loss = lambda: _torch_naive_loss(model, x, method, gen)  # noqa: E731
    elif impl == "plain":
        loss = lambda: _torch_plain_loss(model, x, method, gen)  # noqa: E731
    elif impl == UNVALIDATED:
        import ppl_score

        def loss():
            with ppl_score.validation_enabled(False):
                return score_matching_loss(model, x, method, generator=gen)
    else:
        loss = lambda: _torch_alt_loss(model, x, method, impl, gen)  # noqa: E731
    # the output bias does not reach the score: unused by every score-based objective
    return lambda: torch.autograd.grad(loss(), params, allow_unused=True)


def torch_matmul_flops(step) -> int:
    """Matmul FLOPs of one call of ``step`` (torch's ``flop_registry`` formulas, counted by
    a dispatch mode: ``FlopCounterMode`` itself breaks ``autograd.grad`` with inputs)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import flop_registry

    class Count(TorchDispatchMode):
        total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            formula = flop_registry.get(func._overloadpacket)
            if formula is not None:
                self.total += formula(*args, **kwargs, out_val=out)
            return out

    with Count() as c:
        step()
    return int(c.total)


# --------------------------------------------------------------------------------- JAX


def jax_setup(d: int, seed: int):
    import jax

    from ppl_score.jax.nets import energy_init

    params = energy_init(jax.random.PRNGKey(seed), d, HIDDEN)
    x = jax.random.normal(jax.random.PRNGKey(seed + 1), (BATCH, d))
    return params, x, jax.random.PRNGKey(seed + 2)


def _jax_naive_loss(p, x, key, method):
    """Reverse-over-reverse for ``ssm`` / ``ssm_vr``; ``esm`` from the per-example Hessian."""
    import jax
    import jax.numpy as jnp

    from ppl_score.jax.nets import energy_apply

    f = lambda y: energy_apply(p, y).sum()  # noqa: E731
    s = jax.grad(f)(x)
    if method == "esm":
        f1 = lambda xi: energy_apply(p, xi[None])[0]  # noqa: E731
        trace = jnp.trace(jax.vmap(jax.hessian(f1))(x), axis1=1, axis2=2)
        return (trace + 0.5 * (s * s).sum(-1)).mean()
    v = jax.random.normal(key, x.shape, x.dtype)
    hv = jax.grad(lambda y: (jax.grad(f)(y) * v).sum())(x)
    sv = (s * v).sum(-1)
    second = 0.5 * (s * s).sum(-1) if method == "ssm_vr" else 0.5 * sv**2
    return ((hv * v).sum(-1) + second).mean()


def _jax_plain_loss(p, x, key, method, sigma=0.1, eps=0.1):
    """The straightforward formulation, with the library's default draws and no checks:
    ``ssm`` / ``ssm_vr`` by forward-over-reverse (``s, Hv = jvp(grad(sum log p), (x,), (v,))``),
    ``esm`` by the diagonal of ``vmap(jacrev(grad))`` (score shared as ``jacrev``'s aux
    output), ``dsm`` by ``jax.grad`` at ``x~``, ``fd_*`` by the formulas in one batched call."""
    import jax
    import jax.numpy as jnp

    from ppl_score.jax.nets import energy_apply

    f = lambda y: energy_apply(p, y).sum()  # noqa: E731
    if method == "esm":
        f1 = lambda xi: energy_apply(p, xi[None])[0]  # noqa: E731
        g = jax.grad(f1)

        def score_twice(xi):  # jacrev differentiates the first, returns the second as is
            s = g(xi)
            return s, s

        hess, s = jax.vmap(jax.jacrev(score_twice, has_aux=True))(x)
        trace = jnp.trace(hess, axis1=1, axis2=2)
        return (trace + 0.5 * (s * s).sum(-1)).mean()
    if method in ("ssm", "ssm_vr"):
        v = jax.random.rademacher(key, x.shape, dtype=x.dtype)
        s, hv = jax.jvp(jax.grad(f), (x,), (v,))
        sv = (s * v).sum(-1)
        second = 0.5 * (s * s).sum(-1) if method == "ssm_vr" else 0.5 * sv**2
        return ((hv * v).sum(-1) + second).mean()
    if method == "dsm":
        noise = jax.random.normal(key, x.shape, x.dtype)
        s = jax.grad(f)(x + sigma * noise)
        return (0.5 * ((s + noise / sigma) ** 2).sum(-1)).mean()
    d, b = x.shape[1], x.shape[0]
    key_u, key_n = jax.random.split(key)
    u = jax.random.normal(key_u, x.shape, x.dtype)
    v = eps * u / jnp.linalg.norm(u, axis=-1, keepdims=True)
    c = d / eps**2
    if method == "fd_ssm":
        out = energy_apply(p, jnp.concatenate([x, x + v, x - v]))
        l0, lp, lm = out[:b], out[b : 2 * b], out[2 * b :]
        return (c * (lp + lm - 2 * l0 + 0.125 * (lp - lm) ** 2)).mean()
    noise = jax.random.normal(key_n, x.shape, x.dtype)  # fd_dsm
    xt = x + sigma * noise
    out = energy_apply(p, jnp.concatenate([xt + v, xt - v]))
    inner = 0.5 * (out[:b] - out[b:]) + (v * noise).sum(-1) / sigma
    return (0.5 * c * inner**2).mean()


def _jax_alt_loss(p, x, key, method, alt):
    """``esm`` with ``H_ii`` by forward-over-forward (``jvp`` of ``jvp``), chunked like the
    library's forward-over-reverse trace."""
    import jax
    import jax.numpy as jnp

    from ppl_score.jax import derivatives as d
    from ppl_score.jax.nets import energy_apply

    f = lambda y: energy_apply(p, y)  # noqa: E731
    dim = x.shape[1]

    def diag_entry(e):
        ev = jnp.broadcast_to(e, x.shape)
        return jax.jvp(lambda y: jax.jvp(f, (y,), (ev,))[1], (x,), (ev,))[1]

    trace = jax.lax.map(diag_entry, jnp.eye(dim, dtype=x.dtype), batch_size=d.esm_chunk(x.shape[0], dim)).sum(0)
    s = jax.grad(lambda y: f(y).sum())(x)
    return (trace + 0.5 * (s * s).sum(-1)).mean()


def jax_compiled_step(params, x, key, method: str, impl: str):
    """The compiled ``value_and_grad`` step, its compile time in seconds and its matmul
    FLOPs (from the jaxpr, before XLA's simplifications)."""
    import jax

    from ppl_score.jax import score_matching_loss
    from ppl_score.jax.nets import energy_apply

    if method == "base":
        loss = lambda p, x, key: -energy_apply(p, x).mean()  # noqa: E731
    elif impl == "lib":
        loss = lambda p, x, key: score_matching_loss(lambda y: energy_apply(p, y), x, method, key=key)  # noqa: E731
    elif impl == "naive":
        loss = lambda p, x, key: _jax_naive_loss(p, x, key, method)  # noqa: E731
    elif impl == "plain":
        loss = lambda p, x, key: _jax_plain_loss(p, x, key, method)  # noqa: E731
    else:
        loss = lambda p, x, key: _jax_alt_loss(p, x, key, method, impl)  # noqa: E731
    step = jax.value_and_grad(loss)
    flops = jaxpr_matmul_flops(jax.make_jaxpr(step)(params, x, key).jaxpr)
    t0 = time.perf_counter()
    compiled = jax.jit(step).lower(params, x, key).compile()
    jax.block_until_ready(compiled(params, x, key))
    return compiled, time.perf_counter() - t0, flops


def jaxpr_matmul_flops(jaxpr) -> int | None:
    """Matmul FLOPs (``dot_general``: 2 x output size x contracted size) of a jaxpr, through
    nested jaxprs; ``scan`` bodies (``lax.map``) count once per iteration. None when a
    ``while`` loop, whose trip count is unknown, holds matmuls."""
    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2 * math.prod(lhs[i] for i in contract) * math.prod(eqn.outvars[0].aval.shape)
        subs = []
        for value in eqn.params.values():
            for item in value if isinstance(value, (tuple, list)) else (value,):
                sub = getattr(item, "jaxpr", item)  # ClosedJaxpr -> Jaxpr
                if hasattr(sub, "eqns"):
                    subs.append(sub)
        counts = [jaxpr_matmul_flops(sub) for sub in subs]
        if any(c is None for c in counts):
            return None
        if name == "while" and sum(counts) > 0:
            return None
        if name == "cond":
            total += max(counts, default=0)
        else:
            total += eqn.params.get("length", 1) * sum(counts) if name == "scan" else sum(counts)
    return total


def jax_step_bytes(compiled) -> int:
    """Temporaries plus outputs (loss and gradients), less aliased buffers."""
    m = compiled.memory_analysis()
    return int(m.temp_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes)


# ------------------------------------------------------------------------------ memory


def torch_memory_worker(method: str, impl: str, d: int, seed: int) -> None:
    """Run in a fresh process: peak RSS of two steps over that after setup.

    The baseline is taken after a no-grad forward and a tiny backward, so one-time
    allocations (autograd engine threads, BLAS buffers) are not charged to the step."""
    import torch

    model, x = torch_setup(d, seed)
    step = torch_step(model, x, method, impl, seed)
    with torch.no_grad():
        model(x)
    w = torch.ones(2, requires_grad=True)
    torch.autograd.grad((w * w).sum(), w)
    baseline = C.maxrss_bytes()
    for _ in range(2):
        step()
    C.emit_worker_result({"baseline_bytes": baseline, "peak_bytes": C.maxrss_bytes()})


def torch_memory_mb(variants, seed: int, workers: int) -> dict:
    """``{(method, impl, d): MB}`` for torch variants, one subprocess each."""

    def one(v):
        method, impl, d = v
        r = C.run_worker(__file__, ["--worker-memory", method, impl, str(d), "--seed", str(seed)])
        return v, (r["peak_bytes"] - r["baseline_bytes"]) / C.MB

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return dict(pool.map(one, variants))


# ------------------------------------------------------------------------------- main


def variants_for(d: int, backends, methods, explore: bool):
    """``[(backend, method, impl)]`` to time at this ``D`` and ``{variant: reason}`` skipped."""
    run, skipped = [], {}
    for backend in backends:
        run.append((backend, "base", "lib"))
        for method in methods:
            impls = ["lib", "plain"] + (["naive"] if method in NAIVE else [])
            if explore:
                impls += list(ALTERNATIVES.get((backend, method), ()))
                impls += [UNVALIDATED] if backend == "torch" else []
            for impl in impls:
                v = (backend, method, impl)
                if method == "esm" and d > ESM_MAX_D:
                    skipped[v] = f"not run at D={d}: exact trace needs D HVPs per step (too slow)"
                else:
                    run.append(v)
    return run, skipped


def measure_dim(d: int, args, settings) -> tuple[dict, dict, dict]:
    """Timings, JAX memory / compile times and skip reasons for every variant at ``D = d``."""
    run, skipped = variants_for(d, args.backends, args.methods, args.explore)
    fns, info = {}, {}
    if "torch" in args.backends:
        model, x = torch_setup(d, args.seed)
    if "jax" in args.backends:
        import jax

        params, xj, key = jax_setup(d, args.seed)
    for v in run:
        backend, method, impl = v
        if backend == "torch":
            fns[v] = torch_step(model, x, method, impl, args.seed)
        else:
            compiled, compile_s, flops = jax_compiled_step(params, xj, key, method, impl)
            info[v] = {"compile_s": compile_s, "mb": jax_step_bytes(compiled) / C.MB, "flops": flops}
            fns[v] = lambda c=compiled: jax.block_until_ready(c(params, xj, key))
    timings = C.interleaved_timings(
        fns,
        settings["repeats"],
        min_sample_s=settings["min_sample_s"],
        # only the naive exact trace (D backward passes) may be too slow to time
        max_call_s={v: settings["max_call_s"] for v in fns if v[1:] == ("esm", "naive")},
        seed=args.seed + d,
        # each library step right beside its plain counterpart: paired lib/plain ratios
        adjacent=[(v, v[:2] + ("plain",)) for v in fns if v[2] == "lib" and v[:2] + ("plain",) in fns],
    )
    for v, t in timings.items():
        if t.skipped:
            skipped[v] = t.skipped
        elif v[0] == "torch":
            info[v] = {"flops": torch_matmul_flops(fns[v])}
    return timings, info, skipped


def paired_ratios(lib, plain) -> list[float]:
    """``lib_i / plain_i`` per repeat: sample ``i`` of every variant comes from the same
    round-robin pass, so each ratio compares two timings taken seconds apart (a load change
    between repeats cancels)."""
    if lib is None or plain is None or lib.skipped or plain.skipped:
        return []
    return [a / b for a, b in zip(lib.samples, plain.samples)]


def iqr(values) -> float:
    """Interquartile range (0 with fewer than 4 values)."""
    if len(values) < 4:
        return 0.0
    q1, _, q3 = statistics.quantiles(values, n=4)
    return q3 - q1


def build_rows(results, torch_mem) -> list[dict]:
    rows = []
    for d, (timings, info, skipped) in results.items():

        def ms(v):
            t = timings.get(v)
            return None if t is None or t.skipped else 1e3 * t.median

        def flops(v):
            f = info.get(v, {}).get("flops")
            return None if f is None else f / 1e9

        def mem(v):
            return info.get(v, {}).get("mb") if v[0] == "jax" else torch_mem.get(v[1:] + (d,))

        keys = sorted(
            {(b, m) for (b, m, _) in list(timings) + list(skipped)},
            key=lambda k: (["base", *METHODS].index(k[1]), BACKENDS.index(k[0])),
        )
        for backend, method in keys:
            base_v = (backend, "base", "lib")
            base = ms(base_v)
            order = ["lib", "plain", "naive", *ALTERNATIVES.get((backend, method), ()), UNVALIDATED]
            impls = sorted(
                {i for (b, m, i) in list(timings) + list(skipped) if (b, m) == (backend, method)}, key=order.index
            )
            naive_v = (backend, method, "naive")
            plain_v = (backend, method, "plain")
            for impl in impls:
                if impl in ("naive", "plain"):
                    continue
                v = (backend, method, impl)
                t_ms, n_ms = ms(v), ms(naive_v)
                p_ms = ms(plain_v) if impl == "lib" else None
                paired = paired_ratios(timings.get(v), timings.get(plain_v)) if impl == "lib" else None
                other = ms(("torch" if backend == "jax" else "jax", method, impl))
                t = timings.get(v)
                notes = [skipped[v]] if v in skipped else []
                if impl == "lib" and naive_v in skipped and skipped[naive_v] != skipped.get(v):
                    notes.append("naive: " + skipped[naive_v])
                rows.append(
                    {
                        "method": method,
                        "variant": "library" if impl == "lib" else impl,
                        "D": d,
                        "backend": backend,
                        "step_ms": t_ms,
                        "iqr_over_median": None if t is None or t.skipped else t.spread,
                        "samples": None if t is None else len(t.samples),
                        "ratio_to_base": None if t_ms is None or base is None else t_ms / base,
                        "naive_step_ms": n_ms if impl == "lib" else None,
                        "naive_ratio_to_base": None if impl != "lib" or n_ms is None or base is None else n_ms / base,
                        "speedup_vs_naive": None if impl != "lib" or n_ms is None or t_ms is None else n_ms / t_ms,
                        "plain_step_ms": p_ms,
                        "plain_iqr_over_median": None if p_ms is None else timings[plain_v].spread,
                        "lib_over_plain": None if p_ms is None or t_ms is None else t_ms / p_ms,
                        "lib_over_plain_paired_median": None if not paired else statistics.median(paired),
                        "lib_over_plain_paired_iqr": None if not paired else iqr(paired),
                        "gflops": flops(v),
                        "flops_ratio_to_base": None
                        if flops(v) is None or flops(base_v) is None
                        else flops(v) / flops(base_v),
                        "peak_mb": mem(v),
                        "naive_peak_mb": mem(naive_v) if impl == "lib" and method in NAIVE else None,
                        "plain_peak_mb": mem(plain_v) if impl == "lib" and method != "base" else None,
                        "plain_gflops": flops(plain_v) if impl == "lib" and method != "base" else None,
                        "jax_over_torch": None if backend != "jax" or t_ms is None or other is None else t_ms / other,
                        "compile_s": info.get(v, {}).get("compile_s"),
                        "naive_compile_s": info.get(naive_v, {}).get("compile_s") if impl == "lib" else None,
                        "note": "; ".join(notes),
                    }
                )
    return rows


def check_targets(rows) -> list[dict]:
    """Each target against each row it applies to (``met`` is None when not measured)."""
    out = []

    def add(name, row, value, limit, at_most=True):
        met = None if value is None else (value <= limit if at_most else value >= limit)
        out.append(
            {
                "target": name,
                "method": row["method"],
                "D": row["D"],
                "backend": row["backend"],
                "value": value,
                "limit": limit,
                "met": met,
                "flops_ratio_to_base": row["flops_ratio_to_base"],
            }
        )

    lib = [r for r in rows if r["variant"] == "library"]
    for r in lib:
        if r["method"] in ("ssm", "ssm_vr") and r["D"] == 784:
            add("ratio to base <= 3.0 at D=784", r, r["ratio_to_base"], 3.0)
        if r["method"] == "fd_ssm":
            add("ratio to base <= 2.5", r, r["ratio_to_base"], 2.5)
        if r["method"] == "esm" and r["D"] == 64:
            add("speedup vs naive >= 4 at D=64", r, r["speedup_vs_naive"], 4.0, at_most=False)
        if r["backend"] == "jax" and r["method"] != "base" and r["jax_over_torch"] is not None:
            add("JAX/torch <= 1.0", r, r["jax_over_torch"], 1.0)
        if r["method"] != "base":
            add(f"lib/plain <= 1.0 (noise: {PLAIN_NOISE})", r, r["lib_over_plain"], PLAIN_NOISE)
    return out


def print_report(rows, targets, meta) -> None:
    headers = [
        "method",
        "D",
        "backend",
        "step ms",
        "x base",
        "matmul FLOPs x base",
        "x plain",
        "x plain paired (IQR)",
        "IQR/med lib, plain",
        "naive x base",
        "speedup vs naive",
        "peak MB",
        "plain peak MB",
        "naive peak MB",
        "JAX/torch",
        "note",
    ]

    def cells(r):
        paired = (
            "-"
            if r["lib_over_plain_paired_median"] is None
            else (f"{r['lib_over_plain_paired_median']:.2f} ({r['lib_over_plain_paired_iqr']:.2f})")
        )
        spread = (
            "-"
            if r["plain_iqr_over_median"] is None
            else (f"{r['iqr_over_median']:.2f}, {r['plain_iqr_over_median']:.2f}")
        )
        return [
            r["method"],
            str(r["D"]),
            r["backend"],
            C.fmt(r["step_ms"], ".1f"),
            C.fmt(r["ratio_to_base"]),
            C.fmt(r["flops_ratio_to_base"]),
            C.fmt(r["lib_over_plain"]),
            paired,
            spread,
            C.fmt(r["naive_ratio_to_base"]),
            C.fmt(r["speedup_vs_naive"], ".1f"),
            C.fmt(r["peak_mb"], ".1f"),
            C.fmt(r["plain_peak_mb"], ".1f"),
            C.fmt(r["naive_peak_mb"], ".1f"),
            C.fmt(r["jax_over_torch"]),
            r["note"],
        ]

    main = [r for r in rows if r["variant"] == "library"]
    print(C.markdown_table(headers, map(cells, main)))
    alts = [r for r in rows if r["variant"] != "library"]
    if alts:
        print("\nAlternative formulations (--explore):\n")
        headers = ["method", "variant", "D", "backend", "step ms", "x base", "matmul FLOPs x base", "peak MB", "note"]
        print(
            C.markdown_table(
                headers,
                (
                    [
                        r["method"],
                        r["variant"],
                        str(r["D"]),
                        r["backend"],
                        C.fmt(r["step_ms"], ".1f"),
                        C.fmt(r["ratio_to_base"]),
                        C.fmt(r["flops_ratio_to_base"]),
                        C.fmt(r["peak_mb"], ".1f"),
                        r["note"],
                    ]
                    for r in alts
                ),
            )
        )
    print(
        f"\nbatch {BATCH}, MLP energy {'x'.join(map(str, HIDDEN))} softplus, float32; "
        f"{meta['repeats']} interleaved repeats, medians; load average {meta['loadavg_start']} -> "
        f"{meta['loadavg_end']}."
    )
    print(f"peak MB: {meta['memory_method']['torch']}; {meta['memory_method']['jax']}.")
    print(f"FLOPs: {meta['flops_method']}.")
    print("naive: " + meta["naive"]["torch"] + "; " + meta["naive"]["jax"] + ".")
    print("plain: " + meta["plain"]["torch"] + "; " + meta["plain"]["jax"] + ". " + meta["plain"]["ratio"])
    print("\nTargets:")
    for t in targets:
        status = "not measured" if t["met"] is None else ("met" if t["met"] else "MISSED")
        flops = "" if "base" not in t["target"] else f"  (FLOPs x base {C.fmt(t['flops_ratio_to_base'])})"
        print(
            f"  {t['target']:<32} {t['method']:<7} D={t['D']:<4} {t['backend']:<6} "
            f"{C.fmt(t['value'])} -> {status}{flops}"
        )


def backend_meta(backends) -> dict:
    out = {}
    if "torch" in backends:
        import torch

        out["torch_threads"] = torch.get_num_threads()
    if "jax" in backends:
        import jax

        out["jax_devices"] = [str(dev) for dev in jax.devices()]
    return out


def main(argv=None) -> None:
    p = C.make_parser(__doc__.splitlines()[0])
    p.add_argument("--dims", type=int, nargs="+", help="event sizes D (default 2 64 784; --quick: 2 64)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    p.add_argument("--explore", action="store_true", help="also time alternative formulations")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--memory-workers", type=int, default=2, help="concurrent torch memory subprocesses")
    p.add_argument("--torch-threads", type=int, help="torch.set_num_threads (default: torch's own)")
    p.add_argument("--worker-memory", nargs=3, metavar=("METHOD", "IMPL", "D"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker_memory:
        method, impl, d = args.worker_memory
        torch_memory_worker(method, impl, int(d), args.seed)
        return

    if args.torch_threads and "torch" in args.backends:
        import torch

        torch.set_num_threads(args.torch_threads)
    settings = {
        "dims": args.dims or ([2, 64] if args.quick else [2, 64, 784]),
        "repeats": args.repeats or (5 if args.quick else 15),
        "min_sample_s": 0.01 if args.quick else 0.05,
        "max_call_s": 5.0 if args.quick else 30.0,
    }
    loadavg_start = list(os.getloadavg())
    results = {}
    for d in settings["dims"]:
        t0 = time.perf_counter()
        results[d] = measure_dim(d, args, settings)
        compile_s = sum(i.get("compile_s", 0.0) for i in results[d][1].values())
        print(f"D={d}: {time.perf_counter() - t0:.0f} s (JAX compile {compile_s:.0f} s)", file=sys.stderr)
    torch_mem = {}
    if "torch" in args.backends and not args.no_memory:
        t0 = time.perf_counter()
        todo = [
            (m, i, d)
            for d, (timings, _, _) in results.items()
            for (b, m, i), t in timings.items()
            if b == "torch" and not t.skipped and not (args.quick and i == "plain")
        ]  # --quick: keep it a couple of minutes
        torch_mem = torch_memory_mb(todo, args.seed, args.memory_workers)
        print(f"torch memory: {len(todo)} subprocesses in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    rows = build_rows(results, torch_mem)
    targets = check_targets(rows)

    meta = {
        **C.environment_meta(),
        "quick": args.quick,
        "batch": BATCH,
        "hidden": list(HIDDEN),
        "activation": "softplus",
        "dtype": "float32",
        "dims": settings["dims"],
        "repeats": settings["repeats"],
        "min_sample_s": settings["min_sample_s"],
        "naive_esm_max_call_s": settings["max_call_s"],
        **backend_meta(args.backends),
        "loadavg_start": loadavg_start,
        "loadavg_end": list(os.getloadavg()),
        "step": "loss + gradient in the network parameters; JAX: jit(value_and_grad), compiled before timing",
        "base": "-mean log p(x) forward + parameter gradient, same batch and backend",
        "timing": "one process, round-robin over all variants of one D (both backends) in a fresh "
        "random order per repeat, each library step back to back with its plain counterpart "
        "(random order within the pair); median per-call time",
        "memory_method": {
            "torch": "torch: fresh subprocess per variant, peak RSS after 2 steps minus peak RSS after "
            "import, model/batch setup, a no-grad forward and a tiny backward",
            "jax": "JAX: compiled step memory_analysis(), temp + output - alias bytes",
        },
        "flops_method": "matmul FLOPs; torch: torch.utils.flop_counter formulas counted by a dispatch mode; "
        "JAX: dot_general equations of the step's jaxpr (scan bodies times their length)",
        "naive": {
            "torch": "torch ssm/ssm_vr by double backward with create_graph, esm by a loop of D backward passes",
            "jax": "JAX ssm/ssm_vr by reverse-over-reverse (grad of s.v), esm by the diagonal of vmapped jax.hessian",
        },
        "plain": {
            "torch": "torch plain: ssm/ssm_vr by double backward with create_graph (rademacher v), dsm by one "
            "create_graph backward at x~, esm by torch.func.vmap(jacrev(grad)) diagonal (score as aux), "
            "fd_* by the formulas in one batched call; library's default draws, no input checks",
            "jax": "JAX plain: ssm/ssm_vr by jvp of grad (rademacher v), dsm by jax.grad at x~, esm by the "
            "diagonal of vmap(jacrev(grad)) (score as aux), fd_* by the formulas; inside the same "
            "jit(value_and_grad) step",
            "ratio": "x plain = library median / plain median (same interleaved repeats); paired = median "
            "and IQR of the per-repeat ratios lib_i / plain_i; IQR/med = each variant's spread. "
            f"Target: x plain <= {PLAIN_NOISE} (1.0 within noise).",
        },
        "targets_text": TARGETS_TEXT,
        "targets": targets,
    }
    print_report(rows, targets, meta)
    C.write_json(args.json, rows, meta)


if __name__ == "__main__":
    main()
