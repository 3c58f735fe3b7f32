"""ppl_score: score matching as a first-class inference method for Pyro and NumPyro.

``import ppl_score`` imports neither torch nor JAX; pick a backend explicitly:
``ppl_score.torch`` / ``ppl_score.pyro`` or ``ppl_score.jax`` / ``ppl_score.numpyro``. The
framework-free half of the library is ``ppl_score.common``; its objectives registry is also
public as ``ppl_score.spec``, and the validation switch is re-exported here.
"""

from .common.objectives import OBJECTIVES
from .common.validate import NonFiniteWarning, is_validation_enabled, set_validation, validation_enabled

__version__ = "0.1.0"
__all__ = [
    "OBJECTIVES",
    "NonFiniteWarning",
    "__version__",
    "is_validation_enabled",
    "set_validation",
    "validation_enabled",
]
