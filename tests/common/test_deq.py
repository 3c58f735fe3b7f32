"""The framework-free half of the DEQ solvers (``ppl_score.common.deq``)."""

from __future__ import annotations

import numpy as np


def test_anderson_regularization_scales_with_dtype():
    from ppl_score.common import deq as _deq

    eps32, eps64 = float(np.finfo(np.float32).eps), float(np.finfo(np.float64).eps)
    assert _deq.anderson_reg(eps32) > eps32  # registers on the unit diagonal in float32
    assert _deq.anderson_reg(eps64) == _deq.ANDERSON_REG  # float64 keeps its value (and speed)
