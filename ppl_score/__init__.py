"""ppl_score: score matching as a first-class inference method for Pyro and NumPyro.

``import ppl_score`` imports neither torch nor JAX; pick a backend explicitly:
``ppl_score.torch`` / ``ppl_score.pyro`` or ``ppl_score.jax`` / ``ppl_score.numpyro``.
"""

from .spec import OBJECTIVES

__version__ = "0.1.0"
__all__ = ["OBJECTIVES", "__version__"]
