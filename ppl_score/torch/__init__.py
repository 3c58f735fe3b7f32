"""The torch backend: score-matching objectives as differentiable torch functions."""

from ..common.objectives import OBJECTIVES
from .deq import DEQEnergy, DEQLayer, DEQScore, deq_params, fixed_point
from .flows import InvertibleMLP
from .objectives import score_matching_loss

__all__ = [
    "OBJECTIVES",
    "DEQEnergy",
    "DEQLayer",
    "DEQScore",
    "InvertibleMLP",
    "deq_params",
    "fixed_point",
    "score_matching_loss",
]
