"""The torch backend: score-matching objectives as differentiable torch functions."""

from ..spec import OBJECTIVES
from .objectives import score_matching_loss

__all__ = ["OBJECTIVES", "score_matching_loss"]
