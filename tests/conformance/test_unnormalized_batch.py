"""``Unnormalized`` with a real ``batch_shape`` and the batched form of ``log_density_fn``
(issue 11, item 4.1), one body run per PPL: ``expand`` and ``log_prob`` broadcast like any
distribution's; a hierarchical energy (parameters in a plate ``groups``, points in a nested
plate ``data``) is fitted by ``ScoreMatching("esm")`` to its closed form; Langevin and NUTS
run on a site whose density uses a latent drawn per chain from a guide."""

from __future__ import annotations

import numpy as np
import pytest

G, N, D = 3, 4, 2
RNG = np.random.default_rng(11)
X = RNG.normal(size=(G, N, D))
MU = RNG.normal(size=(G, 1, D))


def esm_closed_form(x, mu):
    """``sum_i tr H + 1/2 ||s||^2`` for ``log p = -1/2 ||x - mu||^2``: ``-D + 1/2 ||x - mu||^2``."""
    return float((-x.shape[-1] + 0.5 * ((x - mu) ** 2).sum(-1)).sum())


def normal_log_prob(v):
    return float((-0.5 * v**2 - 0.5 * np.log(2 * np.pi)).sum())


# ---------------------------------------------------------------------------------------
# the distribution
# ---------------------------------------------------------------------------------------


def test_batch_shape_expand_and_log_prob_broadcast(ppl):
    """``log_prob(value [k, *batch, *event]) -> [k, *batch]``, a value broadcasting against
    ``batch_shape``, and ``expand`` giving a real ``Unnormalized`` with the new batch shape."""
    rows = lambda v: -0.5 * (v**2).sum(-1)  # noqa: E731
    d = ppl.Unnormalized(rows, (D,), batch_shape=(3,))
    assert tuple(d.batch_shape) == (3,) and tuple(d.event_shape) == (D,)
    v = RNG.normal(size=(5, 3, D))
    np.testing.assert_allclose(ppl.np(d.log_prob(ppl.t(v))), -0.5 * (v**2).sum(-1), rtol=1e-12)
    one = RNG.normal(size=(D,))
    assert ppl.np(d.log_prob(ppl.t(one))).shape == (3,)  # a single point broadcast to the batch
    e = d.expand((4, 3))
    assert type(e) is type(d) and tuple(e.batch_shape) == (4, 3) and tuple(e.event_shape) == (D,)
    assert ppl.np(e.log_prob(ppl.t(v[:, None]))).shape == (5, 4, 3)
    with pytest.raises(ValueError, match="expand"):
        d.expand((4,))
    with pytest.raises(ValueError, match="broadcast"):
        d.log_prob(ppl.t(RNG.normal(size=(2, D))))
    with pytest.raises(TypeError, match="batched"):
        ppl.Unnormalized(rows, (D,), batched=1)
    with pytest.raises(ValueError, match="batch_shape"):
        ppl.Unnormalized(rows, (D,), batch_shape=(-1,))
    with pytest.raises(TypeError, match="batch_shape"):
        ppl.Unnormalized(rows, (D,), batch_shape=2.0)


def test_batched_form_broadcasts_parameters_and_validates_its_output(ppl):
    """``batched=True``: ``log_density_fn`` gets ``x[*batch, *event]`` unflattened and
    broadcasts with parameters carrying batch dims; an output that sums over points (or has
    dims the batch shape does not cover) is a ValueError naming ``log_density_fn``; the row
    form with such parameters fails with a hint to pass ``batched=True``."""
    mu = ppl.t(MU)
    d = ppl.Unnormalized(lambda v: ppl.sq(v, mu), (D,), batched=True).expand((G, N))
    np.testing.assert_allclose(ppl.np(d.log_prob(ppl.t(X))), -0.5 * ((X - MU) ** 2).sum(-1), rtol=1e-12)
    assert ppl.np(d.log_prob(ppl.t(X[None]))).shape == (1, G, N)
    np.testing.assert_allclose(
        ppl.np(ppl.Unnormalized(lambda v: ppl.sq(v, mu), (D,), batched=True).log_density(ppl.t(np.zeros((1, 1, D))))),
        -0.5 * (MU**2).sum(-1),
        rtol=1e-12,
    )  # [G, 1]: the parameters' dims
    with pytest.raises(ValueError, match="log_density_fn.*batched=True"):
        ppl.Unnormalized(lambda v: ppl.sq(v, mu).sum(), (D,), batched=True).expand((G, N)).log_prob(ppl.t(X))
    with pytest.raises(ValueError, match="log_density_fn.*batched=True"):
        ppl.Unnormalized(lambda v: ppl.sq(v, mu), (D,), batched=True).expand((N,)).log_prob(ppl.t(X[0]))
    with pytest.raises(Exception) as err:
        ppl.Unnormalized(lambda v: ppl.sq(v, mu), (D,)).expand((G, N)).log_prob(ppl.t(X))
    text = str(err.value) + " ".join(getattr(err.value, "__notes__", []))
    assert "batched=True" in text


# ---------------------------------------------------------------------------------------
# the hierarchical energy under ScoreMatching
# ---------------------------------------------------------------------------------------


def _hier_model(ppl, latent: bool):
    mu_fixed = ppl.t(MU)

    def model(x):
        with ppl.plate("groups", G, dim=-2):
            if latent:
                mu = ppl.sample("mu", ppl.dist.Normal(0.0, 1.0).expand([1, D]).to_event(1))
            else:
                mu = mu_fixed
            with ppl.plate("data", N, dim=-1):
                ppl.sample("x", ppl.Unnormalized(lambda v: ppl.sq(v, mu), (D,), batched=True), obs=x)

    def guide(x):
        with ppl.plate("groups", G, dim=-2):
            ppl.sample("mu", ppl.dist.Delta(mu_fixed, event_dim=1))

    return model, guide


def test_hierarchical_energy_esm_closed_form(ppl):
    """``mu`` in plate ``groups`` ([G, 1, D]), ``x`` in the nested plate ``data`` ([G, N, D]):
    ESM is ``sum (-D + 1/2 ||x - mu||^2)``; with ``mu`` latent and a Delta guide at the same
    value the loss adds ``-log p(mu)``."""
    model, _ = _hier_model(ppl, latent=False)
    np.testing.assert_allclose(float(ppl.esm_loss(model, lambda x: None, ppl.t(X))), esm_closed_form(X, MU), rtol=1e-10)
    model, guide = _hier_model(ppl, latent=True)
    expected = esm_closed_form(X, MU) - normal_log_prob(MU)
    np.testing.assert_allclose(float(ppl.esm_loss(model, guide, ppl.t(X))), expected, rtol=1e-10)


# ---------------------------------------------------------------------------------------
# sampling a site whose density uses a latent drawn per chain from a guide
# ---------------------------------------------------------------------------------------


def _loc_model(ppl, batched=True):
    """``loc ~ N(0, 10)``, ``x | loc ~ Unnormalized(-1/2 (x - loc)^2)`` in a plate; the
    guide ``loc ~ N(2, 1)``: the predictive of ``x`` is ``N(2, 2)``."""

    def model(x):
        loc = ppl.sample("loc", ppl.dist.Normal(0.0, 10.0))
        with ppl.plate("data", x.shape[0], dim=-1):
            ppl.sample("x", ppl.Unnormalized(lambda v: -0.5 * (v - loc) ** 2, (), batched=batched), obs=x)

    def guide(x):
        ppl.sample("loc", ppl.dist.Normal(ppl.t(2.0), ppl.t(1.0)))

    return model, guide


def test_langevin_with_guide_latent_in_the_density(ppl):
    """Each chain draws its own ``loc`` (shape [C, 1] at the chain dim), which meets the
    site's value unflattened in the batched form: across chains ``x ~ N(2, 2)``."""
    model, guide = _loc_model(ppl)
    out = ppl.langevin(
        model,
        "x",
        ppl.t(np.zeros(2)),
        guide=guide,
        num_chains=3000,
        num_samples=1,
        thin=40,
        num_warmup=0,
        step_size=0.8,
    )
    x = ppl.np(out.samples)[-1].reshape(-1)  # both points of every chain: i.i.d. given loc per chain
    assert out.samples.shape == (1, 3000, 2) and out.layout.mode == "site"
    first = ppl.np(out.samples)[-1, :, 0]
    assert abs(first.mean() - 2.0) < 4 * np.sqrt(2.0 / 3000)
    assert abs(first.var() - 2.0) < 4 * 2.0 * np.sqrt(2 / 3000)
    assert np.isfinite(x).all()


def test_row_form_with_guide_latent_fails_clearly(ppl):
    model, guide = _loc_model(ppl, batched=False)
    with pytest.raises(ValueError, match="batched=True"):
        ppl.langevin(model, "x", ppl.t(np.zeros(2)), guide=guide, num_chains=4, num_samples=1, num_warmup=0)


def test_nuts_with_guide_latent_in_the_density(ppl):
    model, guide = _loc_model(ppl)
    out = ppl.nuts(model, "x", ppl.t(np.zeros(2)), guide=guide, num_samples=20, num_warmup=20, num_chains=2)
    assert out.samples.shape == (20, 2, 2) and out.accept_rate.shape == (2,)
    assert np.isfinite(ppl.np(out.samples)).all()
