"""The inputs and the loss call of the bad-input tests (``tests/{conformance,torch,jax}/test_errors.py``)."""

from __future__ import annotations

import math
import re

import numpy as np

from ppl_score.spec import OBJECTIVES, UNCONDITIONAL_METHODS

METHODS = UNCONDITIONAL_METHODS
B, EVENT = 4, (2, 3)
D = math.prod(EVENT)
_RNG = np.random.default_rng(0)
X = _RNG.normal(size=(B, *EVENT))
PROJ = _RNG.normal(size=(2, B, *EVENT))
NOISE = _RNG.normal(size=(B, *EVENT))


def _gaussian(ops):
    """log N(0, I) up to a constant, ``[B, *event] -> [B]``."""
    return lambda x: -0.5 * (x.reshape(x.shape[0], -1) ** 2).sum(-1)


def _gaussian_score(ops):
    return lambda x: -x


def _named(name):
    """A message naming the argument ``name`` (quoted, as in ``argument 'x'``)."""
    return re.escape(f"'{name}'")


def _loss(backend, method="ssm", *, builder=None, x=X, kind="log_prob", **kw):
    builder = builder or (_gaussian if kind == "log_prob" else _gaussian_score)
    kw.setdefault("seed", 0)
    return backend.loss(builder, x, method, kind=kind, **kw)


def _given(method):
    """The explicit projections / noise ``method`` takes."""
    spec = OBJECTIVES[method]
    kw = {"projections": PROJ.copy()} if spec.uses_projections else {}
    kw.update({"noise": NOISE.copy()} if spec.uses_noise else {})
    return kw
