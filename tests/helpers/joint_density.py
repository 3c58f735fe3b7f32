"""The held-out joint density case (``x ~ exp(-x^2/2)``, ``y | x ~ N(x, 1)``) in Pyro, and the
backend's ``esm`` of a hand-written joint density (``tests/{pyro,parity}/test_joint_density.py``)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pyro = pytest.importorskip("pyro")
import pyro.distributions as pdist  # noqa: E402

import ppl_score.pyro as spy  # noqa: E402
import ppl_score.torch as storch  # noqa: E402

F64 = torch.float64


N, D = 6, 2


def t(a):
    return torch.as_tensor(np.asarray(a), dtype=F64)


# ---------------------------------------------------------------------------------------
# The held-out case: x ~ exp(-|x|^2 / 2) (unnormalized), y | x ~ N(x, 1); match x only
# ---------------------------------------------------------------------------------------


def held_out_pyro(x, y):
    with pyro.plate("data", x.shape[0]):
        xs = pyro.sample("x", spy.Unnormalized(lambda v: -0.5 * (v**2).sum(-1), event_shape=(D,)), obs=x)
        pyro.sample("y", pdist.Normal(xs, 1.0).to_event(1), obs=y)


# ---------------------------------------------------------------------------------------
# Regressions found in review: deterministic sites, integer and grad-carrying data,
# distributions of non-tensor parts, models that do not broadcast over the copies, masks
# ---------------------------------------------------------------------------------------


def _esm(fn, x):
    return storch.score_matching_loss(fn, x, "esm", reduction="sum").item()
