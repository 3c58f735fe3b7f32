"""``ppl_score.torch.distributed``'s primitives on two gloo ranks (spawned, one thread each):
``gather_rows`` (unequal shards, gradients summed over the ranks' copies), ``rank_generator``
(per-rank streams), ``all_reduce_gradients`` (mean and sum); and the one-process identities."""

from __future__ import annotations

import os
import tempfile

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from ppl_score.torch.distributed import (  # noqa: E402
    all_reduce_gradients,
    gather_rows,
    is_distributed,
    rank_generator,
    world,
)


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    import torch
    import torch.distributed as dist

    from ppl_score.torch.distributed import all_reduce_gradients, gather_rows, rank_generator, world

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        x = (torch.arange(6.0, dtype=torch.float64).reshape(3, 2) + 10 * rank)[: 3 - rank].requires_grad_(True)
        g = gather_rows(x)
        (g * g).sum().backward()
        p = torch.nn.Parameter(torch.full((2,), float(rank + 1), dtype=torch.float64))
        p.grad = torch.full((2,), float(rank + 1), dtype=torch.float64)
        q = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))  # no grad on any rank
        all_reduce_gradients([p, q])
        mean = p.grad.clone()
        p.grad = torch.full((2,), float(rank + 1), dtype=torch.float64)
        all_reduce_gradients([p], op="sum")
        out = dict(
            world=world(),
            gathered=g.detach().numpy(),
            grad=x.grad.numpy(),
            draw=torch.randn(3, generator=rank_generator(7), dtype=torch.float64).numpy(),
            mean=mean.numpy(),
            sum=p.grad.numpy(),
            q=q.grad.numpy(),
        )
        np.savez(os.path.join(out_dir, f"rank{rank}.npz"), **{k: np.asarray(v) for k, v in out.items()})
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks():
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(os.path.join(tmp, "init"), tmp), nprocs=2, join=True)
        yield [dict(np.load(os.path.join(tmp, f"rank{r}.npz"))) for r in range(2)]


@pytest.mark.distributed
def test_gather_rows_unequal_shards_and_gradients(two_ranks):
    x0 = np.arange(6.0).reshape(3, 2)
    x1 = (np.arange(6.0).reshape(3, 2) + 10)[:2]
    for r, out in enumerate(two_ranks):
        assert tuple(out["world"]) == (r, 2)
        np.testing.assert_array_equal(out["gathered"], np.concatenate([x0, x1]))
    # each rank's rows get d/dx of sum(g^2) from both ranks' copies: 2 * 2x
    np.testing.assert_array_equal(two_ranks[0]["grad"], 4 * x0)
    np.testing.assert_array_equal(two_ranks[1]["grad"], 4 * x1)


@pytest.mark.distributed
def test_rank_generator_differs_across_ranks(two_ranks):
    assert not np.allclose(two_ranks[0]["draw"], two_ranks[1]["draw"])
    # rank 0 of the group draws what a one-process run with the same seed draws
    np.testing.assert_array_equal(
        two_ranks[0]["draw"], torch.randn(3, generator=rank_generator(7), dtype=torch.float64).numpy()
    )


@pytest.mark.distributed
def test_all_reduce_gradients(two_ranks):
    for out in two_ranks:
        np.testing.assert_array_equal(out["mean"], [1.5, 1.5])
        np.testing.assert_array_equal(out["sum"], [3.0, 3.0])
        np.testing.assert_array_equal(out["q"], [0.0])


def test_one_process_identities():
    assert not is_distributed() and world() == (0, 1)
    x = torch.randn(4, 3)
    assert gather_rows(x) is x
    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.ones(2)
    all_reduce_gradients([p])
    assert torch.equal(p.grad, torch.ones(2))
    a = torch.randn(5, generator=rank_generator(3))
    assert torch.equal(a, torch.randn(5, generator=rank_generator(3)))
    assert not torch.equal(a, torch.randn(5, generator=rank_generator(4)))


def test_bad_arguments():
    with pytest.raises(TypeError, match="argument 'seed' must be an int"):
        rank_generator(1.5)
    with pytest.raises(TypeError, match="argument 'x' must be a torch.Tensor"):
        gather_rows(np.zeros(3))
    with pytest.raises(ValueError, match="leading batch dim"):
        gather_rows(torch.tensor(1.0))
    with pytest.raises(ValueError, match="argument 'op' must be 'mean' or 'sum'"):
        all_reduce_gradients([], op="max")
