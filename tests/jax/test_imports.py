"""``import ppl_score.jax`` imports neither torch nor Pyro."""

from __future__ import annotations

import pytest

from tests.helpers.imports import _run


def test_jax_backend_does_not_import_torch():
    pytest.importorskip("jax")
    _run(
        "import sys, ppl_score.jax, ppl_score.jax.nets\n"
        "assert 'jax' in sys.modules\n"
        "loaded = {'torch', 'pyro'} & set(sys.modules)\n"
        "assert not loaded, loaded\n"
    )
