"""The JAX backend: score-matching objectives as pure, jit-compatible functions."""

from ..common.objectives import OBJECTIVES
from .deq import deq_config, deq_energy_apply, deq_energy_init, deq_score_apply, deq_score_init, fixed_point
from .flows import InvertibleMLP
from .objectives import score_matching_loss

__all__ = [
    "OBJECTIVES",
    "InvertibleMLP",
    "deq_config",
    "deq_energy_apply",
    "deq_energy_init",
    "deq_score_apply",
    "deq_score_init",
    "fixed_point",
    "score_matching_loss",
]
