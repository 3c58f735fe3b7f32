"""The training loops ``fit_energy`` of ``ppl_score.{torch,jax}.training`` on the demo's
mixture, one body run per backend: every method, the evaluators against finite
differences, and the Fisher divergence falling."""

from __future__ import annotations

import numpy as np
import pytest

from ppl_score.demo import datasets
from ppl_score.spec import OBJECTIVES, UNCONDITIONAL_METHODS
from tests.helpers.demo import BACKENDS, _require

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --------------------------------------------------------------------------------------
# Training loops


def _arrays(layers):
    """The arrays of ``[(W, b), ...]`` (or of a flat list), without the ``None`` of a layer
    without bias (an energy's last layer)."""
    flat = [a for layer in layers for a in (layer if isinstance(layer, tuple) else (layer,))]
    return [a for a in flat if a is not None]


def _fit(backend, method, steps, hidden=(16, 16), seed=0, batch_size=64, lr=5e-3, **options):
    """Fit an MLP energy on the mixture with ``backend``; returns the fit and a check that
    the caller's initial model / parameters were left untouched."""
    data = datasets.mixture_dataset(n_train=2000, n_test=500)
    quadratic = 0.08
    if backend == "torch":
        import torch

        from ppl_score.torch.nets import MLPEnergy, mlp_params
        from ppl_score.torch.training import fit_energy

        torch.manual_seed(seed)
        model = MLPEnergy(2, hidden, torch.nn.Softplus, quadratic)
        before = mlp_params(model)
        fit = fit_energy(
            model, data.train, method, steps=steps, batch_size=batch_size, lr=lr, seed=seed, progress=False, **options
        )
        trained = mlp_params(fit.model)
        untouched = all(np.array_equal(a, b) for a, b in zip(_arrays(before), _arrays(mlp_params(model))))
    else:
        import functools

        import jax

        from ppl_score.jax.nets import energy_apply, energy_init
        from ppl_score.jax.training import fit_energy

        params = energy_init(jax.random.PRNGKey(seed), 2, hidden)
        before = [np.array(a) for a in _arrays(params)]
        apply_fn = functools.partial(energy_apply, quadratic=quadratic)
        fit = fit_energy(
            apply_fn,
            params,
            data.train,
            method,
            steps=steps,
            batch_size=batch_size,
            lr=lr,
            seed=seed,
            progress=False,
            **options,
        )
        trained = [np.asarray(a) for a in _arrays(fit.params)]
        untouched = all(np.array_equal(a, np.asarray(b)) for a, b in zip(before, _arrays(params)))
    changed = any(not np.allclose(a, b) for a, b in zip(_arrays(before), _arrays(trained)))
    return data, fit, untouched, changed


@pytest.mark.parametrize("method", list(UNCONDITIONAL_METHODS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_fit_energy_runs_every_method(backend, method):
    _require(backend)
    options = {k: v for k, v in {"sigma": 0.1, "eps": 0.1}.items() if k in OBJECTIVES[method].defaults}
    data, fit, untouched, changed = _fit(backend, method, steps=3, **options)
    assert fit.losses.shape == (3,) and np.isfinite(fit.losses).all()
    assert changed and untouched


@pytest.mark.parametrize("backend", BACKENDS)
def test_fit_energy_evaluators_agree_with_finite_differences(backend):
    _require(backend)
    data, fit, _, _ = _fit(backend, "ssm_vr", steps=0)
    x = data.test[:20]
    assert fit.log_prob(x).shape == (20,) and fit.score(x).shape == (20, 2) and fit.esm(x).shape == (20,)
    h = 1e-2  # the model runs in float32: a large step keeps roundoff (eps32 |l| / h) small
    fd = np.stack([(fit.log_prob(x + h * e) - fit.log_prob(x - h * e)) / (2 * h) for e in np.eye(2)], -1)
    np.testing.assert_allclose(fit.score(x), fd, rtol=1e-3, atol=1e-3)
    trace = sum((fit.score(x + h * e)[:, i] - fit.score(x - h * e)[:, i]) / (2 * h) for i, e in enumerate(np.eye(2)))
    s = fit.score(x)
    np.testing.assert_allclose(fit.esm(x), trace + 0.5 * (s * s).sum(-1), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fit_energy_reduces_fisher_divergence(backend):
    _require(backend)

    def fisher(data, fit):
        return 0.5 * np.mean(((fit.score(data.test) - data.score(data.test)) ** 2).sum(-1))

    data, untrained, _, _ = _fit(backend, "ssm_vr", steps=0, hidden=(32, 32))
    _, trained, _, _ = _fit(backend, "ssm_vr", steps=300, hidden=(32, 32), batch_size=128, lr=2e-2)
    before, after = fisher(data, untrained), fisher(data, trained)
    # the untrained model's score is ~ -0.08 x: Fisher ~ 1/2 E||s_true||^2 ~ 4
    assert after < 0.25 * before, (before, after)
