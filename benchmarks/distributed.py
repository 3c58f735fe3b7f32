"""Data-parallel throughput: 1 against 2 workers, torch DDP and JAX sharding, one thread each.

Training throughput (examples per second) of the MLP energy of ``benchmarks/objectives.py``
(``D = 784``, hidden 3x512 softplus, float32) with ``ssm_vr`` and ``fd_ssm``, per-worker batch
128, Adam (lr 1e-4), with 1 and 2 workers of one thread each, in both backends:

* torch: ``torch.multiprocessing`` spawn, ``gloo``, ``file://`` init, the energy wrapped in
  ``DistributedDataParallel``, ``torch.set_num_threads(1)`` per worker, the loss
  ``ppl_score.torch.score_matching_loss(ddp, x, method, generator=g)`` with a generator
  seeded per rank, ``loss.backward()`` (DDP averages the gradients) and ``Adam.step()``.
  The 1-worker group runs the same code with ``world_size = 1``. ``MLPEnergy`` has no output
  bias (since the library's data-parallel change), so every parameter gets a gradient and
  ``find_unused_parameters=False``. On an older checkout the output bias does not reach the
  score, gets no gradient, and DDP would stop at the first step: ``--torch-unused drop-bias``
  (the default) then removes it, ``--torch-unused find-unused`` keeps it and passes
  ``find_unused_parameters=True``. The JSON's ``notes`` say which applied.
* JAX: one subprocess per worker count with ``--xla_force_host_platform_device_count=N`` and
  ``--xla_cpu_multi_thread_eigen=false``, a 1-D mesh of the ``N`` devices, the batch sharded
  over it (``NamedSharding(mesh, P("data"))``, parameters and optimizer state replicated),
  one ``jax.jit`` of ``value_and_grad`` of ``ppl_score.jax.score_matching_loss`` plus the
  ``optax.adam`` update, buffers donated; XLA's partitioner inserts the gradient all-reduce.

One thread per device in XLA:CPU (jax 0.10.2). ``--xla_cpu_multi_thread_eigen=false`` stops
Eigen's matmuls from splitting over threads, but the compiled program itself runs on the
client's intra-op pool (threads ``tf_XLAEigen``), whose size is ``max(schedulable CPUs,
devices)``: 2 threads for a 1-device client on this 2-core machine. No XLA flag sets it
(``intra_op_parallelism_threads=1``, often written into ``XLA_FLAGS``, is not an XLA flag:
XLA stops reading ``XLA_FLAGS`` at the first word without ``--`` and silently ignores every
flag after it). So each JAX worker process restricts its CPU affinity to ``N`` CPUs while
the client is created (a pool of ``N`` threads), then gives all its threads every CPU back,
so that the scheduler still places them freely (``--jax-pool default`` skips this). The
benchmark sets ``XLA_FLAGS`` of the workers itself, whatever the caller's.

Timing: all worker groups (torch 1 and 2, JAX 1 and 2) start once, compile and run
``--warmup`` steps of each method, and then stay alive; the driver sends them "run N steps"
commands one group at a time, so only one group computes at any moment. Each repeat visits
every (backend, method) in a fresh random order and times its 1-worker and 2-worker groups
back to back (in random order), so the pair shares the same background load; a worker
group's time for N steps runs from a barrier to a barrier (torch) or from dispatch to
``block_until_ready`` (JAX). Reported: medians over repeats of examples/s, and
``efficiency = median(2-worker examples/s) / (2 x median(1-worker examples/s))`` (target
>= 0.85), also as the median (and range) of the per-repeat ratios ("paired").

Diagnostics (``--no-diagnostics`` to skip), timed in the same round-robin, of the 2-worker
group: without any communication (torch: ``ddp.no_sync()``; JAX: the same step jitted for one
device and run on each device, dispatched asynchronously), what 2 workers do if communication
is free; meeting once per step without the gradient all-reduce (a 1-element all-reduce per
step: torch ``no_sync`` plus ``dist.all_reduce``, JAX a ``shard_map`` with ``pmean`` of the
loss only); JAX only, the step written as a ``shard_map`` with ``pmean`` of each gradient leaf
(the explicit alternative to the partitioner's collectives); and the gradient all-reduce alone
(one flat float32 tensor of the gradients' size, ``dist.all_reduce`` / a jitted sum over the
sharded axis). Around every sample the load is recorded: the CPU time of the workers (per
wall second), the time their threads waited for a CPU (``/proc/<pid>/task/*/schedstat``),
and the cores used by processes other than the benchmark (``/proc/stat`` busy time less the
benchmark's), with the busiest such processes per repeat.

    python benchmarks/distributed.py --quick --json out/bench/distributed.json
"""

from __future__ import annotations

import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
sys.path.insert(0, _HERE)
sys.path.append(_ROOT)  # a checkout without `pip install -e .`

import _common as C  # noqa: E402

D, BATCH, HIDDEN, LR = 784, 128, (512, 512, 512), 1e-4
METHODS = ("ssm_vr", "fd_ssm")
BACKENDS = ("torch", "jax")
TARGET = 0.85
N_BATCHES = 4  # distinct batches per worker, cycled
XLA_THREAD_FLAGS = "--xla_cpu_multi_thread_eigen=false"
_TCK = os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------------------------
# /proc: CPU time, run-queue wait, other processes
# ---------------------------------------------------------------------------------------


def _threads_sched(pid: int | str = "self") -> tuple[float, float]:
    """(seconds on a CPU, seconds waiting on a run queue) summed over the threads of ``pid``
    (threads that exited are not counted)."""
    run = wait = 0
    base = f"/proc/{pid}/task"
    for tid in os.listdir(base):
        try:
            with open(f"{base}/{tid}/schedstat") as f:
                a = f.read().split()
        except OSError:
            continue
        run += int(a[0])
        wait += int(a[1])
    return run / 1e9, wait / 1e9


def _thread_names(pid: int | str = "self") -> dict[str, int]:
    out: dict[str, int] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                name = f.read().strip()
        except OSError:
            continue
        out[name] = out.get(name, 0) + 1
    return out


def _system_busy_s() -> float:
    """CPU seconds spent busy by the whole machine (all CPUs) since boot."""
    with open("/proc/stat") as f:
        v = [int(t) for t in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal guest guest_nice (guest is in user)
    return (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / _TCK


def _proc_cpu_s(pid: int) -> float:
    """user + system CPU seconds of process ``pid`` (all its threads), 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TCK


def _all_procs_cpu() -> dict[int, tuple[float, str]]:
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                s = f.read()
        except OSError:
            continue
        comm = s[s.find("(") + 1 : s.rfind(")")]
        fields = s.rsplit(")", 1)[1].split()
        out[int(name)] = ((int(fields[11]) + int(fields[12])) / _TCK, comm)
    return out


def _cmdline(pid: int, limit: int = 90) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()[:limit]
    except OSError:
        return ""


def _busiest_others(before: dict, after: dict, ours: set, wall: float, top: int = 3) -> list[dict]:
    rows = []
    for pid, (cpu, comm) in after.items():
        if pid in ours:
            continue
        d = cpu - before.get(pid, (0.0, comm))[0]
        if d > 0:
            rows.append((d, pid, comm))
    rows.sort(reverse=True)
    return [{"pid": p, "comm": c, "cores": d / wall, "cmdline": _cmdline(p)} for d, p, c in rows[:top]]


def _sample_stats(rows: list[dict]) -> dict:
    """Per-sample load figures summed over a group's workers (one dict per worker)."""
    wall = max(r["wall"] for r in rows)
    return {
        "wall": wall,
        "cpu_per_wall": sum(r["cpu"] for r in rows) / wall,
        "runq_wait_per_wall": sum(r["wait"] for r in rows) / wall,
        "loss": rows[0].get("loss"),
    }


# ---------------------------------------------------------------------------------------
# torch workers
# ---------------------------------------------------------------------------------------


def _torch_worker(rank, world_size, init_file, seed, methods, warmup, unused, cmd_queues, result_queue):
    import contextlib

    import torch

    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    import torch.distributed as dist
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel as DDP

    from ppl_score.torch import score_matching_loss
    from ppl_score.torch.nets import MLPEnergy

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    torch.manual_seed(seed)
    model = MLPEnergy(D, HIDDEN)
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    if last.bias is None:
        bias_note = "MLPEnergy has no output bias (the library change is in the checkout); nothing removed, find_unused_parameters=False"
    elif unused == "drop-bias":
        last.bias = None  # F.linear without bias; every parameter left gets a gradient
        bias_note = "output bias removed by the benchmark (last nn.Linear.bias = None), find_unused_parameters=False"
    else:
        bias_note = "output bias kept, find_unused_parameters=True"
    ddp = DDP(model, find_unused_parameters=(unused == "find-unused" and last.bias is not None))
    opt = torch.optim.Adam(ddp.parameters(), lr=LR)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + 7919 * (rank + 1))  # per rank
    data_gen = torch.Generator().manual_seed(seed * 1_000_003 + rank)
    xs = [torch.randn(BATCH, D, generator=data_gen) for _ in range(N_BATCHES)]
    numel = sum(p.numel() for p in ddp.parameters())

    one = torch.zeros(1)

    def step(method, i, mode="sync"):
        """``sync``: DDP; ``nosync``: no communication (``ddp.no_sync()``); ``synconly``: no
        gradient all-reduce, but a 1-element all-reduce per step (the ranks still meet)."""
        opt.zero_grad(set_to_none=True)
        with contextlib.nullcontext() if mode == "sync" else ddp.no_sync():
            loss = score_matching_loss(ddp, xs[i % N_BATCHES], method, generator=gen)
            loss.backward()
        if mode == "synconly":
            dist.all_reduce(one)
        opt.step()
        return loss

    def resync():  # after no_sync: every rank back to rank 0's parameters and Adam state
        with torch.no_grad():
            for p in ddp.parameters():
                dist.broadcast(p, 0)
                for t in opt.state[p].values():
                    if torch.is_tensor(t):
                        dist.broadcast(t, 0)

    def checksum():
        with torch.no_grad():
            c = torch.stack([p.double().sum() for p in ddp.parameters()]).sum().reshape(1)
        gathered = [torch.zeros_like(c) for _ in range(world_size)]
        dist.all_gather(gathered, c)
        return [float(g) for g in gathered]

    try:
        t0 = time.perf_counter()
        loss = None
        for method in methods:
            for i in range(warmup):
                loss = step(method, i)
        sums = checksum()
        if any(s != sums[0] for s in sums) or not torch.isfinite(loss):
            raise RuntimeError(f"ranks disagree after the warm-up (parameter sums {sums}) or loss {loss}")
        result_queue.put(
            (
                rank,
                {
                    "ready": True,
                    "pid": os.getpid(),
                    "warmup_s": time.perf_counter() - t0,
                    "bias": bias_note,
                    "numel": numel,
                    "torch_threads": torch.get_num_threads(),
                    "threads": _thread_names(),
                },
            )
        )
        while True:
            cmd = cmd_queues[rank].get()
            if cmd["cmd"] == "stop":
                break
            if cmd["cmd"] == "allreduce":
                buf = torch.zeros(numel)
                times = []
                for _ in range(cmd["reps"]):
                    dist.barrier()
                    t = time.perf_counter()
                    dist.all_reduce(buf)
                    times.append(time.perf_counter() - t)
                result_queue.put((rank, {"allreduce_s": statistics.median(times)}))
                continue
            mode = cmd["mode"]
            dist.barrier()
            run0, wait0 = _threads_sched()
            t = time.perf_counter()
            for i in range(cmd["steps"]):
                loss = step(cmd["method"], i, mode)
            dist.barrier()
            wall = time.perf_counter() - t
            run1, wait1 = _threads_sched()
            if mode != "sync":
                resync()
            result_queue.put(
                (rank, {"wall": wall, "cpu": run1 - run0, "wait": wait1 - wait0, "loss": float(loss.detach())})
            )
    except BaseException as e:  # noqa: BLE001 - report to the driver, then exit
        result_queue.put((rank, {"error": f"{type(e).__name__}: {e}"}))
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


class TorchGroup:
    """A DDP process group of ``world_size`` spawned workers, driven by command queues."""

    backend = "torch"

    def __init__(self, world_size, seed, methods, warmup, unused):
        import torch.multiprocessing as mp

        self.world_size = world_size
        self._dir = tempfile.mkdtemp(prefix=f"ddp{world_size}_")
        ctx = mp.get_context("spawn")
        self._cmds = [ctx.Queue() for _ in range(world_size)]
        self._results = ctx.Queue()
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        self._ctx = mp.spawn(
            _torch_worker,
            args=(
                world_size,
                os.path.join(self._dir, "init"),
                seed,
                list(methods),
                warmup,
                unused,
                self._cmds,
                self._results,
            ),
            nprocs=world_size,
            join=False,
        )
        self.info: dict = {}

    @property
    def pids(self):
        return [p.pid for p in self._ctx.processes]

    def _collect(self, timeout=900.0):
        import queue

        out, deadline = {}, time.time() + timeout
        while len(out) < self.world_size:
            try:
                rank, res = self._results.get(timeout=1.0)
            except queue.Empty:
                if any(not p.is_alive() for p in self._ctx.processes) or time.time() > deadline:
                    raise RuntimeError(f"torch worker group {self.world_size} died or hung") from None
                continue
            if "error" in res:
                raise RuntimeError(f"torch worker {rank}/{self.world_size}: {res['error']}")
            out[rank] = res
        return [out[r] for r in range(self.world_size)]

    def wait_ready(self):
        res = self._collect()
        self.info = {
            "workers": self.world_size,
            "warmup_s": max(r["warmup_s"] for r in res),
            "bias": res[0]["bias"],
            "numel": res[0]["numel"],
            "torch_threads": res[0]["torch_threads"],
            "threads_per_worker": res[0]["threads"],
        }

    def _send(self, cmd):
        for q in self._cmds:
            q.put(cmd)

    def run(self, method, steps, mode="sync"):
        self._send({"cmd": "run", "method": method, "steps": steps, "mode": mode})
        return _sample_stats(self._collect())

    def allreduce(self, reps):
        self._send({"cmd": "allreduce", "reps": reps})
        return max(r["allreduce_s"] for r in self._collect())

    def stop(self):
        self._send({"cmd": "stop"})
        for p in self._ctx.processes:
            p.join(timeout=30)


# ---------------------------------------------------------------------------------------
# JAX workers
# ---------------------------------------------------------------------------------------


def _jax_worker(n: int, seed: int, methods: list, warmup: int, pool: str) -> None:
    """Runs in its own process (``--_jax-worker N``): a mesh of ``n`` CPU devices; commands
    as JSON lines on stdin, results as JSON lines on stdout."""
    cpus = sorted(os.sched_getaffinity(0))
    if pool == "one-per-device" and n < len(cpus):
        os.sched_setaffinity(0, set(cpus[:n]))  # the client sizes its intra-op pool from this
    import jax

    jax.devices()  # create the CPU client (and its thread pool) now
    if pool == "one-per-device":
        for tid in os.listdir("/proc/self/task"):  # then let every thread run on every CPU
            try:
                os.sched_setaffinity(int(tid), set(cpus))
            except OSError:
                pass
    import numpy as np
    import optax
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from ppl_score.jax import score_matching_loss
    from ppl_score.jax.nets import energy_apply, energy_init

    out = sys.stdout
    sys.stdout = sys.stderr  # keep stray prints off the result channel

    def reply(obj):
        out.write(json.dumps(obj) + "\n")
        out.flush()

    devices = jax.devices()
    if len(devices) != n:
        raise RuntimeError(f"asked for {n} CPU devices, got {len(devices)} (XLA_FLAGS={os.environ.get('XLA_FLAGS')!r})")
    mesh = Mesh(np.array(devices), ("data",))
    repl, shard = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    opt = optax.adam(LR)
    k_init, k_data, k_run = jax.random.split(jax.random.PRNGKey(seed), 3)
    params = jax.device_put(energy_init(k_init, D, HIDDEN), repl)
    state = {"p": params, "s": jax.device_put(opt.init(params), repl), "k": jax.device_put(k_run, repl)}
    xs_host = [np.asarray(jax.random.normal(k, (n * BATCH, D))) for k in jax.random.split(k_data, N_BATCHES)]
    xs = [jax.device_put(x, shard) for x in xs_host]

    def make_loss(method):
        def loss_fn(p, x, key):
            return score_matching_loss(lambda y: energy_apply(p, y), x, method, key=key)

        return loss_fn

    def make_step(method):
        loss_fn = make_loss(method)

        def step(p, s, key, x):
            key, sub = jax.random.split(key)
            loss, g = jax.value_and_grad(loss_fn)(p, x, sub)
            updates, s = opt.update(g, s, p)
            return optax.apply_updates(p, updates), s, key, loss

        return step

    raw = {m: make_step(m) for m in methods}
    steps = {
        m: jax.jit(f, in_shardings=(repl, repl, repl, shard), out_shardings=repl, donate_argnums=(0, 1))
        for m, f in raw.items()
    }
    hlo_allreduce = {}
    t0 = time.perf_counter()
    loss = None
    for m in methods:
        hlo = steps[m].lower(state["p"], state["s"], state["k"], xs[0]).compile().as_text()
        hlo_allreduce[m] = "all-reduce" in hlo
        for i in range(warmup):
            state["p"], state["s"], state["k"], loss = steps[m](state["p"], state["s"], state["k"], xs[i % N_BATCHES])
        loss.block_until_ready()
    if not np.isfinite(float(loss)) or state["p"][0][0].sharding != repl:
        raise RuntimeError(f"loss {loss} or parameters not replicated ({state['p'][0][0].sharding})")

    def make_shard_map_step(method, reduce_grads):
        """The step as a ``shard_map`` over the mesh: each device's loss on its rows (its own
        draws), then ``pmean`` of every gradient leaf (``reduce_grads``) or of the loss only
        (the devices still meet once per step; parameters then drift apart, which does not
        change the work)."""
        loss_fn_m = make_loss(method)

        def local_step(p, s, key, x):
            key, sub = jax.random.split(key)
            sub = jax.random.fold_in(sub, jax.lax.axis_index("data"))
            loss, g = jax.value_and_grad(loss_fn_m)(p, x, sub)
            if reduce_grads:
                g = jax.tree_util.tree_map(lambda t: jax.lax.pmean(t, "data"), g)
            loss = jax.lax.pmean(loss, "data")
            updates, s = opt.update(g, s, p)
            return optax.apply_updates(p, updates), s, key, loss

        f = jax.shard_map(
            local_step, mesh=mesh, in_specs=(P(), P(), P(), P("data")), out_specs=(P(), P(), P(), P()), check_vma=False
        )
        return jax.jit(f, donate_argnums=(0, 1))

    # diagnostics: the same step on each device alone (no all-reduce), the shard_map steps
    # (each with its own copy of the state), and the all-reduce alone
    local, local_steps, allreduce, sm_steps, sm_state = [], {}, None, {}, {}
    numel = sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(params))
    if n > 1:
        local_steps = {m: jax.jit(f, donate_argnums=(0, 1)) for m, f in raw.items()}
        host_p = jax.device_get(state["p"])
        for d, dev in enumerate(devices):
            p_d = jax.device_put(host_p, dev)
            local.append(
                {
                    "p": p_d,
                    "s": jax.device_put(opt.init(p_d), dev),
                    "k": jax.device_put(jax.random.fold_in(k_run, d), dev),
                    "xs": [jax.device_put(x[d * BATCH : (d + 1) * BATCH], dev) for x in xs_host],
                }
            )
        for m in methods:
            for _ in range(2):
                for st in local:
                    st["p"], st["s"], st["k"], loss = local_steps[m](st["p"], st["s"], st["k"], st["xs"][0])
            jax.block_until_ready([st["p"] for st in local])
        for mode in ("shardmap", "synconly"):
            sm_steps[mode] = {m: make_shard_map_step(m, mode == "shardmap") for m in methods}
            sm_state[mode] = {
                "p": jax.device_put(host_p, repl),
                "s": jax.device_put(opt.init(host_p), repl),
                "k": jax.device_put(k_run, repl),
            }
            st = sm_state[mode]
            for m in methods:
                for i in range(2):
                    st["p"], st["s"], st["k"], loss = sm_steps[mode][m](st["p"], st["s"], st["k"], xs[i])
                loss.block_until_ready()
        grads = jax.device_put(np.zeros((n, numel), np.float32), NamedSharding(mesh, P("data", None)))
        allreduce = jax.jit(lambda g: g.sum(0), out_shardings=repl)
        allreduce(grads).block_until_ready()
    reply(
        {
            "ready": True,
            "pid": os.getpid(),
            "warmup_s": time.perf_counter() - t0,
            "devices": n,
            "numel": numel,
            "xla_flags": os.environ.get("XLA_FLAGS"),
            "pool": pool,
            "threads": _thread_names(),
            "hlo_has_all_reduce": hlo_allreduce,
        }
    )

    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "stop":
            break
        if cmd["cmd"] == "allreduce":
            times = []
            for _ in range(cmd["reps"]):
                t = time.perf_counter()
                allreduce(grads).block_until_ready()
                times.append(time.perf_counter() - t)
            reply({"allreduce_s": statistics.median(times)})
            continue
        m, nsteps = cmd["method"], cmd["steps"]
        run0, wait0 = _threads_sched()
        t = time.perf_counter()
        if cmd["mode"] == "sync":
            f = steps[m]
            for i in range(nsteps):
                state["p"], state["s"], state["k"], loss = f(state["p"], state["s"], state["k"], xs[i % N_BATCHES])
            loss.block_until_ready()
        elif cmd["mode"] in sm_steps:
            f, st = sm_steps[cmd["mode"]][m], sm_state[cmd["mode"]]
            for i in range(nsteps):
                st["p"], st["s"], st["k"], loss = f(st["p"], st["s"], st["k"], xs[i % N_BATCHES])
            loss.block_until_ready()
        else:
            f = local_steps[m]
            for i in range(nsteps):
                for st in local:  # dispatched asynchronously: the devices run side by side
                    st["p"], st["s"], st["k"], loss = f(st["p"], st["s"], st["k"], st["xs"][i % N_BATCHES])
            jax.block_until_ready([st["p"] for st in local])
        wall = time.perf_counter() - t
        run1, wait1 = _threads_sched()
        reply({"wall": wall, "cpu": run1 - run0, "wait": wait1 - wait0, "loss": float(loss)})


class JaxGroup:
    """A JAX subprocess with ``n`` forced CPU devices, driven over stdin/stdout."""

    backend = "jax"

    def __init__(self, n, seed, methods, warmup, pool):
        self.world_size = n
        self.xla_flags = f"--xla_force_host_platform_device_count={n} {XLA_THREAD_FLAGS}"
        env = {**os.environ, "XLA_FLAGS": self.xla_flags, "OMP_NUM_THREADS": "1"}
        env.pop("JAX_NUM_CPU_DEVICES", None)
        self._err = tempfile.TemporaryFile(mode="w+")
        cfg = json.dumps({"n": n, "seed": seed, "methods": list(methods), "warmup": warmup, "pool": pool})
        self._proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--_jax-worker", cfg],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._err,
            text=True,
            env=env,
        )
        self.info: dict = {}

    @property
    def pids(self):
        return [self._proc.pid]

    def _read(self):
        line = self._proc.stdout.readline()
        if not line:
            self._proc.wait(timeout=30)
            self._err.seek(0)
            raise RuntimeError(
                f"JAX worker ({self.world_size} devices) exited {self._proc.returncode}:\n{self._err.read()[-3000:]}"
            )
        return json.loads(line)

    def _send(self, cmd):
        self._proc.stdin.write(json.dumps(cmd) + "\n")
        self._proc.stdin.flush()

    def wait_ready(self):
        r = self._read()
        self.info = {
            "workers": self.world_size,
            "warmup_s": r["warmup_s"],
            "numel": r["numel"],
            "xla_flags": r["xla_flags"],
            "pool": r["pool"],
            "threads_per_worker": r["threads"],
            "hlo_has_all_reduce": r["hlo_has_all_reduce"],
        }

    def run(self, method, steps, mode="sync"):
        self._send({"cmd": "run", "method": method, "steps": steps, "mode": mode})
        return _sample_stats([self._read()])

    def allreduce(self, reps):
        self._send({"cmd": "allreduce", "reps": reps})
        return self._read()["allreduce_s"]

    def stop(self):
        try:
            self._send({"cmd": "stop"})
            self._proc.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            self._proc.kill()


# ---------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------


def _median(xs):
    return statistics.median(xs) if xs else float("nan")


def _iqr_rel(xs):
    if len(xs) < 4:
        return 0.0
    q1, med, q3 = statistics.quantiles(xs, n=4)[0], statistics.median(xs), statistics.quantiles(xs, n=4)[2]
    return (q3 - q1) / med


# Diagnostic variants of the 2-worker group, per backend: mode -> what it leaves out.
DIAGNOSTICS = {
    "torch": ("nosync", "synconly"),
    "jax": ("nosync", "synconly", "shardmap"),
}
MODE_TEXT = {
    "sync": "data parallel as specified",
    "nosync": "no communication at all",
    "synconly": "no gradient all-reduce, a 1-element all-reduce per step",
    "shardmap": "JAX shard_map step, pmean of each gradient leaf",
}


def _variants(backend: str, diagnostics: bool) -> list[tuple[int, str]]:
    return [(1, "sync"), (2, "sync")] + ([(2, d) for d in DIAGNOSTICS[backend]] if diagnostics else [])


def measure(groups: dict, backends, methods, steps, repeats, seed, diagnostics, allreduce_reps):
    """Round-robin over (backend, method) in a fresh random order per repeat; inside each, the
    1-worker and 2-worker samples (and the 2-worker diagnostics) back to back, shuffled."""
    ours = {os.getpid()} | {pid for g in groups.values() for pid in g.pids}
    samples = {(b, m, w, v): [] for b in backends for m in methods for w, v in _variants(b, diagnostics)}
    allreduce = {b: [] for b in backends}
    contention = []
    units = [(b, m) for b in backends for m in methods]
    rng = random.Random(seed)
    for r in range(repeats):
        rng.shuffle(units)
        procs0, busy0, t_rep = _all_procs_cpu(), _system_busy_s(), time.perf_counter()
        for b, m in units:
            order = _variants(b, diagnostics)
            rng.shuffle(order)
            for w, v in order:
                g = groups[(b, w)]
                ours_cpu0 = sum(_proc_cpu_s(p) for p in ours)
                sys0, t0 = _system_busy_s(), time.perf_counter()
                s = g.run(m, steps, v)
                wall = time.perf_counter() - t0
                others = (_system_busy_s() - sys0) - (sum(_proc_cpu_s(p) for p in ours) - ours_cpu0)
                s.update(
                    {
                        "repeat": r,
                        "examples_per_s": g.world_size * BATCH * steps / s["wall"],
                        "others_cores": max(0.0, others / wall),
                    }
                )
                samples[(b, m, w, v)].append(s)
        if diagnostics:
            for b in backends:
                allreduce[b].append(groups[(b, 2)].allreduce(allreduce_reps))
        wall_rep = time.perf_counter() - t_rep
        procs1 = _all_procs_cpu()
        ours_rep = sum(procs1.get(p, (0.0, ""))[0] - procs0.get(p, (0.0, ""))[0] for p in ours)
        contention.append(
            {
                "repeat": r,
                "wall_s": wall_rep,
                "loadavg": list(os.getloadavg()),
                "others_cores": max(0.0, (_system_busy_s() - busy0 - ours_rep) / wall_rep),
                "busiest_others": _busiest_others(procs0, procs1, ours, wall_rep),
            }
        )
        print(
            f"repeat {r + 1}/{repeats}: {wall_rep:.1f} s, other processes used "
            f"{contention[-1]['others_cores']:.2f} cores, load {contention[-1]['loadavg'][0]:.2f}",
            file=sys.stderr,
            flush=True,
        )
    return samples, allreduce, contention


def _detail(b, m, w, v, ss, steps):
    thr = [s["examples_per_s"] for s in ss]
    return {
        "backend": b,
        "method": m,
        "workers": w,
        "mode": v,
        "examples_per_s": _median(thr),
        "ms_per_step": 1e3 * _median([s["wall"] / steps for s in ss]),
        "iqr_rel": _iqr_rel(thr),
        "cpu_per_wall": _median([s["cpu_per_wall"] for s in ss]),
        "runq_wait_ms_per_step": 1e3 * _median([s["runq_wait_per_wall"] * s["wall"] / steps for s in ss]),
        "others_cores": _median([s["others_cores"] for s in ss]),
        "samples_examples_per_s": thr,
        "samples_others_cores": [s["others_cores"] for s in ss],
    }


def summarize(samples, allreduce, backends, methods, steps, diagnostics):
    """Rows (median examples/s per variant), efficiencies and the diagnostics' breakdown."""
    details, effs, diags = [], [], []
    for b in backends:
        for m in methods:
            thr = {}
            for w, v in _variants(b, diagnostics):
                details.append(_detail(b, m, w, v, samples[(b, m, w, v)], steps))
                thr[(w, v)] = details[-1]["samples_examples_per_s"]
            one = thr[(1, "sync")]
            paired = [t2 / (2 * t1) for t1, t2 in zip(one, thr[(2, "sync")])]
            effs.append(
                {
                    "backend": b,
                    "method": m,
                    "efficiency": _median(thr[(2, "sync")]) / (2 * _median(one)),
                    "efficiency_paired_median": _median(paired),
                    "efficiency_paired_min": min(paired),
                    "efficiency_paired_max": max(paired),
                    "efficiency_paired": paired,
                }
            )
            effs[-1]["meets_target"] = effs[-1]["efficiency"] >= TARGET
            if not diagnostics:
                continue
            d = {"backend": b, "method": m, "allreduce_alone_ms": 1e3 * _median(allreduce[b])}
            step2_ms = 1e3 * 2 * BATCH / _median(thr[(2, "sync")])
            d["allreduce_alone_share_of_2w_step"] = d["allreduce_alone_ms"] / step2_ms
            for v in DIAGNOSTICS[b]:
                d[f"efficiency_{v}"] = _median(thr[(2, v)]) / (2 * _median(one))
                d[f"efficiency_{v}_paired"] = _median([x / (2 * t1) for t1, x in zip(one, thr[(2, v)])])
            # where the 2-worker time goes, ms per step: no communication -> + meeting once a step
            # -> + the gradient all-reduce
            ms = {v: 1e3 * 2 * BATCH / _median(thr[(2, v)]) for v in ("sync", *DIAGNOSTICS[b])}
            d["ms_per_step_2w"] = ms
            d["ms_per_step_1w"] = 1e3 * BATCH / _median(one)
            d["ms_meeting_once_per_step"] = ms["synconly"] - ms["nosync"]
            d["ms_gradient_allreduce"] = ms["sync"] - ms["synconly"]
            diags.append(d)
    return details, effs, diags


def print_tables(details, effs, diags):
    by = {(r["backend"], r["method"], r["workers"], r["mode"]): r for r in details}
    headers = [
        "backend",
        "method",
        "1 worker ex/s",
        "2 workers ex/s",
        "efficiency",
        "paired (min-max)",
        "CPU/wall 1w, 2w",
        "run-queue wait ms/step 1w, 2w",
        "other cores 1w, 2w",
    ]
    table = []
    for e in effs:
        r1, r2 = by[(e["backend"], e["method"], 1, "sync")], by[(e["backend"], e["method"], 2, "sync")]
        table.append(
            [
                e["backend"],
                e["method"],
                C.fmt(r1["examples_per_s"], ".0f"),
                C.fmt(r2["examples_per_s"], ".0f"),
                C.fmt(e["efficiency"]),
                f"{e['efficiency_paired_median']:.2f} ({e['efficiency_paired_min']:.2f}-{e['efficiency_paired_max']:.2f})",
                f"{r1['cpu_per_wall']:.2f}, {r2['cpu_per_wall']:.2f}",
                f"{r1['runq_wait_ms_per_step']:.1f}, {r2['runq_wait_ms_per_step']:.1f}",
                f"{r1['others_cores']:.2f}, {r2['others_cores']:.2f}",
            ]
        )
    print(C.markdown_table(headers, table))
    if not diags:
        return
    print()
    headers = [
        "backend",
        "method",
        "ms/step 1w",
        "2w ms/step: no comm.",
        "meet once a step",
        "as specified",
        "shard_map",
        "eff. no comm.",
        "eff. meet only",
        "eff. shard_map",
        "all-reduce alone ms",
    ]
    table = []
    for d in diags:
        ms = d["ms_per_step_2w"]
        table.append(
            [
                d["backend"],
                d["method"],
                C.fmt(d["ms_per_step_1w"], ".1f"),
                C.fmt(ms["nosync"], ".1f"),
                C.fmt(ms["synconly"], ".1f"),
                C.fmt(ms["sync"], ".1f"),
                C.fmt(ms.get("shardmap"), ".1f"),
                C.fmt(d["efficiency_nosync"]),
                C.fmt(d["efficiency_synconly"]),
                C.fmt(d.get("efficiency_shardmap")),
                C.fmt(d["allreduce_alone_ms"], ".1f"),
            ]
        )
    print(C.markdown_table(headers, table))


def checkout_state() -> dict:
    """HEAD and the library files that differ from it (the benchmark runs the checkout)."""
    head = subprocess.run(["git", "-C", _ROOT, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    status = subprocess.run(
        ["git", "-C", _ROOT, "status", "--porcelain", "--", "ppl_score"], capture_output=True, text=True
    ).stdout
    return {"head": head, "modified_library_files": [ln[3:] for ln in status.splitlines() if ln.strip()]}


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--_jax-worker"]:
        cfg = json.loads(argv[1])
        _jax_worker(cfg["n"], cfg["seed"], cfg["methods"], cfg["warmup"], cfg["pool"])
        return
    p = C.make_parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=None, help="timed steps per sample (default 6 quick, 30 full)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per method first (default 2 quick, 5 full)")
    p.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument(
        "--torch-unused",
        choices=["drop-bias", "find-unused"],
        default="drop-bias",
        help="MLPEnergy's output bias gets no gradient: remove it (default) or keep it with find_unused_parameters=True",
    )
    p.add_argument(
        "--jax-pool",
        choices=["one-per-device", "default"],
        default="one-per-device",
        help="XLA:CPU intra-op pool of one thread per device (default) or XLA's own size (max(CPUs, devices))",
    )
    p.add_argument("--no-diagnostics", action="store_true", help="skip the no-all-reduce and all-reduce-alone timings")
    args = p.parse_args(argv)
    repeats = args.repeats or (3 if args.quick else 15)
    steps = args.steps or (6 if args.quick else 30)
    warmup = args.warmup or (2 if args.quick else 5)
    diagnostics = not args.no_diagnostics
    meta = {**C.environment_meta(), "checkout": checkout_state()}

    groups = {}
    t_start = time.perf_counter()
    try:
        for n in (1, 2):
            if "torch" in args.backends:
                groups[("torch", n)] = TorchGroup(n, args.seed, args.methods, warmup, args.torch_unused)
            if "jax" in args.backends:
                groups[("jax", n)] = JaxGroup(n, args.seed, args.methods, warmup, args.jax_pool)
        for g in groups.values():
            g.wait_ready()
        print(f"workers ready after {time.perf_counter() - t_start:.1f} s", file=sys.stderr, flush=True)
        t_measure = time.perf_counter()
        samples, allreduce, contention = measure(
            groups, args.backends, args.methods, steps, repeats, args.seed, diagnostics, 5 if args.quick else 20
        )
        measure_s = time.perf_counter() - t_measure
    finally:
        for g in groups.values():
            g.stop()

    details, effs, diags = summarize(samples, allreduce, args.backends, args.methods, steps, diagnostics)
    print_tables(details, effs, diags)
    for e in effs:
        flag = "meets" if e["meets_target"] else "BELOW"
        print(f"{e['backend']} {e['method']}: efficiency {e['efficiency']:.2f} ({flag} the {TARGET} target)")

    info = {f"{b}_{n}": g.info for (b, n), g in groups.items()}
    torch_bias = next((g.info["bias"] for (b, _), g in groups.items() if b == "torch"), None)
    meta.update(
        {
            "quick": args.quick,
            "repeats": repeats,
            "steps_per_sample": steps,
            "warmup_steps_per_method": warmup,
            "D": D,
            "batch_per_worker": BATCH,
            "hidden": list(HIDDEN),
            "lr": LR,
            "target_efficiency": TARGET,
            "measure_s": measure_s,
            "total_s": time.perf_counter() - t_start,
            "loadavg_end": list(os.getloadavg()),
            "workers": info,
            "notes": {
                "torch": (
                    "torch.multiprocessing spawn, gloo, file:// init, DistributedDataParallel, "
                    "torch.set_num_threads(1) and set_num_interop_threads(1) per worker, "
                    "score_matching_loss(ddp, x, method, generator=per-rank generator), loss.backward(), Adam; "
                    f"1 worker = the same code with world_size 1. Output bias: {torch_bias}."
                ),
                "jax": (
                    f"XLA_FLAGS='--xla_force_host_platform_device_count=N {XLA_THREAD_FLAGS}' (set by the benchmark); "
                    "intra_op_parallelism_threads=1 is not an XLA flag: XLA stops parsing XLA_FLAGS at the first word "
                    "without '--' and ignores the flags after it. --xla_cpu_multi_thread_eigen=false keeps Eigen "
                    "single-threaded, but XLA:CPU runs programs on an intra-op pool of max(CPUs, devices) threads "
                    "(tf_XLAEigen); with --jax-pool one-per-device (used unless stated) each worker process is pinned "
                    "to N CPUs while its client is created (a pool of N threads) and then unpinned. 1-D mesh, batch "
                    "NamedSharding(mesh, P('data')), params and Adam state replicated, jit(value_and_grad + optax.adam), "
                    "donated buffers; 1 worker = a 1-device mesh in its own process."
                ),
                "timing": (
                    "medians over repeats of N-step samples; each repeat visits (backend, method) in a random order and "
                    "times the 1- and 2-worker groups back to back; efficiency = median(2w) / (2 x median(1w)); paired "
                    "= per-repeat 2w / (2 x 1w). cpu_per_wall: CPU seconds of the group's workers per wall second "
                    "(all threads); runq_wait: time the workers' threads waited for a CPU; others_cores: cores used by "
                    "processes outside the benchmark during the sample (/proc/stat busy less ours)."
                ),
                "diagnostics": (
                    "rows_detail modes of the 2-worker group: nosync = no communication (torch ddp.no_sync(); JAX the "
                    "step jitted for one device and run on each device, dispatched asynchronously); synconly = no "
                    "gradient all-reduce but a 1-element all-reduce per step (torch no_sync + dist.all_reduce; JAX "
                    "shard_map with pmean of the loss only); shardmap (JAX) = the step as a shard_map with pmean of "
                    "each gradient leaf. ms_meeting_once_per_step = synconly - nosync, ms_gradient_allreduce = sync - "
                    "synconly (2-worker ms per step). allreduce_alone: one all-reduce of a flat float32 tensor of the "
                    "gradients' size between the 2 workers (median of reps per repeat, median over repeats)."
                ),
            },
        }
    )
    C.write_json_object(
        args.json,
        {
            "rows": [
                {k: r[k] for k in ("backend", "method", "workers", "examples_per_s")}
                for r in details
                if r["mode"] == "sync"
            ],
            "efficiency": effs,
            "rows_detail": details,
            "diagnostics": diags,
            "allreduce_alone_s": allreduce,
            "contention": contention,
            "meta": meta,
        },
    )


if __name__ == "__main__":
    main()
