r"""Calibrating the generalized-Bayes weight ``beta`` (JAX): the sandwich matrices of a
per-datum loss and the calibrated ``beta`` from them. Mirrors ``ppl_score.torch.calibration``
function for function; the formulas, their derivation and the references are in
``ppl_score.common.calibration``.

With per-datum losses ``SM_i(z)`` and weights ``w_i``, at ``z`` (a minimizer of
``L(z) = sum_i w_i SM_i(z)``)::

    H = grad_z^2 L(z),   J = sum_i w_i (g_i - g_bar)(g_i - g_bar)^T,   g_i = grad_z SM_i(z)

    "lyddon":    beta = tr(H J^{-1} H) / tr(H)      (Lyddon, Holmes & Walker 2019)
    "magnitude": beta = D / tr(H^{-1} J)            (Ribatet, Cooley & Davison 2012)

so that ``p(z) exp(-beta L(z))`` has, asymptotically, the spread of the estimator
``argmin L`` (covariance ``H^{-1} J H^{-1}``); exactly so for ``D = 1`` (``beta = H / J``).

Traceable (``jit``, ``vmap``); the value checks (positive definiteness, a finite beta) run
eagerly only, and under tracing a failed one gives NaN.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ..common import calibration as shared
from .validate import is_concrete

__all__ = ["Sandwich", "sandwich", "sandwich_beta", "calibrate_beta"]


class Sandwich(NamedTuple):
    """The sandwich matrices of a per-datum loss at ``z``.

    Attributes:
        hessian: ``H = grad_z^2 sum_i w_i SM_i(z)``, ``[D, D]`` (symmetrized).
        meat: ``J = sum_i w_i (g_i - g_bar)(g_i - g_bar)^T``, ``[D, D]``.
        grads: the per-datum gradients ``g_i = grad_z SM_i(z)``, ``[n, D]``.
        weights: ``w_i``, ``[n]`` (ones when ``fn`` gave none).
    """

    hessian: jax.Array
    meat: jax.Array
    grads: jax.Array
    weights: jax.Array

    def covariance(self) -> jax.Array:
        """The estimator's sandwich covariance ``H^{-1} J H^{-1}``, ``[D, D]``."""
        a = jnp.linalg.solve(self.hessian, self.meat)
        return jnp.linalg.solve(self.hessian, a.T)


def _split(out):
    if isinstance(out, tuple):
        if len(out) != 2:
            raise ValueError(
                f"argument 'fn' must return losses [n] or a pair (losses [n], weights [n] or None), "
                f"got a tuple of length {len(out)}"
            )
        return out
    return out, None


def sandwich(fn: Callable[[jax.Array], object], z: jax.Array) -> Sandwich:
    """The sandwich matrices ``H`` and ``J`` of the per-datum losses ``fn`` at ``z``.

    Derivatives by ``jax.jacfwd`` (the per-datum gradients ``[n, D]``: ``D`` forward
    passes) and ``jax.hessian`` of the weighted sum.

    Args:
        fn: ``z [D] -> losses [n]``, or ``-> (losses [n], weights [n] or None)`` (what
            ``ScoreMatching.datum_losses`` returns): the per-datum losses ``SM_i(z)``,
            jax-traceable and differentiable twice in ``z``; weights are taken as constants.
        z: the point, a floating vector ``[D]`` (e.g. the score-matching estimate).

    Returns:
        A :class:`Sandwich` ``(hessian, meat, grads, weights)``.

    Raises:
        TypeError: ``z`` is not a floating array.
        ValueError: ``z`` is not a vector, ``fn``'s output has the wrong shape, fewer than
            two data points, or (eagerly) the losses do not depend on ``z``.
    """
    z = jnp.asarray(z)
    if not jnp.issubdtype(z.dtype, jnp.floating):
        raise TypeError(f"argument 'z' must be a floating array, got dtype {z.dtype}")
    shared.check_z_shape(tuple(z.shape))

    def split(v):
        losses, weights = _split(fn(v))
        losses = jnp.asarray(losses)
        shared.check_fn_output(tuple(losses.shape), None if weights is None else tuple(jnp.shape(weights)))
        w = jnp.ones_like(losses) if weights is None else jax.lax.stop_gradient(jnp.asarray(weights, losses.dtype))
        return losses, w

    grads, w = jax.jacfwd(split, has_aux=True)(z)
    n = grads.shape[0]
    if n < 2:
        raise shared.too_few_data_error(n)
    if is_concrete(grads) and not np.any(np.asarray(grads)):
        raise shared.no_dependence_error()

    def total(v):
        losses, weights = split(v)
        return jnp.sum(weights * losses)

    hessian = jax.hessian(total)(z)
    hessian = 0.5 * (hessian + hessian.T)
    centred = grads - jnp.sum(w[:, None] * grads, 0) / jnp.sum(w)
    meat = (w[:, None] * centred).T @ centred
    return Sandwich(hessian, meat, grads, w)


def _positive_definite(m: jax.Array) -> jax.Array:
    return jnp.all(jnp.isfinite(jnp.linalg.cholesky(m)))


def sandwich_beta(hessian: jax.Array, meat: jax.Array, rule: str = "lyddon") -> jax.Array:
    """The calibrated ``beta`` from the sandwich matrices (see the module docstring).

    Args:
        hessian: ``H``, ``[D, D]``, symmetric positive definite.
        meat: ``J``, ``[D, D]``, symmetric positive (semi-)definite (definite for ``"lyddon"``).
        rule: ``"lyddon"`` (``tr(H J^{-1} H) / tr(H)``) or ``"magnitude"`` (``D / tr(H^{-1} J)``).

    Returns:
        ``beta``, a 0-d array (NaN under tracing where an eager call raises).

    Raises:
        TypeError, ValueError: a bad ``rule``; shapes that do not match; eagerly, ``H``
            (or, for ``"lyddon"``, ``J``) not positive definite, or a beta that is not finite
            and ``> 0``.
    """
    rule = shared.check_rule(rule)
    dtype = jnp.result_type(hessian, meat)
    hessian, meat = jnp.asarray(hessian, dtype), jnp.asarray(meat, dtype)
    d = shared.check_matrices(tuple(hessian.shape), tuple(meat.shape))
    ok = _positive_definite(hessian)
    if is_concrete(ok) and not bool(ok):
        raise shared.not_positive_definite_error("hessian")
    if rule == "lyddon":
        ok_meat = _positive_definite(meat)
        if is_concrete(ok_meat) and not bool(ok_meat):
            raise shared.not_positive_definite_error("meat")
        ok = ok & ok_meat
        beta = jnp.trace(hessian @ jnp.linalg.solve(meat, hessian)) / jnp.trace(hessian)
    else:
        beta = d / jnp.trace(jnp.linalg.solve(hessian, meat))
    if is_concrete(beta):
        shared.check_beta_value(rule, float(beta))
    return jnp.where(ok, beta, jnp.nan)


def calibrate_beta(fn: Callable[[jax.Array], object], z: jax.Array, *, rule: str = "lyddon") -> jax.Array:
    """``sandwich_beta(*sandwich(fn, z)[:2], rule)``: the calibrated ``beta`` of the
    generalized posterior ``p(z) exp(-beta sum_i w_i SM_i(z))``.

    Args:
        fn: per-datum losses, as in :func:`sandwich`.
        z: the point, a floating vector ``[D]``.
        rule: ``"lyddon"`` (default) or ``"magnitude"``.

    Returns:
        ``beta``, a 0-d array.

    Raises:
        TypeError, ValueError: as :func:`sandwich` and :func:`sandwich_beta`.
    """
    rule = shared.check_rule(rule)
    s = sandwich(fn, z)
    return sandwich_beta(s.hessian, s.meat, rule)
