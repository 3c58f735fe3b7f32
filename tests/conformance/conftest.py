"""The ``ppl`` fixture: each test taking it runs once with Pyro and once with NumPyro, through
the adapters of ``tests/helpers/ppl.py``."""

from __future__ import annotations

import pytest

from tests.helpers.ppl import NumPyroPPL, PyroPPL

_PPLS = {"pyro": PyroPPL, "numpyro": NumPyroPPL}
_CACHE: dict = {}


@pytest.fixture(params=sorted(_PPLS), scope="module")
def ppl(request):
    if request.param not in _CACHE:
        _CACHE[request.param] = _PPLS[request.param]()
    return _CACHE[request.param]
