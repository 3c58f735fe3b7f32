"""Running a test body on two CPU processes over gloo (``tests/{torch,pyro}/test_distributed.py``).

``run_ranks(worker, *args)`` spawns ``world_size`` processes with ``torch.multiprocessing.spawn``;
each sets ``torch.set_num_threads(1)``, joins a gloo group through a fresh ``file://`` init
file and calls ``worker(rank, world_size, *args)`` (a module-level function, so that the
spawned process can import it); what it returns comes back to the parent through a file
(``torch.save``), one per rank, in rank order. The single-process references are computed in
the parent, by the test itself. A rank's standard error (C++ aborts and ``faulthandler``'s
tracebacks included) goes to a file that the parent quotes when a rank fails; the ranks meet
at a barrier before closing the group and leave with ``os._exit(0)`` once their result is
saved.
"""

from __future__ import annotations

import faulthandler
import os
import sys
import tempfile
import traceback
import warnings

import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

WORLD = 2


def _entry(rank, world_size, init_file, out_dir, worker, args):
    # What a rank prints, C++ aborts (gloo, c10) included, goes to a file the parent shows.
    log = open(os.path.join(out_dir, f"stderr{rank}.txt"), "w")
    sys.stderr.flush()
    os.dup2(log.fileno(), 2)
    faulthandler.enable(log, all_threads=True)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        result = worker(rank, world_size, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        # No rank closes its connections while another still works (a peer's close seen by
        # gloo's event loop can abort the other process).
        dist.barrier()
    except BaseException:  # the parent shows which rank failed and why
        with open(os.path.join(out_dir, f"error{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()
    # The work is done and saved: leave without running the interpreter's and the C++
    # libraries' exit-time destructors (a crash there would only hide the results).
    sys.stdout.flush()
    log.flush()
    os._exit(0)


def _report(out_dir: str, rank: int, tail: int = 6000) -> str:
    """Rank ``rank``'s Python traceback (if it raised) and the tail of what it printed."""
    parts = []
    for name in (f"error{rank}.txt", f"stderr{rank}.txt"):
        path = os.path.join(out_dir, name)
        if os.path.exists(path):
            with open(path, errors="replace") as f:
                text = f.read()[-tail:].strip()
            if text:
                parts.append(f"--- rank {rank} {name}:\n{text}")
    return "\n".join(parts)


def run_ranks(worker, *args, world_size: int = WORLD, attempts: int = 2) -> list:
    """``[worker(rank, world_size, *args) for rank in range(world_size)]``, each in its own
    process of one gloo group.

    A rank that raises fails the test at once, with its traceback. A rank killed by a signal
    (a C++ abort in gloo or c10, not in the worker's Python) is retried up to ``attempts`` runs
    in all, with a warning quoting what it printed: such a crash is the transport's, and
    the results of a clean run are what the tests compare."""
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available")
    for attempt in range(1, attempts + 1):
        with tempfile.TemporaryDirectory() as out_dir:
            init_file = os.path.join(out_dir, "init")  # must not exist yet: the group creates it
            try:
                mp.spawn(_entry, args=(world_size, init_file, out_dir, worker, args), nprocs=world_size, join=True)
            except Exception as err:
                found = "\n".join(f for f in (_report(out_dir, r) for r in range(world_size)) if f)
                signal = getattr(err, "signal_name", None)
                if signal is None or attempt == attempts:
                    raise AssertionError(f"a rank failed: {err}\n{found}") from None
                warnings.warn(f"run {attempt} of {worker.__name__}: {err}; retried\n{found}", RuntimeWarning)
                continue
            return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]
    raise AssertionError("unreachable")  # pragma: no cover


def assert_close(a, b, tol: float = 1e-9, what: str = "") -> float:
    """``max |a - b| <= tol * max(1, max |b|)`` on tensors (or nested lists/dicts of them);
    returns the largest absolute difference found (for the report)."""
    if isinstance(b, dict):
        assert set(a) == set(b), what
        return max([assert_close(a[k], b[k], tol, f"{what}[{k}]") for k in b] + [0.0])
    if isinstance(b, (list, tuple)):
        assert len(a) == len(b), what
        return max([assert_close(x, y, tol, f"{what}[{i}]") for i, (x, y) in enumerate(zip(a, b))] + [0.0])
    a, b = (torch.as_tensor(t, dtype=torch.float64).detach() for t in (a, b))
    assert a.shape == b.shape, f"{what}: shapes {tuple(a.shape)} != {tuple(b.shape)}"
    diff = float((a - b).abs().max()) if a.numel() else 0.0
    scale = max(1.0, float(b.abs().max()) if b.numel() else 0.0)
    assert diff <= tol * scale, f"{what}: max |diff| {diff:.3e} > {tol:g} x {scale:.3g}"
    return diff
