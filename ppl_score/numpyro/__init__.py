"""The NumPyro front end: thin adapters from NumPyro traces to the JAX backend.

Score matching as an SVI loss (``ScoreMatching``) for unnormalized models (``Unnormalized``),
samplers for fitted models, implicit variational inference (``ImplicitELBO``), Wasserstein
auto-encoders (``WAE``), relative-gradient flows and DEQ energies.
"""

from .calibration import calibrate_beta
from .deq import deq_energy, deq_energy_module, deq_score, deq_score_module
from .distributions import NoiseConditional, Unnormalized, noise_level
from .flows import InvertibleMLPTransform, RelativeGradientMLE, invertible_mlp
from .implicit import ImplicitELBO, score_state
from .mcmc import langevin, nuts, potential_fn, site_log_density
from .score_matching import ScoreMatching
from .stein import goodness_of_fit
from .wae import WAE

__all__ = [
    "ImplicitELBO",
    "InvertibleMLPTransform",
    "NoiseConditional",
    "RelativeGradientMLE",
    "ScoreMatching",
    "Unnormalized",
    "WAE",
    "calibrate_beta",
    "deq_energy",
    "deq_energy_module",
    "deq_score",
    "deq_score_module",
    "goodness_of_fit",
    "invertible_mlp",
    "langevin",
    "noise_level",
    "nuts",
    "potential_fn",
    "score_state",
    "site_log_density",
]
