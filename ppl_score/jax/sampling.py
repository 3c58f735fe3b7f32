"""Random projections, finite-difference directions and noise (JAX).

Every draw takes an explicit PRNG key. Shapes are ``[M, B, *event]`` for projections and
``[B, *event]`` for noise.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def event_norm(u: jax.Array, batch_dims: int) -> jax.Array:
    """Norm over the event dims of ``u``, shaped to broadcast against ``u``."""
    lead = u.shape[:batch_dims]
    norm = jnp.linalg.norm(u.reshape(*lead, -1), axis=-1)
    return norm.reshape(*lead, *([1] * (u.ndim - batch_dims)))


def unit_directions(u: jax.Array) -> jax.Array:
    """``u / ||u||`` per example, for ``u`` of shape ``[M, B, *event]``."""
    return u / event_norm(u, 2)


def draw_projections(key, shape, projection: str, dtype) -> jax.Array:
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
    return math.sqrt(math.prod(shape[2:])) * unit_directions(g)


def draw_directions(key, shape, dtype) -> jax.Array:
    """Finite-difference directions ``u``, uniform on the unit sphere, ``[M, B, *event]``."""
    return unit_directions(jax.random.normal(key, tuple(shape), dtype=dtype))


def draw_noise(key, shape, dtype) -> jax.Array:
    """Standard normal noise ``n`` of shape ``[B, *event]``."""
    return jax.random.normal(key, tuple(shape), dtype=dtype)
