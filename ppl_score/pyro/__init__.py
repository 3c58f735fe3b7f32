"""The Pyro front end: thin adapters from Pyro traces to the torch backend.

Score matching as an SVI loss (``ScoreMatching``) for unnormalized models (``Unnormalized``),
samplers for fitted models, implicit variational inference (``ImplicitELBO``), Wasserstein
auto-encoders (``WAE``), relative-gradient flows and DEQ energies, and data-parallel ``SVI``
(``DistributedOptimizer``).
"""

from .calibration import calibrate_beta
from .deq import DEQEnergy, DEQScore
from .distributed import DistributedOptimizer
from .distributions import Unnormalized
from .flows import InvertibleMLPTransform, RelativeGradientMLE
from .implicit import ImplicitELBO
from .mcmc import langevin, nuts, potential_fn, site_log_density
from .score_matching import ScoreMatching
from .wae import WAE

__all__ = [
    "DEQEnergy",
    "DEQScore",
    "DistributedOptimizer",
    "ImplicitELBO",
    "InvertibleMLPTransform",
    "RelativeGradientMLE",
    "ScoreMatching",
    "Unnormalized",
    "WAE",
    "calibrate_beta",
    "langevin",
    "nuts",
    "potential_fn",
    "site_log_density",
]
