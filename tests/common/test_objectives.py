"""The backend-neutral registry and validation of ``ppl_score.spec`` (SPEC.md section 1),
tested without torch or JAX."""

from __future__ import annotations

import warnings

import pytest

from ppl_score import spec
from ppl_score.spec import OBJECTIVES, resolve

# SPEC.md section 1, the table: name -> option defaults
TABLE = {
    "esm": {},
    "ssm": {"n_projections": 1, "projection": "rademacher"},
    "ssm_vr": {"n_projections": 1, "projection": "rademacher"},
    "dsm": {"sigma": 0.1},
    "fd_ssm": {"eps": 0.1, "n_projections": 1},
    "fd_dsm": {"sigma": 0.1, "eps": 0.1, "n_projections": 1},
}


def test_registry_holds_the_six_objectives():
    assert set(TABLE) <= set(OBJECTIVES)
    import ppl_score

    assert ppl_score.OBJECTIVES is OBJECTIVES


@pytest.mark.parametrize("name", sorted(TABLE))
def test_entry(name):
    entry = OBJECTIVES[name]
    assert entry.name == name
    assert dict(entry.defaults) == TABLE[name]
    assert set(entry.kinds) == {"log_prob", "score"}
    assert isinstance(entry.summary, str) and entry.summary
    assert isinstance(entry.formula, str) and entry.formula
    assert entry.uses_projections == ("n_projections" in TABLE[name])
    assert entry.uses_noise == ("sigma" in TABLE[name])


def test_registry_is_read_only():
    with pytest.raises(TypeError):
        OBJECTIVES["mine"] = OBJECTIVES["esm"]
    with pytest.raises(TypeError):
        OBJECTIVES["dsm"].defaults["sigma"] = 1.0
    with pytest.raises(AttributeError):
        OBJECTIVES["dsm"].name = "x"


def test_projection_distributions_listed():
    assert set(spec.PROJECTIONS) == {"rademacher", "gaussian", "sphere"}
    assert set(spec.REDUCTIONS) == {"mean", "sum", "none"}
    assert set(spec.KINDS) == {"log_prob", "score"}


@pytest.mark.parametrize("name", sorted(TABLE))
def test_resolve_fills_defaults(name):
    r = resolve(name, "score")
    assert r.method == name and r.kind == "score"
    assert dict(r.options) == TABLE[name]
    assert r.explicit == frozenset()


def test_resolve_keeps_explicit_options_and_coerces():
    r = resolve("fd_dsm", "log_prob", {"sigma": 1, "n_projections": 4})
    assert r.options == {"sigma": 1.0, "eps": 0.1, "n_projections": 4}
    assert isinstance(r.options["sigma"], float)
    assert r.explicit == {"sigma", "n_projections"}
    # the caller's dict is not modified
    opts = {"eps": 0.5}
    resolve("fd_ssm", "log_prob", opts)
    assert opts == {"eps": 0.5}


@pytest.mark.parametrize(
    "method,kind,options,exc,name",
    [
        ("nope", "log_prob", {}, ValueError, "method"),
        (1, "log_prob", {}, TypeError, "method"),
        ("esm", "energy", {}, ValueError, "kind"),
        ("esm", 0, {}, TypeError, "kind"),
        ("fd_ssm", "log_prob", {"projection": "sphere"}, ValueError, "projection"),
        ("dsm", "log_prob", {"sigma": 0.0}, ValueError, "sigma"),
        ("fd_ssm", "score", {"eps": -1.0}, ValueError, "eps"),
        ("ssm", "score", {"n_projections": 0}, ValueError, "n_projections"),
        ("ssm", "score", {"n_projections": False}, TypeError, "n_projections"),
    ],
)
def test_resolve_errors(method, kind, options, exc, name):
    with pytest.raises(exc, match=f"'{name}'"):
        resolve(method, kind, options)


def test_check_projection_shape():
    r = resolve("ssm", "log_prob", {})
    assert spec.check_projection_shape(r, (4, 2, 3), (4, 2, 3)) == 1
    assert spec.check_projection_shape(r, (5, 4, 2, 3), (4, 2, 3)) == 5
    with pytest.raises(ValueError, match="'projections'"):
        spec.check_projection_shape(r, (4, 6), (4, 2, 3))
    explicit = resolve("ssm", "log_prob", {"n_projections": 5})
    assert spec.check_projection_shape(explicit, (5, 4, 2, 3), (4, 2, 3)) == 5
    with pytest.raises(ValueError, match="'n_projections'"):
        spec.check_projection_shape(explicit, (4, 2, 3), (4, 2, 3))


def test_check_fn_output_shape():
    spec.check_fn_output_shape("log_prob", (4,), (4, 2, 3))
    spec.check_fn_output_shape("score", (4, 2, 3), (4, 2, 3))
    for kind, out in (("log_prob", (4, 1)), ("log_prob", ()), ("score", (4, 6)), ("score", (4,))):
        with pytest.raises(ValueError, match="'fn'"):
            spec.check_fn_output_shape(kind, out, (4, 2, 3))


def test_event_size():
    assert spec.event_size((7, 2, 3)) == 6
    assert spec.event_size((7, 5)) == 5
    assert spec.event_size((7,)) == 1


def test_fd_roundoff_warning_threshold():
    f32, f64 = 2.0**-23, 2.0**-52
    with pytest.warns(RuntimeWarning, match="'eps'"):
        spec.fd_roundoff_warning(1e-3, f32, "float32")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        spec.fd_roundoff_warning(1e-3, f64, "float64")
        spec.fd_roundoff_warning(0.05, f32, "float32")  # the FD-SSM paper's deep-EBM setting


def test_registry_and_resolved_options_pickle_and_deepcopy():
    """Loss objects hold resolved options: they must survive checkpoints (no mappingproxy)."""
    import copy
    import pickle

    from ppl_score import spec

    resolved = spec.resolve("fd_dsm", "score", {"sigma": 0.3, "n_projections": 2})
    for obj in (spec.OBJECTIVES, *spec.OBJECTIVES.values(), resolved):
        for clone in (pickle.loads(pickle.dumps(obj)), copy.deepcopy(obj)):
            assert clone == obj
    clone = pickle.loads(pickle.dumps(resolved))
    assert dict(clone.options) == {"sigma": 0.3, "eps": 0.1, "n_projections": 2}
    assert clone.explicit == {"sigma", "n_projections"} and clone.method == "fd_dsm"
    with pytest.raises(TypeError):
        clone.options["sigma"] = 1.0  # still read-only
