"""DEQ energies and score networks registered as NumPyro modules, for use inside models.

``deq_energy`` / ``deq_score`` return stax-style ``(init_fn, apply_fn)`` pairs, which
``numpyro.module`` registers as one param (``name + "$params"``) that ``SVI`` optimizes;
``deq_energy_module`` / ``deq_score_module`` do that call. The math, options and backward
modes are those of ``ppl_score.jax.deq``::

    def model(x):
        energy = deq_energy_module("energy", dim, width=64, quadratic=1.0)
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("x", Unnormalized(energy, event_shape=(dim,)), obs=x)

The returned function is also a plain ``fn`` for ``ppl_score.jax.score_matching_loss``.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpyro
from jax.typing import DTypeLike

from ..common.validate import check_int
from ..jax import deq as backend

__all__ = ["deq_energy", "deq_score", "deq_energy_module", "deq_score_module"]


def _event_size(input_shape) -> int:
    if input_shape is None or len(input_shape) < 2:
        raise ValueError(f"argument 'input_shape' must be [B, *event], got {input_shape!r}")
    return math.prod(input_shape[1:])


class _Init:
    """``init_fn(rng_key, input_shape) -> (output_shape, params)`` of a stax-style pair: a
    module-level class rather than a closure, so the pair pickles and deep-copies."""

    def __init__(self, kind: str, width: int, dtype):
        self.kind, self.width, self.dtype = kind, width, dtype

    def __call__(self, rng_key, input_shape):
        dim = _event_size(input_shape)
        dtype = self.dtype or jnp.result_type(float)
        if self.kind == "energy":
            return tuple(input_shape[:1]), backend.deq_energy_init(rng_key, dim, self.width, dtype)
        return tuple(input_shape), backend.deq_score_init(rng_key, dim, self.width, dtype)


class _Apply:
    """``apply_fn(params, x) -> log p(x)`` (``kind="energy"``) or ``s(x)`` (``"score"``)."""

    def __init__(self, kind: str, config: backend.DEQConfig, quadratic: float = 0.0):
        self.kind, self.config, self.quadratic = kind, config, quadratic

    def __call__(self, params, x, **_):
        if self.kind == "energy":
            return backend.deq_energy_apply(params, x, self.config, quadratic=self.quadratic)
        return backend.deq_score_apply(params, x, self.config)


def deq_energy(
    width: int = 512, *, quadratic: float = 0.0, dtype: DTypeLike | None = None, **options: Any
) -> tuple[Callable, Callable]:
    """Stax-style ``(init_fn, apply_fn)`` of ``ppl_score.jax.deq.deq_energy_apply``: the
    energy ``log p(x) = w^T z*(x) + c - quadratic/2 ||x||^2 + const`` of the fixed point
    ``z*(x)`` of a weight-tied layer (a deep equilibrium model [1], as a score model [2]).

    Args:
        width: the DEQ layer's width.
        quadratic: the coefficient of ``-quadratic/2 ||x||^2`` in ``log p``.
        dtype: of the parameters; defaults to JAX's default float (float64 with x64 enabled).
        **options: go to ``ppl_score.jax.deq.deq_config``; defaults ``solver="iteration"``,
            ``tol=1e-4``, ``gamma=0.9``, the same as torch's (their trade-off:
            ``ppl_score.jax.deq.deq_layer_apply``).

    Returns:
        ``(init_fn, apply_fn)`` with ``apply_fn(params, x [B, *event]) -> [B]``; both pickle.

    References:
        [1] S. Bai, J. Z. Kolter, V. Koltun, "Deep equilibrium models", NeurIPS, 2019.

        [2] Y. Huang, Q. Wang, A. Onwunta, B. Wang, "Efficient score matching with deep equilibrium
        layers", ICLR, 2024.
    """
    config = backend.deq_config(**options)
    width = check_int("width", width)
    return _Init("energy", width, dtype), _Apply("energy", config, quadratic)


def deq_score(width: int = 256, *, dtype: DTypeLike | None = None, **options: Any) -> tuple[Callable, Callable]:
    """Stax-style ``(init_fn, apply_fn)`` of ``ppl_score.jax.deq.deq_score_apply``: a score
    network read off the fixed point ``z*(x)`` of a weight-tied layer (a deep equilibrium
    model [1], as a score model [2]).

    Args:
        width: the DEQ layer's width.
        dtype: of the parameters; defaults to JAX's default float.
        **options: go to ``ppl_score.jax.deq.deq_config``; defaults ``solver="iteration"``,
            ``tol=1e-4``, ``gamma=0.9``, the same as torch's (their trade-off:
            ``ppl_score.jax.deq.deq_layer_apply``).

    Returns:
        ``(init_fn, apply_fn)`` with ``apply_fn(params, x [B, *event]) -> [B, *event]``; both
        pickle.

    References:
        [1] S. Bai, J. Z. Kolter, V. Koltun, "Deep equilibrium models", NeurIPS, 2019.

        [2] Y. Huang, Q. Wang, A. Onwunta, B. Wang, "Efficient score matching with deep equilibrium
        layers", ICLR, 2024.
    """
    config = backend.deq_config(**options)
    width = check_int("width", width)
    return _Init("score", width, dtype), _Apply("score", config)


def deq_energy_module(
    name: str, dim: int, width: int = 512, *, quadratic: float = 0.0, **options: Any
) -> Callable[[jax.Array], jax.Array]:
    """``numpyro.module(name, deq_energy(...), input_shape=(1, dim))``: call inside a model
    (under a ``seed`` handler on first use, as ``numpyro.module`` requires)."""
    return numpyro.module(name, deq_energy(width, quadratic=quadratic, **options), input_shape=(1, dim))


def deq_score_module(name: str, dim: int, width: int = 256, **options: Any) -> Callable[[jax.Array], jax.Array]:
    """``numpyro.module(name, deq_score(...), input_shape=(1, dim))``."""
    return numpyro.module(name, deq_score(width, **options), input_shape=(1, dim))
