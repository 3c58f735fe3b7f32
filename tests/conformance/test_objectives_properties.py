"""Property-based tests of ``score_matching_loss`` in both backends (hypothesis).

Over shapes, dtypes, methods, kinds, reductions and option values (valid and not), a call
either raises a clear ``TypeError`` / ``ValueError`` naming an argument or option, or
returns a value whose dtype follows ``x`` and whose shape follows ``reduction``, which is
finite or comes with a ``NonFiniteWarning``; the inputs are never mutated.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from ppl_score import NonFiniteWarning  # noqa: E402
from ppl_score.spec import OBJECTIVES, PROJECTIONS, UNCONDITIONAL_METHODS  # noqa: E402

SETTINGS = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,  # reproducible in CI
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

valid_scale = st.floats(1e-3, 1e2)
bad_scale = st.sampled_from([0.0, -1.0, math.nan, math.inf, "0.1", True, None])


@st.composite
def cases(draw):
    method = draw(st.sampled_from(sorted(UNCONDITIONAL_METHODS)))
    spec = OBJECTIVES[method]
    batch = draw(st.integers(1, 3))
    event = tuple(draw(st.lists(st.integers(1, 3), min_size=1, max_size=2)))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    options = {}
    bad = draw(st.booleans()) and draw(st.integers(0, 3)) == 0  # about 1 in 8 cases invalid
    for name in spec.defaults:
        if not draw(st.booleans()):
            continue
        if name in ("sigma", "eps"):
            options[name] = draw(bad_scale if bad else valid_scale)
        elif name == "n_projections":
            options[name] = draw(st.sampled_from([0, -2, 1.5, "2"]) if bad else st.integers(1, 3))
        else:
            options[name] = draw(st.sampled_from(["orthogonal", 3]) if bad else st.sampled_from(PROJECTIONS))
    if bad and not options:
        options["unknown_option"] = 1.0
    explicit = spec.uses_projections and draw(st.booleans())
    return dict(
        method=method,
        kind=draw(st.sampled_from(spec.kinds)),
        reduction=draw(st.sampled_from(["mean", "sum", "none"])),
        x=draw(st.integers(0, 2**31 - 1)),
        shape=(batch, *event),
        dtype=dtype,
        options=options,
        explicit=explicit,
        scale=draw(st.sampled_from([1.0, 1e-20, 1e20])),
    )


def _fn(backend, kind):
    """A non-quadratic density on any event shape: ``-sum softplus(x) + 1/2 x^2``."""
    if backend.name == "torch":
        import torch

        softplus, sigmoid = torch.nn.functional.softplus, torch.sigmoid
    else:
        import jax

        softplus, sigmoid = jax.nn.softplus, jax.nn.sigmoid
    if kind == "log_prob":
        return lambda x: -(softplus(x) + 0.5 * x * x).reshape(x.shape[0], -1).sum(-1)
    return lambda x: -(sigmoid(x) + x)


def _run(backend, case):
    rng = np.random.default_rng(case["x"])
    x_np = rng.normal(size=case["shape"]).astype(case["dtype"])
    kw = dict(kind=case["kind"], reduction=case["reduction"], **case["options"])
    arrays = {"x": x_np}
    if case["explicit"]:
        m = case["options"].get("n_projections", 1)
        m = m if isinstance(m, int) and not isinstance(m, bool) and m >= 1 else 1
        arrays["projections"] = (case["scale"] * rng.normal(size=(m, *case["shape"]))).astype(case["dtype"])
    backend_arrays = {k: backend.asarray(v, case["dtype"]) for k, v in arrays.items()}
    before = {k: np.array(backend.to_numpy(v), copy=True) for k, v in backend_arrays.items()}
    x = backend_arrays.pop("x")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            out = backend.call(_fn(backend, case["kind"]), x, case["method"], seed=0, **backend_arrays, **kw)
        except (TypeError, ValueError) as e:
            msg = str(e)
            assert "argument" in msg or "option" in msg, msg
            out = None
    for k, v in {"x": x, **backend_arrays}.items():  # nothing mutated
        np.testing.assert_array_equal(backend.to_numpy(v), before[k])
    if out is None:
        return
    value = backend.to_numpy(out)
    assert value.dtype == np.dtype(case["dtype"])
    assert value.shape == ((case["shape"][0],) if case["reduction"] == "none" else ())
    nonfinite_warned = any(issubclass(w.category, NonFiniteWarning) for w in caught)
    assert np.isfinite(value).all() or nonfinite_warned


@SETTINGS
@given(case=cases())
def test_torch_score_matching_loss_properties(torch_backend, case):
    _run(torch_backend, case)


@SETTINGS
@given(case=cases())
def test_jax_score_matching_loss_properties(jax_backend, case):
    _run(jax_backend, case)
