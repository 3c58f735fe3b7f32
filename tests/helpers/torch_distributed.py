"""Running a test body on two CPU processes over gloo (``tests/{torch,pyro}/test_distributed.py``).

``run_ranks(worker, *args)`` spawns ``world_size`` processes with ``torch.multiprocessing.spawn``;
each sets ``torch.set_num_threads(1)``, joins a gloo group through a fresh ``file://`` init
file and calls ``worker(rank, world_size, *args)`` (a module-level function, so that the
spawned process can import it); what it returns comes back to the parent through a file
(``torch.save``), one per rank, in rank order. The single-process references are computed in
the parent, by the test itself.
"""

from __future__ import annotations

import os
import tempfile
import traceback

import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

WORLD = 2


def _entry(rank, world_size, init_file, out_dir, worker, args):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        result = worker(rank, world_size, *args)
    except BaseException:  # the parent shows which rank failed and why
        with open(os.path.join(out_dir, f"error{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


def run_ranks(worker, *args, world_size: int = WORLD) -> list:
    """``[worker(rank, world_size, *args) for rank in range(world_size)]``, each in its own
    process of one gloo group."""
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available")
    with tempfile.TemporaryDirectory() as out_dir:
        init_file = os.path.join(out_dir, "init")  # must not exist yet: the group creates it
        try:
            mp.spawn(_entry, args=(world_size, init_file, out_dir, worker, args), nprocs=world_size, join=True)
        except Exception as err:
            errors = [os.path.join(out_dir, f"error{r}.txt") for r in range(world_size)]
            found = [f"rank {r}:\n{open(p).read()}" for r, p in enumerate(errors) if os.path.exists(p)]
            raise AssertionError("a rank failed:\n" + "\n".join(found or [str(err)])) from None
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]


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
