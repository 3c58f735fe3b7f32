"""Random projections, finite-difference directions and noise (JAX).

Every draw takes an explicit PRNG key. Shapes are ``[M, B, *event]`` for projections and
``[B, *event]`` for noise.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def event_norm(u: jax.Array, batch_dims: int) -> jax.Array:
    """Norm over the event dims of ``u``, shaped to broadcast against ``u``."""
    lead = u.shape[:batch_dims]
    norm = jnp.linalg.norm(u.reshape(*lead, -1), axis=-1)
    return norm.reshape(*lead, *([1] * (u.ndim - batch_dims)))


def event_absmax(u: jax.Array, batch_dims: int) -> jax.Array:
    """``max |u|`` over the event dims of ``u``, shaped to broadcast against ``u``."""
    lead = u.shape[:batch_dims]
    return jnp.abs(u.reshape(*lead, -1)).max(axis=-1).reshape(*lead, *([1] * (u.ndim - batch_dims)))


def unit_directions(u: jax.Array) -> jax.Array:
    """``u / ||u||`` per example, for ``u`` of shape ``[M, B, *event]``.

    Scale-invariant in floating point: ``u`` is first divided by ``max |u|`` so that the
    squared norm can neither overflow (``u * 1e25`` in float32) nor underflow
    (``u * 1e-25``). A zero direction stays zero (callers reject it).
    """
    scale = event_absmax(u, 2)
    w = u / jnp.where(scale > 0, scale, 1)
    norm = event_norm(w, 2)
    return w / jnp.where(norm > 0, norm, 1)


def has_zero_direction(u: jax.Array | np.ndarray) -> bool:
    """Whether some ``u[m, b]`` of a concrete ``[M, B, *event]`` array is exactly zero."""
    u = np.asarray(u)
    return not (u.reshape(u.shape[0], u.shape[1], -1) != 0).any(-1).all()


def draw_projections(key: jax.Array, shape: Sequence[int], projection: str, dtype: jnp.dtype | type) -> jax.Array:
    """Projections ``v`` with ``E[v v^T] = I`` of shape ``[M, B, *event]``.

    ``rademacher``: entries +-1; ``gaussian``: N(0, I); ``sphere``: uniform on the sphere of
    radius ``sqrt(D)``.
    """
    shape = tuple(shape)
    if projection == "rademacher":
        return jax.random.rademacher(key, shape, dtype=dtype)
    g = jax.random.normal(key, shape, dtype=dtype)
    if projection == "gaussian":
        return g
    return math.sqrt(math.prod(shape[2:])) * (g / event_norm(g, 2))


def draw_directions(key: jax.Array, shape: Sequence[int], dtype: jnp.dtype | type) -> jax.Array:
    """Finite-difference directions ``u``, uniform on the unit sphere, ``[M, B, *event]``."""
    # Gaussian draws have norms far from over/underflow: the plain normalization suffices
    g = jax.random.normal(key, tuple(shape), dtype=dtype)
    return g / event_norm(g, 2)


def draw_noise(key: jax.Array, shape: Sequence[int], dtype: jnp.dtype | type) -> jax.Array:
    """Standard normal noise ``n`` of shape ``[B, *event]``."""
    return jax.random.normal(key, tuple(shape), dtype=dtype)


def draw_noise_levels(key: jax.Array, sigmas: Sequence[float], batch: int, dtype: jnp.dtype | type) -> jax.Array:
    """``[B]`` noise levels drawn uniformly (with replacement) from ``sigmas`` (``ms_dsm``)."""
    index = jax.random.randint(key, (batch,), 0, len(sigmas))
    return jnp.asarray(tuple(sigmas), dtype=dtype)[index]
