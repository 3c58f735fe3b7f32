"""Variational inference with implicit guides (NumPyro); mirrors ``ppl_score.pyro.implicit``.

An implicit guide site is ``numpyro.sample(name, dist.Delta(g(eps, ...), event_dim=k))``.
For each one the surrogate loss gains ``stop_grad(s_hat(z))^T (z - stop_grad(z))``, whose
gradient is the reparameterized entropy gradient ``-E[grad_z log q(z)^T dg/dphi]``
(Song et al. 2019), with ``s_hat`` from:

* a learned estimator (``ppl_score.jax.estimators.learned_score_estimator``), whose state
  ``LearnedScoreState(params, opt_state)`` is NumPyro mutable state, so it works inside the
  jitted ``SVI.update`` / ``SVI.run``. The guide declares it once, next to the site::

      def guide(x):
          score_state("z", est)          # numpyro.mutable("z_score_state", est.init(key))
          ...
          numpyro.sample("z", dist.Delta(encoder(x, eps), event_dim=1))

  Each loss evaluation takes one ``est.update`` step on the fresh, stop-gradient samples
  (keyed by the SVI step's key), evaluates the updated network, and returns the new state
  as the mutable state that ``SVI`` carries to the next step;
* ``"stein"`` / ``"spectral"``: kernel estimators across the ``num_particles`` samples of each
  batch element (``num_particles >= 2``);
* a callable ``score(z, context)``, run under ``substitute(data=params)`` so that
  ``numpyro.param(name)`` inside it reads the current parameters (e.g. an exact score).

Everything else is ``Trace_ELBO`` (reparameterized sites, scales). The loss value is the
negative ELBO without the implicit sites' unknown entropy.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
from numpyro.primitives import mutable as _mutable
from jax import random
from numpyro.distributions import Delta, MaskedDistribution
from numpyro.handlers import replay, seed, substitute
from numpyro.infer import ELBO
from numpyro.infer.util import compute_log_probs
from numpyro.util import check_model_guide_match

from .. import implicit_spec as ispec
from ..jax.checks import is_concrete
from ..jax.estimators import LearnedScoreEstimator, kernel_scores_batched
from ..validation import is_validation_enabled


def score_state_name(site: str) -> str:
    """Name of the mutable site holding the learned estimator state of ``site``."""
    return f"{site}_score_state"


def score_state(site: str, estimator: LearnedScoreEstimator, seed: int = 0, dtype=jnp.float32):
    """Declare (in the guide) the learned estimator state of implicit site ``site`` as
    NumPyro mutable state ``score_state_name(site)``; returns the current state."""
    if not isinstance(estimator, LearnedScoreEstimator):
        raise TypeError(f"argument 'estimator' must be a LearnedScoreEstimator, got {type(estimator).__name__}")
    return _mutable(score_state_name(site), estimator.init(random.PRNGKey(seed), dtype))


def _base_fn(fn):
    while hasattr(fn, "base_dist"):
        fn = fn.base_dist
    return fn


def _mask_of(fn):
    mask = None
    while fn is not None:
        if isinstance(fn, MaskedDistribution) and fn._mask is not True:
            m = jnp.asarray(fn._mask)
            mask = m if mask is None else mask * m
        fn = getattr(fn, "base_dist", None)
    return mask


def implicit_site_names(guide_trace, sites=None) -> list[str]:
    """Names of the guide's implicit (``Delta``) sample sites, or the ``sites`` given, which
    must be such sites."""
    found = [
        name
        for name, site in guide_trace.items()
        if site["type"] == "sample" and not site["is_observed"] and isinstance(_base_fn(site["fn"]), Delta)
    ]
    if sites is None:
        return found
    for name in sites:
        if name not in guide_trace or guide_trace[name]["type"] != "sample":
            raise ValueError(f"argument 'sites': site {name!r} is not a sample site of the guide")
        if name not in found:
            raise ValueError(
                f"argument 'sites': guide site {name!r} is not implicit; write it as "
                f"numpyro.sample({name!r}, dist.Delta(g(eps, ...), event_dim=k))"
            )
    return list(sites)


def _check_estimator(est, num_particles):
    if isinstance(est, str):
        ispec.check_kernel_estimator(est, num_particles)
    elif not (isinstance(est, LearnedScoreEstimator) or callable(est)):
        raise TypeError(
            "argument 'estimator' must be a LearnedScoreEstimator, 'stein', 'spectral', a callable "
            f"score(z, context), or a dict of these per site; got {type(est).__name__}"
        )


def site_scores(name, est, options, z, batch_ndim, context, params, key, train):
    """Estimated ``grad_z log q`` for ``z [P, *batch, *event]`` (stop-gradient) of implicit
    site ``name``; returns ``(scores, new_learned_state_or_None)``. Shared with ``WAE``."""
    p, batch = z.shape[0], z.shape[1 : 1 + batch_ndim]
    n_batch = math.prod(batch)
    flat = z.reshape(p, n_batch, -1)
    if isinstance(est, str):
        if p < 2:
            raise ValueError(f"site {name!r}: the {est!r} kernel estimator needs at least 2 samples")
        g = kernel_scores_batched(est, jnp.swapaxes(flat, 0, 1), **options)
        return jnp.swapaxes(g, 0, 1).reshape(z.shape), None
    if isinstance(est, LearnedScoreEstimator):
        d = flat.shape[-1]
        if d != est.dim:
            raise ValueError(f"site {name!r}: the learned estimator has dim={est.dim}, the site's event size is {d}")
        state_name = score_state_name(name)
        if state_name not in params:
            raise ValueError(
                f"site {name!r}: the learned estimator's state {state_name!r} is not in NumPyro's mutable "
                f"state; declare it in the guide with ppl_score.numpyro.implicit.score_state({name!r}, estimator)"
            )
        ctx = None
        if context is not None:
            ctx = context.reshape(-1, context.shape[-1]) if context.ndim > 1 else context[None]
            if ctx.shape[0] == 1 and n_batch > 1:
                ctx = jnp.broadcast_to(ctx, (n_batch, ctx.shape[-1]))
            if ctx.shape[0] != n_batch:
                raise ValueError(
                    f"site {name!r}: the context has {ctx.shape[0]} rows, the site has {n_batch} batch elements "
                    f"(batch shape {tuple(batch)})"
                )
            ctx = jnp.broadcast_to(ctx[None], (p, *ctx.shape)).reshape(p * n_batch, -1)
        samples = flat.reshape(p * n_batch, d)
        state = params[state_name]
        if train:
            state, _ = est.update(state, key, samples, ctx)
        return est.apply(state.params, samples.astype(jax.tree.leaves(state.params)[0].dtype), ctx).astype(z.dtype).reshape(z.shape), state
    with substitute(data=params):
        out = est(z, context)
    if not hasattr(out, "shape") or tuple(out.shape) != tuple(z.shape):
        raise ValueError(
            f"site {name!r}: argument 'estimator' must return scores of the shape of z, {tuple(z.shape)}, "
            f"got {getattr(out, 'shape', type(out).__name__)}"
        )
    return out, None


class ImplicitELBO(ELBO):
    """The ELBO for guides with implicit sites ``sample(name, Delta(g(eps, ...), event_dim=k))``.

    Args:
        estimator: per implicit site (or a dict ``{site: ...}``): a ``LearnedScoreEstimator``
            (state declared in the guide with ``score_state``), ``"stein"``, ``"spectral"``,
            or a callable ``score(z, context)``.
        num_particles: guide samples per step (vectorized with ``jax.vmap``).
        sites: names of the implicit sites (default: every ``Delta`` site of the guide).
        context: amortized guides: a callable ``context(*args, **kwargs) -> [*batch, C]`` on
            the guide's inputs, or a dict per site.
        estimator_options: kernel options (``eta``, ``bandwidth``, ``n_eigen``, ``threshold``),
            or a dict per site.
        update_estimator: take a learned-estimator step in every loss evaluation.
    """

    def __init__(
        self,
        estimator: Any = "stein",
        *,
        num_particles: int = 1,
        sites=None,
        context: Callable | Mapping | None = None,
        estimator_options: Mapping | None = None,
        update_estimator: bool = True,
    ):
        num_particles = ispec.check_int("num_particles", num_particles)
        super().__init__(num_particles=num_particles)
        for est in estimator.values() if isinstance(estimator, Mapping) else [estimator]:
            _check_estimator(est, num_particles)
        if context is not None and not (callable(context) or isinstance(context, Mapping)):
            raise TypeError(f"argument 'context' must be a callable or a dict of callables, got {type(context).__name__}")
        self.estimator = estimator
        self.sites = ispec.check_sites(sites)
        self.context = context
        self.estimator_options = estimator_options
        self.update_estimator = bool(update_estimator)

    def _for_site(self, name):
        est, opts = ispec.for_site(self.estimator, self.estimator_options or {}, name, "implicit site")
        ctx = self.context.get(name) if isinstance(self.context, Mapping) else self.context
        return est, dict(opts), ctx

    def loss_with_mutable_state(self, rng_key, param_map, model, guide, *args, **kwargs):
        info = {}  # static structure recorded while tracing

        def particle(key):
            model_seed, guide_seed = random.split(key)
            guide_lp, guide_trace = compute_log_probs(seed(guide, guide_seed), args, kwargs, param_map)
            params = dict(param_map)
            mutable = {n: s["value"] for n, s in guide_trace.items() if s["type"] == "mutable"}
            params.update(mutable)
            model_lp, model_trace = compute_log_probs(replay(seed(model, model_seed), guide_trace), args, kwargs, params)
            check_model_guide_match(model_trace, guide_trace)
            mutable.update({n: s["value"] for n, s in model_trace.items() if s["type"] == "mutable"})
            elbo = sum(model_lp.values(), jnp.array(0.0)) - sum(guide_lp.values(), jnp.array(0.0))
            names = implicit_site_names(guide_trace, self.sites)
            values, weights = {}, {}
            for name in names:
                site = guide_trace[name]
                z = site["value"]
                event_dim = site["fn"].event_dim
                batch_shape = z.shape[: z.ndim - event_dim]
                w = jnp.ones(batch_shape, z.dtype)
                if site["scale"] is not None:
                    w = w * site["scale"]
                mask = _mask_of(site["fn"])
                if mask is not None:
                    w = w * mask
                values[name], weights[name] = z, w
                info[name] = event_dim
            info["_mutable"] = tuple(mutable)
            return elbo, values, weights, mutable

        p = self.num_particles
        elbos, values, weights, mutable = jax.vmap(particle)(random.split(rng_key, p))
        params = dict(param_map)
        new_state = {}
        surrogate = jnp.array(0.0)
        for i, name in enumerate(values):
            est, opts, ctx_fn = self._for_site(name)
            z, event_dim = values[name], info[name]
            context = None if ctx_fn is None else jax.lax.stop_gradient(jnp.asarray(ctx_fn(*args, **kwargs)))
            s_hat, state = site_scores(
                name,
                est,
                opts,
                jax.lax.stop_gradient(z),
                z.ndim - 1 - event_dim,
                context,
                params,
                random.fold_in(rng_key, 7919 + i),
                self.update_estimator,
            )
            s_hat = jax.lax.stop_gradient(s_hat)
            # eagerly, like the Pyro twin: name the site (under tracing nothing can raise)
            if is_concrete(s_hat) and is_validation_enabled() and not bool(jnp.isfinite(s_hat).all()):
                raise ValueError(f"site {name!r}: the score estimator returned non-finite values (nan or inf)")
            if state is not None:
                new_state[score_state_name(name)] = state
            term = (s_hat * (z - jax.lax.stop_gradient(z))).reshape(*z.shape[: z.ndim - event_dim], -1).sum(-1)
            surrogate = surrogate + (weights[name] * term).sum() / p
        loss = -jnp.mean(elbos) + surrogate
        state_out = None
        if info.get("_mutable"):
            # user mutable sites: their new values with one particle (as Trace_ELBO), else kept
            state_out = {n: (mutable[n][0] if p == 1 else param_map[n]) for n in info["_mutable"]}
            state_out.update(new_state)
        elif new_state:
            state_out = new_state
        return {"loss": loss, "mutable_state": state_out}
