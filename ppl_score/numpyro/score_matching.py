"""Score matching as a NumPyro SVI loss: :class:`ScoreMatching`, a ``numpyro.infer.ELBO``."""

from __future__ import annotations

import numbers
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax import random
from numpyro.distributions import MaskedDistribution, constraints
from numpyro.distributions.transforms import biject_to
from numpyro.handlers import replay, seed, substitute, trace
from numpyro.infer.elbo import ELBO
from numpyro.ops.provenance import eval_provenance
from numpyro.util import check_model_guide_match

from .. import frontend, validation
from ..jax import score_matching_loss
from ..jax.checks import is_concrete

__all__ = ["ScoreMatching"]


class ScoreMatching(ELBO):
    r"""Score matching (Hyvarinen 2005) and its scalable variants as an SVI loss, used
    exactly like :class:`~numpyro.infer.Trace_ELBO` (``svi.run``, ``svi.update`` under
    ``jit``, ``svi.stable_update``)::

        svi = SVI(model, guide, optax.adam(1e-2), loss=ScoreMatching("ssm_vr"))

    It fits models whose likelihood is known only up to a normalizing constant (energy
    models, e.g. :class:`~ppl_score.numpyro.Unnormalized`), since the objectives of SPEC.md
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
      ``Trace_ELBO``) times its mask (``handlers.mask``, ``obs_mask``, ``fn.mask``): a
      masked data point contributes nothing.
    - Observed sites not matched (``sites`` names a subset) are conditioned on.
      ``numpyro.factor`` terms count in :math:`\log p(z)`.

    Each matched site's log density is ``site["fn"].log_prob`` of the distribution the
    model built for it, evaluated at perturbed :math:`x` without re-running the model (one
    batched call per evaluation). That is exact when no site depends on a matched site's
    value, which the loss checks at trace time (by provenance tracking, no run-time cost):
    a violation is a ``ValueError`` naming the sites.

    Randomness: each particle's key is split into ``(model, guide, objective)`` keys; the
    objective's key draws the projections / noise of ``method``.

    :param str method: one of ``ppl_score.spec.OBJECTIVES``: ``"esm"``, ``"ssm"``,
        ``"ssm_vr"`` (default), ``"dsm"``, ``"fd_ssm"``, ``"fd_dsm"``.
    :param sites: names of the observed sites to match (default: all of them).
    :param float beta: weight of the score-matching term (the generalized Bayes
        temperature); default 1.
    :param int num_particles: guide samples averaged per step (vectorized with ``vmap``).
    :param options: the method's options (``n_projections``, ``projection``, ``sigma``,
        ``eps``); unknown options or bad values raise here.

    References: Hyvarinen (2005) JMLR 6; Song, Garg, Shi, Ermon (2019) UAI; Vincent
    (2011) Neural Computation 23; Pang et al. (2020) NeurIPS; generalized Bayes with the
    Hyvarinen score: Matsubara, Knoblauch, Briol, Oates (2022) JRSS-B.
    """

    can_infer_discrete = False

    def __init__(self, method: str = "ssm_vr", *, sites=None, beta: float = 1.0, num_particles: int = 1, **options):
        self.config = frontend.make_config(method, sites, beta, num_particles, options)
        super().__init__(num_particles=self.config.num_particles)
        self.method = self.config.method
        self.sites = self.config.sites
        self.beta = self.config.beta
        self.options = self.config.options

    def __repr__(self) -> str:
        opts = "".join(f", {k}={v!r}" for k, v in self.options.items())
        return (
            f"ScoreMatching({self.method!r}, sites={self.sites!r}, beta={self.beta!r}, "
            f"num_particles={self.num_particles!r}{opts})"
        )

    def loss_with_mutable_state(self, rng_key, param_map, model, guide, *args, **kwargs):
        """The loss (``{"loss", "mutable_state"}``, as every NumPyro ELBO).

        Eagerly (not under ``jit``/``vmap``) and under ``ppl_score.validation``, a non-finite
        loss warns (``NonFiniteWarning``) naming the method and the matched sites.
        """
        matched_names = []  # filled at trace time (names are static)

        def particle(key):
            model_key, guide_key, sm_key = random.split(key, 3)
            params = dict(param_map)
            guide_trace = trace(substitute(seed(guide, guide_key), data=param_map)).get_trace(*args, **kwargs)
            mutable = {name: site["value"] for name, site in guide_trace.items() if site["type"] == "mutable"}
            params.update(mutable)
            model_trace = _get_trace(substitute(replay(seed(model, model_key), guide_trace), data=params), args, kwargs)
            mutable.update({name: site["value"] for name, site in model_trace.items() if site["type"] == "mutable"})
            _check_guide(model_trace, guide_trace)

            def rerun(values):
                """The model trace with matched sites' values replaced (dependency check)."""
                data = {**params, **values}
                replayed = replay(seed(model, model_key), guide_trace)
                return trace(substitute(replayed, data=data)).get_trace(*args, **kwargs)

            loss, matched = self._particle_loss(model_trace, guide_trace, sm_key, rerun)
            matched_names.extend(matched)
            return loss, (mutable or None)

        if self.num_particles == 1:
            loss, mutable = particle(rng_key)
        else:
            losses, mutable = self.vectorize_particles_fn(particle, random.split(rng_key, self.num_particles))
            if mutable:
                warnings.warn("mutable state is currently ignored when num_particles > 1.", stacklevel=2)
            loss, mutable = jnp.mean(losses), None
        self._warn_if_nonfinite(loss, matched_names)
        return {"loss": loss, "mutable_state": mutable}

    def _warn_if_nonfinite(self, loss, matched) -> None:
        # eagerly only: under jit / vmap the value is a tracer and cannot be inspected
        if validation.is_validation_enabled() and is_concrete(loss) and not np.isfinite(np.asarray(loss)).all():
            what, cause = frontend.nonfinite_loss_warning(f"ScoreMatching(method={self.method!r})", matched, self.config.resolved)
            validation.warn_nonfinite(what, cause, stacklevel=4)

    def _particle_loss(self, model_trace, guide_trace, key, rerun):
        """The loss of one particle and the names of its matched sites."""
        observed, latent, prior = [], [], []
        for name, site in model_trace.items():
            if site["type"] != "sample":
                continue
            if not site["is_observed"]:
                latent.append(name)
                prior.append(name)
            elif site["infer"].get("is_auxiliary", False):  # numpyro.factor
                prior.append(name)
            else:
                observed.append(name)
        matched = frontend.select_matched(observed, latent, self.sites)
        _check_dependencies(model_trace, matched, rerun)

        fn, x, weight = _matched_log_density(model_trace, matched)
        with warnings.catch_warnings():
            # a non-finite loss is reported once, by the loss, naming the sites
            warnings.simplefilter("ignore", validation.NonFiniteWarning)
            if weight is None:
                loss = score_matching_loss(fn, x, self.method, key=key, reduction="sum", **self.options)
            else:
                loss = jnp.sum(score_matching_loss(fn, x, self.method, key=key, reduction="none", **self.options) * weight)
        if self.beta != 1.0:
            loss = self.beta * loss

        # E_q[log q(z) - log p(z)]: every guide site (auxiliary ones included, as in
        # Trace_ELBO), the model's latent sites and factors, scaled
        for name in prior:
            loss = loss - _log_prob_sum(model_trace[name])
        for site in guide_trace.values():
            if site["type"] == "sample":
                loss = loss + _log_prob_sum(site)
        return loss, matched


def _get_trace(fn, args, kwargs):
    """``trace(fn).get_trace(*args, **kwargs)``, where a mask of the wrong shape (NumPyro's
    plate and mask handlers fail on it with a bare broadcasting error) names the site."""
    try:
        return trace(fn).get_trace(*args, **kwargs)
    except (ValueError, TypeError) as err:
        found = _mask_shape_culprit(err.__traceback__)
        if found is None:
            raise
        raise frontend.mask_shape_error(*found) from err


def _mask_shape_culprit(tb):
    """``(site, mask shape, batch shape)`` when the sample statement whose handling raised has a
    mask that does not broadcast to its batch shape; None otherwise (best effort: read from the
    failing handler's frame, so an unrelated error is re-raised as it is)."""
    observe, msg, frame = frontend.failing_sample_frames(tb)
    if msg is None:
        return None
    fn = msg["fn"]
    base = fn.base_dist if isinstance(fn, MaskedDistribution) else fn
    expected = frame.get("expected_shape")  # the plates' batch shape (plate.process_message)
    expected = tuple(base.batch_shape) if expected is None else tuple(expected)
    if observe is not None:
        name, mask = observe["name"], observe["obs_mask"]
    else:
        name = msg.get("name")
        mask = fn._mask if isinstance(fn, MaskedDistribution) else getattr(frame.get("self"), "mask", None)
    if mask is None or isinstance(mask, bool):
        return None
    shape = tuple(jnp.shape(mask))
    if _broadcast(shape, expected) == expected:
        return None
    return name, shape, expected


def _check_guide(model_trace, guide_trace) -> None:
    for name, site in model_trace.items():
        if site["type"] == "sample" and not site["is_observed"]:
            if guide_trace.get(name, {}).get("type") != "sample":
                raise frontend.missing_guide_site_error(name)
    for name, site in guide_trace.items():
        if site["type"] == "sample" and not site["is_observed"] and not site["fn"].has_rsample:
            raise frontend.nonreparam_guide_site_error(name)
    check_model_guide_match(model_trace, guide_trace)


def _log_prob_sum(site):
    if site["intermediates"]:
        lp = site["fn"].log_prob(site["value"], site["intermediates"])
    else:
        lp = site["fn"].log_prob(site["value"])
    if site["scale"] is not None:
        lp = site["scale"] * lp
    return jnp.sum(lp)


# ---------------------------------------------------------------------------------------
# Matched sites -> (fn, x, weight) for the backend.
# ---------------------------------------------------------------------------------------


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
    value = jnp.asarray(site["value"])
    if not jnp.issubdtype(value.dtype, jnp.floating):
        value = value.astype(jnp.result_type(float))
    e = fn.event_dim
    if value.ndim < e or tuple(value.shape[value.ndim - e :]) != tuple(fn.event_shape):
        raise frontend.event_shape_error(name, value.shape, fn.event_shape)
    batch = tuple(jnp.broadcast_shapes(value.shape[: value.ndim - e], tuple(fn.batch_shape)))
    value = jnp.broadcast_to(value, batch + value.shape[value.ndim - e :])
    blk = _Block()
    blk.name, blk.base, blk.batch, blk.scale = name, base, batch, site["scale"]
    blk.transform = None if _is_real(fn.support) else biject_to(fn.support)
    blk.mask = _combine_masks(name, batch, site.get("mask"), fn_mask)
    u = value if blk.transform is None else blk.transform.inv(value)
    if blk.mask is not None:
        # masked entries may hold anything (obs_mask allows NaN): use a finite stand-in
        keep = blk.mask.reshape(batch + (1,) * (u.ndim - len(batch)))
        u = jnp.where(keep, u, jnp.zeros((), u.dtype))
        value = jnp.where(keep.reshape(batch + (1,) * (value.ndim - len(batch))), value, jnp.zeros((), value.dtype))
    if validation.is_validation_enabled() and is_concrete(u) and not np.isfinite(np.asarray(u)).all():
        # concrete values only (under jit the data is traced); tell the causes apart on failure
        if not np.isfinite(np.asarray(value)).all():
            raise frontend.nonfinite_observed_error(name)
        raise frontend.outside_support_error(name)
    blk.u, blk.uevent = jax.lax.stop_gradient(u), tuple(u.shape[len(batch) :])
    return blk


def _broadcast(*shapes):
    """The broadcast of ``shapes`` as a tuple, or None where they do not broadcast."""
    try:
        return tuple(jnp.broadcast_shapes(*(tuple(s) for s in shapes)))
    except (ValueError, TypeError):
        return None


def _combine_masks(name, batch, *masks):
    """The conjunction of a site's masks as a bool array of its batch shape (None: no mask)."""
    out = None
    for m in masks:
        if m is None or m is True:
            continue
        if m is False:
            m = jnp.zeros(batch, bool)
        elif _broadcast(jnp.shape(m), batch) != tuple(batch):
            raise frontend.mask_shape_error(name, jnp.shape(m), batch)
        m = jnp.broadcast_to(jnp.asarray(m, bool), batch)
        out = m if out is None else out & m
    return out


def _same_scale(a, b) -> bool:
    """Equal scales; scales that are traced arrays cannot be compared and pass."""
    if a is b:
        return True
    if not (is_concrete(a) and is_concrete(b)):
        return True
    if a is None or b is None:
        a, b = 1.0 if a is None else a, 1.0 if b is None else b
    if isinstance(a, numbers.Number) and isinstance(b, numbers.Number):
        return a == b
    a, b = jnp.asarray(a), jnp.asarray(b)
    return a.shape == b.shape and bool(jnp.all(a == b))


def _matched_log_density(model_trace, matched):
    """``fn(x[k * B, D]) -> [k * B]``, the joint per-datum log density of the matched sites
    at unconstrained values ``x``; the data ``x[B, D]``; per-datum weights ``[B]`` or None."""
    blocks = [_site_block(name, model_trace[name]) for name in matched]
    batch = blocks[0].batch
    if any(blk.batch != batch for blk in blocks):
        raise frontend.batch_shape_error({blk.name: blk.batch for blk in blocks})
    if any(not _same_scale(blk.scale, blocks[0].scale) for blk in blocks):
        raise frontend.scale_mismatch_error([blk.name for blk in blocks])
    n = 1
    for size in batch:
        n *= size
    start = 0
    for blk in blocks:
        size = 1
        for s in blk.uevent:
            size *= s
        blk.start, blk.stop = start, start + size
        start = blk.stop
    x = jnp.concatenate([blk.u.reshape(n, -1) for blk in blocks], axis=1)

    def fn(rows):
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
                lp = lp + (ladj.reshape(*lp.shape, -1).sum(-1) if ladj.ndim > lp.ndim else ladj)
            if blk.mask is not None:
                lp = jnp.where(blk.mask, lp, jnp.zeros((), lp.dtype))
            total = total + lp.reshape(k * n)
        return total

    masks = [blk.mask for blk in blocks]
    weight = None
    if all(m is not None for m in masks):
        # a data point counts when any of its matched sites is unmasked
        weight = jnp.stack(masks).any(0).reshape(n).astype(x.dtype)
    scale = blocks[0].scale
    if scale is not None and not (isinstance(scale, numbers.Number) and scale == 1.0):
        scale = jnp.broadcast_to(jnp.asarray(scale, x.dtype), batch).reshape(n)
        weight = scale if weight is None else weight * scale
    return fn, x, weight


# ---------------------------------------------------------------------------------------
# The dependency check (at trace time).
# ---------------------------------------------------------------------------------------


def _check_dependencies(model_trace, matched, rerun) -> None:
    """Raise if a sample site's distribution depends on a matched site's value: provenance
    of each later site's log density (at its fixed value) in the matched values, tracked
    through a re-run of the model by abstract evaluation (no array computation)."""
    order = [name for name, site in model_trace.items() if site["type"] == "sample"]
    later = frontend.sites_after(order, matched)
    if not later:
        return
    fixed = {j: model_trace[j]["value"] for j in later}

    def log_probs(**values):
        tr = rerun(values)
        return {j: jnp.sum(tr[j]["fn"].log_prob(fixed[j])) for j in later}

    deps = eval_provenance(log_probs, **{i: model_trace[i]["value"] for i in matched})
    found = {}
    for j in later:
        on = [i for i in matched if i in deps[j] and order.index(i) < order.index(j)]
        if on:
            found[j] = on
    if found:
        raise frontend.dependency_error(found)
