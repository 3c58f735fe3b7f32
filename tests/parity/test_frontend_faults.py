"""The Pyro and the NumPyro front end give the same fault messages (issue 10, item 13)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.helpers.frontends import X, _error

pytestmark = pytest.mark.usefixtures("one_torch_thread", "fresh_pyro")


def test_the_front_ends_give_the_same_messages():
    x = X.copy()
    x[0, 0] = np.nan
    for kind, data in [
        ("plain", x),
        ("unnormalized_3", X),
        ("handler_mask", X),
        ("obs_mask", X),
        ("gamma", -np.abs(X)),
    ]:
        assert _error("pyro", kind, data) == _error("numpyro", kind, data), kind
