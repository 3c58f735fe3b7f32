"""Helpers shared by the benchmark scripts: command line, interleaved timing, peak memory,
JSON output and markdown tables.

Timing: every variant of a comparison runs in the same process, round-robin within each
repeat (a fresh seeded order per repeat, so no variant always follows the same neighbour),
and we report medians. A sample repeats a fast call ``inner`` times so that it lasts at least
``min_sample_s`` (timer resolution and per-call jitter), and is divided back to one call.

Peak memory: ``maxrss_bytes`` reads the peak resident set size, a high-water mark that never
goes down, so each measurement runs in a fresh subprocess (``run_worker``).

This module imports neither torch nor JAX.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from typing import Callable, Hashable, Iterable, Mapping, Sequence

MB = 2.0**20


def make_parser(description: str) -> argparse.ArgumentParser:
    """``--quick`` (small sizes, few repeats: a smoke run), ``--json PATH``, ``--repeats N``
    (override the mode's default) and ``--seed``. Scripts add their own options."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="small sizes and few repeats (a smoke run, minutes)")
    p.add_argument("--json", metavar="PATH", help="write {'rows': [...], 'meta': {...}} to PATH")
    p.add_argument("--repeats", type=int, default=None, help="timed samples per variant (default: by mode)")
    p.add_argument("--seed", type=int, default=0)
    return p


@dataclass
class Timing:
    """Per-call seconds of each sample (``samples``), each the mean over ``inner`` calls."""

    samples: list[float] = field(default_factory=list)
    inner: int = 1
    skipped: str | None = None  # why it was not timed (its warm-up call was too slow)

    @property
    def median(self) -> float:
        return statistics.median(self.samples) if self.samples else math.nan

    @property
    def spread(self) -> float:
        """Interquartile range over the median (0 when fewer than 4 samples)."""
        if len(self.samples) < 4:
            return 0.0
        q1, _, q3 = statistics.quantiles(self.samples, n=4)
        return (q3 - q1) / self.median


def time_call(fn: Callable[[], object], inner: int = 1) -> float:
    """Seconds per call of ``fn`` (which must block until its result is ready)."""
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) / inner


def interleaved_timings(
    fns: Mapping[Hashable, Callable[[], object]],
    repeats: int,
    *,
    warmup: int = 1,
    min_sample_s: float = 0.02,
    max_call_s: float | Mapping[Hashable, float] | None = None,
    seed: int = 0,
    adjacent: Iterable[Sequence[Hashable]] = (),
) -> dict[Hashable, Timing]:
    """Time every ``fns[name]()`` ``repeats`` times, round-robin over the variants in each
    repeat (a seeded random order per repeat). ``fn`` must block until its work is done
    (``block_until_ready`` in JAX). Warm-up calls also calibrate ``inner``; a variant whose
    first call takes longer than ``max_call_s`` (one limit for all, or a limit per name) is
    not timed (``Timing.skipped`` says why).

    ``adjacent``: groups of names always timed back to back (in a random order inside the
    group, the groups shuffled with the rest), so that sample ``i`` of each member is taken
    under the same load and their per-repeat ratios are tight on a busy machine."""
    out: dict[Hashable, Timing] = {}
    for name, fn in fns.items():
        t = time_call(fn)
        limit = max_call_s.get(name) if isinstance(max_call_s, Mapping) else max_call_s
        if limit is not None and t > limit:
            out[name] = Timing(skipped=f"one call took {t:.1f} s > {limit:g} s limit")
            continue
        for _ in range(warmup - 1):
            t = time_call(fn)
        out[name] = Timing(inner=max(1, math.ceil(min_sample_s / max(t, 1e-9))))
    rng = random.Random(seed)
    timed = [n for n in fns if out[n].skipped is None]
    units, grouped = [], set()
    for group in adjacent:
        members = [n for n in group if n in timed and n not in grouped]
        if members:
            units.append(members)
            grouped.update(members)
    units += [[n] for n in timed if n not in grouped]
    for _ in range(repeats):
        rng.shuffle(units)
        for unit in units:
            rng.shuffle(unit)
            for name in unit:
                out[name].samples.append(time_call(fns[name], out[name].inner))
    return out


def maxrss_bytes() -> int:
    """Peak resident set size of this process so far.

    Linux: ``VmHWM`` of ``/proc/self/status``, the high-water mark of this process image.
    (``ru_maxrss`` is not usable there: ``execve`` carries over the RSS the parent had when it
    forked, so a small child reports a big parent's peak.) Elsewhere ``ru_maxrss`` (bytes on
    macOS, KiB otherwise).
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if sys.platform == "darwin" else r * 1024)


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2 (C++ logging that Python's ``sys.stderr`` does not see)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def torch_peak_bytes(fn: Callable[[], object]) -> int:
    """Peak of the bytes held by torch's allocator while ``fn()`` runs, above the level at its
    start: the running sum of the profiler's allocation and release events
    (``profile_memory=True``), the CPU counterpart of ``torch.cuda.max_memory_allocated``.
    Exact and deterministic (unlike the RSS, which malloc's arenas and page reuse blur at the
    scale of a few MB). Buffers allocated before the call and released during it are not seen
    as releases, so they are never credited."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_stderr():  # kineto logs a line per start and stop to fd 2
        prof.start()
    try:
        fn()
    finally:
        with _quiet_stderr():
            prof.stop()
    events = [
        e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and e.device_type() == DeviceType.CPU
    ]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def run_worker(script: str, args: Sequence[str], timeout: float = 600.0, env: Mapping[str, str] | None = None) -> dict:
    """Run ``python script *args`` in a fresh process and parse the JSON object on the last
    line of its stdout. Raises ``RuntimeError`` with the child's stderr on failure."""
    cmd = [sys.executable, script, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"worker {' '.join(cmd)} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    return json.loads(lines[-1])


def emit_worker_result(result: Mapping) -> None:
    """The worker side of ``run_worker``: one JSON line on stdout."""
    sys.stdout.write(json.dumps(dict(result)) + "\n")
    sys.stdout.flush()


def package_versions(names: Iterable[str] = ("torch", "jax", "jaxlib", "numpy")) -> dict[str, str | None]:
    """Installed versions, read from package metadata (imports nothing)."""
    out = {}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            out[n] = None
    return out


def environment_meta() -> dict:
    """Machine and software description, with the load average (a sign of contention)."""
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "versions": package_versions(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "argv": sys.argv,
    }


def fmt(value, spec: str = ".2f", missing: str = "-") -> str:
    """``format(value, spec)``, or ``missing`` for ``None`` / NaN; strings pass through."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return missing
    if isinstance(value, str):
        return value
    return format(value, spec)


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A GitHub markdown table; cells must already be strings."""
    rows = [list(map(str, r)) for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), sep, *map(line, rows)])


def write_json_object(path: str | None, obj: dict) -> None:
    """Write ``obj`` as JSON to ``path`` (no-op for ``None``); NaN and infinities become null."""
    if not path:
        return

    def clean(o):
        if isinstance(o, float) and not math.isfinite(o):
            return None
        if isinstance(o, dict):
            return {k: clean(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [clean(v) for v in o]
        return o

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(clean(obj), f, indent=2)
        f.write("\n")


def write_json(path: str | None, rows: list[dict], meta: dict) -> None:
    """Write ``{"rows": rows, "meta": meta}`` to ``path`` (no-op for ``None``); NaN becomes null."""
    write_json_object(path, {"rows": rows, "meta": meta})
