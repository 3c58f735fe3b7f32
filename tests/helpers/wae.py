"""The data and decoder weights of the WAE tests (``tests/{common,parity}/test_wae.py``)."""

from __future__ import annotations

import numpy as np

X = np.random.default_rng(0).normal(size=(6, 3))
W = np.random.default_rng(1).normal(size=(3, 2))
