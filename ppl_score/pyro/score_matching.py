"""Score matching as a Pyro SVI loss: :class:`ScoreMatching`, a ``pyro.infer.ELBO``.

This module only translates Pyro traces; the site handling (which sites are matched, data
blocks, masks and weights, dependencies, the joint log density) is ``ppl_score.common.sites``.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Iterable

import pyro
import torch
from pyro import poutine
from pyro.distributions import constraints
from pyro.distributions.torch_distribution import MaskedDistribution
from pyro.distributions.transforms import biject_to
from pyro.infer.elbo import ELBO
from pyro.infer.util import is_validation_enabled, torch_item
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import prune_subsample_sites, site_is_subsample
from pyro.util import check_model_guide_match, check_site_shape

from ..common import frontend, sites, validate
from ..torch import score_matching_loss
from ..torch.distributed import check_generator
from .distributed import GeneratorState

__all__ = ["ScoreMatching"]

# keyword arguments of pyro.infer.ELBO that ScoreMatching accepts and honours
_ELBO_KWARGS = (
    "max_plate_nesting",
    "vectorize_particles",
    "retain_graph",
    "strict_enumeration_warning",
    "ignore_jit_warnings",
    "jit_options",
)
_COPIES = "_ppl_score_copies"


class ScoreMatching(GeneratorState, ELBO):
    r"""Score matching [1] and its scalable variants (sliced [2], denoising [3],
    finite-difference [4]) as an SVI loss, used exactly like :class:`~pyro.infer.Trace_ELBO`::

        svi = SVI(model, guide, Adam({"lr": 1e-2}), loss=ScoreMatching("ssm_vr"))

    It fits models whose likelihood is known only up to a normalizing constant (energy
    models, e.g. :class:`~ppl_score.pyro.Unnormalized`), since the objectives of the
    spec (docs page *Spec*, section 1) need only :math:`s(x) = \nabla_x \log p(x)` and its
    derivatives. With latent sites :math:`z` and guide :math:`q(z)` the loss is

    .. math::

        L = \mathbb{E}_{q(z)}\Big[\beta \sum_i w_i\, \mathrm{SM}_i(z) + \log q(z) - \log p(z)\Big],

    whose minimizer over all :math:`q` is the generalized Bayes (Hyvarinen-score) posterior [5]
    :math:`p(z) \exp(-\beta \sum_i \mathrm{SM}_i(z))`; with no latent sites it is
    :math:`\beta \sum_i w_i\, \mathrm{SM}_i`, score-matching estimation of the parameters.

    - :math:`\mathrm{SM}_i` is the per-example objective ``method`` of the model's *joint*
      log density in the matched values at data point :math:`i`: every site whose
      distribution depends on a matched value (a later observed site ``y ~ Normal(f(x), 1)``,
      a Markov chain's next step) contributes its log density as a function of it, found by
      re-executing the model with the matched values substituted (``poutine.condition`` and
      ``replay``); unmatched observed sites are conditioned on. Every plate dimension of a
      matched site indexes data points and its event dimensions are the :math:`x` of
      the spec; when a site couples data points (it is not inside every plate of the matched
      sites) the batch is one data point. A site with constrained support is matched in the
      unconstrained space of ``biject_to(support)``, log-abs-det-Jacobian added. Several
      matched sites are matched jointly (:math:`x` concatenates their flattened
      unconstrained values). Log densities are unscaled. Without dependent sites (checked
      every step) no re-execution happens: the matched sites' own distributions are
      evaluated in one batched call. See ``ppl_score.common.sites``.
    - :math:`w_i` is the site's ``scale`` (``N / B`` in a subsampled plate, as in
      ``Trace_ELBO``) times its mask (``poutine.mask``, ``obs_mask``, ``fn.mask``): a
      masked data point contributes nothing.
    - ``pyro.factor`` terms count in :math:`\log p(z)`. Latent sites must be continuous
      and reparameterized in the guide; a latent site whose distribution depends on a
      matched value is a ``ValueError``.

    Args:
        method (str): one of ``ppl_score.spec.OBJECTIVES``: ``"esm"``, ``"ssm"``,
            ``"ssm_vr"`` (default), ``"dsm"``, ``"fd_ssm"``, ``"fd_dsm"``.
        sites: names of the observed sites to match (default: all of them).
        beta (float): weight of the score-matching term (the generalized Bayes
            temperature); default 1. ``ppl_score.pyro.calibrate_beta`` chooses a calibrated one.
        num_particles (int): guide samples averaged per step.
        vectorize_particles: draw the ``num_particles`` samples in one vectorized trace
            (an outer ``pyro.plate``, so the model and guide must broadcast as with
            ``Trace_ELBO(vectorize_particles=True)``); default: vectorized when
            ``num_particles > 1``, falling back (with a ``RuntimeWarning``, once) to one trace per
            particle for a model that does not broadcast; ``False``: one trace per particle.
        max_plate_nesting, retain_graph, strict_enumeration_warning, ignore_jit_warnings, jit_options:
            as in :class:`~pyro.infer.ELBO`.
        generator (torch.Generator): draws the method's projections and noise (``ssm``,
            ``ssm_vr``, ``dsm``, ``fd_*``); default: torch's global generator. In data-parallel
            training give each rank its own stream,
            ``generator=ppl_score.torch.distributed.rank_generator(seed)``, or every rank draws
            the same projections (docs page *Distributed training (torch)*). It advances with
            every step; a copy of the loss (``pickle``, ``copy.deepcopy``, ``torch.save``)
            gets a new generator in the same state. The guide's samples come from Pyro's
            global generator (``pyro.set_rng_seed``), as in ``Trace_ELBO``.
        **options: the method's options (``n_projections``, ``projection``, ``sigma``,
            ``eps``); unknown options or bad values raise here.

    Raises:
        TypeError: ``generator`` is not a ``torch.Generator``; a wrong type of another argument.
        ValueError: an unknown method or option, a bad value.

    References:
        [1] A. Hyvarinen, "Estimation of non-normalized statistical models by score matching",
        Journal of Machine Learning Research, 2005.

        [2] Y. Song, S. Garg, J. Shi, S. Ermon, "Sliced score matching: a scalable approach to
        density and score estimation", UAI, 2019.

        [3] P. Vincent, "A connection between score matching and denoising autoencoders", Neural
        Computation, 2011.

        [4] T. Pang, K. Xu, C. Li, Y. Song, S. Ermon, J. Zhu, "Efficient learning of generative
        models via finite-difference score matching", NeurIPS, 2020.

        [5] T. Matsubara, J. Knoblauch, F.-X. Briol, C. J. Oates, "Robust generalised Bayesian
        inference for intractable likelihoods", Journal of the Royal Statistical Society Series B,
        2022.
    """

    def __init__(
        self,
        method: str = "ssm_vr",
        *,
        sites: str | Iterable[str] | None = None,
        beta: float = 1.0,
        num_particles: int = 1,
        generator: torch.Generator | None = None,
        **options: Any,
    ) -> None:
        self.generator = check_generator(generator)
        elbo_kwargs, options = frontend.split_elbo_kwargs(options, _ELBO_KWARGS)
        self.config = frontend.make_config(method, sites, beta, num_particles, options)
        vectorize = elbo_kwargs.pop("vectorize_particles", None)
        self._auto_vectorize = vectorize is None
        vectorize = frontend.check_vectorize_particles(vectorize, self.config.num_particles)
        super().__init__(num_particles=self.config.num_particles, vectorize_particles=vectorize, **elbo_kwargs)
        self.method = self.config.method
        self.sites = self.config.sites
        self.beta = self.config.beta
        self.options = self.config.options

    def _average(self, particle: torch.Tensor) -> torch.Tensor:
        return particle if self.num_particles == 1 else particle / self.num_particles

    def __repr__(self) -> str:
        opts = "".join(f", {k}={v!r}" for k, v in self.options.items())
        gen = "" if self.generator is None else f", generator=<torch.Generator on {self.generator.device}>"
        return (
            f"ScoreMatching({self.method!r}, sites={self.sites!r}, beta={self.beta!r}, "
            f"num_particles={self.num_particles!r}{opts}{gen})"
        )

    # ---- traces ---------------------------------------------------------------------

    def _get_trace(self, model, guide, args, kwargs):
        """A guide trace and the model trace replayed against it (subsample sites pruned)."""
        model_trace, guide_trace, _ = self._traces_of(model, guide, args, kwargs)
        return model_trace, guide_trace

    def _traces_of(self, model, guide, args, kwargs):
        """``(model trace, guide trace, rerun context)``: every observed floating value in the
        model trace is a fresh leaf that requires grad, so that the dependency analysis can
        see which distributions are built from it."""
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        full = _get_model_trace(_TrackObserved()(poutine.replay(model, trace=guide_trace)), args, kwargs)
        guide_trace = prune_subsample_sites(guide_trace)
        model_trace = prune_subsample_sites(full)
        sites.check_latent_sites(model_trace.nodes, guide_trace.nodes)
        if is_validation_enabled():
            check_model_guide_match(model_trace, guide_trace, self.max_plate_nesting)
        return model_trace, guide_trace, (model, args, kwargs, full)

    def _particles(self, model, guide, args, kwargs):
        """``(loss, matched site names)`` of one vectorized trace of all particles, or of one
        trace per particle (as ``ELBO._get_traces``). With ``vectorize_particles`` left to its
        default, a model that does not broadcast over the particles' plate falls back to one
        trace per particle, with a warning (once)."""
        if self.vectorize_particles and self.num_particles > 1:
            try:
                if self.max_plate_nesting == float("inf"):
                    self._guess_max_plate_nesting(model, guide, args, kwargs)
                vmodel, vguide = self._vectorized_num_particles(model), self._vectorized_num_particles(guide)
                out = self._particle_loss(*self._traces_of(vmodel, vguide, args, kwargs))
            except (ValueError, RuntimeError, IndexError, TypeError) as err:
                if not self._auto_vectorize:
                    raise
                self.vectorize_particles = False
                warnings.warn(frontend.particles_fallback_message(err), RuntimeWarning, stacklevel=4)
            else:
                yield out
                return
        for _ in range(self.num_particles):
            yield self._particle_loss(*self._traces_of(model, guide, args, kwargs))

    # ---- the loss of one particle --------------------------------------------------

    def _matched(self, model_trace, context) -> tuple:
        """``(sites.MatchedDensity, classified sites)`` of one trace."""
        cls = sites.classify(model_trace.nodes, self.sites)
        found = _find_dependencies(model_trace, cls)
        blocks = [sites.site_block(_OPS, name, model_trace.nodes[name]) for name in cls.matched]
        deps = sites.plan(model_trace.nodes, found, blocks)
        rerun = _make_rerun(model_trace, cls, deps, context, self.max_plate_nesting) if deps.dependent else None
        return sites.matched_density(_OPS, blocks, deps, rerun), cls

    def _datum_values(self, dens) -> torch.Tensor:
        def compute(fn):
            return score_matching_loss(
                fn, dens.x, self.method, reduction="none", generator=self.generator, **self.options
            )

        with warnings.catch_warnings():
            # a non-finite loss is reported once, by the loss, naming the sites
            warnings.simplefilter("ignore", validate.NonFiniteWarning)
            # ms_dsm: the backend draws a level per datum; NoiseConditional sites read it
            return frontend.objective_values(self.config.resolved, dens.fn, compute)

    def _particle_loss(self, model_trace, guide_trace, context) -> tuple:
        """The loss of one particle (or of all, vectorized) and the names of its matched sites."""
        dens, cls = self._matched(model_trace, context)
        values = self._datum_values(dens)
        loss = (values if dens.weight is None else values * dens.weight).sum()
        if self.beta != 1.0:
            loss = self.beta * loss

        # E_q[log q(z) - log p(z)]: every guide site (auxiliary ones included, as in
        # Trace_ELBO), the model's latent sites and factors, scaled and masked
        prior = sites.prior_sites(cls, dens.dependent)
        model_trace.compute_log_prob(site_filter=lambda name, site: name in prior)
        guide_trace.compute_log_prob()
        for name in prior:
            loss = loss - model_trace.nodes[name]["log_prob_sum"]
        for site in guide_trace.nodes.values():
            if site["type"] == "sample":
                loss = loss + site["log_prob_sum"]
        if is_validation_enabled():
            for trace in (model_trace, guide_trace):
                for site in trace.nodes.values():
                    if site["type"] == "sample" and "log_prob" in site:
                        check_site_shape(site, self.max_plate_nesting)
        return loss, cls.matched

    # ---- the ELBO interface -----------------------------------------------------------

    def _check_grad_mode(self) -> None:
        # no_grad is fine (grad is switched back on below); inference mode cannot be undone
        if torch.is_inference_mode_enabled():
            raise validate.inference_mode_error(
                f"ScoreMatching(method={self.method!r})", "the scores of the model's log density in the observed values"
            )

    def _warn_if_nonfinite(self, loss, matched) -> None:
        if validate.is_validation_enabled() and not bool(torch.isfinite(torch.as_tensor(loss)).all()):
            what, cause = frontend.nonfinite_loss_warning(
                f"ScoreMatching(method={self.method!r})", matched, self.config.resolved
            )
            validate.warn_nonfinite(what, cause, stacklevel=4)

    def datum_losses(
        self, model: Callable, guide: Callable, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The per-datum objectives of one draw of the guide (for calibration and diagnostics).

        Returns:
            ``(losses [n], weights [n] or None)``: :math:`\\mathrm{SM}_i` unweighted and without
            ``beta``, differentiable in the parameters and in whatever the guide's samples
            depend on; the weights are scale x mask. When a site couples the data points,
            ``n = 1``.

        Raises:
            RuntimeError: under ``torch.inference_mode()``.
        """
        self._check_grad_mode()
        with torch.enable_grad():
            model_trace, _, context = self._traces_of(model, guide, args, kwargs)
            dens, _ = self._matched(model_trace, context)
            return self._datum_values(dens), dens.weight

    def datum_scores(
        self, model: Callable, guide: Callable, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The matched data and the model's score at them, for one draw of the guide (for
        goodness-of-fit tests and diagnostics; ``method`` and its options play no part).

        Returns:
            ``(x [n, D], scores [n, D], weights [n] or None)``: the matched sites' data in
            unconstrained coordinates (one row per data point; several matched sites
            concatenated), the score of the model's joint log density in them (the density
            the objectives match), and the weights (scale x mask), all without gradient.
            When a site couples the data points, ``n = 1``.

        Raises:
            RuntimeError: under ``torch.inference_mode()`` (the score needs autograd;
                ``torch.no_grad()`` is fine).
        """
        self._check_grad_mode()
        with torch.enable_grad():
            model_trace, _, context = self._traces_of(model, guide, args, kwargs)
            dens, _ = self._matched(model_trace, context)
            x = dens.x.detach().requires_grad_(True)
            (scores,) = torch.autograd.grad(dens.fn(x).sum(), x)
        weight = None if dens.weight is None else dens.weight.detach()
        return x.detach(), scores.detach(), weight

    def differentiable_loss(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The loss as a differentiable tensor (the ``ELBOModule`` route).

        Returns:
            The loss, a scalar tensor.

        Raises:
            RuntimeError: under ``torch.inference_mode()``, where the derivatives in ``x`` cannot
                be taken (``torch.no_grad()`` is supported and gives the same value).
        """
        self._check_grad_mode()
        loss, matched = None, []
        # derivatives in x are needed even under no_grad (svi.evaluate_loss)
        with torch.enable_grad():
            for particle, names in self._particles(model, guide, args, kwargs):
                particle = self._average(particle)
                matched.extend(names)
                loss = particle if loss is None else loss + particle
        self._warn_if_nonfinite(loss.detach(), matched)
        return loss

    def loss(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> float:
        """The loss estimate as a float (the same under ``torch.no_grad()``).

        Raises:
            RuntimeError: under ``torch.inference_mode()`` (see :meth:`differentiable_loss`).
        """
        return torch_item(self.differentiable_loss(model, guide, *args, **kwargs))

    def loss_and_grads(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> float:
        """The loss estimate as a float; backpropagates it into the parameters.

        Raises:
            RuntimeError: under ``torch.inference_mode()`` (see :meth:`differentiable_loss`).
        """
        self._check_grad_mode()
        loss, matched = 0.0, []
        with torch.enable_grad():
            for particle, names in self._particles(model, guide, args, kwargs):
                particle = self._average(particle)
                matched.extend(names)
                loss += torch_item(particle)
                # parameters may be reached only inside the matched log densities (an
                # Unnormalized PyroModule energy), so no trace shows them: backprop anyway
                if particle.requires_grad:
                    particle.backward(retain_graph=self.retain_graph)
        self._warn_if_nonfinite(loss, matched)
        return loss


# ---------------------------------------------------------------------------------------
# Translation: torch arrays and Pyro traces for ppl_score.common.sites
# ---------------------------------------------------------------------------------------


class _TorchOps(sites.ArrayOps):
    """``ppl_score.common.sites.ArrayOps`` for torch tensors and Pyro distributions."""

    xp = torch
    masked_type = MaskedDistribution
    constraints = constraints
    biject_to = staticmethod(biject_to)

    def as_float(self, value):
        t = torch.as_tensor(value).detach()
        return t if t.is_floating_point() else t.to(torch.get_default_dtype())

    def as_bool(self, mask):
        return torch.as_tensor(mask).bool()

    def all_finite(self, x):
        return bool(torch.isfinite(x).all())

    def stop_gradient(self, x):
        return x.detach()

    def same_scale(self, a, b):
        if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
            a, b = torch.as_tensor(a), torch.as_tensor(b)
            return a.shape == b.shape and bool((a == b).all())
        return a == b

    def as_array(self, scale, like):
        return torch.as_tensor(scale, dtype=like.dtype, device=like.device)


_OPS = _TorchOps()


class _TrackObserved(Messenger):
    """Hands the model a fresh leaf that requires grad for each observed value of a continuous
    site (integer data of a continuous site as a float leaf), so that a distribution built
    from it is visible to autograd (``_find_dependencies``). The user's tensor is not
    modified (and one that requires grad is detached: the loss does not differentiate in the
    observed data)."""

    def _pyro_sample(self, msg):
        value = msg["value"]
        if (
            msg["is_observed"]
            and isinstance(value, torch.Tensor)
            and not msg["infer"].get("_deterministic", False)
            and not msg["infer"].get("is_auxiliary", False)
        ):
            if not value.is_floating_point():
                if msg["fn"].support.is_discrete:
                    return
                value = value.to(torch.get_default_dtype())
            msg["value"] = value.detach().requires_grad_(True)


def _find_dependencies(model_trace, cls) -> dict:
    """``{site: matched sites its distribution depends on}`` for each sample site after the
    first matched one (nothing to do when no site runs after one). A distribution made of
    tensors (and of distributions and transforms made of tensors) is searched through the
    autograd graph of its tensors for the tracked leaves of the matched values, without
    evaluating anything; one that holds code (an ``Unnormalized`` energy, a module) is asked
    by an autograd query of its log density at its fixed value."""
    later = sites.sites_to_check(cls.order, cls.matched)
    if not later:
        return {}
    nodes = model_trace.nodes
    leaves = {name: nodes[name]["value"] for name in cls.matched if nodes[name]["value"].requires_grad}
    found = {}
    for j in later:
        before = [i for i in cls.matched if i in leaves and cls.order.index(i) < cls.order.index(j)]
        if not before:
            continue
        tensors = _distribution_tensors(nodes[j]["fn"])
        if tensors is not None:
            on = _reachable_leaves(tensors, {id(leaves[i]): i for i in before})
        else:
            on = _log_prob_query(nodes[j], [leaves[i] for i in before], before)
        if on:
            found[j] = [i for i in before if i in on]
    return found


_PLAIN = (bool, int, float, str, type(None), torch.Size, torch.dtype, torch.device, constraints.Constraint)


def _distribution_tensors(fn, depth: int = 0):
    """The tensors a distribution is made of (through its base distributions, transforms
    and lists of them), or None when it holds anything else (code that may close over a
    matched value, or objects such as ``GaussianHMM``'s Gaussians): then the caller asks
    autograd about its log density instead."""
    if depth > 8:
        return None
    out = []
    for value in vars(fn).values():
        items = value if isinstance(value, (list, tuple)) and not isinstance(value, torch.Size) else (value,)
        for v in items:
            if isinstance(v, torch.Tensor):
                out.append(v)
            elif isinstance(v, (torch.distributions.Distribution, torch.distributions.Transform)):
                inner = _distribution_tensors(v, depth + 1)
                if inner is None:
                    return None
                out.extend(inner)
            elif not isinstance(v, _PLAIN):
                return None
    return out


def _reachable_leaves(tensors, targets: dict) -> set:
    """Names of the ``targets`` (``id(leaf) -> name``) reachable backwards from ``tensors``."""
    found, seen = set(), set()
    stack = []
    for t in tensors:
        if not t.requires_grad:
            continue
        if id(t) in targets:
            found.add(targets[id(t)])
        if t.grad_fn is not None:
            stack.append(t.grad_fn)
    while stack and len(found) < len(targets):
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if variable is not None and id(variable) in targets:
            found.add(targets[id(variable)])
        stack.extend(n for n, _ in node.next_functions if n is not None)
    return found


def _log_prob_query(site, leaves, names) -> set:
    value = site["value"].detach() if isinstance(site["value"], torch.Tensor) else site["value"]
    if site["is_observed"]:  # masked entries may hold anything (obs_mask allows NaN)
        clean = sites.clean_observed(_OPS, site)
        value = value if clean is None else clean
    lp = _OPS.unmask(site["fn"])[0].log_prob(value).sum()
    if not lp.requires_grad:
        return set()
    grads = torch.autograd.grad(lp, leaves, allow_unused=True, retain_graph=True)
    return {name for name, g in zip(names, grads) if g is not None}


def _plate_depth(trace, max_plate_nesting) -> int:
    """Batch dims every site of the model can have: the copies' plate goes left of them."""
    depth = 0 if max_plate_nesting == float("inf") else int(max_plate_nesting)
    for site in trace.nodes.values():
        if site["type"] == "sample" and not site_is_subsample(site):
            depth = max(
                depth, len(site["fn"].batch_shape), *(-f.dim for f in site["cond_indep_stack"] if f.dim is not None)
            )
    return depth


def _make_rerun(model_trace, cls, deps, context, max_plate_nesting):
    """``values -> {site: log density}``: the model re-executed with the matched values
    substituted, latent and subsample sites replayed, under a plate over the ``k`` stacked
    copies (left of the model's plates)."""
    model, args, kwargs, full = context
    depth = _plate_depth(full, max_plate_nesting)
    nodes = model_trace.nodes
    event_dim = {name: nodes[name]["fn"].event_dim for name in cls.matched}
    cleaned = {}
    for j in deps.dependent:
        if j not in cls.matched:
            value = sites.clean_observed(_OPS, nodes[j])
            if value is not None:
                cleaned[j] = value
    involved = tuple(dict.fromkeys(cls.matched + deps.dependent))
    # each site's log density must come back as [k, 1.., *its batch shape]: a model whose
    # sites do not broadcast over the copies' plate (e.g. a sum over a plate's dim that drops
    # it) would mix the copies, so it is re-executed one copy at a time instead
    batch = {name: tuple(nodes[name]["fn"].batch_shape) for name in involved}
    replayed = poutine.replay(model, trace=full)
    per_copy = []

    def run(values, k):
        data = dict(cleaned)
        for name, v in values.items():
            pad = depth - (v.dim() - 1 - event_dim[name])
            data[name] = v.reshape((k,) + (1,) * pad + tuple(v.shape[1:]))
        with poutine.block(hide_types=["sample"]), pyro.plate(_COPIES, k, dim=-(depth + 1)):
            tr = poutine.trace(poutine.condition(replayed, data=data)).get_trace(*args, **kwargs)
        return {name: sites.masked_log_prob(_OPS, tr.nodes[name]) for name in involved}

    def aligned(lps, k):
        for name, lp in lps.items():
            expected = sites.broadcast_shapes((k,) + (1,) * depth, batch[name])
            if expected is None or tuple(lp.shape) != expected:
                return False
        return True

    def rerun(values):
        k = next(iter(values.values())).shape[0]
        if not per_copy:
            lps = run(values, k)
            if k == 1 or aligned(lps, k):
                return lps
            per_copy.append(True)
        parts = [run({name: v[c : c + 1] for name, v in values.items()}, 1) for c in range(k)]
        return {name: torch.cat([p[name] for p in parts]) for name in involved}

    return rerun


# ---------------------------------------------------------------------------------------
# Mask errors that Pyro raises without naming the site
# ---------------------------------------------------------------------------------------


def _get_model_trace(model, args, kwargs):
    """``poutine.trace(model).get_trace(*args, **kwargs)``, where a mask of the wrong shape
    (``obs_mask`` or ``Distribution.mask`` in a plate: Pyro's error names neither the mask nor
    the site) is a ``ValueError`` naming both."""
    try:
        return poutine.trace(model).get_trace(*args, **kwargs)
    except ValueError as err:
        found, cause = None, err
        while found is None and cause is not None:  # Pyro's trace re-raises with its shapes
            found, cause = _mask_shape_culprit(cause.__traceback__), cause.__cause__
        if found is None:
            raise
        raise frontend.mask_shape_error(*found) from err


def _mask_shape_culprit(tb):
    """``(site, mask shape, batch shape)`` when the sample statement whose handling raised has a
    mask that does not broadcast to its plates' batch shape; None otherwise (best effort: read
    from the failing frame, so an unrelated error is re-raised as it is)."""
    observe, msg, _ = frontend.failing_sample_frames(tb)
    if observe is not None and isinstance(observe.get("batch_shape"), tuple):
        name, mask, expected = observe["name"], observe["obs_mask"], tuple(observe["batch_shape"])
    elif msg is not None and isinstance(msg["fn"], MaskedDistribution):
        # (the masked distribution's base was expanded to the mask: compare with the plates)
        name, mask = msg["name"], msg["fn"]._mask
        plates = [f for f in msg["cond_indep_stack"] if f.dim is not None and f.size != -1]
        shape = [1] * max([-f.dim for f in plates] + [0])
        for f in plates:
            shape[f.dim] = f.size
        expected = tuple(shape)
        if observe is not None:
            name, mask = observe["name"], observe["obs_mask"]
        if isinstance(mask, torch.Tensor) and all(
            -f.dim > mask.dim() or mask.shape[f.dim] in (1, f.size) for f in plates
        ):
            return None
    else:
        return None
    if not isinstance(mask, torch.Tensor):
        return None
    try:
        fits = tuple(torch.broadcast_shapes(mask.shape, expected)) == expected
    except RuntimeError:
        fits = False
    return None if fits else (name, tuple(mask.shape), expected)
