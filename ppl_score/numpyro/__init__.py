"""The NumPyro front end: score matching as an SVI loss, and unnormalized distributions."""

from .distributions import Unnormalized
from .score_matching import ScoreMatching

__all__ = ["ScoreMatching", "Unnormalized"]

# ---- samplers (ppl_score/numpyro/sampling.py) and other front-end modules: add imports here ----
from .sampling import langevin, nuts, potential_fn, site_log_density  # noqa: E402,F401
from .flows import InvertibleMLPTransform, RelativeGradientMLE, invertible_mlp  # noqa: E402,F401
from .deq import deq_energy, deq_energy_module, deq_score, deq_score_module  # noqa: E402,F401
