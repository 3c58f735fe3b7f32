"""Full-Jacobian flows trained by relative gradient (JAX).

Mirrors ``ppl_score.torch.flows``. ``InvertibleMLP`` is a frozen, hashable configuration
(``dim``, ``n_layers``, ``alpha``, ``bias``) whose methods are pure functions of the
parameters ``params = (FlowLayer(weight [D, D], bias [D] | None), ...)``, with
``y_k = h_{k-1} W_k^T + b_k`` (the torch ``nn.Linear`` layout) and the smooth leaky ReLU
``sigma(y) = alpha y + (1 - alpha) softplus(y)`` after every layer but the last::

    log p(x) = log N(g(x); 0, I) + sum_{k<L} sum_i log sigma'(y_ki) + sum_k log|det W_k|

- ``log_prob``: exact, one ``slogdet`` per layer (for evaluation).
- ``unnormalized_log_prob``: without the ``log|det W_k|`` terms; its ``x``-gradient is the
  exact score (the ``fn`` for ``ppl_score.jax.score_matching_loss``).
- ``relative_gradient_loss``: ``jax.grad`` of it is the relative gradient
  ``grad_W(NLL) W^T W`` of the exact NLL (a ``custom_vjp``, ``O(B D^2)``, no determinant,
  no inverse); use it as the loss of an optax update under ``jit``. Its value omits the
  ``log|det W_k|`` terms.
- ``inverse`` / ``sample``: per-layer linear solve and a Newton inverse of the activation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ..common import flows as common
from ..common import objectives as spec
from .validate import check_array, check_key, is_concrete

__all__ = ["FlowLayer", "InvertibleMLP", "relative_gradient_linear", "smooth_leaky_relu"]


class FlowLayer(NamedTuple):
    weight: jax.Array  # [D, D]; y = h @ weight.T + bias
    bias: Optional[jax.Array]  # [D] or None


def smooth_leaky_relu(y: jax.Array, alpha: float) -> jax.Array:
    """``sigma(y) = alpha y + (1 - alpha) log(1 + e^y)`` (``jax.nn.softplus`` is ``logaddexp(y, 0)``,
    stable, with the exact derivative ``sigmoid(y)``)."""
    return alpha * y + (1.0 - alpha) * jax.nn.softplus(y)


def _dact(y, alpha: float):
    return alpha + (1.0 - alpha) * jax.nn.sigmoid(y)


@jax.custom_vjp
def relative_gradient_linear(h: jax.Array, weight: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(h W^T, ld)``: a linear map whose VJP gives ``weight`` its relative gradient.

    ``h``: ``[B, D]``; ``ld``: ``[B]`` zeros standing for ``log|det W|`` of each example. VJP:
    ``grad_h = delta W``; ``grad_W = delta^T (h W^T) W + (sum_b ct_ld_b) W`` (the relative
    gradient ``W^{-T} W^T W = W`` of ``log|det W|``), never forming a ``D x D x D`` product.
    """
    return h @ weight.T, jnp.zeros(h.shape[:1], h.dtype)


def _rgl_fwd(h, weight):
    y = h @ weight.T
    return (y, jnp.zeros(h.shape[:1], h.dtype)), (weight, y)


def _rgl_bwd(res, cts):
    weight, y = res
    grad_y, grad_ld = cts
    return grad_y @ weight, grad_y.T @ (y @ weight) + grad_ld.sum() * weight


relative_gradient_linear.defvjp(_rgl_fwd, _rgl_bwd)


def _log_normal(z):
    return -0.5 * (z * z).sum(-1) - z.shape[-1] * common.HALF_LOG_2PI


@dataclass(frozen=True)
class InvertibleMLP:
    """Full-Jacobian flow ``g: R^D -> R^D`` with a standard Gaussian base (Gresele et al. 2020).

    Args:
        dim: ``D``.
        n_layers: number ``L`` of dense layers; the last is affine (no activation).
        alpha: slope of the smooth leaky ReLU, in ``(0, 1]``.
        bias: whether the layers have biases (zero-initialised).
    """

    dim: int
    n_layers: int = 2
    alpha: float = common.DEFAULT_ALPHA
    bias: bool = True

    def __post_init__(self):
        dim, n_layers, alpha = common.check_config(self.dim, self.n_layers, self.alpha)
        object.__setattr__(self, "dim", dim)
        object.__setattr__(self, "n_layers", n_layers)
        object.__setattr__(self, "alpha", alpha)
        object.__setattr__(self, "bias", bool(self.bias))

    # ---- parameters -----------------------------------------------------------------
    def init(self, key: jax.Array, dtype: jnp.dtype | type | None = None) -> tuple[FlowLayer, ...]:
        """Orthogonal weights, zero biases."""
        key = check_key(key)
        dtype = jnp.result_type(float) if dtype is None else dtype
        ortho = jax.nn.initializers.orthogonal()
        return tuple(
            FlowLayer(ortho(k, (self.dim, self.dim), dtype), jnp.zeros(self.dim, dtype) if self.bias else None)
            for k in jax.random.split(key, self.n_layers)
        )

    def params_from(
        self, layers: Iterable[tuple[Any, Any]], dtype: jnp.dtype | type | None = None
    ) -> tuple[FlowLayer, ...]:
        """``[(W, b), ...]`` (numpy, e.g. ``ppl_score.torch.flows.InvertibleMLP.flow_params()``)
        as validated ``params``."""
        layers = list(layers)
        if len(layers) != self.n_layers:
            raise ValueError(f"argument 'layers' must hold {self.n_layers} layers, got {len(layers)}")
        out = []
        for k, (w, b) in enumerate(layers):
            w = jnp.asarray(w, dtype)
            if (b is None) == self.bias:
                raise ValueError(f"argument 'layers': layer {k} bias must be {'given' if self.bias else 'None'}")
            out.append(FlowLayer(w, None if b is None else jnp.asarray(b, dtype)))
        self.check_params(out)
        return tuple(out)

    def check_params(self, params: Sequence[FlowLayer]) -> None:
        """Raise ``ValueError`` unless ``params`` is one ``(weight, bias)`` per layer of this flow's shapes."""
        if len(params) != self.n_layers:
            raise ValueError(f"argument 'params' must hold {self.n_layers} layers, got {len(params)}")
        for k, layer in enumerate(params):
            w, b = layer
            if tuple(w.shape) != (self.dim, self.dim):
                raise ValueError(
                    f"argument 'params': layer {k} weight must be [{self.dim}, {self.dim}], got {tuple(w.shape)}"
                )
            if (b is None) == self.bias or (b is not None and tuple(b.shape) != (self.dim,)):
                raise ValueError(
                    f"argument 'params': layer {k} bias must be {'[%d]' % self.dim if self.bias else 'None'}"
                )

    # ---- forward ----------------------------------------------------------------------
    def _flat(self, name, x):
        x = check_array(name, x, finite=False)
        common.check_event(name, x.shape, self.dim)
        check_array(name, x)
        return x.reshape(-1, self.dim), x.shape[:-1]

    def _run(self, params, x, relative: bool):
        """``(z, sum_k sum_i log sigma'(y_ki), ld)`` on flattened ``x [N, D]``."""
        self.check_params(params)
        h, log_act, ld = x, jnp.zeros(x.shape[:1], x.dtype), None
        for k, (w, b) in enumerate(params):
            if relative:
                h, ld_k = relative_gradient_linear(h, w)
                ld = ld_k if ld is None else ld + ld_k
            else:
                h = h @ w.T
            if b is not None:
                h = h + b
            if k < self.n_layers - 1:
                log_act = log_act + jnp.log(_dact(h, self.alpha)).sum(-1)
                h = smooth_leaky_relu(h, self.alpha)
        return h, log_act, ld

    def forward(self, params: Sequence[FlowLayer], x: jax.Array | np.ndarray) -> jax.Array:
        """``z = g(x)``, ``[..., D] -> [..., D]``."""
        flat, batch = self._flat("x", x)
        return self._run(params, flat, False)[0].reshape(*batch, self.dim)

    __call__ = forward

    def log_abs_det_weights(self, params: Sequence[FlowLayer]) -> jax.Array:
        """``sum_k log|det W_k|`` (one ``slogdet`` per layer)."""
        return sum(jnp.linalg.slogdet(w)[1] for w, _ in params)

    def forward_and_log_det(
        self, params: Sequence[FlowLayer], x: jax.Array | np.ndarray
    ) -> tuple[jax.Array, jax.Array]:
        """``(g(x), log|det dg/dx|)`` exactly, shapes ``[..., D]`` and ``[...]``."""
        flat, batch = self._flat("x", x)
        z, log_act, _ = self._run(params, flat, False)
        return z.reshape(*batch, self.dim), (log_act + self.log_abs_det_weights(params)).reshape(batch)

    def log_prob(self, params: Sequence[FlowLayer], x: jax.Array | np.ndarray) -> jax.Array:
        """Exact ``log p(x)``, ``[..., D] -> [...]``."""
        flat, batch = self._flat("x", x)
        z, log_act, _ = self._run(params, flat, False)
        return (_log_normal(z) + log_act + self.log_abs_det_weights(params)).reshape(batch)

    def unnormalized_log_prob(self, params: Sequence[FlowLayer], x: jax.Array | np.ndarray) -> jax.Array:
        """``log p(x) - sum_k log|det W_k|``: no determinant, same score; pass
        ``functools.partial(flow.unnormalized_log_prob, params)`` as ``fn``."""
        flat, batch = self._flat("x", x)
        z, log_act, _ = self._run(params, flat, False)
        return (_log_normal(z) + log_act).reshape(batch)

    # ---- relative-gradient training -----------------------------------------------------
    def relative_gradient_forward(
        self, params: Sequence[FlowLayer], x: jax.Array | np.ndarray
    ) -> tuple[jax.Array, jax.Array]:
        """``(g(x), log_det)``: ``log_det``'s value is ``sum_k sum_i log sigma'(y_ki)`` only;
        the VJP of a loss containing it gives each ``weight`` the relative gradient of the
        loss with the exact ``log|det dg/dx|`` in its place (biases: ordinary gradients)."""
        flat, batch = self._flat("x", x)
        z, log_act, ld = self._run(params, flat, True)
        return z.reshape(*batch, self.dim), (log_act + ld).reshape(batch)

    def relative_gradient_loss(
        self, params: Sequence[FlowLayer], x: jax.Array | np.ndarray, reduction: str = "mean"
    ) -> jax.Array:
        """Training loss of maximum likelihood by relative gradient.

        Value: ``-(log N(g(x)) + sum_k sum_i log sigma'(y_ki))`` reduced over the batch, i.e.
        the negative log-likelihood WITHOUT the ``log|det W_k|`` terms (never computed).
        ``jax.grad`` w.r.t. ``params`` gives each weight ``grad_W(NLL) W^T W`` of the exact
        NLL (same reduction) in ``O(B D^2)``; biases get ordinary gradients. Exact NLL for
        evaluation: ``-flow.log_prob(params, x).mean()``.
        """
        spec.check_reduction(reduction)
        z, log_det = self.relative_gradient_forward(params, x)
        nll = -(_log_normal(z) + log_det)
        if reduction == "none":
            return nll
        return nll.sum() if reduction == "sum" else nll.mean()

    # ---- inverse and sampling -------------------------------------------------------------
    def _act_inverse(self, t, tol: float, max_iter: int):
        """``(sigma^{-1}(t), converged)`` by Newton's method from ``min(t, t/alpha)``, an upper
        bound of the root of the convex increasing ``sigma``: the iterates decrease
        monotonically. A final step from the stopped root carries the exact derivative."""
        a = self.alpha
        t0 = jax.lax.stop_gradient(t)
        scale = tol * (1.0 + jnp.abs(t0))

        def not_done(carry):
            y, i = carry
            return (i < max_iter) & jnp.any(jnp.abs(smooth_leaky_relu(y, a) - t0) > scale)

        def step(carry):
            y, i = carry
            return y - (smooth_leaky_relu(y, a) - t0) / _dact(y, a), i + 1

        y, _ = jax.lax.while_loop(not_done, step, (jnp.minimum(t0, t0 / a), 0))
        y = jax.lax.stop_gradient(y)
        rel = jnp.abs(smooth_leaky_relu(y, a) - t0) / (1.0 + jnp.abs(t0))
        return y - (smooth_leaky_relu(y, a) - t) / _dact(y, a), rel

    def check_invertible(self, params: Sequence[FlowLayer]) -> bool | jax.Array:
        """Whether every layer can be inverted: finite weights and biases, and weights not
        singular to working precision (``s_min > D eps s_max``); mirrors the torch method.

        Returns:
            ``True`` for concrete ``params`` (which it checks on the host); for traced ones,
            a traced boolean (``inverse`` then returns NaN rather than raise).

        Raises:
            ValueError: concrete ``params`` with a layer that cannot be inverted (named).
        """
        self.check_params(params)
        if all(is_concrete(a) for layer in params for a in layer if a is not None):
            for k, (w, b) in enumerate(params):
                w = np.asarray(w)
                finite_w = bool(np.isfinite(w).all())
                s = np.linalg.svd(w, compute_uv=False) if finite_w else None
                common.check_layer(
                    k,
                    finite_w,
                    b is None or bool(np.isfinite(np.asarray(b)).all()),
                    float(s[0]) if finite_w else np.nan,
                    float(s[-1]) if finite_w else np.nan,
                    self.dim,
                    float(np.finfo(w.dtype).eps),
                )
            return True
        ok = jnp.asarray(True)
        for w, b in params:
            s = jnp.linalg.svd(jnp.where(jnp.isfinite(w), w, 0.0), compute_uv=False)
            tol = common.singular_tolerance(self.dim, float(jnp.finfo(w.dtype).eps))
            ok = ok & jnp.isfinite(w).all() & (s[-1] > tol * s[0])
            if b is not None:
                ok = ok & jnp.isfinite(b).all()
        return ok

    def inverse(
        self,
        params: Sequence[FlowLayer],
        z: jax.Array | np.ndarray,
        *,
        tol: float | None = None,
        max_iter: int = common.NEWTON_MAX_ITER,
    ) -> jax.Array:
        """``x = g^{-1}(z)``, ``[..., D] -> [..., D]``: per layer a Newton inverse of the
        activation (relative residual ``<= tol``, default ``64 eps``) and one linear solve.
        Differentiable in ``z`` and ``params``.

        Raises:
            ValueError: on concrete input, a layer's weight or bias holds NaN / inf, or a
                weight is singular to working precision (smallest singular value ``<= D eps``
                times the largest; the message names the layer), or Newton has not converged
                after ``max_iter`` steps. Under ``jit``, where nothing can be raised, the
                affected rows (all of them, for a bad layer) come back as NaN, never as
                silent garbage.
        """
        flat, batch = self._flat("z", z)
        tol = common.newton_tolerance(tol, float(jnp.finfo(flat.dtype).eps))
        max_iter = common.check_max_iter(max_iter)
        invertible = self.check_invertible(params)
        h, ok = flat, jnp.ones(flat.shape, bool)
        for k in reversed(range(self.n_layers)):
            w, b = params[k]
            if k < self.n_layers - 1:
                h, rel = self._act_inverse(h, tol, max_iter)
                converged = (rel <= tol).all()
                if is_concrete(converged) and not bool(converged):
                    bad = ~(rel <= tol)  # NaN counts as unconverged
                    raise common.newton_error(max_iter, int(bad.sum()), float(rel.max()), tol, k)
                ok = ok & (rel <= tol)
            if b is not None:
                h = h - b
            h = jnp.linalg.solve(w, h.T).T
        # only reached with a bad layer or unconverged entries under tracing, where raising
        # is impossible
        h = jnp.where(ok.all(-1, keepdims=True) & invertible, h, jnp.nan)
        return h.reshape(*batch, self.dim)

    def sample(self, params: Sequence[FlowLayer], key: jax.Array, n: int, **inverse_kwargs: Any) -> jax.Array:
        """``n`` samples ``g^{-1}(z)``, ``z ~ N(0, I)``, ``[n, D]``.

        Args:
            params: the flow's parameters.
            key: a PRNG key for ``z``.
            n: the number of samples, an ``int >= 1`` (numpy integers too).
            **inverse_kwargs: ``tol``, ``max_iter`` of ``inverse``.

        Raises:
            TypeError: ``n`` is not an integer.
            ValueError: ``n < 1``, or the flow cannot be inverted (see ``inverse``).
        """
        n = common.check_n_samples(n)
        z = jax.random.normal(check_key(key), (n, self.dim), params[0].weight.dtype)
        return self.inverse(params, z, **inverse_kwargs)
