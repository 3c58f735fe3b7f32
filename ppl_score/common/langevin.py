"""Langevin samplers: the math, and the argument checks shared by both backends and both
front ends; the layout of a sampled site (``SiteLayout``) and the shape contract of
``Unnormalized``'s two forms, shared by the Pyro and NumPyro front ends, with what their
sampling and ``Unnormalized`` do alike written once over an array namespace ``xp``
(``SiteOps``, ``SiteDensity``, ``SiteSamples``, ``UnnormalizedOps``: each front end
subclasses the ops with its library). Imports neither torch nor JAX.

With ``l(x) = log p(x) + const`` and its score ``s(x) = grad_x l(x)``, one step of size
``h`` (the Euler-Maruyama discretization of ``dX = s(X) dt + sqrt(2) dW``) proposes

    x' = x + h s(x) + sqrt(2 h) z,    z ~ N(0, I).

- **ULA** (unadjusted Langevin) accepts every proposal. Its stationary law is biased,
  by O(h) (for a Gaussian ``N(mu, S)`` with precision ``P``: ``N(mu, S (I - h P / 2)^{-1})``),
  and it needs only the score, so it also runs on a score network.
- **MALA** (Metropolis-adjusted Langevin; Roberts & Tweedie 1996) accepts ``x'`` with
  probability ``min(1, exp(l(x') - l(x) + log q(x | x') - log q(x' | x)))``, where
  ``log q(b | a) = -||b - a - h s(a)||^2 / (4 h) + const``; its stationary law is ``p``
  exactly, for every ``h``.

Chains run in parallel: ``x`` has shape ``[C, *event]`` and ``fn(x) -> [C]``. Each row of
``fn``'s output must depend only on the same row of ``x`` (the chains are independent),
so one gradient of ``fn(x).sum()`` gives every chain's score.

Faults, the same in both backends and front ends: a non-finite density or score at the
start, or chains that diverge (ULA with too large a step), are a ``ValueError`` that says to
decrease ``step_size`` (in Pyro before any support check of the model can fire); a MALA run
whose mean acceptance rate is below ``LOW_ACCEPTANCE`` returns (nearly) its initial state and
warns with the rate (``LowAcceptanceWarning``, a ``RuntimeWarning``). The torch samplers
switch grad on for the derivatives in ``x``, so ``torch.no_grad()`` changes nothing, and
raise ``RuntimeError`` under ``torch.inference_mode()``, where grad cannot be switched on.
"""

from __future__ import annotations

import abc
import contextlib
import math
import warnings
from typing import Any, NamedTuple, Sequence

import numpy as np

from . import frontend, objectives
from .validate import check_int, check_positive_float

__all__ = [
    "KINDS",
    "AnnealedPlan",
    "check_annealed",
    "Plan",
    "check_plan",
    "check_step_size",
    "check_kind",
    "check_adjusted",
    "check_chains_shape",
    "check_num_chains",
    "divergence_error",
    "init_error",
    "LowAcceptanceWarning",
    "LOW_ACCEPTANCE",
    "warn_low_acceptance",
    "check_nuts_run",
    "SiteLayout",
    "site_layout",
    "draws_layout",
    "check_sampling_run",
    "check_num_draws",
    "check_vectorize",
    "check_init_shape",
    "draws_site_error",
    "draw_param_batch",
    "VECTORIZE",
    "BATCHED_HINT",
    "unnormalized_log_prob_shape",
    "check_expand",
    "check_rows_output",
    "check_batched_output",
    "UnnormalizedOps",
    "SiteDensity",
    "SiteSamples",
    "SiteOps",
    "check_site_args",
    "check_rows",
    "check_sample_site",
    "missing_latents_error",
    "unnormalized_base",
    "strip_leading_ones",
    "site_samples",
]

KINDS = ("log_prob", "score")

# MALA whose mean acceptance rate (over chains and kept steps) is below this barely moves:
# ``warn_low_acceptance`` says so with the rate.
LOW_ACCEPTANCE = 0.01


class AnnealedPlan(NamedTuple):
    """A validated annealed Langevin run (Song & Ermon 2019, Algorithm 1): ``n_steps_each``
    ULA steps at each level ``sigma_i`` of ``sigmas`` (largest first) with step size
    ``h_i = step_lr * sigma_i^2 / sigma_L^2``, then, with ``denoise``, one Tweedie step
    ``x <- x + sigma_L^2 s(x, sigma_L)`` (Jolicoeur-Martineau et al. 2021; Song & Ermon 2020)."""

    sigmas: tuple
    step_sizes: tuple
    n_steps_each: int
    denoise: bool


def check_annealed(sigmas: Any, n_steps_each: Any, step_lr: Any, denoise: Any) -> AnnealedPlan:
    """Validate annealed Langevin's arguments and compute its step sizes."""
    levels = objectives.check_sigmas(sigmas, what="argument")
    n = check_int("n_steps_each", n_steps_each, low=1)
    lr = check_positive_float("step_lr", step_lr)
    if not isinstance(denoise, bool):
        raise TypeError(f"argument 'denoise' must be a bool, got {type(denoise).__name__}")
    last = levels[-1]
    return AnnealedPlan(levels, tuple(lr * (s / last) ** 2 for s in levels), n, denoise)


class LowAcceptanceWarning(RuntimeWarning):
    """MALA accepted (almost) no proposal: the returned chains barely left their start."""


class Plan(NamedTuple):
    """A validated run: ``num_warmup`` discarded steps, then ``num_steps`` steps of which
    every ``thin``-th state is kept (``num_samples = num_steps // thin`` states)."""

    step_size: float
    num_steps: int
    num_warmup: int
    thin: int

    @property
    def num_samples(self) -> int:
        return self.num_steps // self.thin


def check_step_size(step_size: Any) -> float:
    return check_positive_float("step_size", step_size)


def check_plan(step_size: Any, num_steps: Any, num_warmup: Any = 0, thin: Any = 1) -> Plan:
    """Validate the run length arguments; ``num_steps`` must be a multiple of ``thin`` so
    that no step is run and silently dropped."""
    plan = Plan(
        step_size=check_step_size(step_size),
        num_steps=check_int("num_steps", num_steps, low=1),
        num_warmup=check_int("num_warmup", num_warmup, low=0),
        thin=check_int("thin", thin, low=1),
    )
    if plan.num_steps % plan.thin:
        raise ValueError(f"argument 'num_steps'={plan.num_steps} must be a multiple of argument 'thin'={plan.thin}")
    return plan


def check_kind(kind: Any, adjusted: bool) -> str:
    if not isinstance(kind, str):
        raise TypeError(f"argument 'kind' must be a string, got {type(kind).__name__}")
    if kind not in KINDS:
        raise ValueError(f"argument 'kind' must be one of {KINDS}, got {kind!r}")
    if adjusted and kind != "log_prob":
        raise ValueError(
            "argument 'kind'='score' needs the unadjusted sampler (ULA): the Metropolis "
            "correction of MALA evaluates the log density, which a score network does not give"
        )
    return kind


def check_chains_shape(shape: tuple, name: str = "x0") -> None:
    """``[C, *event]`` with ``C >= 1``."""
    shape = tuple(shape)
    if len(shape) < 1:
        raise ValueError(f"argument {name!r} must have shape [C, *event] with a chain dimension, got a scalar")
    if shape[0] < 1:
        raise ValueError(f"argument {name!r} must hold at least one chain, got shape {shape}")


def check_num_chains(num_chains: Any) -> int:
    return check_int("num_chains", num_chains, low=1)


def check_adjusted(adjusted: Any) -> bool:
    if not isinstance(adjusted, bool):
        raise TypeError(f"argument 'adjusted' must be a bool, got {type(adjusted).__name__}")
    return adjusted


def divergence_error(step_size: float, adjusted: bool) -> ValueError:
    """The error for a run whose states became non-finite."""
    if adjusted:
        hint = "the log density or its score is non-finite at the chains' states"
    else:
        hint = "ULA diverged (its step is unstable when step_size exceeds ~2 / largest curvature)"
    return ValueError(
        f"Langevin chains reached non-finite values with step_size={step_size:g}: {hint}; decrease 'step_size'"
    )


def init_error(name: str = "x0") -> ValueError:
    return ValueError(
        f"the log density or its score is non-finite at argument {name!r}; start the chains where the density is positive"
    )


def warn_low_acceptance(accept_rate: float, min_rate: float, step_size: float, stacklevel: int = 4) -> None:
    """Warn (``LowAcceptanceWarning``) when MALA's mean acceptance rate is below
    ``LOW_ACCEPTANCE``: the samples are then (nearly) the initial state repeated."""
    if accept_rate < LOW_ACCEPTANCE:
        warnings.warn(
            f"MALA accepted almost no proposal: mean acceptance rate {accept_rate:.3g} (lowest chain "
            f"{min_rate:.3g}) with step_size={step_size:g}; the chains barely moved from their start. "
            "Decrease 'step_size' (a rate near 0.57 is optimal in high dimension)",
            LowAcceptanceWarning,
            stacklevel=stacklevel,
        )


def check_nuts_run(num_samples: Any, num_warmup: Any, warmup_name: str = "num_warmup") -> tuple[int, int]:
    """``num_samples >= 1`` draws after ``num_warmup >= 0`` warmup steps (the NUTS helpers)."""
    return check_int("num_samples", num_samples, low=1), check_int(warmup_name, num_warmup, low=0)


# ---------------------------------------------------------------------------------------
# Sampling a site of a fitted model (``ppl_score.{pyro,numpyro}.mcmc``)
# ---------------------------------------------------------------------------------------

# How ``ppl_score.numpyro.mcmc`` batches chains: ``"plate"`` runs the model once for
# all chains inside a plate left of its plates (as Pyro does), ``"vmap"`` maps one chain's
# model over the chains (for models that do not broadcast over an extra batch dim).
VECTORIZE = ("plate", "vmap")


class SiteLayout(NamedTuple):
    """What the dims of ``SiteSamples.samples [num_samples, num_chains, *shape]`` mean.

    - ``mode="site"``: each chain's state is a copy of the observed site's value
      (``shape`` = the site's value shape, ``[*batch, *event]``), sampled from its
      conditional given every other site (children and factors included).
    - ``mode="draws"``: each chain holds ``num_draws`` new points of the site,
      ``shape = (num_draws, *draw_shape)``: i.i.d. draws from the site's own
      distribution given its parents, ``draw_shape = (*param_batch, *event)`` where
      ``param_batch`` is the batch shape the density's parameters carry (``()`` for a
      row-wise ``Unnormalized`` density: one point per draw).

    Attributes:
        mode: ``"site"`` or ``"draws"``.
        shape: one chain's state shape.
        event_shape: the site's event shape (the trailing dims of ``shape``).
        num_draws: draws per chain (``None`` in site mode).
    """

    mode: str
    shape: tuple
    event_shape: tuple
    num_draws: int | None = None

    @property
    def draw_shape(self) -> tuple:
        """One point's shape: ``shape`` without the draws dim (site mode: the whole ``shape``)."""
        return self.shape[1:] if self.mode == "draws" else self.shape


def site_layout(shape: Sequence[int], event_shape: Sequence[int]) -> SiteLayout:
    """The layout of site mode: every chain is a copy of the site's value ``[*shape]``."""
    return SiteLayout("site", tuple(shape), tuple(event_shape), None)


def draws_layout(num_draws: int, param_batch: Sequence[int], event_shape: Sequence[int]) -> SiteLayout:
    """The layout of draws mode: ``num_draws`` points ``[*param_batch, *event_shape]``."""
    return SiteLayout("draws", (num_draws, *tuple(param_batch), *tuple(event_shape)), tuple(event_shape), num_draws)


def check_init_shape(init_shape: Sequence[int], target: Sequence[int]) -> None:
    """``init`` must broadcast to ``target = [num_chains, *layout.shape]``.

    Raises:
        ValueError: it does not, naming ``init`` and the accepted shapes.
    """
    if _broadcast(init_shape, target) != tuple(target):
        raise ValueError(
            f"argument 'init' must broadcast to [num_chains, *shape] = {tuple(target)} (e.g. one "
            f"chain's state {tuple(target[1:])}, or one point), got {tuple(init_shape)}"
        )


def draws_site_error(site: str, fn: Any, frontend: str) -> ValueError:
    """``num_draws`` on a site whose distribution ``fn`` is not ``Unnormalized``."""
    name, inner = type(fn).__name__, getattr(fn, "base_dist", None)
    while inner is not None:
        name += f"({type(inner).__name__}"
        inner = getattr(inner, "base_dist", None)
    name += ")" * name.count("(")
    return ValueError(
        f"argument 'num_draws' draws new points of an Unnormalized site; site {site!r} has distribution {name}: "
        f"draw its new points exactly (e.g. {'pyro.infer' if frontend == 'pyro' else 'numpyro.infer'}"
        ".Predictive), or sample the observed site's conditional without 'num_draws'"
    )


def draw_param_batch(out_shape: Sequence[int], depth: int) -> tuple:
    """The batch dims of one new point of a batched ``Unnormalized`` density: the output of
    ``log_density`` at ``x[R, 1, ..., 1, *event]`` (``depth`` ones) is ``[R, *pb]``; returns
    ``pb`` padded to ``depth`` dims.

    Raises:
        ValueError: the output has more dims than the model's plates.
    """
    out_shape = tuple(out_shape)
    if len(out_shape) != depth + 1:
        raise ValueError(
            f"the Unnormalized density's output {out_shape} at points of shape [R, *{(1,) * depth}, "
            f"*event] has more batch dims than the model's plates ({depth}): its parameters carry "
            "dims no plate declares"
        )
    return out_shape[1:]


def check_num_draws(num_draws: Any) -> int | None:
    """``None`` (site mode) or a positive int (draws mode)."""
    return None if num_draws is None else check_int("num_draws", num_draws, low=1)


def check_vectorize(vectorize: Any) -> str:
    if not isinstance(vectorize, str):
        raise TypeError(f"argument 'vectorize' must be a string, got {type(vectorize).__name__}")
    if vectorize not in VECTORIZE:
        raise ValueError(f"argument 'vectorize' must be one of {VECTORIZE}, got {vectorize!r}")
    return vectorize


def check_sampling_run(step_size: Any, num_samples: Any, num_steps: Any, num_warmup: Any, thin: Any) -> Plan:
    """The run of a front end's ``langevin``: ``num_samples`` kept states per chain (every
    ``thin``-th of ``num_samples * thin`` steps after ``num_warmup`` warm-up steps), or,
    alternatively, ``num_steps`` steps after warm-up (a multiple of ``thin``).

    Raises:
        TypeError, ValueError: a bad value (named), or both ``num_samples`` and ``num_steps``.
    """
    if num_samples is not None and num_steps is not None:
        raise ValueError(
            "pass one of 'num_samples' (kept states per chain) and 'num_steps' (steps after "
            "warm-up, a multiple of 'thin'), not both"
        )
    thin = check_int("thin", thin, low=1)
    if num_steps is None:
        num_steps = check_int("num_samples", 1000 if num_samples is None else num_samples, low=1) * thin
    return check_plan(step_size, num_steps, num_warmup, thin)


# ---------------------------------------------------------------------------------------
# ``Unnormalized``: the two forms of ``log_density_fn`` (shared by both front ends)
# ---------------------------------------------------------------------------------------

BATCHED_HINT = (
    "if the density's parameters carry batch dims (a plate, or the chains of a sampler whose "
    "latents come from a guide), build it with Unnormalized(..., batched=True): log_density_fn "
    "then gets x[*batch, *event_shape] unflattened and returns [*batch]"
)


def _broadcast(*shapes) -> tuple | None:
    try:
        return tuple(np.broadcast_shapes(*(tuple(int(d) for d in s) for s in shapes)))
    except ValueError:
        return None


def check_expand(batch_shape: Sequence[int], new_batch_shape: Any) -> tuple:
    """``Unnormalized.expand``: ``new_batch_shape`` must broadcast from ``batch_shape``.

    Raises:
        ValueError: it does not (a dim of size > 1 changed, or dims dropped).
    """
    new = frontend.check_batch_shape(new_batch_shape)
    if _broadcast(batch_shape, new) != new:
        raise ValueError(f"Unnormalized.expand: batch_shape {tuple(batch_shape)} cannot be expanded to {new}")
    return new


def unnormalized_log_prob_shape(lead: Sequence[int], batch_shape: Sequence[int], event_shape: Sequence[int]) -> tuple:
    """The shape of ``log_prob(value)`` for a value with leading shape ``lead``: ``lead``
    broadcast with ``batch_shape``, as for every distribution.

    Raises:
        ValueError: ``lead`` does not broadcast with ``batch_shape``.
    """
    out = _broadcast(lead, batch_shape)
    if out is None:
        raise ValueError(
            f"Unnormalized.log_prob: the value's shape {(*tuple(lead), *tuple(event_shape))} does not "
            f"broadcast with [*batch_shape, *event_shape] = {(*tuple(batch_shape), *tuple(event_shape))}"
        )
    return out


def check_rows_output(out_shape: Sequence[int], n: int) -> None:
    """The row form: ``log_density_fn(x[n, *event]) -> [n]``.

    Raises:
        ValueError: another shape, naming ``log_density_fn`` (with the ``batched=True`` hint).
    """
    if tuple(out_shape) != (n,):
        raise ValueError(
            f"argument 'log_density_fn' must map x of shape [n, *event_shape] to [n] (one log density "
            f"per row), expected {(n,)}, got {tuple(out_shape)}; {BATCHED_HINT}"
        )


def check_batched_output(out_shape: Sequence[int], lead: Sequence[int], expected: Sequence[int]) -> None:
    """The batched form: ``log_density_fn(x[*lead, *event])`` returns one value per point,
    shaped as ``lead`` broadcast with the parameters' batch dims; it must keep every dim of
    ``lead`` (no reduction over points) and broadcast to ``expected`` (``lead`` broadcast
    with the distribution's ``batch_shape``).

    Raises:
        ValueError: an output that drops or reduces a dim of ``lead``, or has dims beyond
            ``expected`` (parameters whose batch dims the distribution does not declare:
            pass ``batch_shape`` or observe it under the matching plates).
    """
    out_shape, lead, expected = tuple(out_shape), tuple(lead), tuple(expected)
    if (
        len(out_shape) < len(lead)
        or _broadcast(out_shape, lead) != out_shape
        or _broadcast(out_shape, expected) != expected
    ):
        raise ValueError(
            "argument 'log_density_fn' (batched=True) must map x of shape [*batch, *event_shape] to "
            f"[*batch] (one log density per point, broadcast with its parameters' batch dims): x had "
            f"batch dims {lead}, the distribution's batch_shape gives {expected}, got {out_shape}. "
            "Do not sum over points, and give the distribution a batch_shape (or plates) covering "
            "the parameters' batch dims"
        )


class UnnormalizedOps:
    """``Unnormalized``'s evaluation of ``log_density_fn`` in either form, written once over an
    array namespace ``xp`` (``torch`` or ``jax.numpy``); a front end subclasses it with its
    namespace, the errors a row-form ``log_density_fn`` raises when its parameters' batch dims
    meet the ``n`` rows (``call_errors``: they get ``BATCHED_HINT`` as a note), and a check of
    the batched form's output type (``check_output``)."""

    xp: Any = None
    call_errors: tuple = ()

    def check_output(self, out: Any) -> None:
        """The batched form's output is an array of the front end's library (default: any)."""

    def evaluate(
        self,
        log_density_fn: Any,
        batched: bool,
        event_shape: Sequence[int],
        value: Any,
        lead: Sequence[int],
        expected: Sequence[int] | None,
    ) -> Any:
        """``log_density_fn`` at ``value [*lead, *event_shape]``: shape ``expected`` (``lead``
        broadcast with the batch shape, from ``unnormalized_log_prob_shape``), or, with
        ``expected=None`` (new points), ``lead`` (row form) / ``lead`` broadcast with the
        parameters' batch dims (batched form).

        Raises:
            ValueError: ``log_density_fn`` returns the wrong shape for its form
                (``check_rows_output``, ``check_batched_output``).
        """
        if batched:
            out = log_density_fn(value)
            self.check_output(out)
            out_shape = tuple(getattr(out, "shape", ()))
            check_batched_output(out_shape, lead, out_shape if expected is None else expected)
            if expected is None:
                return out
        else:
            n = math.prod(lead)
            try:
                out = log_density_fn(self.xp.reshape(value, (n, *tuple(event_shape))))
            except self.call_errors as err:  # e.g. parameters with batch dims meeting the n rows
                err.add_note(f"(ppl_score) {BATCHED_HINT}")
                raise
            check_rows_output(getattr(out, "shape", ()), n)
            out = out.reshape(lead)
            if expected is None:
                return out
        return self.xp.broadcast_to(out, expected) if tuple(out.shape) != tuple(expected) else out


# ---------------------------------------------------------------------------------------
# The sampled site's density and draws (``ppl_score.{pyro,numpyro}.mcmc``), written
# once; each front end supplies a ``SiteOps`` for its array library
# ---------------------------------------------------------------------------------------


class SiteOps(abc.ABC):
    """The array operations of a sampled site's density, written once over an array namespace
    ``xp`` (``torch`` or ``jax.numpy``); a front end subclasses it with its namespace and the
    few operations the libraries spell differently (how ``init`` is checked, broadcast and
    tested against the support)."""

    xp: Any = None

    # ---- spelled differently: each front end defines these ----

    @abc.abstractmethod
    def check_init(self, init: Any) -> None:
        """Raise ``TypeError`` (naming ``init``) when it is not an array of the library."""

    @abc.abstractmethod
    def broadcast_init(self, init: Any, like: Any, target: tuple) -> Any:
        """``init`` in ``like``'s dtype, broadcast to ``target`` (no gradient)."""

    @abc.abstractmethod
    def in_support(self, transform: Any, init: Any, u: Any) -> bool:
        """Whether ``init`` lies in ``transform``'s codomain and ``u = transform.inv(init)`` is finite."""

    def fresh(self, u: Any) -> Any:
        """``u`` as an array of its own (not a view of another)."""
        return u

    @abc.abstractmethod
    def zeros(self, like: Any, shape: tuple) -> Any:
        """Zeros of ``shape`` in ``like``'s dtype (and device)."""

    def no_grad(self) -> Any:
        """A context without gradient tracking (where the library tracks it)."""
        return contextlib.nullcontext()

    def size(self, shape: tuple) -> Any:
        """A shape as the library spells one (``torch.Size``, a tuple)."""
        return tuple(shape)

    # errors an observed value raises when it cannot be reshaped to the points it starts
    shape_errors: tuple = ()

    # ---- the same in both ----

    def constrain(self, transform: Any, u: Any, c: int) -> tuple:
        """Site mode: ``u [c, *unconstrained_shape]`` (one row per chain) -> ``(x, log |det J|
        per chain [c])``, ``x = transform(u)``.

        Raises:
            ValueError: ``u`` does not hold ``c`` chains.
        """
        check_rows(u, c)
        x = transform(u)
        return x, self.sum_rows(transform.log_abs_det_jacobian(u, x), c)

    def draws_density(
        self, density_type: type, base: Any, value: Any, transform: Any, c: int, k: int, depth: int
    ) -> "SiteDensity":
        """Draws mode: ``c * k`` rows, each one new point from the ``Unnormalized`` density
        ``base``'s own density (``base.log_density``), as a ``density_type`` (the front end's
        ``SiteDensity``); ``depth`` is the model's plate nesting, ``value`` the observed value."""
        rows = c * k
        event = tuple(base.event_shape)
        uevent = tuple(transform.inv(value).shape[value.ndim - len(event) :])
        if base.batched:  # the parameters' batch dims: probe at one point per row
            with self.no_grad():
                probe = transform(self.zeros(value, (rows, *(1,) * depth, *uevent)))
                pb = draw_param_batch(tuple(base.log_density(probe).shape), depth)
        else:
            pb = (1,) * depth
        layout = draws_layout(k, strip_leading_ones(pb), event)
        log_prob = self.rows_log_prob(transform, base.log_density, (*pb, *uevent))
        start = self.draws_start(value, depth, pb, event, rows, transform, uevent).reshape(c, *layout.shape)
        return density_type(
            log_prob,
            transform,
            self.size(layout.draw_shape),
            self.size((*strip_leading_ones(pb), *uevent)),
            value,
            c,
            layout,
            start,
        )

    def draws_start(
        self, value: Any, depth: int, pb: tuple, event: tuple, rows: int, transform: Any, uevent: tuple
    ) -> Any:
        """Observed points as starts ``[rows, *pb, *event]``: cycled (one point per draw), or
        the first point of each parameter group (batched density); where they do not fit,
        ``transform(0)``."""
        nb = value.ndim - len(event)
        try:
            if all(p == 1 for p in pb):
                points = value.reshape(-1, *event)
                return points[self.xp.arange(rows) % points.shape[0]].reshape(rows, *pb, *event)
            v = value.reshape((1,) * (depth - nb) + tuple(value.shape))
            v = v[tuple(slice(0, 1) if p == 1 else slice(None) for p in pb)]
            return self.fresh(self.xp.broadcast_to(v, (rows, *pb, *event)))
        except self.shape_errors:
            return transform(self.zeros(value, (rows, *pb, *uevent)))

    def sum_rows(self, x: Any, n: int) -> Any:
        """Sum ``x [n, ...]`` over everything but the rows, ``-> [n]``; a scalar broadcasts."""
        return x.reshape(n, -1).sum(-1) if x.ndim else self.xp.broadcast_to(x, (n,))

    def rows_log_prob(self, transform: Any, log_density: Any, upoint_shape: tuple) -> Any:
        """Draws mode: ``u [n, *]`` (one unconstrained point ``[*upoint_shape]`` per row) ``->
        [n]``, each point's ``log_density`` at ``transform(u)`` plus its ``log |det J|``."""

        def log_prob(u: Any) -> Any:
            n = u.shape[0]
            ur = u.reshape(n, *upoint_shape)
            x = transform(ur)
            total = self.sum_rows(transform.log_abs_det_jacobian(ur, x), n)
            return total + log_density(x).reshape(n, -1).sum(-1)

        return log_prob

    def potential(self, dens: "SiteDensity", site: str) -> Any:
        """``values -> -log p`` of one chain's state ``values[site]`` (unconstrained), a scalar:
        the potential of a PPL's ``NUTS(potential_fn=...)``."""

        def potential(values: dict) -> Any:
            return -dens.log_prob(self.xp.reshape(values[site], (dens.num_rows, *dens.unconstrained_shape))).sum()

        return potential


class SiteDensity(NamedTuple):
    """A site's log density in unconstrained coordinates, over a batch of independent rows.

    ``log_prob(u[num_rows, *unconstrained_shape]) -> [num_rows]``: the log density (up to a
    constant) at ``transform(u)``, plus ``log |det d transform / du|``. A row is one chain's
    copy of the site (site mode, ``num_rows = num_chains``) or one new point (draws mode,
    ``num_rows = num_chains * num_draws``); ``layout`` says how rows make up the chains.
    Each front end's ``SiteDensity`` subclasses it with its ``SiteOps`` (``ops``).

    Attributes:
        log_prob: ``u [num_rows, *unconstrained_shape] -> [num_rows]``.
        transform: the PPL's ``biject_to(support)``, unconstrained -> the site's support.
        shape: one row's value shape (site mode: the site's value shape).
        unconstrained_shape: one row's unconstrained shape.
        value: the site's traced (observed) value.
        num_chains: independent chains.
        layout: what the dims of a chain's state mean (``SiteLayout``).
        start: the default start, ``[num_chains, *layout.shape]``, in the support.
    """

    log_prob: Any
    transform: Any
    shape: tuple
    unconstrained_shape: tuple
    value: Any
    num_chains: int
    layout: SiteLayout
    start: Any

    ops = None  # the front end's SiteOps

    @property
    def num_rows(self) -> int:
        return self.num_chains * (self.layout.num_draws or 1)

    def init_unconstrained(self, init: Any, num_chains: int | None = None) -> Any:
        """Chains' start ``[C, *layout.shape]`` mapped to unconstrained space (one chain's
        rows: ``[C, *unconstrained_shape]`` in site mode, ``[C, num_draws,
        *unconstrained_shape]`` in draws mode).

        Args:
            init: constrained values that broadcast to ``[C, *layout.shape]`` (one chain's
                state, one point, or every chain's); ``None``: ``start`` (the observed value
                in site mode, observed points cycled in draws mode).
            num_chains: ``C`` (default: ``self.num_chains``).

        Raises:
            TypeError: ``init`` is not an array of the front end's library.
            ValueError: it does not broadcast, or lies outside the site's support.
        """
        c = self.num_chains if num_chains is None else num_chains
        target = (c, *self.layout.shape)
        if init is None:
            init = self.start[:1] if c != self.num_chains else self.start
        self.ops.check_init(init)
        check_init_shape(tuple(init.shape), target)
        init = self.ops.broadcast_init(init, self.value, target)
        u = self.transform.inv(init)
        if not self.ops.in_support(self.transform, init, u):
            raise ValueError("argument 'init' lies outside the site's support")
        return self.ops.fresh(u)


class SiteSamples(NamedTuple):
    """The draws of ``langevin`` and ``nuts`` (``ppl_score.pyro``, ``ppl_score.numpyro``).

    Attributes:
        samples: ``[num_samples, num_chains, *layout.shape]``, in the site's support.
        accept_rate: mean acceptance probability, ``[num_chains]``; Langevin in draws mode:
            ``[num_chains, num_draws]`` (each point is its own Metropolis chain).
        layout: what the dims of ``samples`` mean (``SiteLayout``).
    """

    samples: Any
    accept_rate: Any
    layout: SiteLayout


def site_samples(dens: SiteDensity, u: Any, accept_rate: Any) -> SiteSamples:
    """A Langevin run's rows ``u [S, num_rows, *]`` back to ``[S, C, *layout.shape]`` in the
    support, with ``accept_rate`` per chain (site mode) or per point (draws mode)."""
    c, layout = dens.num_chains, dens.layout
    samples = dens.transform(u).reshape(u.shape[0], c, *layout.shape)
    accept_rate = accept_rate.reshape(c, -1) if layout.mode == "draws" else accept_rate.reshape(c)
    return SiteSamples(samples, accept_rate, layout)


def check_site_args(model: Any, num_chains: Any, num_draws: Any) -> tuple[int, int | None]:
    """``site_log_density``'s ``model`` (callable), ``num_chains`` and ``num_draws``
    (``check_num_draws``); returns ``(num_chains, num_draws)``.

    Raises:
        TypeError, ValueError: naming the argument.
    """
    if not callable(model):
        raise TypeError(f"argument 'model' must be callable, got {type(model).__name__}")
    return check_num_chains(num_chains), check_num_draws(num_draws)


def check_rows(u: Any, c: int) -> None:
    """Site mode: the leading dim of ``u`` is the ``c`` chains.

    Raises:
        ValueError: another leading dim.
    """
    if u.shape[0] != c:
        raise ValueError(f"expected {c} chains (the leading dim of u), got shape {tuple(u.shape)}")


def check_sample_site(nodes: Any, site: Any, is_density_site: Any) -> dict:
    """The node of the observed, continuous sample ``site`` in a trace's ``nodes`` (a mapping
    from names to site dicts); ``is_density_site(node)`` says which nodes are sample sites
    whose log density is a term of the joint.

    Raises:
        TypeError: ``site`` is not a str.
        ValueError: not a sample site (naming the model's sample sites), not observed, or
            discrete.
    """
    if not isinstance(site, str):
        raise TypeError(f"argument 'site' must be a site name (str), got {type(site).__name__}")
    names = [n for n, node in nodes.items() if is_density_site(node)]
    if site not in nodes or not is_density_site(nodes[site]):
        raise ValueError(f"site {site!r} is not a sample site of the model; its sample sites are {names}")
    node = nodes[site]
    if not node["is_observed"]:
        raise ValueError(
            f"site {site!r} is not observed with these arguments: pass its data (the observed "
            "value fixes the site's shape and is where chains start by default)"
        )
    fn = node["fn"]
    if fn.support.is_discrete:
        raise ValueError(f"site {site!r} is discrete ({type(fn).__name__}); Langevin and NUTS need a continuous site")
    return node


def missing_latents_error(missing: list, guide_hint: str = "a fitted guide") -> ValueError:
    """Latent sites that neither ``guide`` nor ``latents`` give a value."""
    return ValueError(
        f"latent site(s) {missing} of the model have no value: pass 'guide' ({guide_hint}) "
        "or 'latents' (a dict of values)"
    )


def unnormalized_base(site: str, fn: Any, expanded_type: type, unnormalized_type: type, frontend: str) -> Any:
    """The ``Unnormalized`` distribution under a draws-mode site's ``fn`` (plates wrap it in
    the PPL's ``ExpandedDistribution``, ``expanded_type``).

    Raises:
        ValueError: ``fn`` is not an ``Unnormalized`` (``draws_site_error``).
    """
    base = fn
    while isinstance(base, expanded_type):
        base = base.base_dist
    if not isinstance(base, unnormalized_type):
        raise draws_site_error(site, fn, frontend)
    return base


def strip_leading_ones(shape: Sequence[int]) -> tuple:
    """``shape`` without its leading dims of size 1."""
    shape = tuple(shape)
    while shape and shape[0] == 1:
        shape = shape[1:]
    return shape
