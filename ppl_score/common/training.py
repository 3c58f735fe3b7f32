"""The framework-free half of ``ppl_score.{torch,jax}.training``: the training loops' settings,
argument checks and messages, written once for both backends."""

from __future__ import annotations

from typing import Any, Mapping

from . import objectives as spec
from .validate import check_int, check_positive_float

__all__ = ["EVAL_CHUNK", "LR_FLOOR", "check_fit", "nonfinite_loss_error", "report_every"]

# Rows per chunk when evaluating the trained model (bounds the memory of esm's HVPs; the JAX
# evaluator pads the last chunk so it compiles once).
EVAL_CHUNK = 512
# The learning rate decays along a cosine to this fraction of ``lr``.
LR_FLOOR = 0.05


def check_fit(method: Any, options: Mapping[str, Any], steps: Any, batch_size: Any, lr: Any) -> float:
    """Check ``fit_energy``'s settings before any work; returns ``lr`` as a float.

    Raises:
        TypeError: ``steps`` / ``batch_size`` not an int, ``lr`` not a real number, an option
            of the wrong type.
        ValueError: an unknown method or option, ``steps < 0``, ``batch_size < 1``, ``lr`` not
            finite and ``> 0``.
    """
    spec.resolve(method, "log_prob", options)
    check_int("steps", steps, low=0)
    check_int("batch_size", batch_size)
    return check_positive_float("lr", lr)


def report_every(steps: int) -> int:
    """Steps between progress-bar updates (and finiteness checks of the loss): about 100 in all."""
    return max(1, steps // 100)


def nonfinite_loss_error(method: str, step: int) -> FloatingPointError:
    """The error of a training loop whose loss became non-finite by ``step`` (1-based)."""
    return FloatingPointError(
        f"the {method} loss became non-finite by step {step}; lower 'lr' (or raise 'eps' / 'sigma')"
    )
