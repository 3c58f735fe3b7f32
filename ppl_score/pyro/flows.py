"""Full-Jacobian flows in Pyro: a ``TransformModule`` and relative-gradient maximum likelihood.

``InvertibleMLPTransform`` wraps ``ppl_score.torch.flows.InvertibleMLP`` (``g``: data ->
latent) as a Pyro transform in the generative direction (``_call = g^{-1}``, ``_inverse = g``),
so ``TransformedDistribution(base, [transform])`` has the flow's exact density::

    flow = InvertibleMLPTransform(D, n_layers=3)

    def model(x):
        pyro.module("flow", flow)
        base = dist.Normal(torch.zeros(D), 1.0).to_event(1)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.TransformedDistribution(base, [flow]), obs=x)

    svi = SVI(model, lambda x: None, pyro.optim.Adam({"lr": 1e-3}), RelativeGradientMLE())

``RelativeGradientMLE`` trains it by maximum likelihood with relative gradients (Gresele et
al. 2020, reference in ``RelativeGradientMLE``): ``loss_and_grads`` leaves
``grad_W(NLL) W^T W`` in each weight's ``.grad`` for the optimizer, computed from the batch's
activations in ``O(B D^2)`` per layer, without a determinant or an inverse.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from pyro import poutine
from pyro.distributions import constraints
from pyro.distributions.torch_distribution import ExpandedDistribution, MaskedDistribution
from pyro.distributions.torch_transform import TransformModule
from pyro.distributions.util import scale_and_mask, sum_rightmost
from pyro.infer.elbo import ELBO
from pyro.poutine.util import prune_subsample_sites
from torch.distributions import ComposeTransform, Independent, TransformedDistribution

from ..common import flows as common
from ..torch.flows import InvertibleMLP

__all__ = ["InvertibleMLPTransform", "RelativeGradientMLE"]


class InvertibleMLPTransform(TransformModule):
    """Pyro ``TransformModule`` for the full-Jacobian flow [1], base -> data direction.

    ``_call(z) = g^{-1}(z)`` (Newton + linear solves, for sampling), ``_inverse(x) = g(x)`` and
    ``log_abs_det_jacobian(z, x) = -log|det dg/dx|`` (exact, ``slogdet`` per layer).

    Args:
        dim: the dimension ``D`` of the data (required unless ``flow`` is given).
        n_layers, alpha, bias, dtype, generator: as in ``ppl_score.torch.flows.InvertibleMLP``.
        flow (ppl_score.torch.flows.InvertibleMLP): an existing flow to wrap instead (the
            arguments above are then not used).
        **inverse_kwargs: ``tol``, ``max_iter``: options of ``InvertibleMLP.inverse``.

    Raises:
        ValueError: neither ``dim`` nor ``flow`` is given.
        TypeError: ``flow`` is not a ``ppl_score.torch.flows.InvertibleMLP``.

    References:
        [1] L. Gresele, G. Fissore, A. Javaloy, B. Schoelkopf, A. Hyvarinen, "Relative gradient
        optimization of the Jacobian term in unsupervised deep learning", NeurIPS, 2020.
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True

    def __init__(
        self,
        dim: int | None = None,
        n_layers: int = 2,
        alpha: float = common.DEFAULT_ALPHA,
        bias: bool = True,
        *,
        flow: InvertibleMLP | None = None,
        dtype: torch.dtype | None = None,
        generator: torch.Generator | None = None,
        **inverse_kwargs: Any,
    ) -> None:
        # cache_size=0: a cached g(x) would go stale when the same data tensor is scored
        # again after a parameter update.
        super().__init__(cache_size=0)
        if flow is None:
            if dim is None:
                raise ValueError("argument 'dim' is required when no 'flow' is given")
            flow = InvertibleMLP(dim, n_layers, alpha, bias, dtype=dtype, generator=generator)
        elif not isinstance(flow, InvertibleMLP):
            raise TypeError(f"argument 'flow' must be a ppl_score.torch.flows.InvertibleMLP, got {type(flow).__name__}")
        self.flow = flow
        self.inverse_kwargs = dict(inverse_kwargs)

    def _call(self, z):
        return self.flow.inverse(z, **self.inverse_kwargs)

    def _inverse(self, x):
        return self.flow(x)

    def log_abs_det_jacobian(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return -self.flow.forward_and_log_det(x)[1]


def _flat_transforms(transforms):
    out = []
    for t in transforms:
        out.extend(_flat_transforms(t.parts) if isinstance(t, ComposeTransform) else [t])
    return out


def _training_log_prob(fn, value):
    """``(log p(value), uses_flow)``: for a ``TransformedDistribution`` with an
    ``InvertibleMLPTransform`` (possibly wrapped in ``Independent``, ``ExpandedDistribution``,
    ``MaskedDistribution``), the relative-gradient surrogate (value without the
    ``log|det W|`` terms, backward giving relative gradients); otherwise ``fn.log_prob``."""
    d, wrappers = fn, []
    while isinstance(d, (Independent, ExpandedDistribution, MaskedDistribution)):
        wrappers.append(d)
        d = d.base_dist
    transforms = _flat_transforms(d.transforms) if isinstance(d, TransformedDistribution) else []
    if not any(isinstance(t, InvertibleMLPTransform) for t in transforms):
        return fn.log_prob(value), False
    # torch's TransformedDistribution.log_prob with the flow's terms swapped for the surrogate
    event_dim, log_prob, y = len(d.event_shape), 0.0, value
    for t in reversed(transforms):
        if isinstance(t, InvertibleMLPTransform):
            x, log_det = t.flow.relative_gradient_forward(y)  # log|det dg/dy|, event summed
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
            batch = value.shape[: value.dim() - len(w.event_shape)]
            log_prob = log_prob.expand(torch.broadcast_shapes(w.batch_shape, batch))
        else:
            log_prob = scale_and_mask(log_prob, mask=w._mask)
    return log_prob, True


class RelativeGradientMLE(ELBO):
    """Maximum likelihood by relative gradient [1] for models whose observed sites are
    ``TransformedDistribution``s with an ``InvertibleMLPTransform``.

    For such a site the training loss uses ``log N(g(x)) + sum_k sum_i log sigma'(y_ki)`` and a
    zero-valued placeholder per layer for ``log|det W_k|``; backpropagation gives every flow
    weight the relative gradient ``grad_W(NLL) W^T W`` of the exact NLL, whose log-det part
    ``-W^{-T} W^T W = -W`` is added analytically: ``O(B D^2)``, no determinant, no inverse.
    Biases and the parameters of other sites get ordinary gradients.

    - ``loss`` / ``loss_and_grads`` / ``differentiable_loss`` return the TRAINING loss:
      ``-sum over data points of [log p(x) - sum_k log|det W_k|]`` (plate scales and masks as
      in ``Trace_ELBO``), i.e. the negative log-likelihood WITHOUT the ``log|det W_k|`` terms,
      which are never computed in training. Its value is therefore not comparable across
      parameter values; only its gradient (made relative) is that of the NLL.
    - ``exact_nll(model, guide, *args)``: the exact negative log-likelihood (with ``slogdet``)
      for evaluation; equal to ``Trace_ELBO().loss`` on such a model.

    The model must be fully observed (no latent sample sites; the guide has none); other
    observed sites contribute their ordinary ``log_prob``. Supported site distributions:
    ``TransformedDistribution`` (transforms may include ``ComposeTransform``s), possibly
    wrapped by ``to_event``, ``expand`` and ``mask``.

    References:
        [1] L. Gresele, G. Fissore, A. Javaloy, B. Schoelkopf, A. Hyvarinen, "Relative gradient
        optimization of the Jacobian term in unsupervised deep learning", NeurIPS, 2020.
    """

    def __init__(self) -> None:
        super().__init__(num_particles=1)

    def _get_trace(self, model, guide, args, kwargs):
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        for name, site in prune_subsample_sites(guide_trace).nodes.items():
            if site["type"] == "sample" and not site["is_observed"]:
                raise ValueError(
                    f"RelativeGradientMLE fits fully observed models: the guide samples site {name!r}; "
                    "use an empty guide"
                )
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
        model_trace = prune_subsample_sites(model_trace)
        for name, site in model_trace.nodes.items():
            if site["type"] == "sample" and not site["is_observed"]:
                raise ValueError(
                    f"RelativeGradientMLE fits fully observed models: site {name!r} is latent (not observed)"
                )
        return model_trace, guide_trace

    def _nll(self, model, guide, args, kwargs, exact: bool):
        model_trace, _ = self._get_trace(model, guide, args, kwargs)
        loss, found = 0.0, False
        for site in model_trace.nodes.values():
            if site["type"] != "sample":
                continue
            if exact:
                log_p = site["fn"].log_prob(site["value"])
            else:
                log_p, uses_flow = _training_log_prob(site["fn"], site["value"])
                found = found or uses_flow
            loss = loss - scale_and_mask(log_p, site["scale"], site["mask"]).sum()
        if not exact and not found:
            raise ValueError(
                "RelativeGradientMLE found no observed site distributed as a TransformedDistribution "
                "with an InvertibleMLPTransform; use Trace_ELBO for other models"
            )
        return loss if isinstance(loss, torch.Tensor) else torch.tensor(loss)

    def differentiable_loss(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The training loss (see the class docstring) as a tensor whose ``backward()`` gives
        relative gradients; also what ``ELBOModule`` (``loss(model, guide)``) returns."""
        return self._nll(model, guide, args, kwargs, exact=False)

    def loss(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> float:
        """Training loss value: the NLL without the ``log|det W_k|`` terms."""
        with torch.no_grad():
            return self._nll(model, guide, args, kwargs, exact=False).item()

    def loss_and_grads(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> float:
        """Training loss value; leaves relative gradients in the flow weights' ``.grad``."""
        loss = self._nll(model, guide, args, kwargs, exact=False)
        if loss.requires_grad:
            loss.backward()
        return loss.item()

    def exact_nll(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> float:
        """Exact negative log-likelihood (``slogdet`` per layer), for evaluation."""
        with torch.no_grad():
            return self._nll(model, guide, args, kwargs, exact=True).item()
