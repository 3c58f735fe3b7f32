"""The JAX half of the validation path (:mod:`ppl_score.common.validate` holds the
framework-free half): the checks of JAX arguments every module of the JAX backend and the
NumPyro front end share (arrays, PRNG keys), so one rule gives one message.

Type errors raise ``TypeError`` and value errors ``ValueError``, naming the argument. Value
checks need concrete values: they run eagerly with validation on
(``ppl_score.set_validation``) and are skipped under tracing (``jit``, ``grad``, ``vmap``).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..common.validate import is_validation_enabled

__all__ = ["check_array", "check_key", "is_concrete"]


def is_concrete(a: Any) -> bool:
    """Whether ``a`` has values (not a tracer of ``jit``, ``grad`` or ``vmap``)."""
    return not isinstance(a, jax.core.Tracer)


def check_array(
    name: str,
    a: Any,
    *,
    dtype: str | None = "floating",
    finite: bool = True,
    cast: jnp.dtype | type | None = None,
) -> jax.Array:
    """Check that argument ``name`` is an array of the right kind and return it as a ``jax.Array``.

    Args:
        name: the argument's name, for the message.
        a: the value passed: a ``jax.Array`` (a tracer included) or a numpy array.
        dtype: ``"floating"`` (a floating dtype), ``"real"`` (floating or integer) or ``None``
            (any dtype); checked before any cast.
        finite: also check that every entry is finite (eagerly, with validation on).
        cast: a dtype to convert to, or ``None`` to keep ``a``'s.

    Raises:
        TypeError: ``a`` is not an array, or has the wrong dtype.
        ValueError: ``a`` holds nan or inf.
    """
    if not isinstance(a, (jax.Array, np.ndarray)):
        raise TypeError(f"argument {name!r} must be a jax.Array or numpy array, got {type(a).__name__}")
    if dtype == "floating" and not jnp.issubdtype(a.dtype, jnp.floating):
        raise TypeError(f"argument {name!r} must have a floating dtype, got {a.dtype}")
    if dtype == "real" and not (jnp.issubdtype(a.dtype, jnp.floating) or jnp.issubdtype(a.dtype, jnp.signedinteger)):
        raise TypeError(f"argument {name!r} must be a real array, got dtype {a.dtype}")
    a = jnp.asarray(a) if cast is None else jnp.asarray(a, dtype=cast)
    # numpy, not jnp: inside a jit trace jnp ops on a closed-over concrete array return tracers
    if finite and is_validation_enabled() and is_concrete(a) and not np.isfinite(np.asarray(a)).all():
        raise ValueError(f"argument {name!r} contains non-finite values (nan or inf)")
    return a


def check_key(key: Any, name: str = "key") -> jax.Array | np.ndarray:
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
