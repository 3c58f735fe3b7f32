"""Variational inference with implicit guides (Pyro).

An implicit guide site is written ``pyro.sample(name, dist.Delta(g(eps, ...), event_dim=k))``:
its value ``z = g_phi(eps)`` is a differentiable transform of noise, its density ``q_phi``
is unknown. ``Trace_ELBO`` would take ``log q = 0`` for it (``Delta.log_prob``) and drop
the entropy. ``ImplicitELBO`` restores the entropy's gradient by reparameterization
(Song et al. 2019, section 4.2; Li and Turner 2018; Shi et al. 2018; references in
``ImplicitELBO``):

    grad_phi E_q[-log q_phi(z)] = -E_eps[ grad_z log q_phi(z)^T dg_phi(eps)/dphi ]

(the score-function part ``E_q[grad_phi log q_phi]`` is zero), so for each implicit site the
surrogate loss gains ``stop_grad(s_hat(z))^T (z - stop_grad(z))``, with ``s_hat ~ grad_z log q``
from an estimator:

* a ``ppl_score.torch.estimators.LearnedScoreEstimator``: a score network, optionally
  conditioned on a context (amortized guides), updated by ``n_steps`` (default 10) score-matching steps
  on the fresh, detached samples of every ``loss_and_grads`` / ``differentiable_loss`` call before
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

Data parallelism (``torch.nn.parallel.DistributedDataParallel``, one shard of the data per
rank): ``generator=`` gives each rank its own random stream (``ppl_score.torch.distributed.
rank_generator``) and ``process_group=`` makes the batch-global parts of the entropy term
those of one process holding every rank's samples: a global latent's particles are pooled
for the kernel estimators, a learned estimator is updated on every rank's samples and its
replicas stay identical. Docs page *Batch-global terms under DDP (torch)*.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from pyro.distributions import Delta
from pyro.infer import Trace_ELBO
from pyro.infer.util import torch_item
from pyro.poutine.trace_struct import Trace
from pyro.util import warn_if_nan

from ..common import implicit as common
from ..common.validate import check_int, check_sites
from ..torch import distributed as tdist
from ..torch.estimators import LearnedScoreEstimator, check_scores_finite, site_scores
from .distributed import RankState

__all__ = ["ImplicitELBO", "implicit_sites"]


def implicit_sites(guide_trace: Trace, sites: Sequence[str] | None = None) -> list[str]:
    """Names of the guide's implicit sites: unobserved sample sites whose distribution is a
    ``Delta`` (or the ``sites`` given, which must be such sites).

    Raises:
        ValueError: a name of ``sites`` is not a sample site of the guide, or not implicit.
    """
    return common.implicit_site_names(guide_trace.nodes, sites, Delta, "pyro")


class ImplicitELBO(RankState, Trace_ELBO):
    """The ELBO for guides with implicit sites ``sample(name, Delta(g(eps, ...), event_dim=k))``.

    The entropy of an implicit site enters through its reparameterized gradient
    ``grad_phi E_q[-log q_phi(z)] = -E_eps[grad_z log q_phi(z)^T dg_phi(eps)/dphi]``, section
    4.2 of [1], with ``grad_z log q_phi`` estimated from the guide's samples by a learned
    score network (trained by sliced score matching [1]), the Stein gradient estimator [2]
    or the spectral estimator (SSGE) [3]; see the module docstring.

    Args:
        estimator: the score estimator of every implicit site, or a dict ``{site: estimator}``:
            a ``LearnedScoreEstimator``, ``"stein"``, ``"spectral"``, or a callable
            ``score(z, context)`` (see the module docstring).
        num_particles: guide samples per step.
        vectorize_particles: draw them in one vectorized trace (a particle plate, like
            ``Trace_ELBO``; the guide's noise must then be drawn inside the plate, e.g. by
            ``pyro.sample(..., infer={"is_auxiliary": True})``; such a site's log density,
            a constant in the parameters, then enters the reported loss as it does in
            ``Trace_ELBO``: mask it, ``dist.Normal(0, 1).expand(...).mask(False)``, to leave
            it out), else sequentially.
        sites: names of the implicit sites (default: every ``Delta`` site of the guide).
        context: for amortized guides, a callable ``context(*args, **kwargs) -> [*batch, C]``
            computed from the guide's inputs (e.g. ``lambda x: x``), or a dict per site; the
            learned estimator then models ``grad_z log q(z | c)``.
        estimator_options: options of the kernel estimators (``eta``, ``bandwidth``,
            ``n_eigen``, ``threshold``), or a dict per site.
        update_estimator: update learned estimators in ``loss_and_grads`` /
            ``differentiable_loss`` (``loss`` never updates them).
        generator: a ``torch.Generator`` (CPU or CUDA) for every draw the loss makes on its
            device: the guide's and the model's (``torch.randn``, ``pyro.sample``: the
            particles), and a learned estimator's projections and noise unless it has a
            ``generator`` of its own. Its stream stands in for the global RNG of that device
            during each evaluation, and the global RNG is left as it was. None (default):
            the global RNG (``torch.manual_seed`` / ``pyro.set_rng_seed``). Draws on other
            devices and from Python's ``random`` or NumPy stay on their global generators.
            Pickled as its state (see below).
        process_group: None (default: no collective; under DDP every rank then estimates the
            entropy term from its own samples, a different, biased objective), or a
            ``torch.distributed`` group (``torch.distributed.group.WORLD``) whose ranks pool
            their samples: the particles of a global implicit site (outside every plate, one
            distribution) for ``"stein"`` / ``"spectral"``, whose estimate is then that of
            one process with every rank's particles (one particle per rank may do); and
            every rank's samples for a learned estimator's update, its replicas kept
            identical (``LearnedScoreEstimator.update``). Sites in plates keep their
            per-datum kernel estimates. Every ``differentiable_loss`` / ``loss_and_grads`` is
            then a collective: all ranks call it, with the same sites.
        **kwargs: passed to ``Trace_ELBO`` (``max_plate_nesting``, ``retain_graph``, ...).

    Raises:
        TypeError, ValueError: a bad ``estimator`` (a kernel estimator needs
            ``num_particles >= 2``), ``context``, ``sites``, ``num_particles``, ``generator``
            or ``process_group``; at the first step, ``sites`` naming a site that is not
            implicit.

    Pickling, ``copy.deepcopy`` and ``torch.save`` keep the generator as its device and
    state (restored into a new ``torch.Generator``) and ``process_group`` as None or the
    default group (``WORLD``, resolved again when the loss is used; None in a process without
    an initialized default group); a loss holding another group raises ``TypeError``.

    A learned estimator must keep up with the guide it scores. Its defaults (10 Adam steps
    at lr 3e-3 per SVI step, two hidden layers of 128) recover the posterior sd of Bayesian
    logistic regressions and of a conjugate Gaussian to within about 10%; the former
    default, one step at 1e-3, shrank it to as little as 0.09-0.39 of it (docs page *Score
    estimators, implicit VI and WAE*, section "Tuning a learned estimator"). Signs of such a collapse: a guide spread that keeps shrinking
    below a reference's (a short NUTS run, a Gaussian guide), an ELBO that improves while
    it does. Remedies: more estimator steps per SVI step
    (``n_steps``), a higher ``lr`` (to about 1e-2), more ``num_particles`` (more samples per
    estimator update), a lower SVI learning rate; see ``LearnedScoreEstimator``.

    References:
        [1] Y. Song, S. Garg, J. Shi, S. Ermon, "Sliced score matching: a scalable approach to
        density and score estimation", UAI, 2019.

        [2] Y. Li, R. E. Turner, "Gradient estimators for implicit models", ICLR, 2018.

        [3] J. Shi, S. Sun, J. Zhu, "A spectral approach to gradient estimation for implicit
        distributions", ICML, 2018.
    """

    generator: torch.Generator | None = None  # defaults for losses pickled before these options
    _process_group: Any = None

    def __init__(
        self,
        estimator: Any = "stein",
        *,
        num_particles: int = 1,
        vectorize_particles: bool = False,
        sites: str | Iterable[str] | None = None,
        context: Callable | Mapping | None = None,
        estimator_options: Mapping | None = None,
        update_estimator: bool = True,
        generator: torch.Generator | None = None,
        process_group: Any = None,
        **kwargs: Any,
    ) -> None:
        num_particles = check_int("num_particles", num_particles)
        super().__init__(num_particles=num_particles, vectorize_particles=bool(vectorize_particles), **kwargs)
        self.generator = tdist.check_generator(generator)
        self.process_group = tdist.check_process_group(process_group)
        # with a group, a global site's particles are pooled over the ranks: one per rank may
        # do (a site in a plate still needs 2, checked at the step)
        common.check_estimators(estimator, LearnedScoreEstimator, None if process_group else num_particles)
        self.sites = check_sites(sites, "latent")
        self._estimator_arg = estimator
        self._options_arg = estimator_options
        self.update_estimator = bool(update_estimator)
        self.context = common.check_context(context)

    def _context_for(self, ctx, args, kwargs):
        if ctx is None:
            return None
        out = ctx(*args, **kwargs)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"argument 'context' must return a torch.Tensor, got {type(out).__name__}")
        return out.detach()

    def _implicit_surrogate(self, traces, args, kwargs, train):
        """``(1/P) sum_p sum_sites scale * stop_grad(s_hat(z_p))^T (z_p - stop_grad(z_p))``."""
        names = implicit_sites(traces[0][1], self.sites)
        group = self.process_group
        total = 0.0
        for name in names:
            nodes = [guide_trace.nodes[name] for _, guide_trace in traces]
            event_dim = len(nodes[0]["fn"].event_shape)
            vectorized = self.vectorize_particles and self.num_particles > 1
            is_global = common.outside_plates(nodes[0], ("num_particles_vectorized",))
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
            site_group = group
            if group is not None and is_global and all(n == 1 for n in stacked.shape[1 : 1 + batch_ndim]):
                # a global latent, one distribution: the ranks' particles of it are pooled
                stacked = stacked.reshape(stacked.shape[0], *stacked.shape[1 + batch_ndim :])
                batch_ndim = 0
            elif batch_ndim == 0:
                site_group = None  # in sequential plates only: per datum, not on every rank
            # else in (vectorized) plates: per datum, the data sharded over the ranks
            est, options, ctx = common.site_options(self._estimator_arg, self._options_arg, self.context, name)
            context = self._context_for(ctx, args, kwargs)
            s_hat = site_scores(
                name,
                est,
                stacked.detach(),
                batch_ndim,
                context,
                options=options,
                train=train,
                process_group=site_group,
            )
            check_scores_finite(name, s_hat)
            values = [site["value"] for site in nodes]
            s_hat = [s_hat.reshape(values[0].shape)] if vectorized else list(s_hat.unbind(0))
            for site, zp, sp in zip(nodes, values, s_hat):
                term = (sp * (zp - zp.detach())).reshape(*zp.shape[: zp.dim() - event_dim], -1).sum(-1)
                if site.get("mask") is not None:
                    term = term * site["mask"]
                total = total + (site["scale"] * term).sum()
        return total / self.num_particles

    def _losses(self, model, guide, args, kwargs, train):
        with tdist.use_generator(self.generator):
            return self._losses_now(model, guide, args, kwargs, train)

    def _losses_now(self, model, guide, args, kwargs, train):
        traces = list(self._get_traces(model, guide, args, kwargs))
        loss, surrogate = 0.0, 0.0
        for model_trace, guide_trace in traces:
            loss_p, surrogate_p = self._differentiable_loss_particle(model_trace, guide_trace)
            loss = loss + loss_p / self.num_particles
            surrogate = surrogate + surrogate_p / self.num_particles
        surrogate = surrogate + self._implicit_surrogate(traces, args, kwargs, train)
        return loss, surrogate, traces

    def loss(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> float:
        """The negative ELBO without the implicit sites' entropy (a float); estimators untouched."""
        with torch.no_grad(), tdist.use_generator(self.generator):
            traces = list(self._get_traces(model, guide, args, kwargs))
            implicit_sites(traces[0][1], self.sites)
            loss = (
                sum(torch_item(g.log_prob_sum()) - torch_item(m.log_prob_sum()) for m, g in traces) / self.num_particles
            )
        warn_if_nan(loss, "loss")
        return loss

    def differentiable_loss(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The loss as a differentiable tensor: its value is that of :meth:`loss`, its gradient
        includes the implicit sites' entropy gradient (learned estimators are updated first
        when ``update_estimator``)."""
        loss, surrogate, _ = self._losses(model, guide, args, kwargs, self.update_estimator)
        warn_if_nan(surrogate, "loss")
        return loss + (surrogate - torch_item(surrogate))

    def loss_and_grads(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> float:
        """The loss as a float (as :meth:`loss`); backpropagates the surrogate, entropy
        gradient included, into the parameters."""
        loss, surrogate, traces = self._losses(model, guide, args, kwargs, self.update_estimator)
        trainable = any(site["type"] == "param" for pair in traces for trace in pair for site in trace.nodes.values())
        if trainable and getattr(surrogate, "requires_grad", False):
            surrogate.backward(retain_graph=self.retain_graph)
        warn_if_nan(loss, "loss")
        return loss
