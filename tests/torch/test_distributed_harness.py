"""The two-process harness of the gloo tests (``tests/helpers/torch_distributed.py``) reports
a failing rank with what it printed, and retries a run only when a rank was killed by a
signal (a transport crash), never when the worker's Python raised."""

from __future__ import annotations

import os
import resource
import sys

import pytest

torch = pytest.importorskip("torch")

from tests.helpers.torch_distributed import run_ranks  # noqa: E402


def _raises_on_rank_1(rank, world_size):
    if rank == 1:
        print("rank 1 was here", file=sys.stderr, flush=True)
        raise ValueError("worker error on rank 1")
    return rank


def _aborts_once_on_rank_1(rank, world_size, flag):
    import torch.distributed as dist

    if rank == 1 and not os.path.exists(flag):
        open(flag, "w").close()
        print("aborting once", file=sys.stderr, flush=True)
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core file in the work tree
        os.abort()
    dist.barrier()
    return rank * 10


@pytest.mark.distributed
def test_a_raising_rank_fails_with_its_traceback_and_output():
    with pytest.raises(AssertionError) as info:
        run_ranks(_raises_on_rank_1)
    text = str(info.value)
    assert "ValueError: worker error on rank 1" in text
    assert "rank 1 was here" in text


@pytest.mark.distributed
def test_a_rank_killed_by_a_signal_is_retried_once_with_a_warning(tmp_path):
    flag = str(tmp_path / "aborted")
    with pytest.warns(RuntimeWarning, match="(?s)SIGABRT; retried.*aborting once"):
        assert run_ranks(_aborts_once_on_rank_1, flag) == [0, 10]
    os.remove(flag)
    with pytest.raises(AssertionError, match="SIGABRT"):
        run_ranks(_aborts_once_on_rank_1, flag, attempts=1)
