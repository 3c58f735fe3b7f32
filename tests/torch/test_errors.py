"""Bad inputs specific to the torch backend: the ``generator`` argument."""

from __future__ import annotations

import pytest

from tests.helpers.errors import X, _gaussian, _named


def test_torch_bad_generator(torch_backend):
    with pytest.raises(TypeError, match=_named("generator")):
        torch_backend.call(_gaussian(None), torch_backend.asarray(X), "ssm", generator=0)
