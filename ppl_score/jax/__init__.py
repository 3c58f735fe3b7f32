"""The JAX backend: score-matching objectives as pure, jit-compatible functions."""

from ..spec import OBJECTIVES
from .objectives import score_matching_loss

__all__ = ["OBJECTIVES", "score_matching_loss"]
