"""Score matching as a Pyro SVI loss: :class:`ScoreMatching`, a ``pyro.infer.ELBO``."""

from __future__ import annotations

import warnings

import torch
from pyro import poutine
from pyro.distributions import constraints
from pyro.distributions.torch_distribution import MaskedDistribution
from pyro.distributions.transforms import biject_to
from pyro.distributions.util import broadcast_shape
from pyro.infer.elbo import ELBO
from pyro.infer.util import is_validation_enabled, torch_item
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import prune_subsample_sites
from pyro.util import check_model_guide_match, check_site_shape

from .. import frontend, validation
from ..torch import score_matching_loss

__all__ = ["ScoreMatching"]


class ScoreMatching(ELBO):
    r"""Score matching (Hyvarinen 2005) and its scalable variants as an SVI loss, used
    exactly like :class:`~pyro.infer.Trace_ELBO`::

        svi = SVI(model, guide, Adam({"lr": 1e-2}), loss=ScoreMatching("ssm_vr"))

    It fits models whose likelihood is known only up to a normalizing constant (energy
    models, e.g. :class:`~ppl_score.pyro.Unnormalized`), since the objectives of SPEC.md
    section 1 need only :math:`s(x) = \nabla_x \log p(x)` and its derivatives. With
    latent sites :math:`z` and guide :math:`q(z)` the loss is

    .. math::

        L = \mathbb{E}_{q(z)}\Big[\beta \sum_i w_i\, \mathrm{SM}_i(z) + \log q(z) - \log p(z)\Big],

    whose minimizer over all :math:`q` is the generalized Bayes (Hyvarinen-score) posterior
    :math:`p(z) \exp(-\beta \sum_i \mathrm{SM}_i(z))`; with no latent sites it is
    :math:`\beta \sum_i w_i\, \mathrm{SM}_i`, score-matching estimation of the parameters.

    - :math:`\mathrm{SM}_i` is the per-example objective ``method`` of the joint log
      density of the matched sites at data point :math:`i`, taken unscaled: every batch
      (plate) dimension of a matched site indexes data points, its event dimensions are the
      :math:`x` of SPEC.md. A site with constrained support is matched in the unconstrained
      space of ``biject_to(support)``, log-abs-det-Jacobian added, so the estimator stays
      consistent. Several matched sites (same batch shape) are matched jointly: :math:`x`
      is the concatenation of their flattened unconstrained values.
    - :math:`w_i` is the site's ``scale`` (``N / B`` in a subsampled plate, as in
      ``Trace_ELBO``) times its mask (``poutine.mask``, ``obs_mask``, ``fn.mask``): a
      masked data point contributes nothing.
    - Observed sites not matched (``sites`` names a subset) are conditioned on.
      ``pyro.factor`` terms count in :math:`\log p(z)`.

    Each matched site's log density is ``site["fn"].log_prob`` of the distribution the
    model built for it, evaluated at perturbed :math:`x` without re-running the model (one
    batched call per evaluation). That is exact when no site depends on a matched site's
    value, which the loss checks under ``pyro.enable_validation()`` (the default):
    a violation is a ``ValueError`` naming the sites.

    :param str method: one of ``ppl_score.spec.OBJECTIVES``: ``"esm"``, ``"ssm"``,
        ``"ssm_vr"`` (default), ``"dsm"``, ``"fd_ssm"``, ``"fd_dsm"``.
    :param sites: names of the observed sites to match (default: all of them).
    :param float beta: weight of the score-matching term (the generalized Bayes
        temperature); default 1.
    :param int num_particles: guide samples averaged per step.
    :param options: the method's options (``n_projections``, ``projection``, ``sigma``,
        ``eps``); unknown options or bad values raise here.

    References: Hyvarinen (2005) JMLR 6; Song, Garg, Shi, Ermon (2019) UAI; Vincent
    (2011) Neural Computation 23; Pang et al. (2020) NeurIPS; generalized Bayes with the
    Hyvarinen score: Matsubara, Knoblauch, Briol, Oates (2022) JRSS-B.
    """

    def __init__(self, method: str = "ssm_vr", *, sites=None, beta: float = 1.0, num_particles: int = 1, **options):
        self.config = frontend.make_config(method, sites, beta, num_particles, options)
        super().__init__(num_particles=self.config.num_particles)
        self.method = self.config.method
        self.sites = self.config.sites
        self.beta = self.config.beta
        self.options = self.config.options

    def _average(self, particle: torch.Tensor) -> torch.Tensor:
        return particle if self.num_particles == 1 else particle / self.num_particles

    def __repr__(self) -> str:
        opts = "".join(f", {k}={v!r}" for k, v in self.options.items())
        return (
            f"ScoreMatching({self.method!r}, sites={self.sites!r}, beta={self.beta!r}, "
            f"num_particles={self.num_particles!r}{opts})"
        )

    # ---- traces ---------------------------------------------------------------------

    def _get_trace(self, model, guide, args, kwargs):
        """A guide trace and the model trace replayed against it."""
        validate = is_validation_enabled()
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        replayed = poutine.replay(model, trace=guide_trace)
        if validate:
            replayed = _TrackObserved()(replayed)
        model_trace = _get_model_trace(replayed, args, kwargs)
        guide_trace = prune_subsample_sites(guide_trace)
        model_trace = prune_subsample_sites(model_trace)
        for name, site in model_trace.nodes.items():
            if site["type"] == "sample" and not site["is_observed"]:
                if guide_trace.nodes.get(name, {}).get("type") != "sample":
                    raise frontend.missing_guide_site_error(name)
        for name, site in guide_trace.nodes.items():
            if site["type"] == "sample" and not site["is_observed"] and not site["fn"].has_rsample:
                raise frontend.nonreparam_guide_site_error(name)
        if validate:
            check_model_guide_match(model_trace, guide_trace, self.max_plate_nesting)
        return model_trace, guide_trace

    # ---- the loss of one particle --------------------------------------------------

    def _particle_loss(self, model_trace, guide_trace) -> tuple:
        """The loss of one particle and the names of its matched sites."""
        observed, latent, prior = [], [], []
        for name, site in model_trace.nodes.items():
            if site["type"] != "sample":
                continue
            if not site["is_observed"]:
                latent.append(name)
                prior.append(name)
            elif site["infer"].get("is_auxiliary", False):  # pyro.factor
                prior.append(name)
            else:
                observed.append(name)
        matched = frontend.select_matched(observed, latent, self.sites)
        if is_validation_enabled():
            _check_dependencies(model_trace, matched)

        fn, x, weight = _matched_log_density(model_trace, matched)
        with warnings.catch_warnings():
            # a non-finite loss is reported once, by the loss, naming the sites
            warnings.simplefilter("ignore", validation.NonFiniteWarning)
            if weight is None:
                loss = score_matching_loss(fn, x, self.method, reduction="sum", **self.options)
            else:
                loss = (score_matching_loss(fn, x, self.method, reduction="none", **self.options) * weight).sum()
        if self.beta != 1.0:
            loss = self.beta * loss

        # E_q[log q(z) - log p(z)]: every guide site (auxiliary ones included, as in
        # Trace_ELBO), the model's latent sites and factors, scaled and masked
        prior_set = set(prior)
        model_trace.compute_log_prob(site_filter=lambda name, site: name in prior_set)
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
        return loss, matched

    # ---- the ELBO interface -----------------------------------------------------------

    def _check_grad_mode(self) -> None:
        # no_grad is fine (grad is switched back on below); inference mode cannot be undone
        if torch.is_inference_mode_enabled():
            raise validation.inference_mode_error(
                f"ScoreMatching(method={self.method!r})", "the scores of the model's log density in the observed values"
            )

    def _warn_if_nonfinite(self, loss, matched) -> None:
        if validation.is_validation_enabled() and not bool(torch.isfinite(torch.as_tensor(loss)).all()):
            what, cause = frontend.nonfinite_loss_warning(f"ScoreMatching(method={self.method!r})", matched, self.config.resolved)
            validation.warn_nonfinite(what, cause, stacklevel=4)

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
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
            for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
                particle, names = self._particle_loss(model_trace, guide_trace)
                particle = self._average(particle)
                matched.extend(names)
                loss = particle if loss is None else loss + particle
        self._warn_if_nonfinite(loss.detach(), matched)
        return loss

    def loss(self, model, guide, *args, **kwargs) -> float:
        """The loss estimate as a float (the same under ``torch.no_grad()``).

        Raises:
            RuntimeError: under ``torch.inference_mode()`` (see :meth:`differentiable_loss`).
        """
        return torch_item(self.differentiable_loss(model, guide, *args, **kwargs))

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        """The loss estimate as a float; backpropagates it into the parameters.

        Raises:
            RuntimeError: under ``torch.inference_mode()`` (see :meth:`differentiable_loss`).
        """
        self._check_grad_mode()
        loss, matched = 0.0, []
        with torch.enable_grad():
            for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
                particle, names = self._particle_loss(model_trace, guide_trace)
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
# Matched sites -> (fn, x, weight) for the backend.
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


class _Block:
    """One matched site: its unconstrained data and how to evaluate its log density."""

    __slots__ = ("name", "base", "transform", "mask", "u", "batch", "uevent", "start", "stop", "scale")


def _is_real(c) -> bool:
    while isinstance(c, constraints.independent):
        c = c.base_constraint
    return type(c) is type(constraints.real)


def _site_block(name: str, site: dict) -> _Block:
    fn = site["fn"]
    if fn.support.is_discrete:
        raise frontend.discrete_site_error(name)
    base, fn_mask = (fn.base_dist, fn._mask) if isinstance(fn, MaskedDistribution) else (fn, None)
    value = torch.as_tensor(site["value"]).detach()
    if not value.is_floating_point():
        value = value.to(torch.get_default_dtype())
    e = fn.event_dim
    if value.dim() < e or value.shape[value.dim() - e :] != fn.event_shape:
        raise frontend.event_shape_error(name, value.shape, fn.event_shape)
    batch = value.shape[: value.dim() - e]
    if batch != fn.batch_shape:
        batch = torch.Size(broadcast_shape(batch, fn.batch_shape))
        value = value.expand(batch + value.shape[value.dim() - e :])
    blk = _Block()
    blk.name, blk.base, blk.batch, blk.scale = name, base, batch, site["scale"]
    blk.transform = None if _is_real(fn.support) else biject_to(fn.support)
    blk.mask = _combine_masks(name, batch, value.device, site["mask"], fn_mask)
    u = value if blk.transform is None else blk.transform.inv(value)
    if blk.mask is not None:
        # masked entries may hold anything (obs_mask allows NaN): use a finite stand-in
        keep = blk.mask.reshape(batch + (1,) * (u.dim() - len(batch)))
        zero = torch.zeros((), dtype=u.dtype, device=u.device)
        u = torch.where(keep, u, zero)
        value = torch.where(keep.reshape(batch + (1,) * (value.dim() - len(batch))), value, zero)
    if validation.is_validation_enabled() and not bool(torch.isfinite(u).all()):
        # one host sync in the common (finite) case; tell the two causes apart only on failure
        if not bool(torch.isfinite(value).all()):
            raise frontend.nonfinite_observed_error(name)
        raise frontend.outside_support_error(name)
    blk.u, blk.uevent = u.detach(), u.shape[len(batch) :]
    return blk


def _combine_masks(name, batch, device, *masks):
    """The conjunction of a site's masks as a bool tensor of its batch shape (None: no mask)."""
    out = None
    for m in masks:
        if m is None or m is True:
            continue
        if m is False:
            m = torch.zeros(batch, dtype=torch.bool, device=device)
        m = torch.as_tensor(m, device=device)
        try:
            fits = torch.broadcast_shapes(m.shape, batch) == batch
        except RuntimeError:
            fits = False
        if not fits:
            raise frontend.mask_shape_error(name, m.shape, batch)
        m = m.bool().expand(batch)
        out = m if out is None else out & m
    return out


def _same_scale(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        a, b = torch.as_tensor(a), torch.as_tensor(b)
        return a.shape == b.shape and bool((a == b).all())
    return a == b


def _matched_log_density(model_trace, matched):
    """``fn(x[k * B, D]) -> [k * B]``, the joint per-datum log density of the matched sites
    at unconstrained values ``x``; the data ``x[B, D]``; per-datum weights ``[B]`` or None."""
    blocks = [_site_block(name, model_trace.nodes[name]) for name in matched]
    batch = blocks[0].batch
    if any(blk.batch != batch for blk in blocks):
        raise frontend.batch_shape_error({blk.name: blk.batch for blk in blocks})
    if any(not _same_scale(blk.scale, blocks[0].scale) for blk in blocks):
        raise frontend.scale_mismatch_error([blk.name for blk in blocks])
    n = batch.numel()
    start = 0
    for blk in blocks:
        blk.start, blk.stop = start, start + blk.uevent.numel()
        start = blk.stop
    x = torch.cat([blk.u.reshape(n, -1) for blk in blocks], dim=1)

    def fn(rows: torch.Tensor) -> torch.Tensor:
        k = rows.shape[0] // n  # the backend stacks copies / perturbations of the batch
        total = 0.0
        for blk in blocks:
            u = rows[:, blk.start : blk.stop].reshape(k, *batch, *blk.uevent)
            if blk.transform is None:
                lp = blk.base.log_prob(u)
            else:
                y = blk.transform(u)
                lp = blk.base.log_prob(y)
                ladj = blk.transform.log_abs_det_jacobian(u, y)
                lp = lp + (ladj.reshape(*lp.shape, -1).sum(-1) if ladj.dim() > lp.dim() else ladj)
            if blk.mask is not None:
                lp = torch.where(blk.mask, lp, torch.zeros((), dtype=lp.dtype, device=lp.device))
            total = total + lp.reshape(k * n)
        return total

    masks = [blk.mask for blk in blocks]
    weight = None
    if all(m is not None for m in masks):
        # a data point counts when any of its matched sites is unmasked
        weight = torch.stack(masks).any(0).reshape(n).to(x.dtype)
    scale = blocks[0].scale
    if isinstance(scale, torch.Tensor) or scale != 1.0:
        scale = torch.as_tensor(scale, dtype=x.dtype, device=x.device).expand(batch).reshape(n)
        weight = scale if weight is None else weight * scale
    return fn, x, weight


# ---------------------------------------------------------------------------------------
# The dependency check (under validation).
# ---------------------------------------------------------------------------------------


class _TrackObserved(Messenger):
    """Hands the model a fresh leaf that requires grad for each observed floating value (one
    that already requires grad is kept), so that a distribution built from it is visible to
    autograd (``_check_dependencies``). The user's tensor is not modified."""

    def _pyro_sample(self, msg):
        value = msg["value"]
        if (
            msg["is_observed"]
            and isinstance(value, torch.Tensor)
            and value.is_floating_point()
            and not value.requires_grad
        ):
            msg["value"] = value.detach().requires_grad_(True)


def _check_dependencies(model_trace, matched) -> None:
    """Raise if a sample site's distribution depends on a matched site's value."""
    order = [name for name, site in model_trace.nodes.items() if site["type"] == "sample"]
    later = frontend.sites_after(order, matched)
    if not later:
        return
    leaves = {
        name: model_trace.nodes[name]["value"] for name in matched if model_trace.nodes[name]["value"].requires_grad
    }
    found = {}
    for j in later:
        before = [i for i in matched if i in leaves and order.index(i) < order.index(j)]
        if not before:
            continue
        site = model_trace.nodes[j]
        lp = site["fn"].log_prob(site["value"].detach()).sum()
        if not lp.requires_grad:
            continue
        grads = torch.autograd.grad(lp, [leaves[i] for i in before], allow_unused=True, retain_graph=True)
        on = [i for i, g in zip(before, grads) if g is not None]
        if on:
            found[j] = on
    if found:
        raise frontend.dependency_error(found)
