"""The demo (``python -m ppl_score demo``) and its datasets.

``ppl_score.demo.cli`` fits a deep energy model by score matching and writes metrics and a
figure; ``ppl_score.demo.datasets`` holds the built-in data (a 2-D mixture with a known score,
scikit-learn's 8x8 digits, a user's ``.npy``/``.npz`` array).
"""

from . import datasets
from .cli import BACKENDS, add_arguments, check_args, run

__all__ = ["BACKENDS", "add_arguments", "check_args", "datasets", "run"]
