"""Full-Jacobian flows in NumPyro: a transform with registered parameters and
relative-gradient maximum likelihood inside a jitted ``SVI.update``.

``invertible_mlp(name, dim, ...)`` registers the flow's weights and biases with
``numpyro.param`` and returns an ``InvertibleMLPTransform`` in the generative direction
(``__call__ = g^{-1}``, ``_inverse = g``), so ``TransformedDistribution(base, transform)`` has
the flow's exact density::

    def model(x):
        flow = invertible_mlp("flow", D, n_layers=3)
        base = dist.Normal(jnp.zeros(D), 1.0).to_event(1)
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("x", dist.TransformedDistribution(base, flow), obs=x)

    svi = SVI(model, lambda x: None, optax.adam(1e-3), RelativeGradientMLE())
    result = svi.run(key, 2000, x)        # or jax.jit(svi.update)

``RelativeGradientMLE.loss`` is built on ``ppl_score.jax.flows.relative_gradient_linear``
(a ``custom_vjp``), so the gradient ``SVI`` takes of it, inside its jitted update, is the
relative gradient ``grad_W(NLL) W^T W`` (Gresele et al. 2020, reference in ``RelativeGradientMLE``),
in ``O(B D^2)``. Outside NumPyro, ``InvertibleMLP.relative_gradient_loss`` is the same loss
for a plain optax loop.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpyro
from jax.typing import DTypeLike
from numpyro.distributions import (
    ExpandedDistribution,
    Independent,
    MaskedDistribution,
    TransformedDistribution,
    constraints,
)
from numpyro.distributions.transforms import ComposeTransform, Transform
from numpyro.distributions.util import sum_rightmost
from numpyro.handlers import seed, substitute, trace
from numpyro.infer.elbo import ELBO

from ..common import flows as common
from ..jax.flows import FlowLayer, InvertibleMLP

__all__ = ["InvertibleMLPTransform", "RelativeGradientMLE", "invertible_mlp"]


class InvertibleMLPTransform(Transform):
    """NumPyro transform for the full-Jacobian flow [1], base -> data direction.

    ``__call__(z) = g^{-1}(z)`` (Newton + linear solves, for sampling), ``_inverse(x) = g(x)``,
    ``log_abs_det_jacobian(z, x) = -log|det dg/dx|`` (exact, ``slogdet`` per layer).

    Args:
        flow (ppl_score.jax.flows.InvertibleMLP): the flow's configuration.
        params: its parameters ``(FlowLayer(W, b), ...)``.
        inverse_kwargs: options of ``InvertibleMLP.inverse`` (``tol``, ``max_iter``).

    Raises:
        TypeError: ``flow`` is not a ``ppl_score.jax.flows.InvertibleMLP``.
        ValueError: ``params`` do not fit ``flow``.

    References:
        [1] L. Gresele, G. Fissore, A. Javaloy, B. Schoelkopf, A. Hyvarinen, "Relative gradient
        optimization of the Jacobian term in unsupervised deep learning", NeurIPS, 2020.
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector

    def __init__(
        self, flow: InvertibleMLP, params: Sequence[FlowLayer], inverse_kwargs: Mapping[str, Any] | None = None
    ) -> None:
        if not isinstance(flow, InvertibleMLP):
            raise TypeError(f"argument 'flow' must be a ppl_score.jax.flows.InvertibleMLP, got {type(flow).__name__}")
        self.flow = flow
        self.params = tuple(FlowLayer(*layer) for layer in params)
        flow.check_params(self.params)
        self.inverse_kwargs = dict(inverse_kwargs or {})

    def __call__(self, z):
        return self.flow.inverse(self.params, z, **self.inverse_kwargs)

    def _inverse(self, x):
        return self.flow.forward(self.params, x)

    def log_abs_det_jacobian(self, z: jax.Array, x: jax.Array, intermediates: Any = None) -> jax.Array:
        return -self.flow.forward_and_log_det(self.params, x)[1]

    def tree_flatten(self) -> tuple[tuple, tuple]:
        return (self.params,), (("params",), {"flow": self.flow, "inverse_kwargs": self.inverse_kwargs})

    def eq(self, other: Any, static: bool = False) -> bool:
        return self is other


def invertible_mlp(
    name: str,
    dim: int,
    n_layers: int = 2,
    alpha: float = common.DEFAULT_ALPHA,
    bias: bool = True,
    *,
    init: Sequence[FlowLayer] | None = None,
    dtype: DTypeLike | None = None,
    **inverse_kwargs: Any,
) -> InvertibleMLPTransform:
    """Register the flow's parameters (``{name}.weight{k}``, ``{name}.bias{k}``) with
    ``numpyro.param`` and return the ``InvertibleMLPTransform`` built from their values.

    Args:
        name: the prefix of the parameters' names.
        dim, n_layers, alpha, bias: as in ``ppl_score.jax.flows.InvertibleMLP``.
        init: initial parameters (e.g.
            ``InvertibleMLP.params_from(torch_flow.flow_params())``); default: orthogonal
            weights and zero biases drawn from the seed handler's key.
        dtype: of the default initial parameters; defaults to JAX's default float.
        **inverse_kwargs: options of ``InvertibleMLP.inverse`` (``tol``, ``max_iter``).

    Returns:
        The ``InvertibleMLPTransform`` of the registered parameters' current values.
    """
    flow = InvertibleMLP(dim, n_layers, alpha, bias)
    if init is not None:
        init = tuple(FlowLayer(*layer) for layer in init)
        flow.check_params(init)
    dtype = jnp.result_type(float) if dtype is None else dtype
    ortho = jax.nn.initializers.orthogonal()
    layers = []
    for k in range(flow.n_layers):
        w0 = init[k].weight if init is not None else (lambda key: ortho(key, (flow.dim, flow.dim), dtype))
        w = numpyro.param(f"{name}.weight{k}", w0)
        b = None
        if flow.bias:
            b = numpyro.param(f"{name}.bias{k}", init[k].bias if init is not None else jnp.zeros(flow.dim, dtype))
        layers.append(FlowLayer(w, b))
    return InvertibleMLPTransform(flow, layers, inverse_kwargs)


def _flat_transforms(transforms):
    out = []
    for t in transforms:
        out.extend(_flat_transforms(t.parts) if isinstance(t, ComposeTransform) else [t])
    return out


def _training_log_prob(fn, value):
    """``(log p(value), uses_flow)``: for a ``TransformedDistribution`` with an
    ``InvertibleMLPTransform`` (possibly wrapped in ``Independent``, ``ExpandedDistribution``
    (plates), ``MaskedDistribution``), the relative-gradient surrogate; otherwise
    ``fn.log_prob``."""
    d, wrappers = fn, []
    while isinstance(d, (Independent, ExpandedDistribution, MaskedDistribution)):
        wrappers.append(d)
        d = d.base_dist
    transforms = _flat_transforms(d.transforms) if isinstance(d, TransformedDistribution) else []
    if not any(isinstance(t, InvertibleMLPTransform) for t in transforms):
        return fn.log_prob(value), False
    # numpyro's TransformedDistribution.log_prob with the flow's terms swapped for the surrogate
    event_dim, log_prob, y = len(d.event_shape), 0.0, value
    for t in reversed(transforms):
        if isinstance(t, InvertibleMLPTransform):
            x, log_det = t.flow.relative_gradient_forward(t.params, y)  # log|det dg/dy|, event summed
            log_prob = log_prob + sum_rightmost(log_det, event_dim - 1)
        else:
            x = t.inv(y)
            event_dim += t.domain.event_dim - t.codomain.event_dim
            log_prob = log_prob - sum_rightmost(t.log_abs_det_jacobian(x, y), event_dim - t.domain.event_dim)
        y = x
    log_prob = log_prob + sum_rightmost(d.base_dist.log_prob(y), event_dim - len(d.base_dist.event_shape))
    for w in reversed(wrappers):  # innermost first, as each wrapper's own log_prob would
        if isinstance(w, Independent):
            log_prob = sum_rightmost(log_prob, w.reinterpreted_batch_ndims)
        elif isinstance(w, ExpandedDistribution):
            batch = jnp.shape(value)[: max(jnp.ndim(value) - w.event_dim, 0)]
            log_prob = jnp.broadcast_to(log_prob, jax.lax.broadcast_shapes(w.batch_shape, batch))
        else:
            log_prob = jnp.where(w._mask, log_prob, 0.0)
    return log_prob, True


class RelativeGradientMLE(ELBO):
    """Maximum likelihood by relative gradient [1] for NumPyro models whose observed sites are
    ``TransformedDistribution``s with an ``InvertibleMLPTransform``.

    ``loss`` is the TRAINING loss: ``-sum over data points of [log p(x) - sum_k log|det W_k|]``
    (site scales from subsampled plates and masks apply), i.e. the negative log-likelihood
    WITHOUT the ``log|det W_k|`` terms, which are never computed. Its gradient, as taken by
    ``SVI.update`` (jitted), gives every flow weight the relative gradient
    ``grad_W(NLL) W^T W`` of the exact NLL (log-det part ``-W``, added analytically);
    biases and other parameters get ordinary gradients.
    ``exact_nll(rng_key, params, model, guide, *args)`` is the exact negative log-likelihood
    for evaluation (``slogdet`` per layer); ``params`` as from ``svi.get_params(state)``.

    The model must be fully observed (no latent sample sites; the guide samples nothing).
    Supported site distributions: ``TransformedDistribution`` (transforms may include
    ``ComposeTransform``s), possibly wrapped by ``to_event``, plates (``expand``) and masks.

    References:
        [1] L. Gresele, G. Fissore, A. Javaloy, B. Schoelkopf, A. Hyvarinen, "Relative gradient
        optimization of the Jacobian term in unsupervised deep learning", NeurIPS, 2020.
    """

    def __init__(self) -> None:
        super().__init__(num_particles=1)

    @staticmethod
    def _model_trace(rng_key, param_map, model, guide, args, kwargs):
        key_guide, key_model = jax.random.split(rng_key)
        guide_trace = trace(seed(substitute(guide, data=param_map), key_guide)).get_trace(*args, **kwargs)
        for name, site in guide_trace.items():
            if site["type"] == "sample" and not site["is_observed"]:
                raise ValueError(
                    f"RelativeGradientMLE fits fully observed models: the guide samples site {name!r}; "
                    "use an empty guide"
                )
        model_trace = trace(seed(substitute(model, data=param_map), key_model)).get_trace(*args, **kwargs)
        for name, site in model_trace.items():
            if site["type"] == "sample" and not site["is_observed"]:
                raise ValueError(
                    f"RelativeGradientMLE fits fully observed models: site {name!r} is latent (not observed)"
                )
        return model_trace

    def _nll(self, rng_key, param_map, model, guide, args, kwargs, exact: bool):
        model_trace = self._model_trace(rng_key, param_map, model, guide, args, kwargs)
        loss, found = 0.0, False
        for site in model_trace.values():
            if site["type"] != "sample":
                continue
            if exact:
                log_p = site["fn"].log_prob(site["value"])
            else:
                log_p, uses_flow = _training_log_prob(site["fn"], site["value"])
                found = found or uses_flow
            if site.get("scale") is not None:
                log_p = site["scale"] * log_p
            loss = loss - jnp.sum(log_p)
        if not exact and not found:
            raise ValueError(
                "RelativeGradientMLE found no observed site distributed as a TransformedDistribution "
                "with an InvertibleMLPTransform; use Trace_ELBO for other models"
            )
        return loss

    def loss(
        self,
        rng_key: jax.Array,
        param_map: Mapping[str, Any],
        model: Callable,
        guide: Callable,
        *args: Any,
        **kwargs: Any,
    ) -> jax.Array:
        """Training loss (the NLL without the ``log|det W_k|`` terms); its ``jax.grad`` in the
        flow weights is their relative gradient."""
        return self._nll(rng_key, param_map, model, guide, args, kwargs, exact=False)

    def exact_nll(
        self,
        rng_key: jax.Array,
        param_map: Mapping[str, Any],
        model: Callable,
        guide: Callable,
        *args: Any,
        **kwargs: Any,
    ) -> jax.Array:
        """Exact negative log-likelihood (``slogdet`` per layer), for evaluation."""
        return self._nll(rng_key, param_map, model, guide, args, kwargs, exact=True)
