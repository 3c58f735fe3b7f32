"""Checks of JAX arguments shared by every module of the JAX backend and by the NumPyro
front end: PRNG keys, and whether a value is concrete (value checks run eagerly and are
skipped under tracing)."""

from __future__ import annotations

import jax
import numpy as np

__all__ = ["check_key", "is_concrete"]


def is_concrete(a) -> bool:
    """Whether ``a`` has values (not a tracer of ``jit``, ``grad`` or ``vmap``)."""
    return not isinstance(a, jax.core.Tracer)


def check_key(key, name: str = "key"):
    """Validate a single PRNG key: a typed key (``jax.random.key(seed)``, shape ``()``) or a
    raw ``uint32`` key (``jax.random.PRNGKey(seed)``). Works on tracers (shape and dtype only).

    Raises:
        TypeError: ``key`` is not an array, or an array of another dtype (an int seed, a
            string, a float array).
        ValueError: a batch of keys, or a raw key of the wrong shape.
    """
    how = "jax.random.key(seed) or jax.random.PRNGKey(seed)"
    if not isinstance(key, (jax.Array, np.ndarray)):
        raise TypeError(f"argument {name!r} must be a PRNG key ({how}), got {type(key).__name__}")
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        if key.shape != ():
            raise ValueError(
                f"argument {name!r} must be a single PRNG key, got a batch of keys of shape "
                f"{tuple(key.shape)}; pass one of them (key[0]) or split a single key"
            )
        return key
    if key.dtype != np.uint32:
        raise TypeError(f"argument {name!r} must be a PRNG key ({how}), got an array of dtype {key.dtype}")
    raw_shape = _raw_key_shape()
    if key.shape != raw_shape:
        if key.ndim > len(raw_shape) and tuple(key.shape[-len(raw_shape) :]) == raw_shape:
            raise ValueError(
                f"argument {name!r} must be a single PRNG key, got a batch of keys of shape "
                f"{tuple(key.shape)}; pass one of them (key[0]) or split a single key"
            )
        raise ValueError(f"argument {name!r}: a raw uint32 key has shape {raw_shape}, got {tuple(key.shape)}")
    return key


_RAW_KEY_SHAPE: tuple | None = None


def _raw_key_shape() -> tuple:
    global _RAW_KEY_SHAPE
    if _RAW_KEY_SHAPE is None:
        _RAW_KEY_SHAPE = tuple(jax.eval_shape(jax.random.PRNGKey, 0).shape)
    return _RAW_KEY_SHAPE
