"""Random projections, finite-difference directions and noise (torch).

Every draw takes an optional ``torch.Generator``; without one the global generator is used.
Shapes are ``[M, B, *event]`` for projections and ``[B, *event]`` for noise.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch


def event_norm(u: torch.Tensor, batch_dims: int) -> torch.Tensor:
    """Norm over the event dims of ``u``, shaped to broadcast against ``u``."""
    lead = u.shape[:batch_dims]
    norm = u.reshape(*lead, -1).norm(dim=-1)
    return norm.reshape(*lead, *([1] * (u.dim() - batch_dims)))


def event_absmax(u: torch.Tensor, batch_dims: int) -> torch.Tensor:
    """``max |u|`` over the event dims of ``u``, shaped to broadcast against ``u``."""
    lead = u.shape[:batch_dims]
    return u.reshape(*lead, -1).abs().amax(dim=-1).reshape(*lead, *([1] * (u.dim() - batch_dims)))


def unit_directions(u: torch.Tensor) -> torch.Tensor:
    """``u / ||u||`` per example, for ``u`` of shape ``[M, B, *event]``.

    Scale-invariant in floating point: ``u`` is first divided by ``max |u|`` so that the
    squared norm can neither overflow (``u * 1e25`` in float32) nor underflow
    (``u * 1e-25``). A zero direction stays zero (callers reject it).
    """
    scale = event_absmax(u, 2)
    w = u / torch.where(scale > 0, scale, torch.ones_like(scale))
    norm = event_norm(w, 2)
    return w / torch.where(norm > 0, norm, torch.ones_like(norm))


def has_zero_direction(u: torch.Tensor) -> bool:
    """Whether some ``u[m, b]`` of ``[M, B, *event]`` is exactly zero (a host sync)."""
    return not bool(u.reshape(u.shape[0], u.shape[1], -1).ne(0).any(-1).all())


def draw_projections(
    shape: Sequence[int],
    projection: str,
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Projections ``v`` with ``E[v v^T] = I`` of shape ``[M, B, *event]``.

    ``rademacher``: entries +-1; ``gaussian``: N(0, I); ``sphere``: uniform on the sphere of
    radius ``sqrt(D)``.
    """
    shape = tuple(shape)
    if projection == "rademacher":
        bits = torch.randint(0, 2, shape, generator=generator, device=device)
        return bits.to(dtype) * 2 - 1
    g = torch.randn(shape, generator=generator, dtype=dtype, device=device)
    if projection == "gaussian":
        return g
    return math.sqrt(math.prod(shape[2:])) * (g / event_norm(g, 2))


def draw_directions(
    shape: Sequence[int],
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Finite-difference directions ``u``, uniform on the unit sphere, ``[M, B, *event]``."""
    # Gaussian draws have norms far from over/underflow: the plain normalization suffices
    g = torch.randn(tuple(shape), generator=generator, dtype=dtype, device=device)
    return g / event_norm(g, 2)


def draw_noise(
    shape: Sequence[int],
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Standard normal noise ``n`` of shape ``[B, *event]``."""
    return torch.randn(tuple(shape), generator=generator, dtype=dtype, device=device)


def draw_noise_levels(
    sigmas: Sequence[float],
    batch: int,
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """``[B]`` noise levels drawn uniformly (with replacement) from ``sigmas`` (``ms_dsm``)."""
    index = torch.randint(len(sigmas), (batch,), generator=generator, device=device)
    return torch.tensor(tuple(sigmas), dtype=dtype, device=device)[index]
