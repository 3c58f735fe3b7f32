"""Data parallelism on ``torch.distributed`` (DDP): what the losses need beyond DDP itself.

Under ``torch.nn.parallel.DistributedDataParallel`` every rank evaluates the loss on its own
shard of the batch and DDP averages the parameter gradients over ranks. For a loss that is a
mean (or a subsampling-scaled sum) of per-datum terms this gives the gradient of the loss on
the whole batch, and nothing here is needed. Two things are not per-datum:

- **randomness** (projections, noise, particles): each rank must draw its own, or every rank
  repeats the same draws and the average of their gradients has the variance of one rank's.
  :func:`rank_generator` seeds a ``torch.Generator`` per rank from one seed.
- **batch-global terms** (WAE's MMD between codes and prior draws, kernel score estimators
  over particles, the aggregate posterior's score): they couple the data of all ranks.
  :func:`gather_rows` concatenates a tensor over ranks with gradients flowing back to every
  rank's rows, so each rank evaluates the term on the whole batch; with DDP's averaging the
  parameter gradient is then exactly that of the single-process term (each rank's rows
  receive the gradient summed over the ranks' identical copies, which the average divides
  by the world size again).

Outside a process group (``torch.distributed`` not initialized) every function is the
single-process identity, so the same code runs on one device.
"""

from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist

__all__ = [
    "all_reduce_gradients",
    "broadcast_generator_",
    "broadcast_tensors_",
    "check_generator",
    "check_process_group",
    "comm_device",
    "gather_rows",
    "gather_rows_detached",
    "generator_from_state",
    "generator_to_state",
    "group_from_state",
    "group_to_state",
    "is_distributed",
    "rank_generator",
    "rank_seed",
    "use_generator",
    "world",
]


def is_distributed(process_group: dist.ProcessGroup | None = None) -> bool:
    """Whether a process group is in use: ``torch.distributed`` initialized (and, for an
    explicit ``process_group``, that group given)."""
    return process_group is not None or (dist.is_available() and dist.is_initialized())


def world(process_group: dist.ProcessGroup | None = None) -> tuple[int, int]:
    """``(rank, world_size)`` in ``process_group`` (the default group when ``None``);
    ``(0, 1)`` outside a process group."""
    if not is_distributed(process_group):
        return 0, 1
    return dist.get_rank(process_group), dist.get_world_size(process_group)


def rank_generator(
    seed: int, process_group: dist.ProcessGroup | None = None, device: torch.device | str | None = None
) -> torch.Generator:
    """A ``torch.Generator`` for this rank, seeded from ``(seed, rank)``.

    Pass it as ``generator=`` to the losses and samplers so each rank draws its own
    projections, noise and particles; the same ``seed`` on every rank gives different,
    reproducible streams. Rank 0 of a one-process run gets the same stream as any other
    run with the same seed.

    Args:
        seed: an int shared by every rank.
        process_group: the group whose rank counts (default: the default group).
        device: the generator's device (default: CPU).

    Raises:
        TypeError: ``seed`` is not an int.
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"argument 'seed' must be an int, got {type(seed).__name__}")
    rank, _ = world(process_group)
    digest = hashlib.blake2b(f"{seed}:{rank}".encode(), digest_size=8).digest()
    generator = torch.Generator(device=device) if device is not None else torch.Generator()
    return generator.manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))


def gather_rows(x: torch.Tensor, process_group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """``x [n_r, ...]`` of every rank concatenated along dim 0 in rank order, differentiable.

    Shards may differ in their first dim (a last, smaller batch); the other dims must agree.
    The backward pass sends each rank the gradient of its own rows summed over all ranks
    (an all-reduce of the gathered gradients), which is what DDP's gradient average
    expects when every rank evaluates the same batch-global term.

    Raises:
        TypeError: ``x`` is not a tensor.
        ValueError: ``x`` is 0-d, or the ranks' trailing shapes differ.
    """
    _check_rows(x)
    rank, size = world(process_group)
    if size == 1:
        return x
    rows, padded = _padded_rows(x, process_group, size, "gather_rows")
    parts = _AllGather.apply(padded, process_group, rank, size)
    return torch.cat([p[:n] for p, n in zip(parts, rows)]).to(x.device)


def _check_rows(x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"argument 'x' must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 0:
        raise ValueError("argument 'x' must have a leading batch dim to gather over, got a 0-d tensor")


def _padded_rows(x: torch.Tensor, process_group, size: int, what: str) -> tuple[list[int], torch.Tensor]:
    """Every rank's number of rows, and ``x`` on the collectives' device padded with zero rows
    to the largest; the ranks' trailing shapes must agree."""
    device = comm_device(process_group, x.device)
    shape = torch.tensor([x.shape[0], *x.shape[1:]], dtype=torch.int64, device=device)
    shapes = [torch.empty_like(shape) for _ in range(size)]
    dist.all_gather(shapes, shape, group=process_group)
    if any(not torch.equal(s[1:], shape[1:]) for s in shapes):
        raise ValueError(
            f"{what}: the ranks' tensors differ beyond the first dim: "
            f"{[tuple(s.tolist()) for s in shapes]}; only the number of rows may differ"
        )
    rows = [int(s[0]) for s in shapes]
    padded = x.to(device)
    if padded.shape[0] < max(rows):
        padded = torch.cat([padded, padded.new_zeros(max(rows) - padded.shape[0], *padded.shape[1:])])
    return rows, padded


class _AllGather(torch.autograd.Function):
    """All-gather whose backward sums the gradients of every rank's copy and returns this
    rank's rows (a reduce-scatter written as an all-reduce, which gloo supports)."""

    @staticmethod
    def forward(ctx, x, group, rank, size):
        ctx.group, ctx.rank = group, rank
        parts = [torch.empty_like(x) for _ in range(size)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return tuple(parts)

    @staticmethod
    def backward(ctx, *grads):
        total = torch.stack([g.contiguous() for g in grads])
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=ctx.group)
        return total[ctx.rank], None, None, None


def all_reduce_gradients(params, process_group: dist.ProcessGroup | None = None, op: str = "mean") -> None:
    """Average (``op="mean"``) or sum (``"sum"``) the ``.grad`` of ``params`` over ranks, in place.

    What DDP does inside ``backward``, for loops that do not wrap the model in DDP (Pyro's
    ``SVI``: see ``ppl_score.pyro.distributed.DistributedOptimizer``). Parameters without a
    gradient on this rank take part with zeros, so every rank issues the same collectives.

    Raises:
        ValueError: ``op`` is not ``"mean"`` or ``"sum"``.
    """
    if op not in ("mean", "sum"):
        raise ValueError(f"argument 'op' must be 'mean' or 'sum', got {op!r}")
    _, size = world(process_group)
    if size == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM, group=process_group)
        if op == "mean":
            p.grad.div_(size)


# ---------------------------------------------------------------------------------------
# additions for the batch-global terms of ImplicitELBO and WAE (ppl_score.pyro.implicit,
# ppl_score.pyro.wae, ppl_score.torch.estimators)


def check_generator(generator: torch.Generator | None, name: str = "generator") -> torch.Generator | None:
    """``generator`` if it is None or a ``torch.Generator`` on a CPU or CUDA device.

    Raises:
        TypeError: anything else, naming the argument.
    """
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"argument {name!r} must be a torch.Generator or None, got {type(generator).__name__}")
    if generator is not None and generator.device.type not in ("cpu", "cuda"):
        raise TypeError(f"argument {name!r} must be a CPU or CUDA torch.Generator, got one on {generator.device}")
    return generator


def generator_to_state(generator: torch.Generator | None) -> tuple[str, torch.Tensor] | None:
    """A picklable stand-in for ``generator`` (a ``torch.Generator`` pickles only in recent
    torch): None, or its device and state; :func:`generator_from_state` rebuilds it."""
    return None if generator is None else (str(generator.device), generator.get_state())


def generator_from_state(state: tuple[str, torch.Tensor] | torch.Generator | None) -> torch.Generator | None:
    """A new generator in the device and state that :func:`generator_to_state` saved (a
    generator or None passes through)."""
    if state is None or isinstance(state, torch.Generator):
        return state
    device, rng_state = state
    return torch.Generator(device=device).set_state(rng_state)


def check_process_group(process_group: dist.ProcessGroup | None) -> dist.ProcessGroup | None:
    """``process_group`` if it is None or a ``torch.distributed.ProcessGroup``
    (e.g. ``torch.distributed.group.WORLD`` once the default group is initialized).

    Raises:
        TypeError: anything else.
    """
    if process_group is not None and not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(
            "argument 'process_group' must be None or a torch.distributed.ProcessGroup "
            f"(e.g. torch.distributed.group.WORLD after init_process_group), got {type(process_group).__name__}"
        )
    return process_group


def _default_state(device: torch.device) -> torch.Tensor:
    return torch.get_rng_state() if device.type == "cpu" else torch.cuda.get_rng_state(device)


def _set_default_state(device: torch.device, state: torch.Tensor) -> None:
    if device.type == "cpu":
        torch.set_rng_state(state)
    else:
        torch.cuda.set_rng_state(state, device)


class use_generator:
    """Context manager: inside it, the global RNG of ``generator``'s device (CPU, or one CUDA
    device) draws from ``generator``'s stream, which advances ``generator``; the global RNG is
    restored on exit. ``None`` does nothing.

    It lets a ``generator`` steer draws made by code that takes none (a Pyro guide's
    ``torch.randn`` and ``pyro.sample``, ``Distribution.sample``). Draws on another device, and
    Python's ``random`` and NumPy's, stay on their global generators. Not thread-safe (the
    global RNG is process-wide).
    """

    def __init__(self, generator: torch.Generator | None) -> None:
        self.generator = check_generator(generator)

    def __enter__(self) -> torch.Generator | None:
        g = self.generator
        if g is not None:
            device = g.device
            if device.type == "cuda" and device.index is None:
                device = torch.device("cuda", torch.cuda.current_device())
            self._device, self._saved = device, _default_state(device)
            _set_default_state(device, g.get_state())
        return g

    def __exit__(self, *exc) -> None:
        g = self.generator
        if g is not None:
            g.set_state(_default_state(self._device))
            _set_default_state(self._device, self._saved)


def comm_device(process_group: dist.ProcessGroup | None, device: torch.device | str = "cpu") -> torch.device:
    """Where a collective's buffer must live: CUDA for NCCL, else ``device`` (default: the CPU)."""
    device = torch.device(device)
    if dist.get_backend(process_group) == "nccl" and device.type != "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return device


def gather_rows_detached(
    x: torch.Tensor, process_group: dist.ProcessGroup | None = None
) -> tuple[torch.Tensor, list[int]]:
    """``(x_all, rows)``: ``x [n_r, ...]`` of every rank concatenated along dim 0 in rank order,
    without gradient (cheaper than :func:`gather_rows` when none is needed), and the number
    of rows of every rank (this rank's rows of ``x_all`` start at ``sum(rows[:rank])``).

    Raises:
        TypeError: ``x`` is not a tensor.
        ValueError: ``x`` is 0-d, or the ranks' trailing shapes differ.
    """
    _check_rows(x)
    _, size = world(process_group)
    if size == 1:
        return x.detach(), [x.shape[0]]
    rows, padded = _padded_rows(x.detach(), process_group, size, "gather_rows_detached")
    parts = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(parts, padded.contiguous(), group=process_group)
    return torch.cat([p[:n] for p, n in zip(parts, rows)]).to(x.device), rows


def broadcast_tensors_(tensors, process_group: dist.ProcessGroup | None = None) -> None:
    """Overwrite ``tensors`` (an iterable of tensors, the same shapes and dtypes on every rank)
    in place with those of the group's rank 0, one collective per dtype. Outside a process
    group it does nothing.

    Used to keep replicas identical (a learned score estimator's network, a generator's
    state) whatever each rank was seeded with.
    """
    tensors = list(tensors)
    _, size = world(process_group)
    if size == 1 or not tensors:
        return
    src = dist.get_global_rank(process_group, 0) if process_group is not None else 0
    by_dtype: dict = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for dtype in sorted(by_dtype, key=str):
        group = by_dtype[dtype]
        device = comm_device(process_group, group[0].device)
        flat = torch.cat([t.detach().reshape(-1).to(device) for t in group])
        dist.broadcast(flat, src=src, group=process_group)
        offset = 0
        with torch.no_grad():
            for t in group:
                n = t.numel()
                t.copy_(flat[offset : offset + n].reshape(t.shape).to(t.device))
                offset += n


def broadcast_generator_(generator: torch.Generator, process_group: dist.ProcessGroup | None = None) -> None:
    """Give ``generator`` (a CPU or CUDA ``torch.Generator``, of the same device type on every
    rank) the state of the group's rank 0, so that the ranks draw the same numbers next."""
    check_generator(generator)
    _, size = world(process_group)
    if size == 1:
        return
    state = generator.get_state().clone()
    broadcast_tensors_([state], process_group)
    generator.set_state(state)


def rank_seed(seed: int, process_group: dist.ProcessGroup | None = None) -> int:
    """This rank's seed derived from ``seed``: the seed of :func:`rank_generator`, for the
    global generators, ``torch.manual_seed(rank_seed(seed))`` or
    ``pyro.set_rng_seed(rank_seed(seed) % 2**32)`` (Pyro also seeds NumPy, which takes
    32 bits).

    Raises:
        TypeError: ``seed`` is not an int.
    """
    return int(rank_generator(seed, process_group).initial_seed())


def group_to_state(process_group: dist.ProcessGroup | str | None) -> str | None:
    """A picklable stand-in for ``process_group`` (a ``ProcessGroup`` does not pickle): None
    for None, ``"WORLD"`` for the default group (or ``"WORLD"`` itself).

    Raises:
        TypeError: another group (it cannot be named in a new process): set the loss's
            ``process_group`` to None before saving it and back after loading.
    """
    if process_group is None or process_group == "WORLD":
        return process_group
    if dist.is_initialized() and process_group is dist.group.WORLD:
        return "WORLD"
    raise TypeError(
        "a loss holding a process group other than torch.distributed.group.WORLD cannot be pickled or "
        "copied; set its process_group to None before saving it and back after loading"
    )


def group_from_state(state: dist.ProcessGroup | str | None) -> dist.ProcessGroup | None:
    """The group that ``state`` (a group, or :func:`group_to_state`'s ``"WORLD"``) stands for:
    ``"WORLD"`` is ``torch.distributed.group.WORLD`` when the default group is initialized,
    else None (one process: nothing to gather)."""
    if isinstance(state, str):
        return dist.group.WORLD if dist.is_available() and dist.is_initialized() else None
    return state
