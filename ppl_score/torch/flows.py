"""Full-Jacobian flows trained by relative gradient (torch).

``InvertibleMLP`` maps data ``x`` to a latent ``z = g(x)`` through ``L`` dense ``D x D``
layers (``y_k = h_{k-1} W_k^T + b_k``, the ``nn.Linear`` layout) with the smooth leaky ReLU
``sigma(y) = alpha y + (1 - alpha) softplus(y)`` after every layer but the last::

    log p(x) = log N(g(x); 0, I) + sum_{k<L} sum_i log sigma'(y_ki) + sum_k log|det W_k|

- ``log_prob``: exact, one ``slogdet`` per layer (``O(D^3)``, for evaluation).
- ``unnormalized_log_prob``: the same without the ``log|det W_k|`` terms, which do not
  depend on ``x``; its ``x``-gradient is the exact score, so it is the ``fn`` to pass to
  ``ppl_score.torch.score_matching_loss``.
- ``relative_gradient_loss``: maximum likelihood by relative gradient (Gresele et al. 2020).
  Its ``backward()`` leaves ``grad_W(NLL) W^T W`` in each ``weight.grad`` in ``O(B D^2)``,
  without a determinant or an inverse; its value omits the ``log|det W_k|`` terms.
- ``inverse`` / ``sample``: per-layer linear solve and a Newton inverse of the activation.

See ``ppl_score.common.flows`` for the math shared with ``ppl_score.jax.flows``.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import numpy as np
import torch
from torch import nn

from ..common import flows as common
from ..common import objectives as spec
from .validate import check_array

__all__ = ["InvertibleMLP", "relative_gradient_linear", "smooth_leaky_relu"]


def _softplus(y: torch.Tensor) -> torch.Tensor:
    # logaddexp is stable for any y and, unlike F.softplus (linear above a threshold), has
    # the exact derivative sigmoid(y) everywhere, which the Newton inverse relies on.
    return torch.logaddexp(y, torch.zeros((), dtype=y.dtype, device=y.device))


def smooth_leaky_relu(y: torch.Tensor, alpha: float) -> torch.Tensor:
    """``sigma(y) = alpha y + (1 - alpha) log(1 + e^y)``."""
    return alpha * y + (1.0 - alpha) * _softplus(y)


def _as_tensor(a) -> torch.Tensor:
    # a copy: arrays from JAX are read-only, which torch.as_tensor warns about
    return a.detach() if isinstance(a, torch.Tensor) else torch.from_numpy(np.array(a))


def _dact(y: torch.Tensor, alpha: float) -> torch.Tensor:
    return alpha + (1.0 - alpha) * torch.sigmoid(y)


class _RelativeGradientLinear(torch.autograd.Function):
    """``y = h W^T`` plus a zero placeholder ``ld[B]`` standing for ``log|det W|`` per example.

    Backward: ``grad_h = delta W`` (ordinary backpropagation) and the relative gradient
    ``grad_W = delta^T (h W^T) W + (sum_b d loss/d ld_b) W``; the second term is the relative
    gradient ``W^{-T} W^T W = W`` of ``log|det W|`` at whatever weight the loss gives it.
    Associated as ``delta^T ((h W^T) W)``, with ``h W^T`` kept from the forward pass, every
    product involves the batch: ``O(B D^2)``, never a ``D x D`` by ``D x D`` product.
    """

    @staticmethod
    def forward(ctx, h, weight):
        y = h @ weight.mT
        ctx.save_for_backward(weight, y)
        return y, h.new_zeros(h.shape[0])

    @staticmethod
    def backward(ctx, grad_y, grad_ld):
        weight, y = ctx.saved_tensors
        grad_h = grad_y @ weight if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = grad_y.mT @ (y @ weight)
            if grad_ld is not None:
                grad_w = grad_w + grad_ld.sum() * weight
        return grad_h, grad_w


def relative_gradient_linear(h: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(h W^T, ld)``: a linear map whose backward gives ``weight`` its relative gradient.

    ``h``: ``[B, D]``; ``ld``: ``[B]`` zeros that stand for ``log|det W|`` of each example.
    Add ``ld`` to the per-example log-likelihoods: its value is never computed (zero), but
    its gradient, ``W`` times the weight the loss gives it, is.
    """
    return _RelativeGradientLinear.apply(h, weight)


class InvertibleMLP(nn.Module):
    """Full-Jacobian flow ``g: R^D -> R^D`` with a standard Gaussian base (Gresele et al. 2020).

    Args:
        dim: ``D``.
        n_layers: number ``L`` of dense layers; the last is affine (no activation).
        alpha: slope of the smooth leaky ReLU, in ``(0, 1]``.
        bias: whether the layers have biases (zero-initialised).
        dtype, device: of the parameters.
        generator: ``torch.Generator`` for the orthogonal initialisation of the weights.

    Attributes ``weights`` / ``biases`` are ``nn.ParameterList`` (``W_k`` is ``[D, D]``, the
    ``nn.Linear`` layout ``y = h W^T + b``).
    """

    def __init__(
        self,
        dim: int,
        n_layers: int = 2,
        alpha: float = common.DEFAULT_ALPHA,
        bias: bool = True,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        self.dim, self.n_layers, self.alpha = common.check_config(dim, n_layers, alpha)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"argument 'generator' must be a torch.Generator, got {type(generator).__name__}")
        weights = []
        for _ in range(self.n_layers):
            w = torch.empty(self.dim, self.dim, dtype=dtype, device=device)
            nn.init.orthogonal_(w, generator=generator)
            weights.append(nn.Parameter(w))
        self.weights = nn.ParameterList(weights)
        self.biases = (
            nn.ParameterList(
                nn.Parameter(torch.zeros(self.dim, dtype=dtype, device=device)) for _ in range(self.n_layers)
            )
            if bias
            else None
        )

    def extra_repr(self) -> str:
        return f"dim={self.dim}, n_layers={self.n_layers}, alpha={self.alpha}, bias={self.biases is not None}"

    # ---- parameters -----------------------------------------------------------------
    def flow_params(self) -> list[tuple[np.ndarray, np.ndarray | None]]:
        """``[(W [D, D], b [D] or None), ...]`` as float64 numpy arrays (the layout of
        ``ppl_score.jax.flows.InvertibleMLP``, for cross-backend parity)."""
        out = []
        for k, w in enumerate(self.weights):
            b = None if self.biases is None else self.biases[k].detach().double().cpu().numpy().copy()
            out.append((w.detach().double().cpu().numpy().copy(), b))
        return out

    @torch.no_grad()
    def load_flow_params(self, params: Iterable[tuple[Any, Any]]) -> InvertibleMLP:
        """Copy ``[(W, b), ...]`` (numpy or tensors, e.g. from ``flow_params``) into the flow."""
        params = list(params)
        if len(params) != self.n_layers:
            raise ValueError(f"argument 'params' must hold {self.n_layers} layers, got {len(params)}")
        for k, (w, b) in enumerate(params):
            w = _as_tensor(w)
            if tuple(w.shape) != (self.dim, self.dim):
                raise ValueError(
                    f"argument 'params': layer {k} weight must be [{self.dim}, {self.dim}], got {tuple(w.shape)}"
                )
            self.weights[k].copy_(w)
            if (b is None) != (self.biases is None):
                raise ValueError(
                    f"argument 'params': layer {k} bias must be {'None' if self.biases is None else 'given'}"
                )
            if b is not None:
                self.biases[k].copy_(_as_tensor(b).reshape(self.dim))
        return self

    def _bias(self, k):
        return None if self.biases is None else self.biases[k]

    # ---- forward ----------------------------------------------------------------------
    def _check(self, name: str, x) -> torch.Tensor:
        check_array(name, x, finite=False)
        common.check_event(name, x.shape, self.dim)
        return check_array(name, x)

    def _run(self, x: torch.Tensor, relative: bool):
        """``(z, sum_k sum_i log sigma'(y_ki), ld)`` on flattened ``x [N, D]``; ``ld`` is the
        relative-gradient placeholder (``relative=True``) or ``None``."""
        h, log_act, ld = x, x.new_zeros(x.shape[0]), None
        for k, w in enumerate(self.weights):
            if relative:
                h, ld_k = relative_gradient_linear(h, w)
                ld = ld_k if ld is None else ld + ld_k
            else:
                h = h @ w.mT
            b = self._bias(k)
            if b is not None:
                h = h + b
            if k < self.n_layers - 1:
                log_act = log_act + torch.log(_dact(h, self.alpha)).sum(-1)
                h = smooth_leaky_relu(h, self.alpha)
        return h, log_act, ld

    def _flat(self, name, x):
        x = self._check(name, x)
        return x.reshape(-1, self.dim), x.shape[:-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``z = g(x)``, ``[..., D] -> [..., D]``."""
        flat, batch = self._flat("x", x)
        return self._run(flat, False)[0].reshape(*batch, self.dim)

    def log_abs_det_weights(self) -> torch.Tensor:
        """``sum_k log|det W_k|`` (one ``slogdet`` per layer; ``O(L D^3)``)."""
        return sum(torch.linalg.slogdet(w)[1] for w in self.weights)

    def forward_and_log_det(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(g(x), log|det dg/dx|)`` exactly, shapes ``[..., D]`` and ``[...]``."""
        flat, batch = self._flat("x", x)
        z, log_act, _ = self._run(flat, False)
        return z.reshape(*batch, self.dim), (log_act + self.log_abs_det_weights()).reshape(batch)

    @staticmethod
    def _log_normal(z: torch.Tensor) -> torch.Tensor:
        return -0.5 * (z * z).sum(-1) - z.shape[-1] * common.HALF_LOG_2PI

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Exact ``log p(x)``, ``[..., D] -> [...]``."""
        flat, batch = self._flat("x", x)
        z, log_act, _ = self._run(flat, False)
        return (self._log_normal(z) + log_act + self.log_abs_det_weights()).reshape(batch)

    def unnormalized_log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """``log p(x) - sum_k log|det W_k|``: no determinant, same score ``grad_x log p(x)``.

        Differentiable to any order in ``x``; pass it as ``fn`` to ``score_matching_loss``.
        """
        flat, batch = self._flat("x", x)
        z, log_act, _ = self._run(flat, False)
        return (self._log_normal(z) + log_act).reshape(batch)

    # ---- relative-gradient training -----------------------------------------------------
    def relative_gradient_forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(g(x), log_det)`` for relative-gradient training, shapes ``[..., D]``, ``[...]``.

        ``log_det``'s value is ``sum_k sum_i log sigma'(y_ki)`` only (no ``log|det W_k|``); when a
        loss containing it is backpropagated, every ``weight.grad`` receives the relative
        gradient ``grad_W(loss) W^T W`` of the loss with the exact ``log|det dg/dx|`` in
        place of ``log_det`` (biases receive ordinary gradients).
        """
        flat, batch = self._flat("x", x)
        z, log_act, ld = self._run(flat, True)
        return z.reshape(*batch, self.dim), (log_act + ld).reshape(batch)

    def relative_gradient_loss(self, x: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """Training loss of maximum likelihood by relative gradient.

        Value: ``-(log N(g(x)) + sum_k sum_i log sigma'(y_ki))`` reduced over the batch, i.e.
        the negative log-likelihood WITHOUT the ``log|det W_k|`` terms, which are never
        computed. ``backward()`` leaves in each ``weight.grad`` the relative gradient
        ``grad_W(NLL) W^T W`` of the exact NLL (same reduction), in ``O(B D^2)``; bias
        gradients are ordinary. Exact NLL for evaluation: ``-log_prob(x).mean()``.
        """
        spec.check_reduction(reduction)
        z, log_det = self.relative_gradient_forward(x)
        nll = -(self._log_normal(z) + log_det)
        if reduction == "none":
            return nll
        return nll.sum() if reduction == "sum" else nll.mean()

    # ---- inverse and sampling -------------------------------------------------------------
    def _act_inverse(self, t: torch.Tensor, tol: float, max_iter: int, layer: int | None = None) -> torch.Tensor:
        """``sigma^{-1}(t)`` by Newton's method, differentiable in ``t``.

        ``sigma`` is increasing and convex, and ``y0 = min(t, t/alpha) >= sigma^{-1}(t)``
        (``sigma(y) >= y`` and ``sigma(y) > alpha y``), so the iterates decrease monotonically
        to the root without overshooting. A final Newton step from the detached root carries
        the exact derivative ``1 / sigma'(y)`` (implicit function theorem).
        """
        a = self.alpha
        with torch.no_grad():
            t0 = t.detach()
            scale = tol * (1.0 + t0.abs())
            y = torch.minimum(t0, t0 / a)
            for _ in range(max_iter):
                r = smooth_leaky_relu(y, a) - t0
                if bool((r.abs() <= scale).all()):
                    break
                y = y - r / _dact(y, a)
            rel = (smooth_leaky_relu(y, a) - t0).abs() / (1.0 + t0.abs())
            if not bool((rel <= tol).all()):
                bad = ~(rel <= tol)  # NaN counts as unconverged
                raise common.newton_error(max_iter, int(bad.sum()), float(rel.max()), tol, layer)
        return y - (smooth_leaky_relu(y, a) - t) / _dact(y, a)

    def inverse(
        self, z: torch.Tensor, *, tol: float | None = None, max_iter: int = common.NEWTON_MAX_ITER
    ) -> torch.Tensor:
        """``x = g^{-1}(z)``, ``[..., D] -> [..., D]``: per layer a Newton inverse of the
        activation (relative residual ``<= tol``, default ``64 eps``) and one batched linear
        solve. Differentiable in ``z`` and in the parameters.

        Raises:
            ValueError: a layer's weight or bias holds NaN / inf, or a weight is singular to
                working precision (smallest singular value ``<= D eps`` times the largest; the
                message names the layer), or Newton has not converged after ``max_iter``
                steps. Checked whatever the validation switch: the inverse synchronises with
                the host at every Newton step anyway.
        """
        flat, batch = self._flat("z", z)
        tol = common.newton_tolerance(tol, torch.finfo(flat.dtype).eps)
        max_iter = common.check_max_iter(max_iter)
        self.check_invertible()
        h = flat
        for k in reversed(range(self.n_layers)):
            if k < self.n_layers - 1:
                h = self._act_inverse(h, tol, max_iter, k)
            b = self._bias(k)
            if b is not None:
                h = h - b
            h = torch.linalg.solve(self.weights[k], h.mT).mT
        return h.reshape(*batch, self.dim)

    @torch.no_grad()
    def check_invertible(self) -> None:
        """Check that every layer can be inverted: finite weights and biases, and weights not
        singular to working precision (``s_min > D eps s_max``, one ``svdvals`` per layer).

        Raises:
            ValueError: naming the first layer that cannot be inverted.
        """
        for k, w in enumerate(self.weights):
            b = self._bias(k)
            finite_w = bool(torch.isfinite(w).all())
            s = torch.linalg.svdvals(w) if finite_w else None
            common.check_layer(
                k,
                finite_w,
                b is None or bool(torch.isfinite(b).all()),
                float(s[0]) if finite_w else math.nan,
                float(s[-1]) if finite_w else math.nan,
                self.dim,
                torch.finfo(w.dtype).eps,
            )

    def sample(self, n: int, *, generator: torch.Generator | None = None, **inverse_kwargs: Any) -> torch.Tensor:
        """``n`` samples ``g^{-1}(z)``, ``z ~ N(0, I)``, ``[n, D]``.

        Args:
            n: the number of samples, an ``int >= 1`` (numpy integers too).
            generator: ``torch.Generator`` for ``z``.
            **inverse_kwargs: ``tol``, ``max_iter`` of ``inverse``.

        Raises:
            TypeError: ``n`` is not an integer.
            ValueError: ``n < 1``, or the flow cannot be inverted (see ``inverse``).
        """
        n = common.check_n_samples(n)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"argument 'generator' must be a torch.Generator, got {type(generator).__name__}")
        w = self.weights[0]
        z = torch.randn(n, self.dim, generator=generator, dtype=w.dtype, device=w.device)
        return self.inverse(z, **inverse_kwargs)
