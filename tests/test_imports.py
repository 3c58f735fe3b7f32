"""Import hygiene and completeness of the backends.

``import ppl_score`` imports neither torch nor JAX; each backend imports only its own
framework; every ``OBJECTIVES`` entry is implemented (and callable) in both backends.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import ppl_score
from ppl_score.spec import OBJECTIVES

# the directory holding the ppl_score under test (the repository root for a source checkout)
ROOT = Path(ppl_score.__file__).resolve().parents[1]


def _run(code: str) -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_import_ppl_score_imports_no_framework():
    _run(
        "import sys, ppl_score, ppl_score.spec\n"
        "assert len(ppl_score.OBJECTIVES) >= 6\n"
        "loaded = {'torch', 'jax', 'jaxlib', 'pyro', 'numpyro'} & set(sys.modules)\n"
        "assert not loaded, loaded\n"
    )


def test_torch_backend_does_not_import_jax():
    pytest.importorskip("torch")
    _run(
        "import sys, ppl_score.torch, ppl_score.torch.nets\n"
        "assert 'torch' in sys.modules\n"
        "loaded = {'jax', 'jaxlib', 'numpyro'} & set(sys.modules)\n"
        "assert not loaded, loaded\n"
    )


def test_jax_backend_does_not_import_torch():
    pytest.importorskip("jax")
    _run(
        "import sys, ppl_score.jax, ppl_score.jax.nets\n"
        "assert 'jax' in sys.modules\n"
        "loaded = {'torch', 'pyro'} & set(sys.modules)\n"
        "assert not loaded, loaded\n"
    )


@pytest.mark.parametrize("name", ["torch", "jax"])
def test_every_objective_implemented(name):
    """A backend missing an entry of OBJECTIVES (or carrying one the spec lacks) fails here."""
    pytest.importorskip(name)
    import importlib

    objectives = importlib.import_module(f"ppl_score.{name}.objectives")
    assert set(objectives._PER_EXAMPLE) == set(OBJECTIVES)
    package = importlib.import_module(f"ppl_score.{name}")
    assert package.score_matching_loss is objectives.score_matching_loss


@pytest.mark.parametrize("kind", ["log_prob", "score"])
def test_every_objective_callable(backend, kind):
    """One call per method and kind, with drawn randomness, gives a finite scalar."""
    x = np.random.default_rng(0).normal(size=(4, 3))
    builder = (lambda ops: lambda y: -0.5 * (y * y).sum(-1)) if kind == "log_prob" else (lambda ops: lambda y: -y)
    for method in OBJECTIVES:
        out = backend.loss(builder, x, method, kind=kind, seed=0)
        assert out.shape == () and np.isfinite(out), method
