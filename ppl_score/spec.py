"""The objectives spec under its public name: :mod:`ppl_score.common.objectives` re-exported.

``ppl_score.spec.OBJECTIVES``, ``ppl_score.spec.resolve`` and the other names of the spec
(see the docs page "Spec") stay importable from here; the implementation lives in
``ppl_score.common.objectives``, the framework-free half of ``ppl_score.{torch,jax}.objectives``.
"""

from .common.objectives import *  # noqa: F401,F403
from .common.objectives import __all__  # noqa: F401
