"""Small networks used as energies and score models (JAX): pure ``init`` / ``apply``
functions over a list of ``(W [in, out], b [out])`` pairs, the layout of
``ppl_score.torch.nets.mlp_params``."""

from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from .validate import check_key


def mlp_init(
    key: jax.Array, sizes: Sequence[int], dtype: jnp.dtype | type = jnp.float32, zero_bias: bool = False
) -> list[tuple[jax.Array, jax.Array]]:
    """Layers of widths ``sizes`` (``sizes[0]`` in, ``sizes[-1]`` out) with torch's default ``nn.Linear`` init
    (uniform in +-1/sqrt(fan_in)); ``zero_bias``: biases start at zero (and each layer's key
    goes whole to its weights)."""
    key = check_key(key)
    params = []
    for k, (a, b) in zip(jax.random.split(key, len(sizes) - 1), zip(sizes[:-1], sizes[1:])):
        bound = 1.0 / math.sqrt(a)
        if zero_bias:
            params.append((jax.random.uniform(k, (a, b), dtype, -bound, bound), jnp.zeros(b, dtype)))
            continue
        kw, kb = jax.random.split(k)
        params.append(
            (jax.random.uniform(kw, (a, b), dtype, -bound, bound), jax.random.uniform(kb, (b,), dtype, -bound, bound))
        )
    return params


def mlp_apply(
    params: Sequence[tuple[jax.Array, jax.Array]],
    h: jax.Array,
    activation: Callable[[jax.Array], jax.Array] = jax.nn.softplus,
) -> jax.Array:
    for w, b in params[:-1]:
        h = activation(h @ w + b)
    w, b = params[-1]
    return h @ w + b


def energy_init(
    key: jax.Array, dim: int, hidden: Sequence[int] = (512, 512, 512), dtype: jnp.dtype | type = jnp.float32
) -> list[tuple[jax.Array, jax.Array]]:
    """Parameters of ``energy_apply``: an MLP ``dim -> hidden -> 1``."""
    return mlp_init(key, (dim, *hidden, 1), dtype)


def energy_apply(
    params: Sequence[tuple[jax.Array, jax.Array]],
    x: jax.Array,
    activation: Callable[[jax.Array], jax.Array] = jax.nn.softplus,
    quadratic: float = 0.0,
) -> jax.Array:
    """``log p(x) + const`` for ``x[B, *event] -> [B]``; mirrors ``torch.nets.MLPEnergy``."""
    flat = x.reshape(x.shape[0], -1)
    out = mlp_apply(params, flat, activation)[:, 0]
    if quadratic:
        out = out - 0.5 * quadratic * (flat * flat).sum(-1)
    return out


def score_init(
    key: jax.Array, dim: int, hidden: Sequence[int] = (256, 256), dtype: jnp.dtype | type = jnp.float32
) -> list[tuple[jax.Array, jax.Array]]:
    return mlp_init(key, (dim, *hidden, dim), dtype)


def score_apply(
    params: Sequence[tuple[jax.Array, jax.Array]],
    x: jax.Array,
    activation: Callable[[jax.Array], jax.Array] = jax.nn.softplus,
) -> jax.Array:
    """Score network ``x[B, *event] -> [B, *event]``; mirrors ``torch.nets.MLPScore``."""
    return mlp_apply(params, x.reshape(x.shape[0], -1), activation).reshape(x.shape)
