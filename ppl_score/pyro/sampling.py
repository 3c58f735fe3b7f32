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
``[num_samples, num_chains, *layout.shape]``; ``layout`` (``ppl_score.langevin.SiteLayout``)
says what the dims are.

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

from typing import Any, Callable, NamedTuple

import pyro
import pyro.poutine as poutine
import torch
from pyro.distributions import ExpandedDistribution
from pyro.distributions.util import scale_and_mask
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import site_is_subsample
from torch.distributions import biject_to

from .. import langevin as shared
from .distributions import Unnormalized
from ..torch import langevin as backend
from ..validation import inference_mode_error

__all__ = ["SiteDensity", "SiteSamples", "site_log_density", "langevin", "potential_fn", "nuts"]

_CHAINS = "_ppl_score_chains"


class SiteDensity(NamedTuple):
    """A site's log density in unconstrained coordinates, over a batch of independent rows.

    ``log_prob(u[num_rows, *unconstrained_shape]) -> [num_rows]``: the log density (up to a
    constant) at ``transform(u)``, plus ``log |det d transform / du|``. A row is one chain's
    copy of the site (site mode, ``num_rows = num_chains``) or one new point (draws mode,
    ``num_rows = num_chains * num_draws``); ``layout`` says how rows make up the chains.
    """

    log_prob: Callable[[torch.Tensor], torch.Tensor]
    transform: Any  # torch.distributions.Transform, unconstrained -> site support
    shape: torch.Size  # one row's value shape (site mode: the site's value shape)
    unconstrained_shape: torch.Size  # one row's unconstrained shape
    value: torch.Tensor  # the site's traced (observed) value
    num_chains: int
    layout: shared.SiteLayout
    start: torch.Tensor  # the default start, [num_chains, *layout.shape], in the support

    @property
    def num_rows(self) -> int:
        return self.num_chains * (self.layout.num_draws or 1)

    def init_unconstrained(self, init, num_chains: int | None = None) -> torch.Tensor:
        """Chains' start ``[C, *layout.shape]`` mapped to unconstrained space (one chain's
        rows: ``[C, *unconstrained_shape]`` in site mode, ``[C, num_draws,
        *unconstrained_shape]`` in draws mode).

        Args:
            init: constrained values that broadcast to ``[C, *layout.shape]`` (one chain's
                state, one point, or every chain's); ``None``: ``start`` (the observed value
                in site mode, observed points cycled in draws mode).
            num_chains: ``C`` (default: ``self.num_chains``).

        Raises:
            TypeError: ``init`` is not a tensor.
            ValueError: it does not broadcast, or lies outside the site's support.
        """
        c = self.num_chains if num_chains is None else num_chains
        target = (c, *self.layout.shape)
        if init is None:
            init = self.start[:1] if c != self.num_chains else self.start
        if not isinstance(init, torch.Tensor):
            raise TypeError(f"argument 'init' must be a torch.Tensor, got {type(init).__name__}")
        shared.check_init_shape(tuple(init.shape), target)
        init = init.detach().to(self.value.dtype).expand(target)
        u = self.transform.inv(init)
        if not (bool(self.transform.codomain.check(init).all()) and bool(torch.isfinite(u).all())):
            raise ValueError("argument 'init' lies outside the site's support")
        return u.clone()


class SiteSamples(NamedTuple):
    """The draws of ``langevin`` and ``nuts``.

    Attributes:
        samples: ``[num_samples, num_chains, *layout.shape]``, in the site's support.
        accept_rate: mean acceptance probability, ``[num_chains]``; Langevin in draws mode:
            ``[num_chains, num_draws]`` (each point is its own Metropolis chain).
        layout: what the dims of ``samples`` mean (``ppl_score.langevin.SiteLayout``).
    """

    samples: torch.Tensor
    accept_rate: torch.Tensor
    layout: shared.SiteLayout


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
    num_draws: int | None = None,
    guide=None,
    latents: dict | None = None,
    **kwargs,
) -> SiteDensity:
    """The log density of the observed ``site`` of ``model(*args, **kwargs)`` in
    unconstrained coordinates, vectorized over rows (see the module doc).

    Args:
        model, site, *args, **kwargs: the model, its observed site, and its arguments.
        num_chains: independent chains.
        num_draws: ``None`` (site mode): each chain is a copy of the site's value, sampled
            from its conditional given every other site. An int (draws mode, an
            ``Unnormalized`` site): each chain holds ``num_draws`` new points drawn i.i.d.
            from the site's own density given its parents (children and factors of the
            site, which condition on the observed points, are left out).
        guide: draws each row's latent values once (under a plate over rows).
        latents: values of the model's latent sites, shared by all rows.

    Returns:
        A ``SiteDensity``.

    Raises:
        TypeError, ValueError: a bad argument or site (named), a latent site given by
            neither ``guide`` nor ``latents``, or ``num_draws`` on a site that is not
            ``Unnormalized``.
    """
    if not callable(model):
        raise TypeError(f"argument 'model' must be callable, got {type(model).__name__}")
    c = shared.check_num_chains(num_chains)
    k = shared.check_num_draws(num_draws)
    rows = c * (k or 1)
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
    per_row = False
    if guide is not None and missing:
        with torch.no_grad(), pyro.plate(_CHAINS, rows, dim=chain_dim):
            guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        drawn = {n: guide_trace.nodes[n]["value"].detach() for n in missing if n in guide_trace.nodes}
        fixed.update(drawn)
        per_row = bool(drawn)
        missing = [n for n in missing if n not in drawn]
    if missing:
        raise ValueError(
            f"latent site(s) {missing} of the model have no value: pass 'guide' (a fitted guide) "
            "or 'latents' (a dict of values)"
        )
    value = node["value"].detach()
    transform = biject_to(node["fn"].support)
    if k is None:
        return _site_density(model, site, args, kwargs, node, fixed, transform, c, depth)
    if per_row:  # the site's density closes over each row's latents: trace it under the rows plate
        with torch.no_grad(), pyro.plate(_CHAINS, rows, dim=chain_dim):
            trace = poutine.trace(poutine.condition(model, fixed)).get_trace(*args, **kwargs)
        node = trace.nodes[site]
    return _draws_density(site, node, value, transform, c, k, depth)


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
        if u.shape[0] != c:
            raise ValueError(f"expected {c} chains (the leading dim of u), got shape {tuple(u.shape)}")
        x = transform(u)
        logdet = transform.log_abs_det_jacobian(u, x)
        total = logdet.reshape(c, -1).sum(-1) if logdet.dim() else logdet.expand(c)
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


def _unnormalized(site: str, fn) -> Unnormalized:
    base = fn
    while isinstance(base, ExpandedDistribution):
        base = base.base_dist
    if not isinstance(base, Unnormalized):
        raise shared.draws_site_error(site, fn, "pyro")
    return base


def _draws_density(site, node, value, transform, c, k, depth) -> SiteDensity:
    """Draws mode: ``c * k`` rows, each one new point from the site's own density."""
    base = _unnormalized(site, node["fn"])
    rows = c * k
    event = tuple(base.event_shape)
    uevent = tuple(transform.inv(value).shape[value.dim() - len(event) :])
    if base.batched:  # the parameters' batch dims: probe at one point per row
        with torch.no_grad():
            probe = transform(value.new_zeros((rows, *(1,) * depth, *uevent)))
            pb = shared.draw_param_batch(base.log_density(probe).shape, depth)
    else:
        pb = (1,) * depth
    point_shape = (*pb, *event)
    upoint_shape = (*pb, *uevent)
    layout = shared.draws_layout(k, _strip_ones(pb), event)

    def log_prob(u: torch.Tensor) -> torch.Tensor:
        n = u.shape[0]
        ur = u.reshape(n, *upoint_shape)
        x = transform(ur)
        logdet = transform.log_abs_det_jacobian(ur, x)
        total = logdet.reshape(n, -1).sum(-1) if logdet.dim() else logdet.expand(n)
        lp = base.log_density(x)
        return total + lp.reshape(n, -1).sum(-1)

    start = _draws_start(value, depth, pb, event, rows, transform, uevent).reshape(c, *layout.shape)
    return SiteDensity(log_prob, transform, torch.Size(layout.draw_shape),
                       torch.Size((*_strip_ones(pb), *uevent)), value, c, layout, start)


def _strip_ones(pb) -> tuple:
    pb = tuple(pb)
    while pb and pb[0] == 1:
        pb = pb[1:]
    return pb


def _draws_start(value, depth, pb, event, rows, transform, uevent) -> torch.Tensor:
    """Observed points as starts: cycled (one point per draw), or the first point of each
    parameter group (batched density); where they do not fit, ``transform(0)``."""
    nb = value.dim() - len(event)
    try:
        if all(p == 1 for p in pb):
            points = value.reshape(-1, *event)
            idx = torch.arange(rows) % points.shape[0]
            return points[idx].reshape(rows, *pb, *event)
        v = value.reshape((1,) * (depth - nb) + tuple(value.shape))
        for i, p in enumerate(pb):
            if p == 1:
                v = v.narrow(i, 0, 1)
        return v.expand(rows, *pb, *event).clone()
    except RuntimeError:
        return transform(value.new_zeros((rows, *pb, *uevent)))


def langevin(
    model,
    site: str,
    *args,
    num_samples: int | None = None,
    num_warmup: int = 500,
    num_chains: int = 1,
    num_draws: int | None = None,
    step_size: float = 1e-2,
    adjusted: bool = True,
    init: torch.Tensor | None = None,
    thin: int = 1,
    num_steps: int | None = None,
    guide=None,
    latents: dict | None = None,
    generator: torch.Generator | None = None,
    progress_bar: bool = False,
    **kwargs,
) -> SiteSamples:
    """Langevin chains (MALA, or ULA with ``adjusted=False``) on the observed ``site`` of a
    fitted ``model(*args, **kwargs)`` (see the module doc).

    Args:
        model, site, *args, **kwargs: the model, the observed site to sample, and the model's
            arguments (they fix the site's shape and the other sites' values).
        num_samples: states kept per chain (default 1000): every ``thin``-th of
            ``num_samples * thin`` steps after the warm-up.
        num_warmup: steps run first and discarded (default 500).
        num_chains: independent chains.
        num_draws: ``None``: each chain is a copy of the site's value, sampled from its
            conditional given every other site. An int (an ``Unnormalized`` site): each chain
            holds ``num_draws`` new points, i.i.d. from the site's own density given its
            parents (its children and factors are left out); each point is its own
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

    Returns:
        ``SiteSamples(samples [num_samples, num_chains, *layout.shape], accept_rate, layout)``.

    Raises:
        TypeError, ValueError: bad arguments or sites (named), or diverged chains (decrease
            ``step_size``; reported before any support check of the model's distributions).
        RuntimeError: under ``torch.inference_mode()`` (the score needs autograd; under
            ``torch.no_grad()`` the result is the same as outside it).

    A MALA run that accepts (almost) nothing warns with its acceptance rate
    (``ppl_score.langevin.LowAcceptanceWarning``).
    """
    adjusted = shared.check_adjusted(adjusted)
    plan = shared.check_sampling_run(step_size, num_samples, num_steps, num_warmup, thin)
    dens = site_log_density(model, site, *args, num_chains=num_chains, num_draws=num_draws, guide=guide,
                            latents=latents, **kwargs)
    u0 = dens.init_unconstrained(init).reshape(dens.num_rows, *dens.unconstrained_shape)
    sampler = backend.mala if adjusted else backend.ula
    result = sampler(dens.log_prob, u0, plan.step_size, plan.num_steps, num_warmup=plan.num_warmup,
                     thin=plan.thin, generator=generator, progress_bar=progress_bar)
    return _result(dens, result.samples, result.accept_rate)


def _result(dens: SiteDensity, u: torch.Tensor, accept_rate: torch.Tensor) -> SiteSamples:
    """Rows back to ``[S, C, *layout.shape]`` in the support."""
    c, layout = dens.num_chains, dens.layout
    samples = dens.transform(u).reshape(u.shape[0], c, *layout.shape)
    accept_rate = accept_rate.reshape(c, -1) if layout.mode == "draws" else accept_rate.reshape(c)
    return SiteSamples(samples, accept_rate, layout)


def potential_fn(model, site: str, *args, num_draws: int | None = None, guide=None, latents: dict | None = None,
                 **kwargs):
    """``params -> -log p(transform(params[site])) - log|det J|``, a scalar: the potential
    energy of one chain's state of the observed ``site`` in unconstrained coordinates (site
    mode: the site's conditional given the rest; draws mode: ``num_draws`` new points) for
    ``pyro.infer.mcmc.NUTS(potential_fn=...)`` / ``HMC``. Latent sites are fixed by
    ``latents`` or one draw of ``guide``. Samples come back unconstrained: map them with
    ``site_log_density(...).transform`` (``nuts`` does this for you)."""
    dens = site_log_density(model, site, *args, num_chains=1, num_draws=num_draws, guide=guide, latents=latents,
                            **kwargs)
    return _potential(dens, site)


def _potential(dens: SiteDensity, site: str):
    def potential(params: dict) -> torch.Tensor:
        return -dens.log_prob(params[site].reshape(dens.num_rows, *dens.unconstrained_shape)).sum()

    return potential


def nuts(
    model,
    site: str,
    *args,
    num_samples: int = 500,
    num_warmup: int | None = None,
    num_chains: int = 1,
    num_draws: int | None = None,
    init: torch.Tensor | None = None,
    guide=None,
    latents: dict | None = None,
    kernel_options: dict | None = None,
    progress_bar: bool = False,
    warmup_steps: int | None = None,
    **kwargs,
) -> SiteSamples:
    """Pyro's ``NUTS`` on the observed ``site`` through ``potential_fn``.

    Args:
        model, site, *args, **kwargs, num_chains, num_draws, init, guide, latents: as in
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
    dens = site_log_density(model, site, *args, num_chains=1, num_draws=num_draws, guide=guide, latents=latents,
                            **kwargs)
    u0 = dens.init_unconstrained(init, num_chains=c)
    pot = _potential(dens, site)
    class Kernel(NUTS):
        """``NUTS`` keeping its last diagnostics (MCMC reads them before the kernel resets)."""

        def diagnostics(self):
            self.last_diagnostics = super().diagnostics()
            return self.last_diagnostics

    draws, rates = [], []
    for start in u0:
        kernel = Kernel(potential_fn=pot, **(kernel_options or {}))
        mcmc = MCMC(kernel, num_samples=num_samples, warmup_steps=num_warmup,
                    initial_params={site: start}, disable_progbar=not progress_bar)
        with torch.enable_grad():  # the same draws under torch.no_grad(): NUTS needs the potential's gradient
            mcmc.run()
        draws.append(mcmc.get_samples()[site].detach())
        rates.append(float(kernel.last_diagnostics["acceptance rate"]))
    u = torch.stack(draws, dim=1)  # [S, C, *layout.shape] unconstrained
    samples = dens.transform(u)
    return SiteSamples(samples, torch.tensor(rates, dtype=samples.dtype), dens.layout)
