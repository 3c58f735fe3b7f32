"""Asking the samplers for draws (issue 11, items 4.2 and 4.3), one body run per PPL:
``num_samples`` / ``num_warmup`` / ``num_chains`` / ``init``, new i.i.d. points of an
``Unnormalized`` site with ``num_draws`` (their layout, default start and moments), and
``SiteSamples`` with its ``layout`` from ``langevin`` and ``nuts``. NumPyro's chains batched
by a plate are in ``tests/numpyro/test_mcmc.py``."""

from __future__ import annotations

import numpy as np
import pytest

from ppl_score.common.langevin import SiteLayout
from tests.helpers.mcmc import COV, DATA, MU, PREC, Z, assert_moments


def gaussian_energy_model(ppl, batch=8):
    """The README's shape: a row-form Gaussian energy ``N(MU, COV)`` in a subsampled plate of
    ``batch`` points out of ``len(data)``, with an observed child ``y ~ N(x, 1)`` that new
    points (``num_draws``) leave out."""
    mu, prec = ppl.t(MU), ppl.t(PREC)

    def energy(v):
        r = v - mu
        return -0.5 * ((r @ prec) * r).sum(-1)

    def model(data):
        with ppl.plate("data", data.shape[0], subsample_size=batch) as idx:
            x = ppl.sample(
                "x",
                ppl.pn.Unnormalized(energy, (2,)) if ppl.name == "numpyro" else ppl.pp.Unnormalized(energy, (2,)),
                obs=data[idx],
            )
            ppl.sample("y", ppl.dist.Normal(x, 1.0).to_event(1), obs=data[idx] + 5.0)

    return model


def test_num_draws_are_new_points_of_the_fitted_energy(ppl):
    """``num_draws`` points, each its own Metropolis chain, from the site's own density
    ``N(MU, COV)`` (the child is left out), independent of the subsampled batch size: the
    layout is ``[num_samples, num_chains, num_draws, 2]``, the rate ``[num_chains, num_draws]``."""
    model = gaussian_energy_model(ppl)
    out = ppl.langevin(
        model, "x", ppl.t(DATA), num_draws=1500, num_chains=2, num_samples=2, thin=30, num_warmup=30, step_size=0.3
    )
    assert out.layout == SiteLayout("draws", (1500, 2), (2,), 1500)
    assert out.layout.draw_shape == (2,)
    assert tuple(out.samples.shape) == (2, 2, 1500, 2) and tuple(out.accept_rate.shape) == (2, 1500)
    x = np.asarray(out.samples)[-1].reshape(-1, 2)
    assert_moments(x, MU, COV)
    assert 0.5 < float(np.asarray(out.accept_rate).mean()) < 1.0


def test_num_draws_default_start_and_init(ppl):
    """The default start cycles through the site's observed points; ``init`` broadcasts to
    ``[num_chains, num_draws, *event]`` (one point, or every draw) and must lie in the support."""
    model = gaussian_energy_model(ppl, batch=5)
    dens = ppl.density(model, "x", ppl.t(DATA), num_draws=7, num_chains=2)
    start = np.asarray(dens.start)
    assert start.shape == (2, 7, 2) and dens.num_rows == 14
    observed = np.asarray(dens.value)
    np.testing.assert_allclose(start.reshape(14, 2), observed[np.arange(14) % 5])
    u = dens.init_unconstrained(ppl.t([0.5, 0.25]))
    assert tuple(u.shape) == (2, 7, 2) and np.allclose(np.asarray(u), [0.5, 0.25])
    with pytest.raises(ValueError, match="init"):
        dens.init_unconstrained(ppl.t(np.zeros((3, 2))))
    out = ppl.langevin(
        model,
        "x",
        ppl.t(DATA),
        num_draws=3,
        num_samples=4,
        num_warmup=0,
        step_size=1e-12,
        init=ppl.t(np.full((3, 2), 7.0)),
        adjusted=False,
    )
    np.testing.assert_allclose(np.asarray(out.samples), 7.0, atol=1e-4)


def test_hierarchical_draws_keep_the_parameters_dims(ppl):
    """A batched density with ``mu`` per group ([G, 1, D] in plate ``groups``): a new point is
    one per group, ``draw_shape = (G, 1, D)``, each group's draws centred at its ``mu``."""
    g = 3
    mus = np.array([[[-3.0, 0.0]], [[0.0, 3.0]], [[3.0, 0.0]]])
    mu = ppl.t(mus)
    Unnormalized = ppl.pn.Unnormalized if ppl.name == "numpyro" else ppl.pp.Unnormalized

    def model(x):
        with ppl.plate("groups", g, dim=-2), ppl.plate("data", x.shape[1], dim=-1):
            ppl.sample("x", Unnormalized(lambda v: -0.5 * ((v - mu) ** 2).sum(-1), (2,), batched=True), obs=x)

    out = ppl.langevin(
        model, "x", ppl.t(np.zeros((g, 4, 2))), num_draws=1000, num_samples=1, thin=30, num_warmup=20, step_size=0.5
    )
    assert out.layout.shape == (1000, g, 1, 2) and out.layout.draw_shape == (g, 1, 2)
    x = np.asarray(out.samples)[-1, 0]  # [1000, g, 1, 2]
    np.testing.assert_array_less(np.abs(x.mean(0) - mus), Z / np.sqrt(1000))


def test_num_draws_posterior_predictive_from_a_guide(ppl):
    """With a guide each new point gets its own latent draw: ``loc ~ N(2, 1)``,
    ``x | loc ~ N(loc, 1)``, so the draws follow ``N(2, 2)``."""
    Unnormalized = ppl.pn.Unnormalized if ppl.name == "numpyro" else ppl.pp.Unnormalized

    def model(x):
        loc = ppl.sample("loc", ppl.dist.Normal(0.0, 10.0))
        with ppl.plate("data", x.shape[0], dim=-1):
            ppl.sample("x", Unnormalized(lambda v: -0.5 * (v - loc) ** 2, (), batched=True), obs=x)

    def guide(x):
        ppl.sample("loc", ppl.dist.Normal(ppl.t(2.0), ppl.t(1.0)))

    out = ppl.langevin(
        model, "x", ppl.t(np.zeros(3)), guide=guide, num_draws=3000, num_samples=1, thin=40, num_warmup=0, step_size=0.8
    )
    assert out.layout.shape == (3000,)
    x = np.asarray(out.samples)[-1, 0]
    assert abs(x.mean() - 2.0) < Z * np.sqrt(2.0 / 3000)
    assert abs(x.var() - 2.0) < Z * 2.0 * np.sqrt(2 / 3000)


def test_nuts_draws_and_result_type(ppl):
    """``nuts`` takes the same draw arguments and returns ``SiteSamples`` with the layout of
    ``langevin`` (a chain's points move jointly: one rate per chain)."""
    model = gaussian_energy_model(ppl)
    out = ppl.nuts(model, "x", ppl.t(DATA), num_draws=50, num_chains=2, num_samples=60, num_warmup=60)
    assert out.layout == SiteLayout("draws", (50, 2), (2,), 50)
    assert tuple(out.samples.shape) == (60, 2, 50, 2) and tuple(out.accept_rate.shape) == (2,)
    x = np.asarray(out.samples)[-1].reshape(-1, 2)  # 100 independent points
    np.testing.assert_array_less(np.abs(x.mean(0) - MU), Z * np.sqrt(np.diag(COV) / 100))
    assert 0.3 < float(np.asarray(out.accept_rate).mean()) <= 1.0


def test_run_length_arguments(ppl):
    """``num_samples`` states kept per chain after ``num_warmup`` steps (``thin`` apart);
    ``num_steps`` is the alternative spelling of the kept-phase length; bad values name the
    argument."""
    model = gaussian_energy_model(ppl)
    out = ppl.langevin(model, "x", ppl.t(DATA), num_samples=3, thin=2, num_warmup=1, num_chains=2, step_size=0.1)
    assert tuple(out.samples.shape) == (3, 2, 8, 2) and out.layout.mode == "site"
    out = ppl.langevin(model, "x", ppl.t(DATA), num_steps=4, thin=2, num_warmup=0, step_size=0.1)
    assert tuple(out.samples.shape) == (2, 1, 8, 2)
    with pytest.raises(ValueError, match="num_samples.*num_steps"):
        ppl.langevin(model, "x", ppl.t(DATA), num_samples=2, num_steps=2)
    with pytest.raises(ValueError, match="num_draws"):
        ppl.langevin(model, "x", ppl.t(DATA), num_draws=0)
    with pytest.raises(ValueError, match="num_warmup"):
        ppl.langevin(model, "x", ppl.t(DATA), num_samples=2, num_warmup=-1)
    with pytest.raises(ValueError, match="num_draws.*Normal"):
        ppl.langevin(model, "y", ppl.t(DATA), num_draws=3, num_samples=1)
