"""The Pyro front end: thin adapters from Pyro traces to the torch backend.

Score matching as an SVI loss (``ScoreMatching``) for unnormalized models (``Unnormalized``),
samplers for fitted models, implicit variational inference (``ImplicitELBO``), Wasserstein
auto-encoders (``WAE``), relative-gradient flows and DEQ energies, and data-parallel ``SVI``
(``DistributedOptimizer``).
"""

from .calibration import calibrate_beta
from .deq import DEQEnergy, DEQScore
from .distributed import DistributedOptimizer
from .distributions import NoiseConditional, Unnormalized, noise_level
from .flows import InvertibleMLPTransform, RelativeGradientMLE
from .implicit import ImplicitELBO
from .mcmc import langevin, nuts, potential_fn, site_log_density
from .score_matching import ScoreMatching
from .stein import goodness_of_fit
from .wae import WAE

__all__ = [
    "DEQEnergy",
    "DEQScore",
    "DistributedOptimizer",
    "ImplicitELBO",
    "InvertibleMLPTransform",
    "NoiseConditional",
    "RelativeGradientMLE",
    "ScoreMatching",
    "Unnormalized",
    "WAE",
    "calibrate_beta",
    "goodness_of_fit",
    "langevin",
    "noise_level",
    "nuts",
    "potential_fn",
    "site_log_density",
]
