"""``import ppl_score.torch`` imports neither JAX nor NumPyro."""

from __future__ import annotations

import pytest

from tests.helpers.imports import _run


def test_torch_backend_does_not_import_jax():
    pytest.importorskip("torch")
    _run(
        "import sys, ppl_score.torch, ppl_score.torch.nets\n"
        "assert 'torch' in sys.modules\n"
        "loaded = {'jax', 'jaxlib', 'numpyro'} & set(sys.modules)\n"
        "assert not loaded, loaded\n"
    )
