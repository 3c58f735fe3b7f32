"""Data-parallel training of Pyro models on ``torch.distributed``.

Two routes (docs page *Distributed training (torch)*):

- the ``ELBOModule`` route: ``elbo = ScoreMatching(method)(model, guide)`` is a
  ``torch.nn.Module``; wrap it in ``torch.nn.parallel.DistributedDataParallel`` and call
  ``ddp(batch).backward()`` on each rank's shard. DDP averages the gradients over ranks.
- ``SVI``: Pyro's ``SVI.step`` takes no DDP module, so the optimizer does what DDP does:
  ``SVI(model, guide, DistributedOptimizer(pyro.optim.Adam({...})), loss=ScoreMatching())``
  all-reduces the gradients before every step (as ``pyro.optim.HorovodOptimizer`` does with
  Horovod).

Either way each rank's loss must be its shard's estimate of the whole objective for the
average to be the full-data gradient: put the shard in ``pyro.plate(name, N, subsample=idx)``
(scale ``N / len(idx)``), and use :func:`shard_scale` when shards are unequal or padded.
"""

from __future__ import annotations

from typing import Any, Iterable

import pyro
import torch
import torch.distributed as dist
from pyro.optim import PyroOptim

from ..torch.distributed import (
    all_reduce_gradients,
    check_process_group,
    comm_device,
    generator_from_state,
    generator_to_state,
    group_from_state,
    group_to_state,
    world,
)

__all__ = ["DistributedOptimizer", "GeneratorState", "RankState", "shard_scale"]

_OPS = ("mean", "sum")


class DistributedOptimizer(PyroOptim):
    """A ``PyroOptim`` that all-reduces the parameters' gradients over the ranks of a process
    group before every step: data-parallel ``SVI`` without DDP, modelled on
    ``pyro.optim.HorovodOptimizer``::

        dist.init_process_group("gloo")           # or "nccl"; one process per rank
        optim = DistributedOptimizer(pyro.optim.Adam({"lr": 1e-3}))
        svi = SVI(model, guide, optim, loss=ScoreMatching("ssm_vr", generator=rank_generator(0)))
        for idx in my_shard_of_each_batch:
            svi.step(idx)                         # model: pyro.plate("data", N, subsample=idx)

    Every rank must start from the same parameters (the same seed, or a broadcast from rank 0)
    and call ``step`` the same number of times; the averaged gradients then keep them equal.
    The parameters are reduced in the order of their names in Pyro's param store, so every
    rank issues the same collectives whatever order the trace found them in. A parameter
    without gradient on some ranks takes part with zeros there; one without gradient on every
    rank keeps ``grad = None`` (and is skipped by the optimizer, as in one process).

    Args:
        optim: the ``PyroOptim`` to step (``pyro.optim.Adam({...})``, ``ClippedAdam``, a
            ``PyroLRScheduler``...); its per-parameter optimizers, state, ``get_state`` /
            ``set_state`` / ``save`` / ``load`` and other attributes (a scheduler's ``step``)
            are used as they are.
        process_group: the group to reduce over (default: the default group). Outside an
            initialized process group the optimizer is ``optim`` itself (one process). A copy
            (``pickle``, ``copy.deepcopy``) keeps the default group by name and cannot hold
            another.
        op: ``"mean"`` (default, what DDP does): each rank's loss is its shard's estimate of
            the whole objective (a subsampled plate). ``"sum"``: each rank's loss is its
            shard's part of a sum (a plain ``pyro.plate(name, len(shard))``), the gradients
            add up to the whole batch's.

    Raises:
        TypeError: ``optim`` is not a ``PyroOptim``, ``process_group`` not a process group.
        ValueError: ``op`` is not ``"mean"`` or ``"sum"``; ``optim`` is already a
            ``DistributedOptimizer``; (at a step) a parameter is not in Pyro's param store.
        RuntimeError: (at a step) the ranks step different numbers of parameters.
    """

    def __init__(self, optim: PyroOptim, process_group: dist.ProcessGroup | None = None, op: str = "mean") -> None:
        # no PyroOptim.__init__: the state (per-parameter optimizers) stays in ``optim``
        if not isinstance(optim, PyroOptim):
            raise TypeError(
                f"argument 'optim' must be a pyro.optim.PyroOptim (e.g. pyro.optim.Adam({{...}})), got {type(optim).__name__}"
            )
        if isinstance(optim, DistributedOptimizer):
            raise ValueError("argument 'optim' is already a DistributedOptimizer: the gradients would be reduced twice")
        if op not in _OPS:
            raise ValueError(f"argument 'op' must be 'mean' or 'sum', got {op!r}")
        self.optim = optim
        self.process_group = check_process_group(process_group)
        self.op = op

    def __call__(self, params: Iterable[torch.Tensor], *args: Any, **kwargs: Any) -> None:
        """All-reduce the gradients of ``params`` over the ranks, then step ``optim`` on them."""
        params = _ordered(params)
        _reduce_gradients(params, self.process_group, self.op)
        self.optim(params, *args, **kwargs)

    def get_state(self) -> dict:
        return self.optim.get_state()

    def set_state(self, state_dict: dict) -> None:
        self.optim.set_state(state_dict)

    # a ProcessGroup does not pickle: the default group is saved by name (another raises)
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["process_group"] = group_to_state(self.process_group)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, process_group=group_from_state(state["process_group"]))

    def __getattr__(self, name: str) -> Any:
        # what PyroOptim and its subclasses hold or add (optim_objs, a scheduler's step)
        optim = self.__dict__.get("optim")
        if optim is None or name.startswith("__"):
            raise AttributeError(name)
        return getattr(optim, name)

    def __repr__(self) -> str:
        return f"DistributedOptimizer({type(self.optim).__name__}, op={self.op!r})"


def _ordered(params: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """``params`` sorted by their names in Pyro's param store: the same order on every rank."""
    store = pyro.get_param_store()
    named = []
    for p in params:
        name = store.param_name(p)
        if name is None:
            raise ValueError(
                "DistributedOptimizer orders the gradients' collectives by parameter name, and a parameter "
                f"of shape {tuple(p.shape)} is not in Pyro's param store (module_local_params=True?); "
                "use the ELBOModule route with DistributedDataParallel instead"
            )
        named.append((name, p))
    return [p for _, p in sorted(named, key=lambda t: t[0])]


def _reduce_gradients(params: list[torch.Tensor], process_group: dist.ProcessGroup | None, op: str) -> None:
    _, size = world(process_group)
    if size == 1:
        return
    device = comm_device(process_group)
    # the same number of parameters everywhere, or the collectives below would not pair up
    count = torch.tensor([len(params), -len(params)], dtype=torch.float64, device=device)
    dist.all_reduce(count, op=dist.ReduceOp.MAX, group=process_group)
    if int(count[0]) != -int(count[1]):
        raise RuntimeError(
            f"DistributedOptimizer: the ranks step different numbers of parameters (from {-int(count[1])} "
            f"to {int(count[0])}); every rank must run the same model and guide"
        )
    if not params:
        return
    # which parameters have a gradient on some rank: the others stay None, as in one process
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.float64, device=device)
    dist.all_reduce(has, op=dist.ReduceOp.SUM, group=process_group)
    all_reduce_gradients([p for p, h in zip(params, has.tolist()) if h > 0], process_group, op)


class GeneratorState:
    """Base of the Pyro losses with ``generator=`` (``ScoreMatching``, and through
    :class:`RankState` ``ImplicitELBO`` and ``WAE``): the generator survives pickling,
    ``copy.deepcopy`` and ``torch.save``, saved as its device and state (a copy gets a new
    generator in the same state)."""

    generator: torch.Generator | None = None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["generator"] = generator_to_state(state.get("generator"))
        if "_process_group" in state:
            state["_process_group"] = group_to_state(state["_process_group"])
        return state

    def __setstate__(self, state: dict) -> None:
        state = dict(state)
        state["generator"] = generator_from_state(state.get("generator"))
        self.__dict__.update(state)


class RankState(GeneratorState):
    """Base of the Pyro losses with ``generator=`` and ``process_group=`` (``ImplicitELBO``,
    ``WAE``): the group, which does not pickle, is saved as None or ``"WORLD"`` and resolved
    again when the loss runs (a copy loaded in a one-process run gathers nothing)."""

    _process_group: Any = None

    @property
    def process_group(self) -> dist.ProcessGroup | None:
        """The group whose ranks pool the batch-global terms, or None (per-rank terms)."""
        return group_from_state(self._process_group)

    @process_group.setter
    def process_group(self, value: dist.ProcessGroup | None) -> None:
        self._process_group = check_process_group(value)


def shard_scale(
    rows: int, valid: int | torch.Tensor | None = None, process_group: dist.ProcessGroup | None = None
) -> float:
    """The factor that makes the average over ranks of the shards' losses the whole batch's
    when shards are unequal or padded: ``world_size * rows / total``, with ``total`` the sum
    over ranks of ``valid`` (default ``rows``). A collective: every rank must call it.

    With ``pyro.plate(name, N, subsample=idx)`` a rank's loss weighs each datum ``N / rows``
    (``rows = len(idx)``). Averaging over ranks is the whole batch's estimate only when every
    rank has the same ``rows``; otherwise, and when ``DistributedSampler`` pads the last
    shards with repeated indices (masked with ``poutine.mask``: pass their number of unmasked
    rows as ``valid``), scale the rank's loss by this factor::

        keep = positions < N                  # False on the sampler's padding
        with pyro.plate("data", N, subsample=idx), poutine.mask(mask=keep), \\
                poutine.scale(scale=shard_scale(len(idx), keep.sum())):
            pyro.sample("x", ..., obs=data[idx])

    Each datum then weighs ``N / total`` after DDP's (or ``DistributedOptimizer``'s)
    average, as in one process on the union of the shards. 1 outside a process group and
    for equal, unpadded shards.

    Raises:
        ValueError: ``rows`` or ``valid`` negative, ``valid > rows``, or no valid row on any rank.
    """
    rows = int(rows)
    valid = rows if valid is None else int(valid)
    if rows < 0 or not 0 <= valid <= rows:
        raise ValueError(f"shard_scale: need 0 <= valid <= rows, got rows={rows}, valid={valid}")
    _, size = world(process_group)
    total = float(valid)
    if size > 1:
        buf = torch.tensor([total], dtype=torch.float64, device=comm_device(process_group))
        dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=process_group)
        total = buf.item()
    if total == 0:
        raise ValueError("shard_scale: no valid row on any rank")
    return size * rows / total
