"""Completeness of the backends: every ``OBJECTIVES`` entry is implemented (and callable)
in both."""

from __future__ import annotations

import numpy as np
import pytest

from ppl_score.spec import OBJECTIVES


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
    conditional = (
        (lambda ops: lambda y, sigma: -0.5 * (y * y).sum(-1) / (1 + sigma**2))
        if kind == "log_prob"
        else (lambda ops: lambda y, sigma: -y / (1 + sigma[:, None] ** 2))
    )
    for method in OBJECTIVES:
        fn = conditional if OBJECTIVES[method].noise_conditional else builder
        out = backend.loss(fn, x, method, kind=kind, seed=0)
        assert out.shape == () and np.isfinite(out), method
