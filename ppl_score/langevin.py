"""Langevin samplers: the math, and the argument checks shared by both backends and both
front ends; the layout of a sampled site (``SiteLayout``) and the shape contract of
``Unnormalized``'s two forms, shared by the Pyro and NumPyro front ends. Imports neither
torch nor JAX.

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

import warnings
from typing import Any, NamedTuple

import numpy as np

from ._validate import check_int, check_positive_float

__all__ = [
    "KINDS",
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
    "check_batch_shape",
    "check_expand",
    "check_rows_output",
    "check_batched_output",
]

KINDS = ("log_prob", "score")

# MALA whose mean acceptance rate (over chains and kept steps) is below this barely moves:
# ``warn_low_acceptance`` says so with the rate.
LOW_ACCEPTANCE = 0.01


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


def _check_int(name: str, value: Any, minimum: int) -> int:
    return check_int(name, value, low=minimum)


def check_step_size(step_size: Any) -> float:
    return check_positive_float("step_size", step_size)


def check_plan(step_size: Any, num_steps: Any, num_warmup: Any = 0, thin: Any = 1) -> Plan:
    """Validate the run length arguments; ``num_steps`` must be a multiple of ``thin`` so
    that no step is run and silently dropped."""
    plan = Plan(
        step_size=check_step_size(step_size),
        num_steps=_check_int("num_steps", num_steps, 1),
        num_warmup=_check_int("num_warmup", num_warmup, 0),
        thin=_check_int("thin", thin, 1),
    )
    if plan.num_steps % plan.thin:
        raise ValueError(
            f"argument 'num_steps'={plan.num_steps} must be a multiple of argument 'thin'={plan.thin}"
        )
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
    return _check_int("num_chains", num_chains, 1)


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
    return ValueError(f"Langevin chains reached non-finite values with step_size={step_size:g}: {hint}; decrease 'step_size'")


def init_error(name: str = "x0") -> ValueError:
    return ValueError(f"the log density or its score is non-finite at argument {name!r}; start the chains where the density is positive")


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
    return _check_int("num_samples", num_samples, 1), _check_int(warmup_name, num_warmup, 0)


# ---------------------------------------------------------------------------------------
# Sampling a site of a fitted model (``ppl_score.{pyro,numpyro}.sampling``)
# ---------------------------------------------------------------------------------------

# How ``ppl_score.numpyro.sampling`` batches chains: ``"plate"`` runs the model once for
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


def site_layout(shape, event_shape) -> SiteLayout:
    """The layout of site mode: every chain is a copy of the site's value ``[*shape]``."""
    return SiteLayout("site", tuple(shape), tuple(event_shape), None)


def draws_layout(num_draws: int, param_batch, event_shape) -> SiteLayout:
    """The layout of draws mode: ``num_draws`` points ``[*param_batch, *event_shape]``."""
    return SiteLayout("draws", (num_draws, *tuple(param_batch), *tuple(event_shape)), tuple(event_shape), num_draws)


def check_init_shape(init_shape, target) -> None:
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


def draw_param_batch(out_shape, depth: int) -> tuple:
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
    return None if num_draws is None else _check_int("num_draws", num_draws, 1)


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
    thin = _check_int("thin", thin, 1)
    if num_steps is None:
        num_steps = _check_int("num_samples", 1000 if num_samples is None else num_samples, 1) * thin
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


def check_batch_shape(batch_shape: Any) -> tuple:
    """``batch_shape`` of ``Unnormalized``: an int or a tuple of non-negative ints."""
    if isinstance(batch_shape, int) and not isinstance(batch_shape, bool):
        batch_shape = (batch_shape,)
    try:
        shape = tuple(batch_shape)
    except TypeError:
        raise TypeError(f"argument 'batch_shape' must be a tuple of ints, got {type(batch_shape).__name__}") from None
    if not all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise ValueError(f"argument 'batch_shape' must hold non-negative ints, got {shape}")
    return tuple(int(d) for d in shape)


def check_expand(batch_shape, new_batch_shape) -> tuple:
    """``Unnormalized.expand``: ``new_batch_shape`` must broadcast from ``batch_shape``.

    Raises:
        ValueError: it does not (a dim of size > 1 changed, or dims dropped).
    """
    new = check_batch_shape(new_batch_shape)
    if _broadcast(batch_shape, new) != new:
        raise ValueError(f"Unnormalized.expand: batch_shape {tuple(batch_shape)} cannot be expanded to {new}")
    return new


def unnormalized_log_prob_shape(lead, batch_shape, event_shape) -> tuple:
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


def check_rows_output(out_shape, n: int) -> None:
    """The row form: ``log_density_fn(x[n, *event]) -> [n]``.

    Raises:
        ValueError: another shape, naming ``log_density_fn`` (with the ``batched=True`` hint).
    """
    if tuple(out_shape) != (n,):
        raise ValueError(
            f"argument 'log_density_fn' must map x of shape [n, *event_shape] to [n] (one log density "
            f"per row), expected {(n,)}, got {tuple(out_shape)}; {BATCHED_HINT}"
        )


def check_batched_output(out_shape, lead, expected) -> None:
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
    if len(out_shape) < len(lead) or _broadcast(out_shape, lead) != out_shape or _broadcast(out_shape, expected) != expected:
        raise ValueError(
            "argument 'log_density_fn' (batched=True) must map x of shape [*batch, *event_shape] to "
            f"[*batch] (one log density per point, broadcast with its parameters' batch dims): x had "
            f"batch dims {lead}, the distribution's batch_shape gives {expected}, got {out_shape}. "
            "Do not sum over points, and give the distribution a batch_shape (or plates) covering "
            "the parameters' batch dims"
        )
