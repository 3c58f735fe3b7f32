"""Deprecated alias of the validation switch and warning in :mod:`ppl_score.common.validate`.

``ppl_score.set_validation``, ``ppl_score.validation_enabled``, ``ppl_score.is_validation_enabled``
and ``ppl_score.NonFiniteWarning`` are the public names; ``ppl_score.validation.X`` keeps
working and warns once.
"""

import warnings

from .common.validate import (  # noqa: F401
    NonFiniteWarning,
    is_validation_enabled,
    set_validation,
    validation_enabled,
    warn_nonfinite,
)

__all__ = ["NonFiniteWarning", "is_validation_enabled", "set_validation", "validation_enabled", "warn_nonfinite"]

warnings.warn(
    "ppl_score.validation moved to ppl_score.common.validate (the switch stays at ppl_score.set_validation); "
    "the old name is a deprecated alias",
    DeprecationWarning,
    stacklevel=2,
)
