"""Score matching as a NumPyro SVI loss: :class:`ScoreMatching`, a ``numpyro.infer.ELBO``.

This module only translates NumPyro traces; the site handling (which sites are matched, data
blocks, masks and weights, dependencies, the joint log density) is ``ppl_score.common.sites``.
"""

from __future__ import annotations

import numbers
import warnings
from typing import Any, Callable, Iterable, Mapping

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

from ..common import frontend, sites, validate
from ..jax import score_matching_loss
from ..jax.validate import is_concrete

__all__ = ["ScoreMatching"]

# keyword arguments of numpyro.infer.ELBO that ScoreMatching accepts and honours
_ELBO_KWARGS = ("vectorize_particles",)


class ScoreMatching(ELBO):
    r"""Score matching [1] and its scalable variants (sliced [2], denoising [3],
    finite-difference [4]) as an SVI loss, used exactly like
    :class:`~numpyro.infer.Trace_ELBO` (``svi.run``, ``svi.update`` under ``jit``,
    ``svi.stable_update``)::

        svi = SVI(model, guide, optax.adam(1e-2), loss=ScoreMatching("ssm_vr"))

    It fits models whose likelihood is known only up to a normalizing constant (energy
    models, e.g. :class:`~ppl_score.numpyro.Unnormalized`), since the objectives of the
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
      re-executing the model with the matched values substituted (``handlers.substitute``
      and ``replay``, ``vmap``-ed over the copies the objectives stack, all under ``jit``);
      unmatched observed sites are conditioned on. Every plate dimension of a matched site
      indexes data points and its event dimensions are the :math:`x` of the spec; when a
      site couples data points (it is not inside every plate of the matched sites) the
      batch is one data point. A site with constrained support is matched in the
      unconstrained space of ``biject_to(support)``, log-abs-det-Jacobian added. Several
      matched sites are matched jointly (:math:`x` concatenates their flattened
      unconstrained values). Log densities are unscaled. The dependencies are found at
      trace time by provenance tracking (no run-time cost); without dependent sites the
      matched sites' own distributions are evaluated in one batched call. See
      ``ppl_score.common.sites``.
    - :math:`w_i` is the site's ``scale`` (``N / B`` in a subsampled plate, as in
      ``Trace_ELBO``) times its mask (``handlers.mask``, ``obs_mask``, ``fn.mask``): a
      masked data point contributes nothing.
    - ``numpyro.factor`` terms count in :math:`\log p(z)`. Latent sites must be continuous
      and reparameterized in the guide; a latent site whose distribution depends on a
      matched value is a ``ValueError``.

    Randomness: each particle's key is split into ``(model, guide, objective)`` keys; the
    objective's key draws the projections / noise of ``method``.

    Args:
        method (str): one of ``ppl_score.spec.OBJECTIVES``: ``"esm"``, ``"ssm"``,
            ``"ssm_vr"`` (default), ``"dsm"``, ``"fd_ssm"``, ``"fd_dsm"``.
        sites: names of the observed sites to match (default: all of them).
        beta (float): weight of the score-matching term (the generalized Bayes
            temperature); default 1. ``ppl_score.numpyro.calibrate_beta`` chooses a calibrated one.
        num_particles (int): guide samples averaged per step.
        vectorize_particles: as in :class:`~numpyro.infer.ELBO`: ``vmap`` over particles
            (default, True), ``jax.lax.map`` (False), or a map function.
        **options: the method's options (``n_projections``, ``projection``, ``sigma``,
            ``eps``); unknown options or bad values raise here.

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

    can_infer_discrete = False

    def __init__(
        self,
        method: str = "ssm_vr",
        *,
        sites: str | Iterable[str] | None = None,
        beta: float = 1.0,
        num_particles: int = 1,
        **options: Any,
    ) -> None:
        elbo_kwargs, options = frontend.split_elbo_kwargs(options, _ELBO_KWARGS)
        self.config = frontend.make_config(method, sites, beta, num_particles, options)
        vectorize = elbo_kwargs.get("vectorize_particles", True)
        vectorize = frontend.check_vectorize_particles(vectorize, self.config.num_particles)
        super().__init__(num_particles=self.config.num_particles, vectorize_particles=vectorize)
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

    def _traces(self, key, param_map, model, guide, args, kwargs):
        """``(model trace, guide trace, mutable state, rerun context, objective key)``."""
        model_key, guide_key, sm_key = random.split(key, 3)
        params = dict(param_map)
        guide_trace = trace(substitute(seed(guide, guide_key), data=param_map)).get_trace(*args, **kwargs)
        mutable = {name: site["value"] for name, site in guide_trace.items() if site["type"] == "mutable"}
        params.update(mutable)
        model_trace = _get_trace(substitute(replay(seed(model, model_key), guide_trace), data=params), args, kwargs)
        mutable.update({name: site["value"] for name, site in model_trace.items() if site["type"] == "mutable"})
        sites.check_latent_sites(model_trace, guide_trace)
        check_model_guide_match(model_trace, guide_trace)

        def rerun(values):
            """The model trace with the given sites' values substituted."""
            replayed = replay(seed(model, model_key), guide_trace)
            return trace(substitute(replayed, data={**params, **values})).get_trace(*args, **kwargs)

        return model_trace, guide_trace, mutable, rerun, sm_key

    def _matched(self, model_trace, rerun):
        """``(sites.MatchedDensity, classified sites)`` of one trace."""
        cls = sites.classify(model_trace, self.sites)
        found = _find_dependencies(model_trace, cls, rerun)
        blocks = [sites.site_block(_OPS, name, model_trace[name]) for name in cls.matched]
        deps = sites.plan(model_trace, found, blocks)
        joint = _make_rerun(model_trace, cls, deps, rerun) if deps.dependent else None
        return sites.matched_density(_OPS, blocks, deps, joint), cls

    def _datum_values(self, dens, key):
        def compute(fn):
            return score_matching_loss(fn, dens.x, self.method, key=key, reduction="none", **self.options)

        with warnings.catch_warnings():
            # a non-finite loss is reported once, by the loss, naming the sites
            warnings.simplefilter("ignore", validate.NonFiniteWarning)
            # ms_dsm: the backend draws a level per datum; NoiseConditional sites read it
            return frontend.objective_values(self.config.resolved, dens.fn, compute)

    def loss_with_mutable_state(
        self,
        rng_key: jax.Array,
        param_map: Mapping[str, Any],
        model: Callable,
        guide: Callable,
        *args: Any,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """The loss (``{"loss", "mutable_state"}``, as every NumPyro ELBO).

        Eagerly (not under ``jit``/``vmap``) and with validation on (``ppl_score.set_validation``), a non-finite
        loss warns (``NonFiniteWarning``) naming the method and the matched sites.
        """
        matched_names = []  # filled at trace time (names are static)

        def particle(key):
            model_trace, guide_trace, mutable, rerun, sm_key = self._traces(key, param_map, model, guide, args, kwargs)
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

    def datum_losses(
        self,
        rng_key: jax.Array,
        param_map: Mapping[str, Any],
        model: Callable,
        guide: Callable,
        *args: Any,
        **kwargs: Any,
    ) -> tuple[jax.Array, jax.Array | None]:
        """The per-datum objectives of one draw of the guide (for calibration and diagnostics).

        Returns:
            ``(losses [n], weights [n] or None)``: :math:`\\mathrm{SM}_i` unweighted and without
            ``beta``, traceable (``jit``, ``jacfwd``, ``hessian``) in ``param_map`` and in
            whatever the guide's samples depend on; the weights are scale x mask. When a site
            couples the data points, ``n = 1``.
        """
        model_trace, _, _, rerun, sm_key = self._traces(rng_key, param_map, model, guide, args, kwargs)
        dens, _ = self._matched(model_trace, rerun)
        return self._datum_values(dens, sm_key), dens.weight

    def datum_scores(
        self,
        rng_key: jax.Array,
        param_map: Mapping[str, Any],
        model: Callable,
        guide: Callable,
        *args: Any,
        **kwargs: Any,
    ) -> tuple[jax.Array, jax.Array, jax.Array | None]:
        """The matched data and the model's score at them, for one draw of the guide (for
        goodness-of-fit tests and diagnostics; ``method`` and its options play no part).

        Returns:
            ``(x [n, D], scores [n, D], weights [n] or None)``: the matched sites' data in
            unconstrained coordinates (one row per data point; several matched sites
            concatenated), the score of the model's joint log density in them (the density
            the objectives match), and the weights (scale x mask); traceable. When a site
            couples the data points, ``n = 1``.
        """
        model_trace, _, _, rerun, _ = self._traces(rng_key, param_map, model, guide, args, kwargs)
        dens, _ = self._matched(model_trace, rerun)
        scores = jax.grad(lambda x: jnp.sum(dens.fn(x)))(dens.x)
        return dens.x, scores, dens.weight

    def _warn_if_nonfinite(self, loss, matched) -> None:
        # eagerly only: under jit / vmap the value is a tracer and cannot be inspected
        if validate.is_validation_enabled() and is_concrete(loss) and not np.isfinite(np.asarray(loss)).all():
            what, cause = frontend.nonfinite_loss_warning(
                f"ScoreMatching(method={self.method!r})", matched, self.config.resolved
            )
            validate.warn_nonfinite(what, cause, stacklevel=4)

    def _particle_loss(self, model_trace, guide_trace, key, rerun):
        """The loss of one particle and the names of its matched sites."""
        dens, cls = self._matched(model_trace, rerun)
        values = self._datum_values(dens, key)
        loss = jnp.sum(values if dens.weight is None else values * dens.weight)
        if self.beta != 1.0:
            loss = self.beta * loss

        # E_q[log q(z) - log p(z)]: every guide site (auxiliary ones included, as in
        # Trace_ELBO), the model's latent sites and factors, scaled
        for name in sites.prior_sites(cls, dens.dependent):
            loss = loss - _log_prob_sum(model_trace[name])
        for site in guide_trace.values():
            if site["type"] == "sample":
                loss = loss + _log_prob_sum(site)
        return loss, cls.matched


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
    if sites.broadcast_shapes(shape, expected) == expected:
        return None
    return name, shape, expected


def _log_prob_sum(site):
    if site["intermediates"]:
        lp = site["fn"].log_prob(site["value"], site["intermediates"])
    else:
        lp = site["fn"].log_prob(site["value"])
    if site["scale"] is not None:
        lp = site["scale"] * lp
    return jnp.sum(lp)


# ---------------------------------------------------------------------------------------
# Translation: JAX arrays and NumPyro traces for ppl_score.common.sites
# ---------------------------------------------------------------------------------------


class _JaxOps(sites.ArrayOps):
    """``ppl_score.common.sites.ArrayOps`` for JAX arrays and NumPyro distributions."""

    xp = jnp
    masked_type = MaskedDistribution
    constraints = constraints
    biject_to = staticmethod(biject_to)

    def as_float(self, value):
        value = jnp.asarray(value)
        return value if jnp.issubdtype(value.dtype, jnp.floating) else value.astype(jnp.result_type(float))

    def as_bool(self, mask):
        return jnp.asarray(mask, bool)

    def all_finite(self, x):
        # concrete values only (under jit the data is traced)
        return bool(np.isfinite(np.asarray(x)).all()) if is_concrete(x) else None

    def stop_gradient(self, x):
        return jax.lax.stop_gradient(x)

    def same_scale(self, a, b):
        """Equal scales; scales that are traced arrays cannot be compared and pass."""
        if a is b or not (is_concrete(a) and is_concrete(b)):
            return True
        a, b = 1.0 if a is None else a, 1.0 if b is None else b
        if isinstance(a, numbers.Number) and isinstance(b, numbers.Number):
            return a == b
        a, b = jnp.asarray(a), jnp.asarray(b)
        return a.shape == b.shape and bool(jnp.all(a == b))

    def as_array(self, scale, like):
        return jnp.asarray(scale, dtype=like.dtype)


_OPS = _JaxOps()


def _find_dependencies(model_trace, cls, rerun) -> dict:
    """``{site: matched sites its distribution depends on}``: provenance of each later site's
    log density (at its fixed value) in the matched values, tracked through a re-run of the
    model by abstract evaluation at trace time (no array computation, no run-time cost)."""
    later = sites.sites_to_check(cls.order, cls.matched)
    if not later:
        return {}
    fixed = {j: model_trace[j]["value"] for j in later}

    def log_probs(**values):
        tr = rerun(values)
        return {j: jnp.sum(tr[j]["fn"].log_prob(fixed[j])) for j in later}

    deps = eval_provenance(log_probs, **{i: model_trace[i]["value"] for i in cls.matched})
    found = {}
    for j in later:
        on = [i for i in cls.matched if i in deps[j] and cls.order.index(i) < cls.order.index(j)]
        if on:
            found[j] = on
    return found


def _make_rerun(model_trace, cls, deps, rerun):
    """``values -> {site: log density}``: the model re-executed with the matched values
    substituted (latent sites replayed, the same seed, so the same subsample), ``vmap``-ed
    over the ``k`` stacked copies."""
    cleaned = {}
    for j in deps.dependent:
        if j not in cls.matched:
            value = sites.clean_observed(_OPS, {**model_trace[j], "name": j})
            if value is not None:
                cleaned[j] = value
    involved = tuple(dict.fromkeys(cls.matched + deps.dependent))

    def one(values):
        tr = rerun({**cleaned, **values})
        return {name: sites.masked_log_prob(_OPS, tr[name]) for name in involved}

    return jax.vmap(one)
