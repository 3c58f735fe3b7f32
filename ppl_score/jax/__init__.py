"""The JAX backend: score-matching objectives as pure, jit-compatible functions."""

from ..common.objectives import OBJECTIVES
from .deq import deq_config, deq_energy_apply, deq_energy_init, deq_score_apply, deq_score_init, fixed_point
from .flows import InvertibleMLP
from .objectives import score_matching_loss
from .stein import KSDTest, ksd, ksd_test

__all__ = [
    "OBJECTIVES",
    "InvertibleMLP",
    "KSDTest",
    "deq_config",
    "deq_energy_apply",
    "deq_energy_init",
    "deq_score_apply",
    "deq_score_init",
    "fixed_point",
    "ksd",
    "ksd_test",
    "score_matching_loss",
]
