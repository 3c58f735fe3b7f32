"""Langevin samplers: the math, and the argument checks shared by both backends and both
front ends. Imports neither torch nor JAX.

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
