r"""Calibrating the generalized-Bayes weight ``beta`` (torch): the sandwich matrices of a
per-datum loss and the calibrated ``beta`` from them. Mirrors ``ppl_score.jax.calibration``
function for function; the formulas, their derivation and the references are in
``ppl_score.common.calibration``.

With per-datum losses ``SM_i(z)`` and weights ``w_i``, at ``z`` (a minimizer of
``L(z) = sum_i w_i SM_i(z)``)::

    H = grad_z^2 L(z),   J = sum_i w_i (g_i - g_bar)(g_i - g_bar)^T,   g_i = grad_z SM_i(z)

    "lyddon":    beta = tr(H J^{-1} H) / tr(H)      (Lyddon, Holmes & Walker 2019)
    "magnitude": beta = D / tr(H^{-1} J)            (Ribatet, Cooley & Davison 2012)

so that ``p(z) exp(-beta L(z))`` has, asymptotically, the spread of the estimator
``argmin L`` (covariance ``H^{-1} J H^{-1}``); exactly so for ``D = 1`` (``beta = H / J``).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from ..common import calibration as shared

__all__ = ["Sandwich", "sandwich", "sandwich_beta", "calibrate_beta"]


class Sandwich(NamedTuple):
    """The sandwich matrices of a per-datum loss at ``z``.

    Attributes:
        hessian: ``H = grad_z^2 sum_i w_i SM_i(z)``, ``[D, D]`` (symmetrized).
        meat: ``J = sum_i w_i (g_i - g_bar)(g_i - g_bar)^T``, ``[D, D]``.
        grads: the per-datum gradients ``g_i = grad_z SM_i(z)``, ``[n, D]``.
        weights: ``w_i``, ``[n]`` (ones when ``fn`` gave none).
    """

    hessian: torch.Tensor
    meat: torch.Tensor
    grads: torch.Tensor
    weights: torch.Tensor

    def covariance(self) -> torch.Tensor:
        """The estimator's sandwich covariance ``H^{-1} J H^{-1}``, ``[D, D]``."""
        a = torch.linalg.solve(self.hessian, self.meat)
        return torch.linalg.solve(self.hessian, a.mT)


def _split(out):
    if isinstance(out, tuple):
        if len(out) != 2:
            raise ValueError(
                f"argument 'fn' must return losses [n] or a pair (losses [n], weights [n] or None), "
                f"got a tuple of length {len(out)}"
            )
        return out
    return out, None


def _grad_or_zeros(out, inputs, **kw):
    (g,) = torch.autograd.grad(out, inputs, allow_unused=True, **kw)
    return torch.zeros_like(inputs) if g is None else g


def sandwich(fn: Callable[[torch.Tensor], object], z: torch.Tensor) -> Sandwich:
    """The sandwich matrices ``H`` and ``J`` of the per-datum losses ``fn`` at ``z``.

    Derivatives by autograd on one call of ``fn``: ``H`` row by row (``D`` double-backward
    passes), the per-datum gradients ``[n, D]`` column by column through a vector-Jacobian
    product linear in its cotangent (``D`` more passes, not ``n``).

    Args:
        fn: ``z [D] -> losses [n]``, or ``-> (losses [n], weights [n] or None)`` (what
            ``ScoreMatching.datum_losses`` returns): the per-datum losses ``SM_i(z)``,
            differentiable twice in ``z``; weights are taken as constants.
        z: the point, a floating vector ``[D]`` (e.g. the score-matching estimate).

    Returns:
        A :class:`Sandwich` ``(hessian, meat, grads, weights)``.

    Raises:
        TypeError: ``z`` is not a floating tensor.
        ValueError: ``z`` is not a vector, ``fn``'s output has the wrong shape, fewer than
            two data points, or the losses do not depend on ``z``.
    """
    z = torch.as_tensor(z)
    if not z.is_floating_point():
        raise TypeError(f"argument 'z' must be a floating tensor, got dtype {z.dtype}")
    d = shared.check_z_shape(tuple(z.shape))
    z = z.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        losses, weights = _split(fn(z))
        losses = torch.as_tensor(losses)
        n = shared.check_fn_output(tuple(losses.shape), None if weights is None else tuple(weights.shape))
        if n < 2:
            raise shared.too_few_data_error(n)
        w = torch.ones_like(losses) if weights is None else weights.detach().to(losses.dtype)
        if not losses.requires_grad:
            raise shared.no_dependence_error()
        (g,) = torch.autograd.grad((w * losses).sum(), z, create_graph=True, allow_unused=True)
        if g is None:
            raise shared.no_dependence_error()
        if g.requires_grad:
            hessian = torch.stack([_grad_or_zeros(g[k], z, retain_graph=True) for k in range(d)])
        else:  # the loss is linear in z
            hessian = torch.zeros(d, d, dtype=z.dtype, device=z.device)
        # per-datum gradients: vjp(u) = G^T u is linear in u, so d vjp_k / du = G[:, k]
        u = torch.zeros_like(losses, requires_grad=True)
        (vjp,) = torch.autograd.grad(losses, z, grad_outputs=u, create_graph=True, allow_unused=True)
        grads = torch.stack([_grad_or_zeros(vjp[k], u, retain_graph=True) for k in range(d)], dim=1)
    dtype = torch.promote_types(z.dtype, losses.dtype)
    hessian = 0.5 * (hessian + hessian.mT).detach().to(dtype)
    grads, w = grads.detach().to(dtype), w.to(dtype)
    if not bool(grads.any()):
        raise shared.no_dependence_error()
    centred = grads - (w[:, None] * grads).sum(0) / w.sum()
    meat = (w[:, None] * centred).mT @ centred
    return Sandwich(hessian, meat, grads, w)


def _check_pd(which: str, m: torch.Tensor) -> None:
    _, info = torch.linalg.cholesky_ex(m)
    if int(info) != 0 or not bool(torch.isfinite(m).all()):
        raise shared.not_positive_definite_error(which)


def sandwich_beta(hessian: torch.Tensor, meat: torch.Tensor, rule: str = "lyddon") -> torch.Tensor:
    """The calibrated ``beta`` from the sandwich matrices (see the module docstring).

    Args:
        hessian: ``H``, ``[D, D]``, symmetric positive definite.
        meat: ``J``, ``[D, D]``, symmetric positive (semi-)definite (definite for ``"lyddon"``).
        rule: ``"lyddon"`` (``tr(H J^{-1} H) / tr(H)``) or ``"magnitude"`` (``D / tr(H^{-1} J)``).

    Returns:
        ``beta``, a 0-d tensor.

    Raises:
        TypeError, ValueError: a bad ``rule``; shapes that do not match; ``H`` (or, for
            ``"lyddon"``, ``J``) not positive definite; a beta that is not finite and ``> 0``.
    """
    rule = shared.check_rule(rule)
    hessian, meat = torch.as_tensor(hessian), torch.as_tensor(meat)
    dtype = torch.promote_types(hessian.dtype, meat.dtype)
    hessian, meat = hessian.to(dtype), meat.to(dtype)
    d = shared.check_matrices(tuple(hessian.shape), tuple(meat.shape))
    _check_pd("hessian", hessian)
    if rule == "lyddon":
        _check_pd("meat", meat)
        beta = torch.trace(hessian @ torch.linalg.solve(meat, hessian)) / torch.trace(hessian)
    else:
        beta = d / torch.trace(torch.linalg.solve(hessian, meat))
    shared.check_beta_value(rule, float(beta))
    return beta


def calibrate_beta(fn: Callable[[torch.Tensor], object], z: torch.Tensor, *, rule: str = "lyddon") -> torch.Tensor:
    """``sandwich_beta(*sandwich(fn, z)[:2], rule)``: the calibrated ``beta`` of the
    generalized posterior ``p(z) exp(-beta sum_i w_i SM_i(z))``.

    Args:
        fn: per-datum losses, as in :func:`sandwich`.
        z: the point, a floating vector ``[D]``.
        rule: ``"lyddon"`` (default) or ``"magnitude"``.

    Returns:
        ``beta``, a 0-d tensor.

    Raises:
        TypeError, ValueError: as :func:`sandwich` and :func:`sandwich_beta`.
    """
    rule = shared.check_rule(rule)
    s = sandwich(fn, z)
    return sandwich_beta(s.hessian, s.meat, rule)
