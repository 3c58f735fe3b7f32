"""Sampling an observed site of a fitted Pyro model: Langevin dynamics and Pyro's NUTS.

A model fitted by score matching, e.g. ::

    def model(data):
        with pyro.plate("data", data.shape[0], subsample_size=128) as idx:
            pyro.sample("x", Unnormalized(energy, event_shape=(2,)), obs=data[idx])

defines ``x`` only up to its normalizer, so ``pyro.sample`` cannot draw it. Two things can
be sampled, both by MCMC in the unconstrained space of ``T = biject_to(support)``
(``u -> log p(T(u)) + log |det dT/du|``):

- **The observed site's conditional** (site mode, the default): each chain is a copy of the
  site's value (here the 128-point minibatch), drawn from

      log p(x | rest) = sum over sample sites of log p(site | its parents)   (x substituted),

  so children of the site and ``pyro.factor`` terms count; log densities are unscaled (a
  subsampling scale is not a tempering) and masks apply.
- **New points** (draws mode, ``num_draws=k``, an ``Unnormalized`` site): each chain holds
  ``k`` new points drawn i.i.d. from the site's own density given its parents, the
  data-generating density of one point; the site's children and factors, which condition on
  the observed points, are left out. A row-form density gives points ``[*event]``; a
  batched one whose parameters carry plate dims (``mu`` per group) gives one point per
  parameter group, ``[*param_batch, *event]``. Each point is its own Metropolis chain, and
  the cost is ``num_chains * k`` points, not copies of the data.

Chains are vectorized by running the model once per evaluation inside a ``pyro.plate``
over chains placed left of the model's plates (like ``vectorize_particles``), so the model
must broadcast as it does for vectorized ELBO particles. The other sites are fixed: latent
sites at the values in ``latents`` (shared by every chain) or drawn once per chain (per
point in draws mode) from ``guide``, so the chains sample the posterior predictive;
parameters are read from the param store. A subsampling plate keeps the indices of the
first trace. The result, ``SiteSamples(samples, accept_rate, layout)``, has samples
``[num_samples, num_chains, *layout.shape]``; ``layout``
(``ppl_score.common.langevin.SiteLayout``) says what the dims are.

- ``langevin(model, site, *args, num_samples=1000, num_warmup=500, num_chains=1,
  num_draws=None, ...)``: MALA / ULA chains (``ppl_score.torch.langevin``)::

      draws = langevin(model, "x", data, num_draws=500, step_size=0.1)
      points = draws.samples[-1, 0]                    # [500, 2]: the last state of each point

- ``nuts(model, site, *args, ...)``: Pyro's ``NUTS`` with the same arguments and result.
- ``potential_fn(model, site, *args, ...)``: the potential for your own
  ``pyro.infer.mcmc.NUTS(potential_fn=...)``::

      pot = potential_fn(model, "x", data)
      dens = site_log_density(model, "x", data)
      mcmc = MCMC(NUTS(potential_fn=pot), num_samples=500, warmup_steps=500,
                  initial_params={"x": dens.init_unconstrained(None)[0]})
      mcmc.run()
      x = dens.transform(mcmc.get_samples()["x"])
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import pyro
import pyro.poutine as poutine
import torch
from pyro.distributions import ExpandedDistribution
from pyro.distributions.util import scale_and_mask
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import site_is_subsample
from torch.distributions import biject_to

from ..common import frontend
from ..common import langevin as shared
from ..common.objectives import check_sigmas
from ..common.validate import inference_mode_error
from ..torch import langevin as backend
from .distributions import Unnormalized

SiteSamples = shared.SiteSamples  # the draws of ``langevin`` and ``nuts``, written once

__all__ = ["SiteDensity", "SiteSamples", "site_log_density", "langevin", "potential_fn", "nuts"]

_CHAINS = "_ppl_score_chains"


class _TorchSiteOps(shared.SiteOps):
    """``ppl_score.common.langevin.SiteOps`` for torch tensors and Pyro transforms."""

    xp = torch

    def check_init(self, init) -> None:
        if not isinstance(init, torch.Tensor):
            raise TypeError(f"argument 'init' must be a torch.Tensor, got {type(init).__name__}")

    def broadcast_init(self, init, like, target):
        return init.detach().to(like.dtype).expand(target)

    def in_support(self, transform, init, u) -> bool:
        return bool(transform.codomain.check(init).all()) and bool(torch.isfinite(u).all())

    def fresh(self, u):
        return u.clone()

    def zeros(self, like, shape):
        return like.new_zeros(shape)

    def no_grad(self):
        return torch.no_grad()

    def size(self, shape):
        return torch.Size(shape)

    shape_errors = (RuntimeError,)


_OPS = _TorchSiteOps()


class SiteDensity(shared.SiteDensity):
    """A site's log density in unconstrained coordinates, over a batch of independent rows
    (torch tensors; ``shape`` and ``unconstrained_shape`` are ``torch.Size``): the fields,
    ``num_rows`` and ``init_unconstrained`` of ``ppl_score.common.langevin.SiteDensity``."""

    __slots__ = ()
    ops = _OPS


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


def _to_chains(lp: torch.Tensor, c: int, depth: int) -> torch.Tensor:
    """Sum a site's log density over everything but the chain dim, ``-> [C]``."""
    lp = lp.reshape((1,) * (depth + 1 - lp.dim()) + tuple(lp.shape)) if lp.dim() <= depth else lp
    return lp.reshape(lp.shape[0], -1).sum(-1).expand(c)


def site_log_density(
    model: Callable,
    site: str,
    *args: Any,
    num_chains: int = 1,
    num_draws: int | None = None,
    guide: Callable | None = None,
    latents: dict | None = None,
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
        guide: draws each row's latent values once (under a plate over rows).
        latents: values of the model's latent sites, shared by all rows.

    Returns:
        A ``SiteDensity``.

    Raises:
        TypeError, ValueError: a bad argument or site (named), a latent site given by
            neither ``guide`` nor ``latents``, or ``num_draws`` on a site that is not
            ``Unnormalized``.
    """
    c, k = shared.check_site_args(model, num_chains, num_draws)
    rows = c * (k or 1)
    if latents is not None and not isinstance(latents, dict):
        raise TypeError(f"argument 'latents' must be a dict of site values, got {type(latents).__name__}")
    if guide is not None and latents is not None:
        raise ValueError("pass at most one of 'guide' and 'latents'")
    fixed = dict(latents or {})
    with torch.no_grad():
        trace = poutine.trace(poutine.condition(model, fixed)).get_trace(*args, **kwargs)
    node = shared.check_sample_site(trace.nodes, site, _is_density_site)
    missing = [n for n, s in trace.nodes.items() if _is_density_site(s) and not s["is_observed"] and n != site]
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
    per_row = False
    if guide is not None and missing:
        with torch.no_grad(), pyro.plate(_CHAINS, rows, dim=chain_dim):
            guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        drawn = {n: guide_trace.nodes[n]["value"].detach() for n in missing if n in guide_trace.nodes}
        fixed.update(drawn)
        per_row = bool(drawn)
        missing = [n for n in missing if n not in drawn]
    if missing:
        raise shared.missing_latents_error(missing)
    value = node["value"].detach()
    transform = biject_to(node["fn"].support)
    if k is None:
        return _site_density(model, site, args, kwargs, node, fixed, transform, c, depth)
    if per_row:  # the site's density closes over each row's latents: trace it under the rows plate
        with torch.no_grad(), pyro.plate(_CHAINS, rows, dim=chain_dim):
            trace = poutine.trace(poutine.condition(model, fixed)).get_trace(*args, **kwargs)
        node = trace.nodes[site]
    base = shared.unnormalized_base(site, node["fn"], ExpandedDistribution, Unnormalized, "pyro")
    return _OPS.draws_density(SiteDensity, base, value, transform, c, k, depth)


def _site_density(model, site, args, kwargs, node, fixed, transform, c, depth) -> SiteDensity:
    """Site mode: each chain a copy of the site's value, the whole model's conditional."""
    value = node["value"].detach()
    fn = node["fn"]
    shape = value.shape
    chain_dim = -(depth + 1)
    unconstrained_shape = transform.inv(value).shape
    # left-pad the site's batch dims so the chain dim sits at chain_dim
    pad = depth - (value.dim() - len(fn.event_shape))
    chain_value_shape = (c,) + (1,) * pad + tuple(shape)

    def log_prob(u: torch.Tensor) -> torch.Tensor:
        x, total = _OPS.constrain(transform, u, c)
        data = {**fixed, site: x.reshape(chain_value_shape)}
        try:
            with pyro.plate(_CHAINS, c, dim=chain_dim):
                tr = poutine.trace(poutine.condition(model, data)).get_trace(*args, **kwargs)
        except (RuntimeError, ValueError) as err:  # e.g. a model that does not broadcast over chains
            err.add_note(
                "(ppl_score) the chains run in one call of the model inside a plate over chains left "
                "of its plates, so the model must broadcast over that extra batch dim (as for "
                "vectorized ELBO particles, e.g. index with x[..., i] and let plates set batch dims)"
            )
            raise
        for s in tr.nodes.values():
            if _is_density_site(s):
                lp = scale_and_mask(s["fn"].log_prob(s["value"]), mask=s["mask"])
                total = total + _to_chains(lp, c, depth)
        return total

    layout = shared.site_layout(shape, fn.event_shape)
    return SiteDensity(log_prob, transform, shape, unconstrained_shape, value, c, layout, value.expand(c, *shape))


def langevin(
    model: Callable,
    site: str,
    *args: Any,
    num_samples: int | None = None,
    num_warmup: int = 500,
    num_chains: int = 1,
    num_draws: int | None = None,
    step_size: float = 1e-2,
    adjusted: bool = True,
    init: torch.Tensor | None = None,
    thin: int = 1,
    num_steps: int | None = None,
    guide: Callable | None = None,
    latents: dict | None = None,
    generator: torch.Generator | None = None,
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
        guide / latents: where the latent sites' values come from (a guide draws them once
            per chain, or per point in draws mode: the posterior predictive).
        generator, progress_bar: as in ``ppl_score.torch.langevin.mala``.
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
        TypeError, ValueError: bad arguments or sites (named), or diverged chains (decrease
            ``step_size``; reported before any support check of the model's distributions).
        RuntimeError: under ``torch.inference_mode()`` (the score needs autograd; under
            ``torch.no_grad()`` the result is the same as outside it).

    A MALA run that accepts (almost) nothing warns with its acceptance rate
    (``ppl_score.common.langevin.LowAcceptanceWarning``).
    """
    if sigmas is not None:
        frontend.check_annealed_options(
            num_samples, num_steps, num_warmup=num_warmup, step_size=step_size, adjusted=adjusted, thin=thin
        )
    adjusted = shared.check_adjusted(adjusted)
    plan = shared.check_sampling_run(step_size, num_samples, num_steps, num_warmup, thin)
    dens = site_log_density(
        model, site, *args, num_chains=num_chains, num_draws=num_draws, guide=guide, latents=latents, **kwargs
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
            generator=generator,
            progress_bar=progress_bar,
        )
        return shared.site_samples(dens, out.samples.unsqueeze(0), u0.new_ones(u0.shape[0]))
    sampler = backend.mala if adjusted else backend.ula
    result = sampler(
        dens.log_prob,
        u0,
        plan.step_size,
        plan.num_steps,
        num_warmup=plan.num_warmup,
        thin=plan.thin,
        generator=generator,
        progress_bar=progress_bar,
    )
    return shared.site_samples(dens, result.samples, result.accept_rate)


def potential_fn(
    model: Callable,
    site: str,
    *args: Any,
    num_draws: int | None = None,
    guide: Callable | None = None,
    latents: dict | None = None,
    **kwargs: Any,
) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
    """``params -> -log p(transform(params[site])) - log|det J|``, a scalar: the potential
    energy of one chain's state of the observed ``site`` in unconstrained coordinates (site
    mode: the site's conditional given the rest; draws mode: ``num_draws`` new points) for
    ``pyro.infer.mcmc.NUTS(potential_fn=...)`` / ``HMC``. Latent sites are fixed by
    ``latents`` or one draw of ``guide``. Samples come back unconstrained: map them with
    ``site_log_density(...).transform`` (``nuts`` does this for you)."""
    dens = site_log_density(
        model, site, *args, num_chains=1, num_draws=num_draws, guide=guide, latents=latents, **kwargs
    )
    return _OPS.potential(dens, site)


def nuts(
    model: Callable,
    site: str,
    *args: Any,
    num_samples: int = 500,
    num_warmup: int | None = None,
    num_chains: int = 1,
    num_draws: int | None = None,
    init: torch.Tensor | None = None,
    guide: Callable | None = None,
    latents: dict | None = None,
    kernel_options: dict | None = None,
    progress_bar: bool = False,
    warmup_steps: int | None = None,
    **kwargs: Any,
) -> SiteSamples:
    r"""Pyro's ``NUTS`` on the observed ``site`` through ``potential_fn``.

    Args:
        model, site, \*args, \*\*kwargs, num_chains, num_draws, init, guide, latents: as in
            ``langevin`` (in draws mode NUTS moves a chain's ``num_draws`` points jointly,
            one trajectory on their product density).
        num_samples: draws kept per chain (default 500).
        num_warmup: adaptation steps (default 500); ``warmup_steps``, Pyro's name, is
            accepted instead.
        kernel_options: keyword arguments of ``NUTS`` (e.g. ``target_accept_prob``).
        progress_bar: show Pyro's progress bar.

    Returns:
        ``SiteSamples(samples [num_samples, num_chains, *layout.shape], accept_rate
        [num_chains], layout)``: the layout of ``langevin``; ``accept_rate`` is each chain's
        acceptance rate after warm-up (Pyro's diagnostic: the fraction of transitions that
        moved). Chains run one after another (Pyro's multi-chain MCMC would fork processes).

    Raises:
        TypeError, ValueError: ``num_samples < 1``, ``num_warmup < 0``, ``num_chains < 1``,
            both ``num_warmup`` and ``warmup_steps``, or a bad site / ``init`` (named).
        RuntimeError: under ``torch.inference_mode()`` (NUTS needs autograd; under
            ``torch.no_grad()`` grad is switched back on and the draws are the same).
    """
    from pyro.infer.mcmc import MCMC, NUTS

    if num_warmup is not None and warmup_steps is not None:
        raise ValueError("pass one of 'num_warmup' and 'warmup_steps' (Pyro's name for it), not both")
    num_warmup = warmup_steps if warmup_steps is not None else (500 if num_warmup is None else num_warmup)
    num_samples, num_warmup = shared.check_nuts_run(
        num_samples, num_warmup, "warmup_steps" if warmup_steps is not None else "num_warmup"
    )
    if torch.is_inference_mode_enabled():
        raise inference_mode_error("nuts", "the gradient of the potential")
    c = shared.check_num_chains(num_chains)
    dens = site_log_density(
        model, site, *args, num_chains=1, num_draws=num_draws, guide=guide, latents=latents, **kwargs
    )
    u0 = dens.init_unconstrained(init, num_chains=c)
    pot = _OPS.potential(dens, site)

    class Kernel(NUTS):
        """``NUTS`` keeping its last diagnostics (MCMC reads them before the kernel resets)."""

        def diagnostics(self):
            self.last_diagnostics = super().diagnostics()
            return self.last_diagnostics

    draws, rates = [], []
    for start in u0:
        kernel = Kernel(potential_fn=pot, **(kernel_options or {}))
        mcmc = MCMC(
            kernel,
            num_samples=num_samples,
            warmup_steps=num_warmup,
            initial_params={site: start},
            disable_progbar=not progress_bar,
        )
        with torch.enable_grad():  # the same draws under torch.no_grad(): NUTS needs the potential's gradient
            mcmc.run()
        draws.append(mcmc.get_samples()[site].detach())
        rates.append(float(kernel.last_diagnostics["acceptance rate"]))
    u = torch.stack(draws, dim=1)  # [S, C, *layout.shape] unconstrained
    samples = dens.transform(u)
    return SiteSamples(samples, torch.tensor(rates, dtype=samples.dtype), dens.layout)
