"""The validation switch (``ppl_score.common.validate``, re-exported by ``ppl_score``)."""

from __future__ import annotations

import pytest

import ppl_score


def test_set_validation_type():
    with pytest.raises(TypeError, match="enabled"):
        ppl_score.set_validation("no")
    assert ppl_score.is_validation_enabled()
