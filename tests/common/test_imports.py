"""``import ppl_score`` imports neither torch, JAX, Pyro nor NumPyro."""

from __future__ import annotations

from tests.helpers.imports import _run


def test_import_ppl_score_imports_no_framework():
    _run(
        "import sys, ppl_score, ppl_score.spec\n"
        "assert len(ppl_score.OBJECTIVES) >= 6\n"
        "loaded = {'torch', 'jax', 'jaxlib', 'pyro', 'numpyro'} & set(sys.modules)\n"
        "assert not loaded, loaded\n"
    )
