"""The torch backend: score-matching objectives as differentiable torch functions."""

from ..common.objectives import OBJECTIVES
from .deq import DEQEnergy, DEQLayer, DEQScore, deq_params, fixed_point
from .flows import InvertibleMLP
from .objectives import score_matching_loss
from .stein import KSDTest, ksd, ksd_test

__all__ = [
    "OBJECTIVES",
    "DEQEnergy",
    "DEQLayer",
    "DEQScore",
    "InvertibleMLP",
    "KSDTest",
    "deq_params",
    "fixed_point",
    "ksd",
    "ksd_test",
    "score_matching_loss",
]
