"""Conformance suite for ``score_matching_loss``, parametrized over both backends.

Every case is numpy in, numpy out (``backend`` fixture in ``tests/conftest.py``), so the torch
and the JAX implementation are held to the same closed forms (SPEC.md sections 1 and 2):
Gaussian log densities, a non-quadratic density with analytic Hessian, a random MLP
energy checked against float64 finite differences, the eps -> 0 limits of ``fd_*``, and
the unbiasedness of the random projections. Backend-specific checks are in
``tests/{torch,jax}/test_objectives.py``.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from ppl_score.spec import OBJECTIVES
from tests.helpers.objectives import KINDS, METHODS, SIGMA, B, M, _draw_case, _inputs

EVENTS = [(3,), (2, 3)]


# ---------------------------------------------------------------------------------------
# 1. Gaussian closed forms: s = -P (x - mu), H = -P.
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("event", EVENTS, ids=lambda e: "event" + "x".join(map(str, e)))
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", METHODS)
def test_gaussian_closed_form(backend, refs, rng, method, kind, event):
    dens = refs.Gaussian.random(math.prod(event), rng)
    x, proj, noise = _draw_case(rng, event)
    kw = _inputs(method, proj, noise)
    # fd_* are exact for a quadratic log density at any eps (SPEC section 1); eps=0.5 is
    # far from the limit, so a wrong constant c or step v would show.
    if method.startswith("fd_"):
        kw["eps"] = 0.5
    out = backend.loss(dens.builder(kind), x, method, kind=kind, reduction="none", **kw)
    expected = refs.reference(dens, method, kind, x, projections=proj, noise=noise, sigma=SIGMA)
    assert out.shape == (B,)
    np.testing.assert_allclose(out, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("method", METHODS)
def test_reductions(backend, refs, rng, method):
    event = (2, 3)
    dens = refs.Gaussian.random(6, rng)
    x, proj, noise = _draw_case(rng, event)
    kw = _inputs(method, proj, noise)
    per_example = refs.reference(dens, method, "log_prob", x, projections=proj, noise=noise, sigma=SIGMA)
    outs = {r: backend.loss(dens.log_prob_fn, x, method, reduction=r, **kw) for r in ("none", "mean", "sum")}
    assert outs["mean"].shape == () and outs["sum"].shape == () and outs["none"].shape == (B,)
    np.testing.assert_allclose(outs["none"], per_example, rtol=1e-10)
    np.testing.assert_allclose(outs["mean"], per_example.mean(), rtol=1e-10)
    np.testing.assert_allclose(outs["sum"], per_example.sum(), rtol=1e-10)
    # the default reduction is the mean
    np.testing.assert_allclose(backend.loss(dens.log_prob_fn, x, method, **kw), per_example.mean(), rtol=1e-10)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", [m for m in METHODS if OBJECTIVES[m].uses_projections])
def test_projections_without_m_axis(backend, refs, rng, method, kind):
    """``projections`` of shape ``[B, *event]`` is one projection per example (M = 1)."""
    event = (2, 3)
    dens = refs.Gaussian.random(6, rng)
    x, proj, noise = _draw_case(rng, event, m=1)
    kw = _inputs(method, proj[0], noise)
    out = backend.loss(dens.builder(kind), x, method, kind=kind, reduction="none", **kw)
    kw["projections"] = proj  # the same, with an explicit M = 1 axis, and n_projections agreeing
    out_m = backend.loss(dens.builder(kind), x, method, kind=kind, reduction="none", n_projections=1, **kw)
    expected = refs.reference(dens, method, kind, x, projections=proj[0], noise=noise, sigma=SIGMA)
    np.testing.assert_allclose(out, expected, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(out_m, out, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", ["fd_ssm", "fd_dsm"])
def test_fd_exact_for_quadratic_at_every_eps(backend, refs, rng, method, kind):
    """For a quadratic log density, fd_* equal their limits (ssm / ssm_vr / 1/2 (w^T r)^2 with
    ``w = sqrt(D) u/||u||``) at every eps, not only as eps -> 0."""
    event = (3,)
    dens = refs.Gaussian.random(3, rng)
    x, u, noise = _draw_case(rng, event)
    kw = _inputs(method, u, noise)
    expected = refs.reference(dens, method, kind, x, projections=u, noise=noise, sigma=SIGMA)
    # fd_ssm's limit for kind log_prob is ssm(w), for kind score ssm_vr(w)
    w = refs.sphere_scale(refs.as_m(u, x)).reshape(u.shape)
    if method == "fd_ssm":
        limit = "ssm" if kind == "log_prob" else "ssm_vr"
        via_backend = backend.loss(dens.builder(kind), x, limit, kind=kind, projections=w, reduction="none")
        np.testing.assert_allclose(via_backend, expected, rtol=1e-10)
    for eps in (0.01, 0.1, 1.0, 5.0):
        out = backend.loss(dens.builder(kind), x, method, kind=kind, eps=eps, reduction="none", **kw)
        # round-off of the second difference grows like machine-eps * |l| * D / eps^2
        np.testing.assert_allclose(out, expected, rtol=1e-7, atol=1e-7, err_msg=f"eps={eps}")


# ---------------------------------------------------------------------------------------
# 2. A non-quadratic density with analytic Hessian, and an MLP energy against float64
#    finite differences of its log density.
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", ["esm", "ssm", "ssm_vr", "dsm"])
def test_logcosh_closed_form(backend, refs, rng, method, kind):
    event = (2, 3)
    dens = refs.LogCosh.random(6, rng)
    x, proj, noise = _draw_case(rng, event)
    kw = _inputs(method, proj, noise)
    out = backend.loss(dens.builder(kind), x, method, kind=kind, reduction="none", **kw)
    expected = refs.reference(dens, method, kind, x, projections=proj, noise=noise, sigma=SIGMA)
    np.testing.assert_allclose(out, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", KINDS)
def test_esm_trace_over_several_chunks(backend, refs, rng, kind):
    """D = 20 basis vectors span more than one chunk of the batched Hessian trace."""
    event = (4, 5)
    dens = refs.LogCosh.random(20, rng, k=6)
    x = rng.normal(size=(2, *event))
    out = backend.loss(dens.builder(kind), x, "esm", kind=kind, reduction="none")
    np.testing.assert_allclose(out, refs.reference(dens, "esm", kind, x), rtol=1e-10)


class NumpyMLP:
    """``x[B, *event] -> [B]`` (energy head, log density ``= -E``) or ``-> [B, *event]``
    (score head): a softplus MLP on the flattened event, in numpy and in either backend."""

    def __init__(self, rng, dim, out, hidden=(8, 8)):
        sizes = (dim, *hidden, out)
        self.params = [
            (1.5 * rng.normal(size=(a, b)) / math.sqrt(a), 0.5 * rng.normal(size=b))
            for a, b in zip(sizes[:-1], sizes[1:])
        ]
        self.out = out

    def numpy(self, x):
        h = x.reshape(x.shape[0], -1)
        for w, b in self.params[:-1]:
            h = np.logaddexp(0.0, h @ w + b)
        w, b = self.params[-1]
        h = h @ w + b
        return -h[:, 0] if self.out == 1 else h.reshape(x.shape)

    def builder(self, ops):
        params = [(ops.const(w), ops.const(b)) for w, b in self.params]
        out = self.out

        def fn(x):
            h = x.reshape(x.shape[0], -1)
            for w, b in params[:-1]:
                h = ops.softplus(h @ w + b)
            w, b = params[-1]
            h = h @ w + b
            return -h[:, 0] if out == 1 else h.reshape(x.shape)

        return fn


def _fd_score_and_hessian(mlp, kind, flat, h=1e-4):
    """``s`` and ``H`` (``J`` for a score network) by central differences, float64."""
    b, d = flat.shape
    eye = np.eye(d) * h
    f = mlp.numpy
    if kind == "score":
        s = f(flat)
        cols = [(f(flat + e) - f(flat - e)) / (2 * h) for e in eye]  # column j of J = ds/dx_j
        return s, np.stack(cols, axis=-1)
    s = np.stack([(f(flat + e) - f(flat - e)) / (2 * h) for e in eye], axis=-1)
    hess = np.empty((b, d, d))
    for i in range(d):
        for j in range(d):
            ei, ej = eye[i], eye[j]
            hess[:, i, j] = (f(flat + ei + ej) - f(flat + ei - ej) - f(flat - ei + ej) + f(flat - ei - ej)) / (
                4 * h * h
            )
    return s, hess


@pytest.mark.parametrize("kind", KINDS)
def test_mlp_against_finite_differences(backend, refs, rng, kind):
    """esm, ssm, ssm_vr and dsm of a random MLP energy (or score network) against ``s`` and
    ``H`` from float64 central differences of the network's numpy forward pass."""
    event = (2, 3)
    d = math.prod(event)
    mlp = NumpyMLP(rng, d, 1 if kind == "log_prob" else d)
    x, proj, noise = _draw_case(rng, event)
    s, hess = _fd_score_and_hessian(mlp, kind, x.reshape(B, d))
    s_tilde, _ = _fd_score_and_hessian(mlp, kind, (x + SIGMA * noise).reshape(B, d))
    proj, noise = proj.reshape(M, B, d), noise.reshape(B, d)
    expected = {
        "esm": refs.ref_esm(s, hess),
        "ssm": refs.ref_ssm(s, hess, proj),
        "ssm_vr": refs.ref_ssm_vr(s, hess, proj),
        "dsm": 0.5 * ((s_tilde + noise / SIGMA) ** 2).sum(-1),
    }
    for method, value in expected.items():
        kw = _inputs(method, proj.reshape(M, *x.shape), noise.reshape(x.shape))
        out = backend.loss(mlp.builder, x, method, kind=kind, reduction="none", **kw)
        np.testing.assert_allclose(out, value, rtol=1e-6, atol=1e-6, err_msg=method)


# ---------------------------------------------------------------------------------------
# 3. fd_* approach their limits as eps shrinks, with O(eps^2) bias.
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", ["fd_ssm", "fd_dsm"])
def test_fd_converges_at_rate_eps_squared(backend, refs, rng, method, kind):
    event = (2, 3)
    dens = refs.LogCosh.random(6, rng)
    x, u, noise = _draw_case(rng, event, m=2)
    kw = _inputs(method, u, noise)
    if "sigma" in kw:
        kw["sigma"] = 0.5  # keep the exactly-linear noise term from dominating fd_dsm
    limit = refs.reference(dens, method, kind, x, projections=u, noise=noise, sigma=0.5)
    err = {
        eps: backend.loss(dens.builder(kind), x, method, kind=kind, eps=eps, reduction="none", **kw) - limit
        for eps in (1.0, 0.1, 0.05, 0.025)
    }
    # halving eps divides the bias by 4 (leading term c2 eps^2, next eps^4)
    for big, small in ((0.1, 0.05), (0.05, 0.025)):
        ratio = err[big] / err[small]
        assert np.all(np.abs(ratio - 4.0) < 0.3), (big, small, ratio)
    # at large eps the bias is a visible fraction of the value (not exact, unlike a quadratic)
    assert np.max(np.abs(err[1.0]) / np.abs(limit)) > 1e-2


# ---------------------------------------------------------------------------------------
# 5. Random projections and noise are unbiased (tolerances from the sample variance).
# ---------------------------------------------------------------------------------------

N_MC = 4000  # Monte Carlo draws: x0 replicated N_MC times, one independent draw per row
Z = 5.0  # standard errors


def _replicated(x0, n=N_MC):
    return np.broadcast_to(x0, (n, *x0.shape)).copy()


def _assert_mean(samples, target, z=Z):
    se = samples.std(ddof=1) / math.sqrt(samples.size)
    assert samples.std() > 0, "the estimator is not random at all"
    assert abs(samples.mean() - target) < z * se, (samples.mean(), target, se)


@pytest.mark.parametrize("projection", ["rademacher", "gaussian", "sphere"])
@pytest.mark.parametrize("method", ["ssm", "ssm_vr"])
def test_random_projections_unbiased(backend, refs, rng, method, projection):
    d = 3
    dens = refs.Gaussian.random(d, rng)
    x0 = rng.normal(size=d)
    esm = refs.reference(dens, "esm", "log_prob", x0[None])[0]
    samples = backend.loss(dens.log_prob_fn, _replicated(x0), method, projection=projection, seed=1, reduction="none")
    _assert_mean(samples, esm)


@pytest.mark.parametrize("kind", KINDS)
def test_fd_ssm_random_directions_unbiased(backend, refs, rng, kind):
    """For a quadratic, fd_ssm is ssm (ssm_vr for kind score) with w uniform on the sphere of
    radius sqrt(D), whose mean is esm."""
    d = 3
    dens = refs.Gaussian.random(d, rng)
    x0 = rng.normal(size=d)
    esm = refs.reference(dens, "esm", "log_prob", x0[None])[0]
    samples = backend.loss(dens.builder(kind), _replicated(x0), "fd_ssm", kind=kind, seed=2, reduction="none")
    _assert_mean(samples, esm)


def test_projection_distributions(backend, refs, rng):
    """Sharp identities of each distribution: Rademacher entries are +-1 (so v^T P v = tr P
    for diagonal P), sphere draws have ||v||^2 = D (so v^T v = D), Gaussian draws do neither."""
    d = 3
    x = rng.normal(size=(N_MC, d))
    diag = refs.Gaussian(np.zeros(d), np.diag(rng.uniform(0.5, 2.0, size=d)))
    iso = refs.Gaussian(np.zeros(d), np.eye(d))
    esm_diag = refs.reference(diag, "esm", "log_prob", x)
    esm_iso = refs.reference(iso, "esm", "log_prob", x)
    loss = lambda dens, p: backend.loss(dens.log_prob_fn, x, "ssm_vr", projection=p, seed=3, reduction="none")
    np.testing.assert_allclose(loss(diag, "rademacher"), esm_diag, rtol=1e-12)
    np.testing.assert_allclose(loss(iso, "sphere"), esm_iso, rtol=1e-12)
    assert not np.allclose(loss(diag, "gaussian"), esm_diag)
    assert not np.allclose(loss(diag, "sphere"), esm_diag)
    assert not np.allclose(loss(iso, "gaussian"), esm_iso)


def _variance_and_se(samples):
    """Sample variance and its standard error from the fourth central moment."""
    n = samples.size
    c = samples - samples.mean()
    var = (c**2).sum() / (n - 1)
    m4 = (c**4).mean()
    return var, math.sqrt(max(m4 - var**2 * (n - 3) / (n - 1), 0.0) / n)


def test_n_projections_are_independent(backend, refs, rng):
    """The mean over ``n_projections=K`` independent draws has 1/K the variance of one draw
    (it would keep the full variance if the K projections were one draw repeated)."""
    d, k = 3, 4
    dens = refs.Gaussian.random(d, rng)
    x = _replicated(rng.normal(size=d))
    one = backend.loss(dens.log_prob_fn, x, "ssm", projection="gaussian", seed=4, reduction="none")
    many = backend.loss(dens.log_prob_fn, x, "ssm", projection="gaussian", n_projections=k, seed=5, reduction="none")
    (v1, se1), (vk, sek) = _variance_and_se(one), _variance_and_se(many)
    ratio = v1 / vk
    se_ratio = ratio * math.sqrt((se1 / v1) ** 2 + (sek / vk) ** 2)
    assert abs(ratio - k) < Z * se_ratio, (ratio, se_ratio)
    # and both are unbiased for esm
    esm = refs.reference(dens, "esm", "log_prob", x[:1])[0]
    _assert_mean(many, esm)


@pytest.mark.parametrize("method", ["dsm", "fd_dsm"])
def test_random_noise_gaussian_expectation(backend, refs, rng, method):
    """For a Gaussian, ``r = a + C n`` with ``a = -P (x - mu)``, ``C = I/sigma - sigma P``, so
    ``E[1/2 ||r||^2] = 1/2 ||a||^2 + 1/2 ||C||_F^2``; fd_dsm (exact for a quadratic, w with
    ``E[w w^T] = I``) has the same mean."""
    d, sigma = 3, 0.5
    dens = refs.Gaussian.random(d, rng)
    x0 = rng.normal(size=d)
    a = dens.score(x0[None])[0]
    c = np.eye(d) / sigma - sigma * dens.prec
    expected = 0.5 * a @ a + 0.5 * (c * c).sum()
    samples = backend.loss(dens.log_prob_fn, _replicated(x0), method, sigma=sigma, seed=6, reduction="none")
    _assert_mean(samples, expected)


@pytest.mark.parametrize("kind", KINDS)
def test_random_noise_matches_explicit_noise(backend, refs, rng, kind):
    """dsm with drawn noise converges to its expectation, estimated by averaging dsm over
    explicit N(0, I) noise (a non-Gaussian density: two-sample z-test)."""
    d, sigma = 3, 0.5
    dens = refs.LogCosh.random(d, rng)
    x = _replicated(rng.normal(size=d))
    drawn = backend.loss(dens.builder(kind), x, "dsm", kind=kind, sigma=sigma, seed=7, reduction="none")
    explicit = backend.loss(
        dens.builder(kind), x, "dsm", kind=kind, sigma=sigma, noise=rng.normal(size=x.shape), reduction="none"
    )
    se = math.sqrt(drawn.var(ddof=1) / drawn.size + explicit.var(ddof=1) / explicit.size)
    assert abs(drawn.mean() - explicit.mean()) < Z * se


# ---------------------------------------------------------------------------------------
# 7. Backend contract: dtypes, seeds, jit, no mutation, gradients, warnings.
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("method", METHODS)
def test_dtype_follows_x(backend, refs, rng, method, dtype):
    dens = refs.Gaussian.random(3, rng)
    x, proj, noise = _draw_case(rng, (3,))
    out = backend.loss(dens.log_prob_fn, x, method, dtype=dtype, reduction="none", **_inputs(method, proj, noise))
    assert out.dtype == dtype
    expected = refs.reference(
        dens,
        method,
        "log_prob",
        x.astype(dtype),
        projections=proj.astype(dtype),
        noise=noise.astype(dtype),
        sigma=SIGMA,
    )
    np.testing.assert_allclose(out, expected, rtol=1e-3 if dtype == np.float32 else 1e-10)
    if dtype == np.float32:  # drawn randomness follows x's dtype too (float64: other tests)
        drawn = backend.loss(dens.log_prob_fn, x, method, dtype=dtype, seed=0)
        assert drawn.dtype == dtype and np.isfinite(drawn)


@pytest.mark.parametrize("method", METHODS)
def test_same_seed_same_value(backend, refs, rng, method):
    dens = refs.Gaussian.random(3, rng)
    x = rng.normal(size=(B, 3))
    a = backend.loss(dens.log_prob_fn, x, method, seed=11, reduction="none")
    b = backend.loss(dens.log_prob_fn, x, method, seed=11, reduction="none")
    c = backend.loss(dens.log_prob_fn, x, method, seed=12, reduction="none")
    np.testing.assert_array_equal(a, b)
    if method != "esm":  # esm draws nothing
        assert not np.allclose(a, c)


def test_fd_small_eps_warns_for_float32(backend, refs, rng):
    dens = refs.Gaussian.random(3, rng)
    x = rng.normal(size=(B, 3))
    for method in ("fd_ssm", "fd_dsm"):
        with pytest.warns(RuntimeWarning, match="eps"):
            backend.loss(dens.log_prob_fn, x, method, eps=1e-3, dtype=np.float32, seed=0)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            backend.loss(dens.log_prob_fn, x, method, eps=1e-3, dtype=np.float64, seed=0)
            backend.loss(dens.log_prob_fn, x, method, eps=0.1, dtype=np.float32, seed=0)
