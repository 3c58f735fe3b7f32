"""Argument checks shared by every framework-free module (``spec``, ``frontend``,
``implicit_spec``, ``langevin``, ``_deq``, ``_flows``), so one rule gives one message.

``what`` names the kind of thing checked in the message: ``"argument"`` or ``"option"``.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Sequence

__all__ = ["check_positive_float", "check_int", "check_choice"]


def check_positive_float(name: str, value: Any, what: str = "argument") -> float:
    """A finite real number ``> 0`` (``bool`` is not a number here)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{what} {name!r} must be a positive real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value <= 0.0:
        raise ValueError(f"{what} {name!r} must be a finite number > 0, got {value!r}")
    return value


def check_int(name: str, value: Any, low: int = 1, high: int | None = None, what: str = "argument") -> int:
    """An ``int`` in ``[low, high]`` (``bool`` is not an int here)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{what} {name!r} must be an int >= {low}, got {type(value).__name__}")
    value = int(value)
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{what} {name!r} must be an int {bound}, got {value}")
    return value


def check_choice(name: str, value: Any, allowed: Sequence[str], what: str = "argument") -> str:
    """One of the strings in ``allowed``."""
    if not isinstance(value, str):
        raise TypeError(f"{what} {name!r} must be one of {tuple(allowed)}, got {type(value).__name__}")
    if value not in allowed:
        raise ValueError(f"{what} {name!r} must be one of {tuple(allowed)}, got {value!r}")
    return value
