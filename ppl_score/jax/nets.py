"""Small networks used as energies and score models (JAX): pure ``init`` / ``apply``
functions over a list of ``(W [in, out], b [out])`` pairs, the layout of
``ppl_score.torch.nets.mlp_params``; ``b`` is ``None`` for a layer without bias (the last
layer of an energy)."""

from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from ..common.objectives import check_noise_conditioning, check_sigma_shape
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


def _affine(h: jax.Array, w: jax.Array, b: jax.Array | None) -> jax.Array:
    return h @ w if b is None else h @ w + b


def mlp_apply(
    params: Sequence[tuple[jax.Array, jax.Array | None]],
    h: jax.Array,
    activation: Callable[[jax.Array], jax.Array] = jax.nn.softplus,
) -> jax.Array:
    """The MLP of ``params`` at ``h``: ``activation`` between the layers, none after the
    last; a layer whose bias is ``None`` has none."""
    for w, b in params[:-1]:
        h = activation(_affine(h, w, b))
    return _affine(h, *params[-1])


def energy_init(
    key: jax.Array, dim: int, hidden: Sequence[int] = (512, 512, 512), dtype: jnp.dtype | type = jnp.float32
) -> list[tuple[jax.Array, jax.Array | None]]:
    """Parameters of ``energy_apply``: an MLP ``dim -> hidden -> 1`` whose last layer has no
    bias (``None``): a constant offset of the log density is not identifiable by score
    matching and receives no gradient; mirrors ``torch.nets.MLPEnergy``. The weights are
    those ``mlp_init`` draws for the same sizes (the last bias is drawn and discarded)."""
    params = mlp_init(key, (dim, *hidden, 1), dtype)
    params[-1] = (params[-1][0], None)
    return params


def energy_apply(
    params: Sequence[tuple[jax.Array, jax.Array | None]],
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


def noise_conditional_score_init(
    key: jax.Array,
    dim: int,
    hidden: Sequence[int] = (256, 256),
    dtype: jnp.dtype | type = jnp.float32,
    *,
    condition_on_sigma: bool = True,
    divide_by_sigma: bool = False,
) -> list[tuple[jax.Array, jax.Array]]:
    """Parameters of ``noise_conditional_score_apply`` (mirrors
    ``torch.nets.NoiseConditionalScore``): an MLP ``dim (+1 for log sigma) -> hidden -> dim``."""
    check_noise_conditioning(condition_on_sigma, divide_by_sigma)
    return mlp_init(key, (dim + int(condition_on_sigma), *hidden, dim), dtype)


def noise_conditional_score_apply(
    params: Sequence[tuple[jax.Array, jax.Array]],
    x: jax.Array,
    sigma: jax.Array,
    activation: Callable[[jax.Array], jax.Array] = jax.nn.softplus,
    *,
    condition_on_sigma: bool = True,
    divide_by_sigma: bool = False,
) -> jax.Array:
    """``s(x, sigma)``, ``x[B, *event], sigma[B] -> [B, *event]``: the MLP of ``params`` on
    ``[x, log sigma]`` (``condition_on_sigma``), divided by ``sigma`` (``divide_by_sigma``,
    NCSNv2's ``s_theta(x) / sigma``); mirrors ``torch.nets.NoiseConditionalScore``."""
    flat = x.reshape(x.shape[0], -1)
    sigma = jnp.asarray(sigma, flat.dtype)
    check_sigma_shape(sigma.shape, x.shape[0])
    sigma = jnp.broadcast_to(sigma, (x.shape[0],))
    h = jnp.concatenate([flat, jnp.log(sigma)[:, None]], -1) if condition_on_sigma else flat
    out = mlp_apply(params, h, activation)
    if divide_by_sigma:
        out = out / sigma[:, None]
    return out.reshape(x.shape)


def noise_conditional_energy_init(
    key: jax.Array, dim: int, hidden: Sequence[int] = (256, 256), dtype: jnp.dtype | type = jnp.float32
) -> list[tuple[jax.Array, jax.Array | None]]:
    """Parameters of ``noise_conditional_energy_apply`` (mirrors
    ``torch.nets.NoiseConditionalEnergy``): ``energy_init`` with one more input, ``log sigma``."""
    return energy_init(key, dim + 1, hidden, dtype)


def noise_conditional_energy_apply(
    params: Sequence[tuple[jax.Array, jax.Array | None]],
    x: jax.Array,
    sigma: jax.Array,
    activation: Callable[[jax.Array], jax.Array] = jax.nn.softplus,
    quadratic: float = 0.0,
) -> jax.Array:
    """``log p_sigma(x) + const``, ``x[B, *event], sigma[B] -> [B]``; mirrors
    ``torch.nets.NoiseConditionalEnergy``."""
    flat = x.reshape(x.shape[0], -1)
    sigma = jnp.asarray(sigma, flat.dtype)
    check_sigma_shape(sigma.shape, x.shape[0])
    sigma = jnp.broadcast_to(sigma, (x.shape[0],))
    out = mlp_apply(params, jnp.concatenate([flat, jnp.log(sigma)[:, None]], -1), activation)[:, 0]
    if quadratic:
        out = out - 0.5 * quadratic * (flat * flat).sum(-1)
    return out
