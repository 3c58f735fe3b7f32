"""Backend selection shared by the demo's tests and the training-loop tests."""

from __future__ import annotations

import pytest

BACKENDS = ["torch", "jax"]


def _require(backend):
    pytest.importorskip(backend)
    if backend == "jax":
        pytest.importorskip("optax")
