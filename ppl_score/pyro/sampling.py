"""Sampling an observed site of a fitted Pyro model: Langevin dynamics and Pyro's NUTS.

A model fitted by score matching, e.g. ::

    def model(data):
        with pyro.plate("data", data.shape[0]):
            pyro.sample("x", Unnormalized(energy, event_shape=(2,)), obs=data)

defines ``x`` only up to its normalizer, so ``pyro.sample`` cannot draw it. Here the site's
conditional log density given every other site,

    log p(x | rest) = sum over sample sites of log p(site | its parents)   (x substituted),

is sampled by MCMC in the unconstrained space of ``T = biject_to(support)``:
``u -> log p(T(u) | rest) + log |det dT/du|``. Chains are vectorized by running the model
once per evaluation inside a ``pyro.plate`` over chains placed left of the model's plates
(like ``vectorize_particles``), so the model must broadcast as it does for vectorized
ELBO particles. Log densities are unscaled (a subsampling scale is not a tempering), masks
apply, and ``pyro.factor`` terms count. The other sites are fixed: latent sites at the values in ``latents`` (shared
by every chain) or drawn once per chain from ``guide`` (so the chains sample the posterior
predictive); parameters are read from the param store.

- ``langevin(model, site, *args, ...)``: ULA / MALA chains (``ppl_score.torch.langevin``).
- ``potential_fn(model, site, *args, ...)``: a potential for
  ``pyro.infer.mcmc.NUTS(potential_fn=...)``; ``nuts(...)`` runs ``MCMC`` with it::

      pot = potential_fn(model, "x", data)
      dens = site_log_density(model, "x", data)
      mcmc = MCMC(NUTS(potential_fn=pot), num_samples=500, warmup_steps=500,
                  initial_params={"x": dens.init_unconstrained(None)[0]})
      mcmc.run()
      x = dens.transform(mcmc.get_samples()["x"])
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import pyro
import pyro.poutine as poutine
import torch
from pyro.distributions.util import scale_and_mask
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import site_is_subsample
from torch.distributions import biject_to

from .. import langevin as shared
from ..torch import langevin as backend
from ..validation import inference_mode_error

__all__ = ["SiteDensity", "SiteSamples", "site_log_density", "langevin", "potential_fn", "nuts"]

_CHAINS = "_ppl_score_chains"


class SiteDensity(NamedTuple):
    """``log_prob(u[C, *unconstrained_shape]) -> [C]``: the site's conditional log density
    (up to a constant) at ``transform(u)``, plus ``log |det d transform / du|``."""

    log_prob: Callable[[torch.Tensor], torch.Tensor]
    transform: Any  # torch.distributions.Transform, unconstrained -> site support
    shape: torch.Size  # the site's value shape (as traced)
    unconstrained_shape: torch.Size
    value: torch.Tensor  # the site's traced (observed) value
    num_chains: int

    def init_unconstrained(self, init, num_chains: int | None = None) -> torch.Tensor:
        """Chains' start ``[C, *unconstrained_shape]`` from ``init`` (constrained, ``[*shape]``
        or ``[C, *shape]``); ``None`` starts every chain at the observed value."""
        c = self.num_chains if num_chains is None else num_chains
        if init is None:
            init = self.value
        if not isinstance(init, torch.Tensor):
            raise TypeError(f"argument 'init' must be a torch.Tensor, got {type(init).__name__}")
        init = init.detach().to(self.value.dtype)
        if tuple(init.shape) == tuple(self.shape):
            init = init.expand(c, *self.shape)
        elif tuple(init.shape) != (c, *self.shape):
            raise ValueError(
                f"argument 'init' must have the site's shape {tuple(self.shape)} or "
                f"[num_chains, *shape] = {(c, *self.shape)}, got {tuple(init.shape)}"
            )
        u = self.transform.inv(init)
        if not (bool(self.transform.codomain.check(init).all()) and bool(torch.isfinite(u).all())):
            raise ValueError("argument 'init' lies outside the site's support")
        return u.clone()


class SiteSamples(NamedTuple):
    samples: torch.Tensor  # [num_steps // thin, C, *site shape], in the site's support
    accept_rate: torch.Tensor  # [C]


def _max_plate_nesting(trace) -> int:
    depth = 0
    for node in trace.nodes.values():
        if node["type"] != "sample" or site_is_subsample(node):
            continue
        depth = max(depth, len(node["fn"].batch_shape))
        for frame in node["cond_indep_stack"]:
            if frame.vectorized:
                depth = max(depth, -frame.dim)
    return depth


def _is_density_site(node) -> bool:
    """A sample site whose log density is a term of the joint (``pyro.factor`` included)."""
    return node["type"] == "sample" and not site_is_subsample(node) and not node["infer"].get("_deterministic", False)


def _check_site(trace, site: Any):
    if not isinstance(site, str):
        raise TypeError(f"argument 'site' must be a site name (str), got {type(site).__name__}")
    names = [n for n, node in trace.nodes.items() if _is_density_site(node)]
    if site not in trace.nodes or not _is_density_site(trace.nodes[site]):
        raise ValueError(f"site {site!r} is not a sample site of the model; its sample sites are {names}")
    node = trace.nodes[site]
    if not node["is_observed"]:
        raise ValueError(
            f"site {site!r} is not observed with these arguments: pass its data (the observed "
            "value fixes the site's shape and is where chains start by default)"
        )
    fn = node["fn"]
    if fn.support.is_discrete:
        raise ValueError(f"site {site!r} is discrete ({type(fn).__name__}); Langevin and NUTS need a continuous site")
    return node


def _to_chains(lp: torch.Tensor, c: int, depth: int) -> torch.Tensor:
    """Sum a site's log density over everything but the chain dim, ``-> [C]``."""
    lp = lp.reshape((1,) * (depth + 1 - lp.dim()) + tuple(lp.shape)) if lp.dim() <= depth else lp
    return lp.reshape(lp.shape[0], -1).sum(-1).expand(c)


def site_log_density(
    model,
    site: str,
    *args,
    num_chains: int = 1,
    guide=None,
    latents: dict | None = None,
    **kwargs,
) -> SiteDensity:
    """The conditional log density of the observed ``site`` of ``model(*args, **kwargs)`` in
    unconstrained coordinates, vectorized over ``num_chains`` chains (see the module doc).

    ``latents``: values of the model's latent sites, shared by all chains; ``guide``: draws
    each chain's latent values once (under a plate over chains). A latent site given by
    neither is a ``ValueError`` naming it.
    """
    if not callable(model):
        raise TypeError(f"argument 'model' must be callable, got {type(model).__name__}")
    c = shared.check_num_chains(num_chains)
    if latents is not None and not isinstance(latents, dict):
        raise TypeError(f"argument 'latents' must be a dict of site values, got {type(latents).__name__}")
    if guide is not None and latents is not None:
        raise ValueError("pass at most one of 'guide' and 'latents'")
    fixed = dict(latents or {})
    with torch.no_grad():
        trace = poutine.trace(poutine.condition(model, fixed)).get_trace(*args, **kwargs)
    node = _check_site(trace, site)
    missing = [
        n for n, s in trace.nodes.items() if _is_density_site(s) and not s["is_observed"] and n != site
    ]
    depth = _max_plate_nesting(trace)
    chain_dim = -(depth + 1)
    # a subsampling plate must index the same data in every evaluation: replay its indices
    subsample = Trace()
    for name, s in trace.nodes.items():
        if site_is_subsample(s):
            subsample.add_node(name, **s)
    if subsample.nodes:
        model = poutine.replay(model, trace=subsample)
        guide = None if guide is None else poutine.replay(guide, trace=subsample)
    if guide is not None and missing:
        with torch.no_grad(), pyro.plate(_CHAINS, c, dim=chain_dim):
            guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        fixed = {n: guide_trace.nodes[n]["value"].detach() for n in missing if n in guide_trace.nodes}
        missing = [n for n in missing if n not in fixed]
    if missing:
        raise ValueError(
            f"latent site(s) {missing} of the model have no value: pass 'guide' (a fitted guide) "
            "or 'latents' (a dict of values)"
        )

    value = node["value"].detach()
    fn = node["fn"]
    shape = value.shape
    transform = biject_to(fn.support)
    unconstrained_shape = transform.inv(value).shape
    # left-pad the site's batch dims so the chain dim sits at chain_dim
    pad = depth - (value.dim() - len(fn.event_shape))
    chain_value_shape = (c,) + (1,) * pad + tuple(shape)

    def log_prob(u: torch.Tensor) -> torch.Tensor:
        if u.shape[0] != c:
            raise ValueError(f"expected {c} chains (the leading dim of u), got shape {tuple(u.shape)}")
        x = transform(u)
        logdet = transform.log_abs_det_jacobian(u, x)
        total = logdet.reshape(c, -1).sum(-1) if logdet.dim() else logdet.expand(c)
        data = {**fixed, site: x.reshape(chain_value_shape)}
        with pyro.plate(_CHAINS, c, dim=chain_dim):
            tr = poutine.trace(poutine.condition(model, data)).get_trace(*args, **kwargs)
        for s in tr.nodes.values():
            if _is_density_site(s):
                lp = scale_and_mask(s["fn"].log_prob(s["value"]), mask=s["mask"])
                total = total + _to_chains(lp, c, depth)
        return total

    return SiteDensity(log_prob, transform, shape, unconstrained_shape, value, c)


def langevin(
    model,
    site: str,
    *args,
    num_chains: int = 1,
    num_steps: int = 1000,
    step_size: float = 1e-2,
    adjusted: bool = True,
    init: torch.Tensor | None = None,
    num_warmup: int = 0,
    thin: int = 1,
    guide=None,
    latents: dict | None = None,
    generator: torch.Generator | None = None,
    progress_bar: bool = False,
    **kwargs,
) -> SiteSamples:
    """Langevin chains (MALA, or ULA with ``adjusted=False``) on the observed ``site`` of a
    fitted ``model(*args, **kwargs)``, every other site fixed (see the module doc).

    Args:
        model, site, *args, **kwargs: the model, the observed site to sample, and the model's
            arguments (they fix the site's shape and the other sites' values).
        num_chains: chains ``C``, each a full copy of the site's value.
        num_steps, num_warmup, thin, generator, progress_bar: as in
            ``ppl_score.torch.langevin.mala``; ``step_size`` is in unconstrained space.
        adjusted: MALA (True, exact) or ULA (False, O(step_size) bias).
        init: start, in the site's support: ``[*shape]`` or ``[C, *shape]``; default: the
            observed value.
        guide / latents: where the latent sites' values come from.

    Returns:
        ``SiteSamples(samples [num_steps // thin, C, *shape], accept_rate [C])``.

    Raises:
        ValueError: bad arguments or sites (named), or diverged chains (decrease
            ``step_size``; reported before any support check of the model's distributions).
        RuntimeError: under ``torch.inference_mode()`` (the score needs autograd; under
            ``torch.no_grad()`` the result is the same as outside it).

    A MALA run that accepts (almost) nothing warns with its acceptance rate
    (``ppl_score.langevin.LowAcceptanceWarning``).
    """
    adjusted = shared.check_adjusted(adjusted)
    shared.check_plan(step_size, num_steps, num_warmup, thin)
    dens = site_log_density(model, site, *args, num_chains=num_chains, guide=guide, latents=latents, **kwargs)
    u0 = dens.init_unconstrained(init)
    sampler = backend.mala if adjusted else backend.ula
    result = sampler(dens.log_prob, u0, step_size, num_steps, num_warmup=num_warmup, thin=thin,
                     generator=generator, progress_bar=progress_bar)
    return SiteSamples(dens.transform(result.samples), result.accept_rate)


def potential_fn(model, site: str, *args, guide=None, latents: dict | None = None, **kwargs):
    """``params -> -log p(transform(params[site]) | rest) - log|det J|``, a scalar: the
    potential energy of the observed ``site`` (one chain, unconstrained coordinates of the
    site's shape) for ``pyro.infer.mcmc.NUTS(potential_fn=...)`` / ``HMC``. Latent sites are
    fixed by ``latents`` or one draw of ``guide``. Samples come back unconstrained: map them
    with ``site_log_density(...).transform`` (``nuts`` does this for you)."""
    dens = site_log_density(model, site, *args, num_chains=1, guide=guide, latents=latents, **kwargs)
    return _potential(dens, site)


def _potential(dens: SiteDensity, site: str):
    def potential(params: dict) -> torch.Tensor:
        return -dens.log_prob(params[site].unsqueeze(0))[0]

    return potential


def nuts(
    model,
    site: str,
    *args,
    num_samples: int = 500,
    warmup_steps: int = 500,
    num_chains: int = 1,
    init: torch.Tensor | None = None,
    guide=None,
    latents: dict | None = None,
    kernel_options: dict | None = None,
    progress_bar: bool = False,
    **kwargs,
) -> torch.Tensor:
    """Pyro's ``NUTS`` on the observed ``site`` through ``potential_fn``; returns samples
    ``[num_samples, num_chains, *shape]`` in the site's support (the layout of
    ``langevin``). Chains run one after another (Pyro's multi-chain MCMC would fork
    processes). ``kernel_options`` go to ``NUTS`` (e.g. ``target_accept_prob``).

    Raises:
        TypeError, ValueError: ``num_samples < 1``, ``warmup_steps < 0``, ``num_chains < 1``,
            or a bad site / ``init`` (named in the message).
        RuntimeError: under ``torch.inference_mode()`` (NUTS needs autograd; under
            ``torch.no_grad()`` grad is switched back on and the draws are the same).
    """
    from pyro.infer.mcmc import MCMC, NUTS

    num_samples, warmup_steps = shared.check_nuts_run(num_samples, warmup_steps, "warmup_steps")
    if torch.is_inference_mode_enabled():
        raise inference_mode_error("nuts", "the gradient of the potential")
    c = shared.check_num_chains(num_chains)
    dens = site_log_density(model, site, *args, num_chains=1, guide=guide, latents=latents, **kwargs)
    u0 = dens.init_unconstrained(init, num_chains=c)
    pot = _potential(dens, site)
    draws = []
    for start in u0:
        kernel = NUTS(potential_fn=pot, **(kernel_options or {}))
        mcmc = MCMC(kernel, num_samples=num_samples, warmup_steps=warmup_steps,
                    initial_params={site: start}, disable_progbar=not progress_bar)
        with torch.enable_grad():  # the same draws under torch.no_grad(): NUTS needs the potential's gradient
            mcmc.run()
        draws.append(mcmc.get_samples()[site].detach())
    return dens.transform(torch.stack(draws, dim=1))
