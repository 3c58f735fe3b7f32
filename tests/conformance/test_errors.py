"""Every bad input of SPEC.md section 2 is a ``ValueError`` (``TypeError`` for a wrong type)
whose message names the offending argument, in both backends; never a silent NaN.

The backend-specific errors (JAX keys, torch generators) are in ``tests/jax/test_errors.py``
and ``tests/torch/test_errors.py``."""

from __future__ import annotations

import numpy as np
import pytest

from ppl_score.spec import OBJECTIVES
from tests.helpers.errors import EVENT, METHODS, NOISE, PROJ, B, D, X, _gaussian, _given, _loss, _named

# ---------------------------------------------------------------------------------------
# method, kind, options
# ---------------------------------------------------------------------------------------

OPTION_ERRORS = [
    # (method, options, exception, argument named in the message)
    ("ssm", {"foo": 1}, ValueError, "foo"),
    ("esm", {"sigma": 0.1}, ValueError, "sigma"),
    ("esm", {"n_projections": 2}, ValueError, "n_projections"),
    ("dsm", {"eps": 0.1}, ValueError, "eps"),
    ("fd_ssm", {"projection": "gaussian"}, ValueError, "projection"),
    ("fd_dsm", {"projection": "rademacher"}, ValueError, "projection"),
    ("fd_ssm", {"sigma": 0.1}, ValueError, "sigma"),
    ("dsm", {"sigma": 0.0}, ValueError, "sigma"),
    ("dsm", {"sigma": -0.1}, ValueError, "sigma"),
    ("dsm", {"sigma": float("nan")}, ValueError, "sigma"),
    ("fd_dsm", {"sigma": float("inf")}, ValueError, "sigma"),
    ("fd_dsm", {"sigma": 0}, ValueError, "sigma"),
    ("dsm", {"sigma": True}, TypeError, "sigma"),
    ("dsm", {"sigma": "0.1"}, TypeError, "sigma"),
    ("fd_ssm", {"eps": 0.0}, ValueError, "eps"),
    ("fd_dsm", {"eps": -1e-3}, ValueError, "eps"),
    ("fd_ssm", {"eps": None}, TypeError, "eps"),
    ("ssm", {"n_projections": 0}, ValueError, "n_projections"),
    ("ssm_vr", {"n_projections": -2}, ValueError, "n_projections"),
    ("fd_ssm", {"n_projections": 0}, ValueError, "n_projections"),
    ("ssm", {"n_projections": 1.5}, TypeError, "n_projections"),
    ("ssm", {"n_projections": 2.0}, TypeError, "n_projections"),
    ("ssm_vr", {"n_projections": True}, TypeError, "n_projections"),
    ("fd_dsm", {"n_projections": "2"}, TypeError, "n_projections"),
    ("ssm", {"projection": "uniform"}, ValueError, "projection"),
    ("ssm_vr", {"projection": 1}, TypeError, "projection"),
]


@pytest.mark.parametrize(
    "method,options,exc,name", OPTION_ERRORS, ids=[f"{m}-{'-'.join(map(str, o.items()))}" for m, o, *_ in OPTION_ERRORS]
)
def test_bad_options(backend, method, options, exc, name):
    with pytest.raises(exc, match=_named(name)):
        _loss(backend, method, **options)


@pytest.mark.parametrize("method,exc", [("nope", ValueError), ("SSM", ValueError), (3, TypeError), (None, TypeError)])
def test_bad_method(backend, method, exc):
    with pytest.raises(exc, match=_named("method")):
        _loss(backend, method)


@pytest.mark.parametrize("kind,exc", [("energy", ValueError), ("logprob", ValueError), (None, TypeError)])
def test_bad_kind(backend, kind, exc):
    with pytest.raises(exc, match=_named("kind")):
        _loss(backend, "ssm", kind=kind, builder=_gaussian)


@pytest.mark.parametrize("reduction,exc", [("average", ValueError), ("", ValueError), (None, TypeError)])
def test_bad_reduction(backend, reduction, exc):
    with pytest.raises(exc, match=_named("reduction")):
        _loss(backend, "esm", reduction=reduction)


# ---------------------------------------------------------------------------------------
# fn and x
# ---------------------------------------------------------------------------------------

BAD_OUTPUTS = {
    # kind log_prob must give [B]
    "log_prob": {
        "keepdim": lambda ops: lambda x: (x.reshape(x.shape[0], -1) ** 2).sum(-1, keepdims=True),
        "elementwise": lambda ops: lambda x: -0.5 * x**2,
        "batch_summed": lambda ops: lambda x: (x**2).sum(),
    },
    # kind score must give [B, *event]
    "score": {
        "flat": lambda ops: lambda x: -x.reshape(x.shape[0], -1),
        "per_example": lambda ops: lambda x: (x.reshape(x.shape[0], -1) ** 2).sum(-1),
    },
}


# every method with the first variant of each kind, every variant with two methods
# (one differentiating fn, one finite-differencing it)
_OUTPUT_CASES = sorted(
    {(m, k, next(iter(BAD_OUTPUTS[k]))) for m in METHODS for k in BAD_OUTPUTS}
    | {(m, k, v) for m in ("ssm", "fd_dsm") for k in BAD_OUTPUTS for v in BAD_OUTPUTS[k]}
)


@pytest.mark.parametrize("method,kind,variant", _OUTPUT_CASES)
def test_fn_output_shape_mismatch(backend, method, kind, variant):
    with pytest.raises(ValueError, match=_named("fn")):
        _loss(backend, method, kind=kind, builder=BAD_OUTPUTS[kind][variant])


def test_fn_not_callable(backend):
    with pytest.raises(TypeError, match=_named("fn")):
        backend.call("not a function", backend.asarray(X), "esm")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("method", METHODS)
def test_non_finite_x(backend, method, bad):
    x = X.copy()
    x[1, 0, 2] = bad
    with pytest.raises(ValueError, match=_named("x")):
        _loss(backend, method, x=x)


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.bool_])
def test_non_float_x(backend, dtype):
    with pytest.raises(TypeError, match=_named("x")):
        _loss(backend, "esm", x=np.ones((B, *EVENT), dtype=dtype))


@pytest.mark.parametrize("x", [np.array(1.0), np.zeros((0, 3))], ids=["scalar", "empty_batch"])
def test_bad_x_shape(backend, x):
    with pytest.raises(ValueError, match=_named("x")):
        _loss(backend, "esm", x=x)


def test_x_of_wrong_type(backend):
    fn = _gaussian(None)
    with pytest.raises(TypeError, match=_named("x")):
        backend.call(fn, X.tolist(), "esm")
    if backend.name == "torch":  # the torch backend takes tensors only
        with pytest.raises(TypeError, match=_named("x")):
            backend.call(fn, X, "esm")


# ---------------------------------------------------------------------------------------
# projections, noise, randomness
# ---------------------------------------------------------------------------------------

PROJ_METHODS = [m for m in METHODS if OBJECTIVES[m].uses_projections]
NOISE_METHODS = [m for m in METHODS if OBJECTIVES[m].uses_noise]


@pytest.mark.parametrize(
    "shape",
    [(B + 1, *EVENT), (2, B, 3, 2), (2, B + 1, *EVENT), (B, D), (1, 2, B, *EVENT), EVENT, (0, B, *EVENT)],
    ids=str,
)
@pytest.mark.parametrize("method", PROJ_METHODS)
def test_projections_shape_mismatch(backend, method, shape):
    proj = np.ones(shape)
    kw = {"noise": NOISE} if OBJECTIVES[method].uses_noise else {}
    with pytest.raises(ValueError, match=_named("projections")):
        _loss(backend, method, projections=proj, **kw)


@pytest.mark.parametrize("method", PROJ_METHODS)
def test_n_projections_disagrees_with_projections(backend, method):
    kw = {"noise": NOISE} if OBJECTIVES[method].uses_noise else {}
    with pytest.raises(ValueError, match=_named("n_projections")):
        _loss(backend, method, projections=PROJ, n_projections=3, **kw)
    with pytest.raises(ValueError, match=_named("n_projections")):
        _loss(backend, method, projections=PROJ[0], n_projections=2, **kw)
    # agreeing is fine, M taken from the shape
    _loss(backend, method, projections=PROJ, n_projections=2, **kw)


@pytest.mark.parametrize("method", NOISE_METHODS)
@pytest.mark.parametrize("shape", [(B + 1, *EVENT), (B, D), (1, B, *EVENT), EVENT], ids=str)
def test_noise_shape_mismatch(backend, method, shape):
    kw = {"projections": PROJ} if OBJECTIVES[method].uses_projections else {}
    with pytest.raises(ValueError, match=_named("noise")):
        _loss(backend, method, noise=np.ones(shape), **kw)


@pytest.mark.parametrize(
    "method,name", [(m, "projections") for m in PROJ_METHODS] + [(m, "noise") for m in NOISE_METHODS]
)
def test_non_finite_projections_or_noise(backend, method, name):
    kw = _given(method)
    kw[name][..., 0] = np.nan
    with pytest.raises(ValueError, match=_named(name)):
        _loss(backend, method, **kw)


@pytest.mark.parametrize(
    "method,name",
    [(m, "projections") for m in METHODS if m not in PROJ_METHODS]
    + [(m, "noise") for m in METHODS if m not in NOISE_METHODS],
)
def test_unused_projections_or_noise(backend, method, name):
    """Explicit randomness for a method that draws none of it is an error, not ignored."""
    kw = _given(method)
    kw[name] = PROJ if name == "projections" else NOISE
    with pytest.raises(ValueError, match=_named(name)):
        _loss(backend, method, **kw)


@pytest.mark.parametrize("method", ["fd_ssm", "fd_dsm"])
def test_zero_fd_direction(backend, method):
    u = PROJ.copy()
    u[1, 2] = 0.0  # ||u|| = 0 for one example: u/||u|| would be NaN
    kw = {"noise": NOISE} if method == "fd_dsm" else {}
    with pytest.raises(ValueError, match=_named("projections")):
        _loss(backend, method, projections=u, **kw)
