"""Variational inference with implicit guides (NumPyro); mirrors ``ppl_score.pyro.implicit``.

An implicit guide site is ``numpyro.sample(name, dist.Delta(g(eps, ...), event_dim=k))``.
For each one the surrogate loss gains ``stop_grad(s_hat(z))^T (z - stop_grad(z))``, whose
gradient is the reparameterized entropy gradient ``-E[grad_z log q(z)^T dg/dphi]``
(Song et al. 2019, section 4.2; references in ``ImplicitELBO``), with ``s_hat`` from:

* a learned estimator (``ppl_score.jax.estimators.learned_score_estimator``), whose state
  ``LearnedScoreState(params, opt_state)`` is NumPyro mutable state, so it works inside the
  jitted ``SVI.update`` / ``SVI.run``. The guide declares it once, next to the site::

      def guide(x):
          score_state("z", est)          # numpyro.mutable("z_score_state", est.init(key))
          ...
          numpyro.sample("z", dist.Delta(encoder(x, eps), event_dim=1))

  Each loss evaluation takes one ``est.update`` (``n_steps`` optimizer steps) on the fresh, stop-gradient samples
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

from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
from jax import random
from jax.typing import DTypeLike
from numpyro import primitives
from numpyro.distributions import Delta, MaskedDistribution
from numpyro.handlers import replay, seed, substitute
from numpyro.infer import ELBO
from numpyro.infer.util import compute_log_probs
from numpyro.util import check_model_guide_match

from ..common import implicit as common
from ..common.validate import check_int, check_sites
from ..jax.estimators import LearnedScoreEstimator, LearnedScoreState, check_scores_finite
from ..jax.estimators import site_scores as backend_site_scores

__all__ = ["ImplicitELBO", "implicit_site_names", "score_state", "score_state_name", "site_scores"]

score_state_name = common.score_state_name


def score_state(
    site: str, estimator: LearnedScoreEstimator, seed: int = 0, dtype: DTypeLike = jnp.float32
) -> LearnedScoreState:
    """Declare (in the guide) the learned estimator state of implicit site ``site`` as
    NumPyro mutable state ``score_state_name(site)``; returns the current state.

    Args:
        site: the implicit site's name.
        estimator: its ``LearnedScoreEstimator``.
        seed: seed of the network's initial weights.
        dtype: the network's dtype.

    Returns:
        The state (a ``LearnedScoreState``): fresh at the first step, then the one that
        ``ImplicitELBO`` / ``WAE`` carry from step to step.

    Raises:
        TypeError: ``estimator`` is not a ``LearnedScoreEstimator``.
    """
    if not isinstance(estimator, LearnedScoreEstimator):
        raise TypeError(f"argument 'estimator' must be a LearnedScoreEstimator, got {type(estimator).__name__}")
    return primitives.mutable(score_state_name(site), estimator.init(random.PRNGKey(seed), dtype))


def _mask_of(fn):
    mask = None
    while fn is not None:
        if isinstance(fn, MaskedDistribution) and fn._mask is not True:
            m = jnp.asarray(fn._mask)
            mask = m if mask is None else mask * m
        fn = getattr(fn, "base_dist", None)
    return mask


def implicit_site_names(guide_trace: Mapping[str, dict], sites: Sequence[str] | None = None) -> list[str]:
    """Names of the guide's implicit (``Delta``) sample sites, or the ``sites`` given, which
    must be such sites.

    Raises:
        ValueError: a name of ``sites`` is not a sample site of the guide, or not implicit.
    """
    return common.implicit_site_names(guide_trace, sites, Delta, "numpyro")


def site_scores(
    name: str,
    est: Any,
    options: Mapping[str, Any],
    z: jax.Array,
    batch_ndim: int,
    context: jax.Array | None,
    params: Mapping[str, Any],
    key: jax.Array,
    train: bool,
) -> tuple[jax.Array, LearnedScoreState | None]:
    """Estimated ``grad_z log q`` for ``z [P, *batch, *event]`` (stop-gradient) of implicit
    site ``name``; returns ``(scores, new_learned_state_or_None)``. Shared with ``WAE``.

    The NumPyro translation of ``ppl_score.jax.estimators.site_scores``: a learned
    estimator's state comes from the mutable state in ``params``; a callable runs under
    ``substitute(data=params)`` so that ``numpyro.param`` inside it reads the current values.
    """
    state = None
    if isinstance(est, LearnedScoreEstimator):
        state = common.learned_state(params, name)
    elif callable(est):
        user_fn = est

        def est(z, context):
            with substitute(data=params):
                return user_fn(z, context)

    return backend_site_scores(name, est, z, batch_ndim, context, options=options, state=state, key=key, train=train)


class ImplicitELBO(ELBO):
    """The ELBO for guides with implicit sites ``sample(name, Delta(g(eps, ...), event_dim=k))``.

    The entropy of an implicit site enters through its reparameterized gradient
    ``grad_phi E_q[-log q_phi(z)] = -E_eps[grad_z log q_phi(z)^T dg_phi(eps)/dphi]``, section
    4.2 of [1], with ``grad_z log q_phi`` estimated from the guide's samples by a learned
    score network (trained by sliced score matching [1]), the Stein gradient estimator [2]
    or the spectral estimator (SSGE) [3]; see the module docstring.

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

    Raises:
        TypeError, ValueError: as ``ppl_score.pyro.implicit.ImplicitELBO``; a learned
            estimator whose state the guide did not declare with ``score_state``.

    Tuning a learned estimator (defaults: ``n_steps=10`` Adam steps at 3e-3 per SVI step;
    signs of a collapsing guide and the remedies): see ``ppl_score.pyro.implicit.ImplicitELBO``.

    References:
        [1] Y. Song, S. Garg, J. Shi, S. Ermon, "Sliced score matching: a scalable approach to
        density and score estimation", UAI, 2019.

        [2] Y. Li, R. E. Turner, "Gradient estimators for implicit models", ICLR, 2018.

        [3] J. Shi, S. Sun, J. Zhu, "A spectral approach to gradient estimation for implicit
        distributions", ICML, 2018.
    """

    def __init__(
        self,
        estimator: Any = "stein",
        *,
        num_particles: int = 1,
        sites: str | Iterable[str] | None = None,
        context: Callable | Mapping | None = None,
        estimator_options: Mapping | None = None,
        update_estimator: bool = True,
    ) -> None:
        num_particles = check_int("num_particles", num_particles)
        super().__init__(num_particles=num_particles)
        common.check_estimators(estimator, LearnedScoreEstimator, num_particles)
        self.estimator = estimator
        self.sites = check_sites(sites, "latent")
        self.context = common.check_context(context)
        self.estimator_options = estimator_options
        self.update_estimator = bool(update_estimator)

    def loss_with_mutable_state(
        self,
        rng_key: jax.Array,
        param_map: Mapping[str, Any],
        model: Callable,
        guide: Callable,
        *args: Any,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """The loss (``{"loss", "mutable_state"}``, as every NumPyro ELBO): the negative ELBO
        without the implicit sites' entropy, plus the entropy surrogate (value zero); the
        mutable state carries the learned estimators' updated states."""
        info = {}  # static structure recorded while tracing

        def particle(key):
            model_seed, guide_seed = random.split(key)
            guide_lp, guide_trace = compute_log_probs(seed(guide, guide_seed), args, kwargs, param_map)
            params = dict(param_map)
            mutable = {n: s["value"] for n, s in guide_trace.items() if s["type"] == "mutable"}
            params.update(mutable)
            model_lp, model_trace = compute_log_probs(
                replay(seed(model, model_seed), guide_trace), args, kwargs, params
            )
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
            est, opts, ctx_fn = common.site_options(self.estimator, self.estimator_options, self.context, name)
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
            check_scores_finite(name, s_hat)  # eagerly, naming the site (under tracing nothing can raise)
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
