"""Deprecated alias of :mod:`ppl_score.demo.datasets` (the demo's built-in data).

``from ppl_score.datasets import mixture_dataset`` keeps working and warns once; import from
``ppl_score.demo.datasets`` instead.
"""

import warnings

from .demo.datasets import *  # noqa: F401,F403
from .demo.datasets import __all__  # noqa: F401

warnings.warn(
    "ppl_score.datasets moved to ppl_score.demo.datasets; the old name is a deprecated alias",
    DeprecationWarning,
    stacklevel=2,
)
