"""``score_matching_loss`` in the modes users run it in (issue 10, items 2, 3, 7 and the
validation switch), one body run per backend: extreme scales of the finite-difference
directions, non-finite results, the validation switch and the chunked exact trace. The
grad modes, JAX keys and x64 checks are in ``tests/{torch,jax}/test_objectives_modes.py``.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import ppl_score
from ppl_score import NonFiniteWarning
from tests.helpers.objectives import METHODS, RNG, X, _builder, _explicit, _mlp_energy, _nan_energy

FD = ("fd_ssm", "fd_dsm")


# ------------------------------------------------------------ 2. scale-invariant directions


@pytest.mark.parametrize("scale", [1e25, 1e-25])
@pytest.mark.parametrize("kind", ["log_prob", "score"])
@pytest.mark.parametrize("method", FD)
def test_fd_directions_are_scale_invariant(backend, method, kind, scale):
    kw = _explicit(method, dtype=np.float32)
    ref = backend.loss(_builder(kind), X.astype(np.float32), method, kind=kind, **kw)
    kw["projections"] = kw["projections"] * np.float32(scale)
    got = backend.loss(_builder(kind), X.astype(np.float32), method, kind=kind, **kw)
    assert np.isfinite(got) and got != 0.0
    np.testing.assert_allclose(got, ref, rtol=1e-5)


def test_fd_directions_scale_invariant_float64(backend):
    kw = _explicit("fd_ssm")
    ref = backend.loss(_mlp_energy, X, "fd_ssm", **kw)
    for scale in (1e200, 1e-200):
        got = backend.loss(_mlp_energy, X, "fd_ssm", projections=kw["projections"] * scale)
        np.testing.assert_allclose(got, ref, rtol=1e-12)


def test_sampling_unit_directions_tiny_and_huge(backend):
    if backend.name == "torch":
        import torch

        from ppl_score.torch.projections import unit_directions

        conv = lambda a: torch.as_tensor(a)  # noqa: E731
    else:
        from ppl_score.jax.projections import unit_directions

        conv = backend.jnp.asarray
    u = RNG.normal(size=(2, 3, 4)).astype(np.float32)
    ref = np.asarray(unit_directions(conv(u)))
    for scale in (1e30, 1e-30):  # squares overflow / underflow in float32
        got = np.asarray(unit_directions(conv(u * np.float32(scale))))
        np.testing.assert_allclose(np.linalg.norm(got.reshape(2, 3, -1), axis=-1), 1.0, rtol=1e-5)
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("method", METHODS)
def test_nan_parameter_warns_naming_the_method(backend, method):
    with pytest.warns(NonFiniteWarning, match=f"method='{method}'.*nan/inf parameter"):
        out = backend.loss(_nan_energy, X, method, **_explicit(method))
    assert not np.isfinite(out)


def test_huge_eps_and_tiny_sigma_warn(backend):
    with pytest.warns(NonFiniteWarning, match="eps=1e\\+30"):
        backend.loss(_mlp_energy, X.astype(np.float32), "fd_ssm", eps=1e30, **_explicit("fd_ssm", dtype=np.float32))
    with pytest.warns(NonFiniteWarning, match="sigma=1e-30"):
        backend.loss(_mlp_energy, X.astype(np.float32), "dsm", sigma=1e-30, **_explicit("dsm", dtype=np.float32))


@pytest.mark.parametrize("eps", [1e-170, 1e170])
def test_eps_whose_square_is_out_of_range_is_a_value_error(backend, eps):
    with pytest.raises(ValueError, match="option 'eps'"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        backend.loss(_mlp_energy, X, "fd_ssm", eps=eps, **_explicit("fd_ssm"))


@pytest.mark.parametrize("kind", ["log_prob", "score"])
@pytest.mark.parametrize("method", METHODS)
def test_integer_fn_output_is_a_type_error(backend, method, kind):
    def builder(ops):
        if kind == "log_prob":
            return lambda x: (x * 0).sum(-1).astype("int32") if ops.name == "jax" else (x * 0).sum(-1).long()
        return lambda x: (x * 0).astype("int32") if ops.name == "jax" else (x * 0).long()

    with pytest.raises(TypeError, match="argument 'fn' must return a floating"):
        backend.loss(builder, X, method, kind=kind, **_explicit(method))


# ------------------------------------------------------------------- the validation switch


def test_validation_switch(backend):
    assert ppl_score.is_validation_enabled()
    bad = X.copy()
    bad[0, 0] = np.nan
    with ppl_score.validation_enabled(False):
        assert not ppl_score.is_validation_enabled()
        with warnings.catch_warnings():
            warnings.simplefilter("error", NonFiniteWarning)
            out = backend.loss(_mlp_energy, bad, "esm")  # no host-syncing check, no warning
        assert np.isnan(out)
        with pytest.raises(ValueError, match="unknown method"):  # value-free checks stay
            backend.loss(_mlp_energy, X, "nope")
    assert ppl_score.is_validation_enabled()
    with pytest.raises(ValueError, match="argument 'x' contains non-finite"):
        backend.loss(_mlp_energy, bad, "esm")


@pytest.mark.parametrize("chunk_budget", [1, 3 * 512, 2**30])
def test_esm_chunking_does_not_change_the_value(backend, monkeypatch, chunk_budget):
    mod = __import__(f"ppl_score.{backend.name}.derivatives", fromlist=["x"])
    ref = backend.loss(_mlp_energy, X, "esm", reduction="none")
    monkeypatch.setattr(mod, "ESM_MEMORY_BUDGET", chunk_budget)
    np.testing.assert_allclose(backend.loss(_mlp_energy, X, "esm", reduction="none"), ref, rtol=1e-12)
