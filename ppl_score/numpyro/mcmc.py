"""Sampling an observed site of a fitted NumPyro model: Langevin dynamics and NumPyro's NUTS.

A model fitted by score matching, e.g. ::

    def model(data):
        with numpyro.plate("data", data.shape[0]):
            numpyro.sample("x", Unnormalized(energy, event_shape=(2,)), obs=data)

defines ``x`` only up to its normalizer, so ``numpyro.sample`` cannot draw it. Two things
can be sampled, both by MCMC in the unconstrained space of ``T = biject_to(support)``
(``u -> log p(T(u)) + log |det dT/du|``), as in ``ppl_score.pyro.mcmc``:

- **The observed site's conditional** (site mode, the default): each chain is a copy of the
  site's value, drawn from

      log p(x | rest) = sum over sample sites of log p(site | its parents)   (x substituted),

  so children of the site and ``numpyro.factor`` terms count; log densities are unscaled
  and masks apply.
- **New points** (draws mode, ``num_draws=k``, an ``Unnormalized`` site): each chain holds
  ``k`` new points drawn i.i.d. from the site's own density given its parents; the site's
  children and factors are left out. A row-form density gives points ``[*event]``; a
  batched one whose parameters carry plate dims gives one point per parameter group,
  ``[*param_batch, *event]``. Each point is its own Metropolis chain.

Chains are batched as data: the model runs once per evaluation for every chain inside a
``numpyro.plate`` over chains placed left of its own plates (``vectorize="plate"``, the
default; the model must broadcast as for vectorized ELBO particles). ``vectorize="vmap"``
instead ``jax.vmap``-s one chain's model, for models that do not broadcast. The whole run
is jitted. The other sites are fixed: parameters from ``params`` (e.g.
``svi_result.params``), latent sites at the values in ``latents`` (shared by every chain)
or drawn once per chain (per point in draws mode) from ``guide``. A subsampling plate keeps
the indices of the first trace (a fixed seed). The result, ``SiteSamples(samples,
accept_rate, layout)``, has samples ``[num_samples, num_chains, *layout.shape]``.

- ``langevin(model, site, *args, key=..., num_samples=1000, num_warmup=500, num_chains=1,
  num_draws=None, ...)``: MALA / ULA chains (``ppl_score.jax.langevin``)::

      draws = langevin(model, "x", data, key=key, params=params, num_draws=500, step_size=0.1)
      points = draws.samples[-1, 0]                    # [500, 2]

- ``nuts(model, site, *args, key=..., ...)``: NumPyro's ``NUTS`` (vectorized chains), the
  same arguments and result.
- ``potential_fn(model, site, *args, ...)``: the potential for your own
  ``numpyro.infer.NUTS(potential_fn=...)``::

      pot = potential_fn(model, "x", data, params=params)
      dens = site_log_density(model, "x", data, params=params)
      mcmc = MCMC(NUTS(potential_fn=pot), num_warmup=500, num_samples=500)
      mcmc.run(key, init_params={"x": dens.init_unconstrained(None)[0]})
      x = dens.transform(mcmc.get_samples()["x"])
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
from numpyro import handlers
from numpyro.distributions import ExpandedDistribution
from numpyro.distributions.transforms import biject_to

from ..common import frontend
from ..common import langevin as shared
from ..common.objectives import check_sigmas
from ..jax import langevin as backend
from ..jax.validate import check_key
from .distributions import Unnormalized

SiteSamples = shared.SiteSamples  # the draws of ``langevin`` and ``nuts``, written once

__all__ = ["SiteDensity", "SiteSamples", "site_log_density", "langevin", "potential_fn", "nuts"]


class _JaxSiteOps(shared.SiteOps):
    """``ppl_score.common.langevin.SiteOps`` for JAX arrays and NumPyro transforms."""

    xp = jnp

    def check_init(self, init) -> None:
        if not isinstance(init, (jax.Array, np.ndarray)):
            raise TypeError(f"argument 'init' must be a jax.Array or numpy array, got {type(init).__name__}")

    def broadcast_init(self, init, like, target):
        return jnp.broadcast_to(jnp.asarray(init, like.dtype), target)

    def in_support(self, transform, init, u) -> bool:
        return bool(jnp.all(transform.codomain(init))) and bool(jnp.isfinite(u).all())

    def zeros(self, like, shape):
        return jnp.zeros(shape, like.dtype)

    shape_errors = (TypeError, ValueError)


_OPS = _JaxSiteOps()


class SiteDensity(shared.SiteDensity):
    """A site's log density in unconstrained coordinates, over a batch of independent rows
    (JAX arrays; ``shape`` and ``unconstrained_shape`` are tuples): the fields, ``num_rows``
    and ``init_unconstrained`` of ``ppl_score.common.langevin.SiteDensity``."""

    __slots__ = ()
    ops = _OPS


def _is_density_site(node) -> bool:
    """A sample site whose log density is a term of the joint (``numpyro.factor`` included)."""
    return node["type"] == "sample"


def _bind(model, params, data):
    """``model`` with ``data`` conditioned and ``params`` substituted; the fixed seed keeps a
    subsampling plate's indices the same in every evaluation (and as in the first trace)."""
    model = handlers.condition(model, data=data)
    if params:
        model = handlers.substitute(model, data=params)
    return handlers.seed(model, rng_seed=0)


_CHAINS = "_ppl_score_chains"
_PLATE_HINT = (
    "(ppl_score) the chains run in one call of the model inside a plate over chains left of its "
    "plates, so the model must broadcast over that extra batch dim (as for vectorized ELBO "
    "particles); pass vectorize='vmap' to map one chain's model over the chains instead"
)


def _max_plate_nesting(trace) -> int:
    depth = 0
    for node in trace.values():
        if node["type"] != "sample":
            continue
        depth = max(depth, len(node["fn"].batch_shape))
        for frame in node["cond_indep_stack"]:
            depth = max(depth, -frame.dim)
    return depth


def _chained(model, rows: int, dim: int):
    """``model`` inside a plate over ``rows`` chains at ``dim``, left of its own plates."""

    def chained(*args, **kwargs):
        with numpyro.plate(_CHAINS, rows, dim=dim):
            return model(*args, **kwargs)

    return chained


def _to_rows(lp: jax.Array, rows: int, depth: int) -> jax.Array:
    """Sum a site's log density over everything but the chain dim, ``-> [rows]``."""
    if lp.ndim <= depth:
        lp = jnp.reshape(lp, (1,) * (depth + 1 - lp.ndim) + tuple(lp.shape))
    return jnp.broadcast_to(lp.reshape(lp.shape[0], -1).sum(-1), (rows,))


def site_log_density(
    model: Callable,
    site: str,
    *args: Any,
    num_chains: int = 1,
    num_draws: int | None = None,
    params: dict | None = None,
    guide: Callable | None = None,
    latents: dict | None = None,
    key: jax.Array | None = None,
    vectorize: str = "plate",
    **kwargs: Any,
) -> SiteDensity:
    r"""The log density of the observed ``site`` of ``model(*args, **kwargs)`` in
    unconstrained coordinates, vectorized over rows (see the module doc).

    Args:
        model, site, \*args, \*\*kwargs: the model, its observed site, and its arguments.
        num_chains: independent chains.
        num_draws: ``None`` (site mode) or the new points each chain holds (draws mode, an
            ``Unnormalized`` site); the module doc and
            ``ppl_score.common.langevin.SiteLayout`` say what each mode samples.
        params: the fitted parameters (``svi_result.params``), substituted into model and guide.
        guide: draws each row's latent values once (with ``key``).
        latents: values of the model's latent sites, shared by all rows.
        key: a ``jax.random`` key for ``guide``.
        vectorize: ``"plate"`` (default): the model runs once for all rows inside a plate
            over them, left of its own plates (it must broadcast, as for vectorized ELBO
            particles); ``"vmap"``: one row's model is ``jax.vmap``-ed (any model, slower).

    Returns:
        A ``SiteDensity``.

    Raises:
        TypeError, ValueError: a bad argument or site (named), a latent site given by
            neither ``guide`` nor ``latents``, a ``guide`` without ``key``, ``num_draws``
            on a site that is not ``Unnormalized``, or ``num_draws`` with ``vectorize="vmap"``
            and latents drawn from ``guide``.
    """
    c, k = shared.check_site_args(model, num_chains, num_draws)
    vectorize = shared.check_vectorize(vectorize)
    rows = c * (k or 1)
    for name, value in (("params", params), ("latents", latents)):
        if value is not None and not isinstance(value, dict):
            raise TypeError(f"argument {name!r} must be a dict, got {type(value).__name__}")
    if guide is not None and latents is not None:
        raise ValueError("pass at most one of 'guide' and 'latents'")
    params = dict(params or {})
    fixed = dict(latents or {})
    trace = handlers.trace(_bind(model, params, fixed)).get_trace(*args, **kwargs)
    node = shared.check_sample_site(trace, site, _is_density_site)
    missing = [n for n, s in trace.items() if _is_density_site(s) and not s["is_observed"] and n != site]
    depth = _max_plate_nesting(trace)
    per_row = {}
    if guide is not None and missing:
        if key is None:
            raise ValueError("argument 'key' is required to draw the latent sites from 'guide'")
        bound_guide = handlers.substitute(guide, data=params) if params else guide

        def draw(k):
            tr = handlers.trace(handlers.seed(bound_guide, rng_seed=k)).get_trace(*args, **kwargs)
            return {n: tr[n]["value"] for n in missing if n in tr}

        per_row = jax.vmap(draw)(jax.random.split(key, rows))
        missing = [n for n in missing if n not in per_row]
    if missing:
        raise shared.missing_latents_error(missing, "a fitted guide, with 'params' and 'key'")
    value = jnp.asarray(node["value"])
    transform = biject_to(node["fn"].support)
    if vectorize == "plate" and per_row:  # each row's latents, with the row dim at the chain dim
        per_row = {
            n: jnp.reshape(v, (rows,) + (1,) * (depth - len(trace[n]["fn"].batch_shape)) + tuple(v.shape[1:]))
            for n, v in per_row.items()
        }
    if k is None:
        if vectorize == "vmap":
            return _site_density_vmap(model, site, args, kwargs, params, fixed, per_row, value, node, transform, c)
        return _site_density(model, site, args, kwargs, params, {**fixed, **per_row}, value, node, transform, c, depth)
    if per_row:  # the site's density closes over each row's latents
        if vectorize == "vmap":
            raise ValueError(
                "argument 'num_draws' with latents drawn from 'guide' needs vectorize='plate' (each "
                "point's density is traced with its own latents under a plate)"
            )
        tr = handlers.trace(_bind(_chained(model, rows, -(depth + 1)), params, {**fixed, **per_row})).get_trace(
            *args, **kwargs
        )
        node = tr[site]
    base = shared.unnormalized_base(site, node["fn"], ExpandedDistribution, Unnormalized, "numpyro")
    return _OPS.draws_density(SiteDensity, base, value, transform, c, k, depth)


def _site_density_vmap(model, site, args, kwargs, params, fixed, per_row, value, node, transform, c) -> SiteDensity:
    """Site mode, one chain's model ``jax.vmap``-ed over the chains."""

    def one_chain(u, chain_latents):
        x = transform(u)
        total = jnp.sum(transform.log_abs_det_jacobian(u, x))
        tr = handlers.trace(_bind(model, params, {**fixed, **chain_latents, site: x})).get_trace(*args, **kwargs)
        for s in tr.values():
            if _is_density_site(s):
                total = total + jnp.sum(s["fn"].log_prob(s["value"]))
        return total

    def log_prob(u: jax.Array) -> jax.Array:
        shared.check_rows(u, c)
        return jax.vmap(one_chain, in_axes=(0, 0 if per_row else None))(u, per_row)

    return _site_result(log_prob, transform, value, node, c)


def _site_result(log_prob, transform, value, node, c) -> SiteDensity:
    shape = tuple(value.shape)
    layout = shared.site_layout(shape, node["fn"].event_shape)
    return SiteDensity(
        log_prob,
        transform,
        shape,
        tuple(transform.inv(value).shape),
        value,
        c,
        layout,
        jnp.broadcast_to(value, (c, *shape)),
    )


def _site_density(model, site, args, kwargs, params, fixed, value, node, transform, c, depth) -> SiteDensity:
    """Site mode, every chain in one run of the model inside a plate over chains."""
    shape = tuple(value.shape)
    pad = depth - (value.ndim - len(node["fn"].event_shape))
    chain_value_shape = (c,) + (1,) * pad + shape
    chained = _chained(model, c, -(depth + 1))

    def log_prob(u: jax.Array) -> jax.Array:
        x, total = _OPS.constrain(transform, u, c)
        data = {**fixed, site: x.reshape(chain_value_shape)}
        try:
            tr = handlers.trace(_bind(chained, params, data)).get_trace(*args, **kwargs)
        except (TypeError, ValueError) as err:  # e.g. a model that does not broadcast over chains
            err.add_note(_PLATE_HINT)
            raise
        for s in tr.values():
            if _is_density_site(s):
                total = total + _to_rows(s["fn"].log_prob(s["value"]), c, depth)
        return total

    return _site_result(log_prob, transform, value, node, c)


def langevin(
    model: Callable,
    site: str,
    *args: Any,
    key: jax.Array,
    num_samples: int | None = None,
    num_warmup: int = 500,
    num_chains: int = 1,
    num_draws: int | None = None,
    step_size: float = 1e-2,
    adjusted: bool = True,
    init: jax.Array | np.ndarray | None = None,
    thin: int = 1,
    num_steps: int | None = None,
    params: dict | None = None,
    guide: Callable | None = None,
    latents: dict | None = None,
    vectorize: str = "plate",
    progress_bar: bool = False,
    sigmas: Sequence[float] | None = None,
    n_steps_each: int = 100,
    step_lr: float = 2e-5,
    denoise: bool = True,
    **kwargs: Any,
) -> SiteSamples:
    r"""Langevin chains (MALA, or ULA with ``adjusted=False``) on the observed ``site`` of a
    fitted ``model(*args, **kwargs)`` (see the module doc).

    Args:
        model, site, \*args, \*\*kwargs: the model, the observed site to sample, and the model's
            arguments (they fix the site's shape and the other sites' values).
        key: a ``jax.random`` key (guide draws and the chains' noise).
        num_samples: states kept per chain (default 1000): every ``thin``-th of
            ``num_samples * thin`` steps after the warm-up.
        num_warmup: steps run first and discarded (default 500).
        num_chains: independent chains.
        num_draws: as in ``site_log_density``; in draws mode each point is its own
            Metropolis chain, so the cost is ``num_chains * num_draws`` points, not copies of
            the data.
        step_size: in unconstrained space.
        adjusted: MALA (True, exact) or ULA (False, O(step_size) bias).
        init: start, in the site's support, broadcasting to ``[num_chains, *layout.shape]``;
            default: the observed value (site mode) or observed points cycled (draws mode).
        thin: keep every ``thin``-th state.
        num_steps: instead of ``num_samples``, the steps after warm-up (a multiple of ``thin``).
        params / guide / latents: the fitted parameters and where the latent sites' values
            come from (a guide draws them once per chain, or per point in draws mode).
        vectorize: ``"plate"`` (default) or ``"vmap"``, see ``site_log_density``.
        progress_bar: as in ``ppl_score.jax.langevin.mala``.
        sigmas: the annealed mode, for a site observed with ``NoiseConditional`` (fitted by
            ``ScoreMatching("ms_dsm")``): annealed Langevin over these decreasing levels
            (``n_steps_each`` ULA steps per level of size ``step_lr * sigma_i^2 / sigma_L^2``,
            then with ``denoise`` the Tweedie step), as ``annealed_langevin`` of the backend;
            one sample per chain, so ``num_samples`` / ``num_steps`` must be left out, and
            ``num_warmup``, ``step_size``, ``adjusted`` and ``thin``, which do not apply, at
            their defaults (else a ``ValueError``).

    Returns:
        ``SiteSamples(samples [num_samples, num_chains, *layout.shape], accept_rate, layout)``.

    Raises:
        TypeError, ValueError: bad arguments or sites (named), a missing ``key``, or diverged
            chains (decrease ``step_size``).

    A MALA run that accepts (almost) nothing warns with its acceptance rate
    (``ppl_score.common.langevin.LowAcceptanceWarning``). Each call builds a new site
    density, so it is compiled for that call and released afterwards (nothing is cached
    across calls).
    """
    if sigmas is not None:
        frontend.check_annealed_options(
            num_samples, num_steps, num_warmup=num_warmup, step_size=step_size, adjusted=adjusted, thin=thin
        )
    adjusted = shared.check_adjusted(adjusted)
    plan = shared.check_sampling_run(step_size, num_samples, num_steps, num_warmup, thin)
    if key is None:
        raise ValueError("argument 'key' is required (a jax.random key)")
    key_guide, key_run = jax.random.split(check_key(key))
    dens = site_log_density(
        model,
        site,
        *args,
        num_chains=num_chains,
        num_draws=num_draws,
        params=params,
        guide=guide,
        latents=latents,
        key=key_guide,
        vectorize=vectorize,
        **kwargs,
    )
    u0 = dens.init_unconstrained(init).reshape(dens.num_rows, *dens.unconstrained_shape)
    if sigmas is not None:
        levels = check_sigmas(sigmas, what="argument")
        frontend.check_annealed_site(dens.log_prob, u0, levels[0], site)
        out = backend.annealed_langevin(
            frontend.at_noise_level(dens.log_prob),
            u0,
            levels,
            n_steps_each,
            step_lr,
            denoise=denoise,
            kind="log_prob",
            key=key_run,
            progress_bar=progress_bar,
        )
        return shared.site_samples(dens, out.samples[None], jnp.ones(u0.shape[:1], u0.dtype))
    sampler = backend.mala if adjusted else backend.ula
    result = sampler(
        dens.log_prob,
        u0,
        plan.step_size,
        plan.num_steps,
        key=key_run,
        num_warmup=plan.num_warmup,
        thin=plan.thin,
        progress_bar=progress_bar,
    )
    return shared.site_samples(dens, result.samples, result.accept_rate)


def potential_fn(
    model: Callable,
    site: str,
    *args: Any,
    num_draws: int | None = None,
    params: dict | None = None,
    guide: Callable | None = None,
    latents: dict | None = None,
    key: jax.Array | None = None,
    vectorize: str = "plate",
    **kwargs: Any,
) -> Callable[[dict[str, jax.Array]], jax.Array]:
    """``params_dict -> -log p(transform(params_dict[site])) - log|det J|``, a scalar: the
    potential energy of one chain's state of the observed ``site`` in unconstrained
    coordinates (site mode: the site's conditional given the rest; draws mode: ``num_draws``
    new points) for ``numpyro.infer.NUTS(potential_fn=...)`` / ``HMC``. Latent sites are
    fixed by ``latents`` or one draw of ``guide`` (with ``key``). Samples come back
    unconstrained: map them with ``site_log_density(...).transform`` (``nuts`` does)."""
    dens = site_log_density(
        model,
        site,
        *args,
        num_chains=1,
        num_draws=num_draws,
        params=params,
        guide=guide,
        latents=latents,
        key=key,
        vectorize=vectorize,
        **kwargs,
    )
    return _OPS.potential(dens, site)


def nuts(
    model: Callable,
    site: str,
    *args: Any,
    key: jax.Array,
    num_samples: int = 500,
    num_warmup: int = 500,
    num_chains: int = 1,
    num_draws: int | None = None,
    init: jax.Array | np.ndarray | None = None,
    params: dict | None = None,
    guide: Callable | None = None,
    latents: dict | None = None,
    kernel_options: dict | None = None,
    vectorize: str = "plate",
    progress_bar: bool = False,
    **kwargs: Any,
) -> SiteSamples:
    r"""NumPyro's ``NUTS`` on the observed ``site`` through ``potential_fn``.

    Args:
        model, site, \*args, \*\*kwargs, key, num_chains, num_draws, init, params, guide, latents, vectorize:
            as in ``langevin`` (in draws mode NUTS moves a chain's ``num_draws`` points
            jointly, one trajectory on their product density).
        num_samples: draws kept per chain (default 500).
        num_warmup: adaptation steps (default 500).
        kernel_options: keyword arguments of ``NUTS`` (e.g. ``target_accept_prob``).
        progress_bar: show NumPyro's progress bar.

    Returns:
        ``SiteSamples(samples [num_samples, num_chains, *layout.shape], accept_rate
        [num_chains], layout)``: the layout of ``langevin``; ``accept_rate`` is each chain's
        mean acceptance probability after warm-up. Chains are vectorized
        (``chain_method="vectorized"``).

    Raises:
        TypeError, ValueError: ``num_samples < 1``, ``num_warmup < 0``, ``num_chains < 1``,
            a missing ``key``, or a bad site / ``init`` (named in the message).
    """
    from numpyro.infer import MCMC, NUTS

    num_samples, num_warmup = shared.check_nuts_run(num_samples, num_warmup)
    c = shared.check_num_chains(num_chains)
    if key is None:
        raise ValueError("argument 'key' is required (a jax.random key)")
    key_guide, key_run = jax.random.split(check_key(key))
    dens = site_log_density(
        model,
        site,
        *args,
        num_chains=1,
        num_draws=num_draws,
        params=params,
        guide=guide,
        latents=latents,
        key=key_guide,
        vectorize=vectorize,
        **kwargs,
    )
    u0 = dens.init_unconstrained(init, num_chains=c)
    kernel = NUTS(potential_fn=_OPS.potential(dens, site), **(kernel_options or {}))
    mcmc = MCMC(
        kernel,
        num_warmup=num_warmup,
        num_samples=num_samples,
        num_chains=c,
        chain_method="vectorized",
        progress_bar=progress_bar,
    )
    mcmc.run(key_run, init_params={site: u0 if c > 1 else u0[0]}, extra_fields=("accept_prob",))
    u = mcmc.get_samples(group_by_chain=True)[site]  # [C, S, *layout.shape] unconstrained
    accept = mcmc.get_extra_fields(group_by_chain=True)["accept_prob"].reshape(c, -1).mean(-1)
    return SiteSamples(
        dens.transform(jnp.swapaxes(u.reshape(c, num_samples, *u0.shape[1:]), 0, 1)), accept, dens.layout
    )
