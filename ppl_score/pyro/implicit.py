"""Variational inference with implicit guides (Pyro).

An implicit guide site is written ``pyro.sample(name, dist.Delta(g(eps, ...), event_dim=k))``:
its value ``z = g_phi(eps)`` is a differentiable transform of noise, its density ``q_phi``
is unknown. ``Trace_ELBO`` would take ``log q = 0`` for it (``Delta.log_prob``) and drop
the entropy. ``ImplicitELBO`` restores the entropy's gradient by reparameterization
(Song et al. 2019, section 4.2; Li & Turner 2018; Shi et al. 2018):

    grad_phi E_q[-log q_phi(z)] = -E_eps[ grad_z log q_phi(z)^T dg_phi(eps)/dphi ]

(the score-function part ``E_q[grad_phi log q_phi]`` is zero), so for each implicit site the
surrogate loss gains ``stop_grad(s_hat(z))^T (z - stop_grad(z))``, with ``s_hat ~ grad_z log q``
from an estimator:

* a ``ppl_score.torch.estimators.LearnedScoreEstimator``: a score network, optionally
  conditioned on a context (amortized guides), updated by one score-matching step on the
  fresh, detached samples of every ``loss_and_grads`` / ``differentiable_loss`` call before
  it is evaluated (the SSM-VR implicit-encoder recipe);
* ``"stein"`` or ``"spectral"``: the kernel estimators, across the ``num_particles`` samples
  of each batch element (so ``num_particles >= 2``; global latents and local latents alike);
* any callable ``score(z, context) -> grad_z log q(z)`` (e.g. an exact score, for checks),
  given the particles' values ``z [P, *site_shape]``.

Everything else is ``Trace_ELBO``: model sites, ordinary (non-implicit) guide sites with
their reparameterized or score-function terms, scales, masks, ``num_particles``. The value
returned by ``loss`` / ``loss_and_grads`` is ``-E_q[log p(x, z)] + E_q[log q(z_explicit)]``,
the negative ELBO without the (unknown) entropy of the implicit sites; their surrogate
terms have value zero.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import torch
from pyro.distributions import Delta
from pyro.infer import Trace_ELBO
from pyro.infer.util import torch_item
from pyro.util import warn_if_nan

from .. import implicit_spec as ispec
from ..torch.estimators import LearnedScoreEstimator, kernel_scores_batched
from ..validation import is_validation_enabled

__all__ = ["ImplicitELBO", "implicit_sites"]


def _base_fn(fn):
    while hasattr(fn, "base_dist"):  # Independent, MaskedDistribution, ExpandedDistribution
        fn = fn.base_dist
    return fn


def implicit_sites(guide_trace, sites=None) -> list[str]:
    """Names of the guide's implicit sites: unobserved sample sites whose distribution is a
    ``Delta`` (or the ``sites`` given, which must be such sites)."""
    found = [
        name
        for name, site in guide_trace.nodes.items()
        if site["type"] == "sample" and not site["is_observed"] and isinstance(_base_fn(site["fn"]), Delta)
    ]
    if sites is None:
        return found
    for name in sites:
        if name not in guide_trace.nodes or guide_trace.nodes[name]["type"] != "sample":
            raise ValueError(f"argument 'sites': site {name!r} is not a sample site of the guide")
        if name not in found:
            raise ValueError(
                f"argument 'sites': guide site {name!r} is not implicit; write it as "
                f"pyro.sample({name!r}, dist.Delta(g(eps, ...), event_dim=k))"
            )
    return list(sites)


class _Estimator:
    """One site's score estimator, resolved from the user's ``estimator`` argument."""

    def __init__(self, estimator, options):
        if isinstance(estimator, LearnedScoreEstimator):
            self.kind = "learned"
        elif isinstance(estimator, str):
            self.kind = ispec.check_kernel_name(estimator)  # its options are checked per call (N known)
        elif callable(estimator):
            self.kind = "callable"
        else:
            raise TypeError(
                "argument 'estimator' must be a LearnedScoreEstimator, 'stein', 'spectral', a callable "
                f"score(z, context), or a dict of these per site; got {type(estimator).__name__}"
            )
        self.estimator = estimator
        self.options = dict(options or {})

    def scores(self, name, z, batch_ndim, context, train):
        """``z [P, *batch, *event]`` (detached) -> estimated ``grad_z log q`` of the same shape."""
        p, batch = z.shape[0], z.shape[1 : 1 + batch_ndim]
        n_batch = math.prod(batch)
        flat = z.reshape(p, n_batch, -1)
        if self.kind == "callable":
            out = self.estimator(z, context)
            if not isinstance(out, torch.Tensor) or out.shape != z.shape:
                raise ValueError(
                    f"site {name!r}: argument 'estimator' must return scores of the shape of z, "
                    f"{tuple(z.shape)}, got {getattr(out, 'shape', type(out).__name__)}"
                )
            return out.detach()
        if self.kind in ispec.KERNEL_ESTIMATORS:
            if p < 2:
                raise ValueError(
                    f"site {name!r}: the {self.kind!r} kernel estimator needs num_particles >= 2 "
                    "(it estimates the score across the particles of each batch element)"
                )
            g = kernel_scores_batched(self.kind, flat.transpose(0, 1), **self.options)
            return g.transpose(0, 1).reshape(z.shape)
        est = self.estimator
        d = flat.shape[-1]
        if d != est.dim:
            raise ValueError(f"site {name!r}: the learned estimator has dim={est.dim}, the site's event size is {d}")
        ctx = None
        if context is not None:
            ctx = context.reshape(-1, context.shape[-1]) if context.dim() > 1 else context[None]
            if ctx.shape[0] == 1 and n_batch > 1:
                ctx = ctx.expand(n_batch, -1)
            if ctx.shape[0] != n_batch:
                raise ValueError(
                    f"site {name!r}: the context has {ctx.shape[0]} rows, the site has {n_batch} batch elements "
                    f"(batch shape {tuple(batch)})"
                )
            ctx = ctx.unsqueeze(0).expand(p, -1, -1).reshape(p * n_batch, -1)
        samples = flat.reshape(p * n_batch, d)
        if train:
            est.update(samples, ctx)
        with torch.no_grad():
            return est(samples, ctx).reshape(z.shape)


class ImplicitELBO(Trace_ELBO):
    """The ELBO for guides with implicit sites ``sample(name, Delta(g(eps, ...), event_dim=k))``.

    Args:
        estimator: the score estimator of every implicit site, or a dict ``{site: estimator}``:
            a ``LearnedScoreEstimator``, ``"stein"``, ``"spectral"``, or a callable
            ``score(z, context)`` (see the module docstring).
        num_particles: guide samples per step.
        vectorize_particles: draw them in one vectorized trace (a particle plate, like
            ``Trace_ELBO``; the guide's noise must then be drawn inside the plate, e.g. by
            ``pyro.sample(..., infer={"is_auxiliary": True})``), else sequentially.
        sites: names of the implicit sites (default: every ``Delta`` site of the guide).
        context: for amortized guides, a callable ``context(*args, **kwargs) -> [*batch, C]``
            computed from the guide's inputs (e.g. ``lambda x: x``), or a dict per site; the
            learned estimator then models ``grad_z log q(z | c)``.
        estimator_options: options of the kernel estimators (``eta``, ``bandwidth``,
            ``n_eigen``, ``threshold``), or a dict per site.
        update_estimator: update learned estimators in ``loss_and_grads`` /
            ``differentiable_loss`` (``loss`` never updates them).
        **kwargs: passed to ``Trace_ELBO`` (``max_plate_nesting``, ``retain_graph``, ...).
    """

    def __init__(
        self,
        estimator: Any = "stein",
        *,
        num_particles: int = 1,
        vectorize_particles: bool = False,
        sites=None,
        context: Callable | Mapping | None = None,
        estimator_options: Mapping | None = None,
        update_estimator: bool = True,
        **kwargs,
    ):
        num_particles = ispec.check_int("num_particles", num_particles)
        super().__init__(num_particles=num_particles, vectorize_particles=bool(vectorize_particles), **kwargs)
        self.sites = ispec.check_sites(sites)
        self._estimator_arg = estimator
        self._options_arg = estimator_options
        self.update_estimator = bool(update_estimator)
        if context is not None and not (callable(context) or isinstance(context, Mapping)):
            raise TypeError(f"argument 'context' must be a callable or a dict of callables, got {type(context).__name__}")
        self.context = context
        self._resolved: dict[str, _Estimator] = {}
        # fail early on a kernel estimator that cannot work
        for est in estimator.values() if isinstance(estimator, Mapping) else [estimator]:
            if isinstance(est, str):
                ispec.check_kernel_estimator(est, num_particles)
            elif not (isinstance(est, LearnedScoreEstimator) or callable(est)):
                _Estimator(est, None)  # raises the TypeError

    def _estimator_for(self, name) -> _Estimator:
        if name not in self._resolved:
            est, opts = ispec.for_site(self._estimator_arg, self._options_arg, name, "implicit site")
            self._resolved[name] = _Estimator(est, opts)
        return self._resolved[name]

    def _context_for(self, name, args, kwargs):
        ctx = self.context
        if isinstance(ctx, Mapping):
            ctx = ctx.get(name)
        if ctx is None:
            return None
        out = ctx(*args, **kwargs)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"argument 'context' must return a torch.Tensor, got {type(out).__name__}")
        return out.detach()

    def _implicit_surrogate(self, traces, args, kwargs, train):
        """``(1/P) sum_p sum_sites scale * stop_grad(s_hat(z_p))^T (z_p - stop_grad(z_p))``."""
        names = implicit_sites(traces[0][1], self.sites)
        total = 0.0
        for name in names:
            nodes = [guide_trace.nodes[name] for _, guide_trace in traces]
            event_dim = len(nodes[0]["fn"].event_shape)
            vectorized = self.vectorize_particles and self.num_particles > 1
            if vectorized:
                # one trace; the particle plate sits at dim -max_plate_nesting of the batch
                z = nodes[0]["value"]
                batch_ndim = z.dim() - event_dim
                pad = self.max_plate_nesting - batch_ndim
                if pad < 0:
                    raise ValueError(f"site {name!r} has more batch dims than max_plate_nesting")
                stacked = z.reshape((1,) * pad + tuple(z.shape))
                if stacked.shape[0] != self.num_particles:
                    raise ValueError(
                        f"site {name!r}: its value has no particle dimension; with vectorize_particles=True "
                        "the guide must draw its noise inside the particle plate (e.g. with pyro.sample)"
                    )
                batch_ndim = self.max_plate_nesting - 1
            else:
                stacked = torch.stack([site["value"] for site in nodes])  # [P, *site_shape]
                batch_ndim = stacked.dim() - 1 - event_dim
            context = self._context_for(name, args, kwargs)
            s_hat = self._estimator_for(name).scores(name, stacked.detach(), batch_ndim, context, train)
            if is_validation_enabled() and not bool(torch.isfinite(s_hat).all()):
                raise ValueError(f"site {name!r}: the score estimator returned non-finite values (nan or inf)")
            values = [site["value"] for site in nodes]
            s_hat = [s_hat.reshape(values[0].shape)] if vectorized else list(s_hat.unbind(0))
            for site, zp, sp in zip(nodes, values, s_hat):
                term = (sp * (zp - zp.detach())).reshape(*zp.shape[: zp.dim() - event_dim], -1).sum(-1)
                if site.get("mask") is not None:
                    term = term * site["mask"]
                total = total + (site["scale"] * term).sum()
        return total / self.num_particles

    def _losses(self, model, guide, args, kwargs, train):
        traces = list(self._get_traces(model, guide, args, kwargs))
        loss, surrogate = 0.0, 0.0
        for model_trace, guide_trace in traces:
            loss_p, surrogate_p = self._differentiable_loss_particle(model_trace, guide_trace)
            loss = loss + loss_p / self.num_particles
            surrogate = surrogate + surrogate_p / self.num_particles
        surrogate = surrogate + self._implicit_surrogate(traces, args, kwargs, train)
        return loss, surrogate, traces

    def loss(self, model, guide, *args, **kwargs):
        """The negative ELBO without the implicit sites' entropy (a float); estimators untouched."""
        with torch.no_grad():
            traces = list(self._get_traces(model, guide, args, kwargs))
            implicit_sites(traces[0][1], self.sites)
            loss = sum(
                torch_item(g.log_prob_sum()) - torch_item(m.log_prob_sum()) for m, g in traces
            ) / self.num_particles
        warn_if_nan(loss, "loss")
        return loss

    def differentiable_loss(self, model, guide, *args, **kwargs):
        loss, surrogate, _ = self._losses(model, guide, args, kwargs, self.update_estimator)
        warn_if_nan(surrogate, "loss")
        return loss + (surrogate - torch_item(surrogate))

    def loss_and_grads(self, model, guide, *args, **kwargs):
        loss, surrogate, traces = self._losses(model, guide, args, kwargs, self.update_estimator)
        trainable = any(
            site["type"] == "param" for pair in traces for trace in pair for site in trace.nodes.values()
        )
        if trainable and getattr(surrogate, "requires_grad", False):
            surrogate.backward(retain_graph=self.retain_graph)
        warn_if_nan(loss, "loss")
        return loss
