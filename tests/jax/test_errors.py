"""Bad inputs specific to the JAX backend: a key is required exactly when something is drawn."""

from __future__ import annotations

import numpy as np
import pytest

from ppl_score.spec import OBJECTIVES
from tests.helpers.errors import METHODS, NOISE, PROJ, _given, _loss, _named


@pytest.mark.parametrize("method", ["ssm", "ssm_vr", "dsm", "fd_ssm", "fd_dsm"])
def test_jax_randomness_requires_key(jax_backend, method):
    with pytest.raises(ValueError, match=_named("key")):
        _loss(jax_backend, method, seed=None)
    spec = OBJECTIVES[method]
    if spec.uses_projections and spec.uses_noise:
        # one of the two given explicitly: the other still needs a key
        with pytest.raises(ValueError, match=_named("key")):
            _loss(jax_backend, method, seed=None, projections=PROJ)
        with pytest.raises(ValueError, match=_named("key")):
            _loss(jax_backend, method, seed=None, noise=NOISE)


@pytest.mark.parametrize("method", METHODS)
def test_jax_no_key_needed_when_nothing_is_drawn(jax_backend, method):
    kw = _given(method)
    assert np.isfinite(_loss(jax_backend, method, seed=None, **kw))
