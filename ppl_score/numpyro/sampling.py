"""Sampling an observed site of a fitted NumPyro model: Langevin dynamics and NumPyro's NUTS.

A model fitted by score matching, e.g. ::

    def model(data):
        with numpyro.plate("data", data.shape[0]):
            numpyro.sample("x", Unnormalized(energy, event_shape=(2,)), obs=data)

defines ``x`` only up to its normalizer, so ``numpyro.sample`` cannot draw it. Here the
site's conditional log density given every other site,

    log p(x | rest) = sum over sample sites of log p(site | its parents)   (x substituted),

is sampled by MCMC in the unconstrained space of ``T = biject_to(support)``:
``u -> log p(T(u) | rest) + log |det dT/du|``. One chain's density traces the model with
``x`` conditioned; chains are ``jax.vmap``-ed over it, and the whole run is jitted.
Log densities are unscaled (a subsampling scale is not a tempering), masks apply, and
``numpyro.factor`` terms count.
The other sites are fixed: parameters from ``params`` (e.g. ``svi_result.params``),
latent sites at the values in ``latents`` (shared by every chain) or drawn once per chain
from ``guide`` (so the chains sample the posterior predictive). Mirrors
``ppl_score.pyro.sampling``.

- ``langevin(model, site, *args, key=..., ...)``: ULA / MALA chains (``ppl_score.jax.langevin``).
- ``potential_fn(model, site, *args, ...)``: a potential for
  ``numpyro.infer.NUTS(potential_fn=...)``; ``nuts(...)`` runs ``MCMC`` with it::

      pot = potential_fn(model, "x", data, params=params)
      dens = site_log_density(model, "x", data, params=params)
      mcmc = MCMC(NUTS(potential_fn=pot), num_warmup=500, num_samples=500)
      mcmc.run(key, init_params={"x": dens.init_unconstrained(None)[0]})
      x = dens.transform(mcmc.get_samples()["x"])
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from numpyro import handlers
from numpyro.distributions.transforms import biject_to

from .. import langevin as shared
from ..jax import langevin as backend
from ..jax.checks import check_key

__all__ = ["SiteDensity", "SiteSamples", "site_log_density", "langevin", "potential_fn", "nuts"]


class SiteDensity(NamedTuple):
    """``log_prob(u[C, *unconstrained_shape]) -> [C]``: the site's conditional log density
    (up to a constant) at ``transform(u)``, plus ``log |det d transform / du|``."""

    log_prob: Callable[[jax.Array], jax.Array]
    transform: Any  # numpyro Transform, unconstrained -> site support
    shape: tuple  # the site's value shape (as traced)
    unconstrained_shape: tuple
    value: jax.Array  # the site's traced (observed) value
    num_chains: int

    def init_unconstrained(self, init, num_chains: int | None = None) -> jax.Array:
        """Chains' start ``[C, *unconstrained_shape]`` from ``init`` (constrained, ``[*shape]``
        or ``[C, *shape]``); ``None`` starts every chain at the observed value."""
        c = self.num_chains if num_chains is None else num_chains
        if init is None:
            init = self.value
        if not isinstance(init, (jax.Array, np.ndarray)):
            raise TypeError(f"argument 'init' must be a jax.Array or numpy array, got {type(init).__name__}")
        init = jnp.asarray(init, self.value.dtype)
        if tuple(init.shape) == tuple(self.shape):
            init = jnp.broadcast_to(init, (c, *self.shape))
        elif tuple(init.shape) != (c, *self.shape):
            raise ValueError(
                f"argument 'init' must have the site's shape {tuple(self.shape)} or "
                f"[num_chains, *shape] = {(c, *self.shape)}, got {tuple(init.shape)}"
            )
        u = self.transform.inv(init)
        if not (bool(jnp.all(self.transform.codomain(init))) and bool(jnp.isfinite(u).all())):
            raise ValueError("argument 'init' lies outside the site's support")
        return u


class SiteSamples(NamedTuple):
    samples: jax.Array  # [num_steps // thin, C, *site shape], in the site's support
    accept_rate: jax.Array  # [C]


def _is_density_site(node) -> bool:
    """A sample site whose log density is a term of the joint (``numpyro.factor`` included)."""
    return node["type"] == "sample"


def _check_site(trace, site: Any):
    if not isinstance(site, str):
        raise TypeError(f"argument 'site' must be a site name (str), got {type(site).__name__}")
    names = [n for n, node in trace.items() if _is_density_site(node)]
    if site not in trace or not _is_density_site(trace[site]):
        raise ValueError(f"site {site!r} is not a sample site of the model; its sample sites are {names}")
    node = trace[site]
    if not node["is_observed"]:
        raise ValueError(
            f"site {site!r} is not observed with these arguments: pass its data (the observed "
            "value fixes the site's shape and is where chains start by default)"
        )
    if node["fn"].support.is_discrete:
        raise ValueError(
            f"site {site!r} is discrete ({type(node['fn']).__name__}); Langevin and NUTS need a continuous site"
        )
    return node


def _bind(model, params, data):
    """``model`` with ``data`` conditioned and ``params`` substituted; the fixed seed keeps a
    subsampling plate's indices the same in every evaluation (and as in the first trace)."""
    model = handlers.condition(model, data=data)
    if params:
        model = handlers.substitute(model, data=params)
    return handlers.seed(model, rng_seed=0)


def site_log_density(
    model,
    site: str,
    *args,
    num_chains: int = 1,
    params: dict | None = None,
    guide=None,
    latents: dict | None = None,
    key=None,
    **kwargs,
) -> SiteDensity:
    """The conditional log density of the observed ``site`` of ``model(*args, **kwargs)`` in
    unconstrained coordinates, for ``num_chains`` chains (see the module doc).

    ``params``: the fitted parameters (``svi_result.params``), substituted into model and
    guide; ``latents``: values of the model's latent sites, shared by all chains;
    ``guide`` (with ``key``): draws each chain's latent values once. A latent site given by
    neither is a ``ValueError`` naming it.
    """
    if not callable(model):
        raise TypeError(f"argument 'model' must be callable, got {type(model).__name__}")
    c = shared.check_num_chains(num_chains)
    for name, value in (("params", params), ("latents", latents)):
        if value is not None and not isinstance(value, dict):
            raise TypeError(f"argument {name!r} must be a dict, got {type(value).__name__}")
    if guide is not None and latents is not None:
        raise ValueError("pass at most one of 'guide' and 'latents'")
    params = dict(params or {})
    fixed = dict(latents or {})
    trace = handlers.trace(_bind(model, params, fixed)).get_trace(*args, **kwargs)
    node = _check_site(trace, site)
    missing = [n for n, s in trace.items() if _is_density_site(s) and not s["is_observed"] and n != site]
    per_chain = {}
    if guide is not None and missing:
        if key is None:
            raise ValueError("argument 'key' is required to draw the latent sites from 'guide'")
        bound_guide = handlers.substitute(guide, data=params) if params else guide

        def draw(k):
            tr = handlers.trace(handlers.seed(bound_guide, rng_seed=k)).get_trace(*args, **kwargs)
            return {n: tr[n]["value"] for n in missing if n in tr}

        per_chain = jax.vmap(draw)(jax.random.split(key, c))
        missing = [n for n in missing if n not in per_chain]
    if missing:
        raise ValueError(
            f"latent site(s) {missing} of the model have no value: pass 'guide' (a fitted guide, "
            "with 'params' and 'key') or 'latents' (a dict of values)"
        )

    value = jnp.asarray(node["value"])
    transform = biject_to(node["fn"].support)
    unconstrained_shape = tuple(transform.inv(value).shape)

    def one_chain(u, chain_latents):
        x = transform(u)
        total = jnp.sum(transform.log_abs_det_jacobian(u, x))
        tr = handlers.trace(_bind(model, params, {**fixed, **chain_latents, site: x})).get_trace(*args, **kwargs)
        for s in tr.values():
            if _is_density_site(s):
                total = total + jnp.sum(s["fn"].log_prob(s["value"]))
        return total

    def log_prob(u: jax.Array) -> jax.Array:
        if u.shape[0] != c:
            raise ValueError(f"expected {c} chains (the leading dim of u), got shape {tuple(u.shape)}")
        return jax.vmap(one_chain, in_axes=(0, 0 if per_chain else None))(u, per_chain)

    return SiteDensity(log_prob, transform, tuple(value.shape), unconstrained_shape, value, c)


def langevin(
    model,
    site: str,
    *args,
    key,
    num_chains: int = 1,
    num_steps: int = 1000,
    step_size: float = 1e-2,
    adjusted: bool = True,
    init=None,
    num_warmup: int = 0,
    thin: int = 1,
    params: dict | None = None,
    guide=None,
    latents: dict | None = None,
    progress_bar: bool = False,
    **kwargs,
) -> SiteSamples:
    """Langevin chains (MALA, or ULA with ``adjusted=False``) on the observed ``site`` of a
    fitted ``model(*args, **kwargs)``, every other site fixed (see the module doc).

    Args:
        model, site, *args, **kwargs: the model, the observed site to sample, and the model's
            arguments (they fix the site's shape and the other sites' values).
        key: a ``jax.random`` key (guide draws and the chains' noise).
        num_chains: chains ``C``, each a full copy of the site's value.
        num_steps, num_warmup, thin, progress_bar: as in ``ppl_score.jax.langevin.mala``;
            ``step_size`` is in unconstrained space.
        adjusted: MALA (True, exact) or ULA (False, O(step_size) bias).
        init: start, in the site's support: ``[*shape]`` or ``[C, *shape]``; default: the
            observed value.
        params / guide / latents: the fitted parameters and where the latent sites' values
            come from.

    Returns:
        ``SiteSamples(samples [num_steps // thin, C, *shape], accept_rate [C])``.

    Raises:
        ValueError: bad arguments or sites (named), a missing ``key``, or diverged chains
            (decrease ``step_size``).

    A MALA run that accepts (almost) nothing warns with its acceptance rate
    (``ppl_score.langevin.LowAcceptanceWarning``). Each call builds a new site density, so
    it is compiled for that call and released afterwards (nothing is cached across calls).
    """
    adjusted = shared.check_adjusted(adjusted)
    shared.check_plan(step_size, num_steps, num_warmup, thin)
    if key is None:
        raise ValueError("argument 'key' is required (a jax.random key)")
    key_guide, key_run = jax.random.split(check_key(key))
    dens = site_log_density(model, site, *args, num_chains=num_chains, params=params, guide=guide,
                            latents=latents, key=key_guide, **kwargs)
    u0 = dens.init_unconstrained(init)
    sampler = backend.mala if adjusted else backend.ula
    result = sampler(dens.log_prob, u0, step_size, num_steps, key=key_run, num_warmup=num_warmup,
                     thin=thin, progress_bar=progress_bar)
    return SiteSamples(dens.transform(result.samples), result.accept_rate)


def potential_fn(model, site: str, *args, params: dict | None = None, guide=None, latents: dict | None = None,
                 key=None, **kwargs):
    """``params_dict -> -log p(transform(params_dict[site]) | rest) - log|det J|``, a
    scalar: the potential energy of the observed ``site`` (one chain, unconstrained
    coordinates of the site's shape) for ``numpyro.infer.NUTS(potential_fn=...)`` / ``HMC``.
    Latent sites are fixed by ``latents`` or one draw of ``guide`` (with ``key``). Samples come
    back unconstrained: map them with ``site_log_density(...).transform`` (``nuts`` does)."""
    dens = site_log_density(model, site, *args, num_chains=1, params=params, guide=guide, latents=latents,
                            key=key, **kwargs)
    return _potential(dens, site)


def _potential(dens: SiteDensity, site: str):
    def potential(values: dict) -> jax.Array:
        return -dens.log_prob(values[site][None])[0]

    return potential


def nuts(
    model,
    site: str,
    *args,
    key,
    num_samples: int = 500,
    num_warmup: int = 500,
    num_chains: int = 1,
    init=None,
    params: dict | None = None,
    guide=None,
    latents: dict | None = None,
    kernel_options: dict | None = None,
    progress_bar: bool = False,
    **kwargs,
) -> jax.Array:
    """NumPyro's ``NUTS`` on the observed ``site`` through ``potential_fn``; returns samples
    ``[num_samples, num_chains, *shape]`` in the site's support (the layout of
    ``langevin``). Chains are vectorized (``chain_method="vectorized"``); ``kernel_options``
    go to ``NUTS`` (e.g. ``target_accept_prob``).

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
    dens = site_log_density(model, site, *args, num_chains=1, params=params, guide=guide, latents=latents,
                            key=key_guide, **kwargs)
    u0 = dens.init_unconstrained(init, num_chains=c)
    kernel = NUTS(potential_fn=_potential(dens, site), **(kernel_options or {}))
    mcmc = MCMC(kernel, num_warmup=num_warmup, num_samples=num_samples, num_chains=c,
                chain_method="vectorized", progress_bar=progress_bar)
    mcmc.run(key_run, init_params={site: u0 if c > 1 else u0[0]})
    u = mcmc.get_samples(group_by_chain=True)[site]  # [C, S, *unconstrained]
    return dens.transform(jnp.swapaxes(u, 0, 1))
