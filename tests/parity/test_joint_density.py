"""``ScoreMatching`` matches the score of the model's *joint* log density (SPEC.md section 3)
in both front ends: a site whose distribution depends on a matched value contributes its
log density as a function of that value.

Checks, each in Pyro and NumPyro: closed forms (the held-out case ``x ~ exp(-x^2/2)``,
``y | x ~ N(x, 1)``: score ``y - 2x``, Hessian ``-2I``), every method against the backend on
the hand-written joint log density with the same draws, a Gaussian AR(1) series (the fit
equals the minimizer of the closed-form score-matching objective and is close to the MLE), a
hierarchical model with a constrained site another depends on, a site that couples the data
points (one datum), subsampling and masks, vectorized particles and the ELBO keyword
arguments, and the errors that remain (latent sites depending on a matched value; discrete
latent sites). Pyro-only regressions are in ``tests/pyro/test_joint_density.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import minimize

torch = pytest.importorskip("torch")
pyro = pytest.importorskip("pyro")
jax = pytest.importorskip("jax")
numpyro = pytest.importorskip("numpyro")
import jax.numpy as jnp  # noqa: E402
import numpyro.distributions as ndist  # noqa: E402
import pyro.distributions as pdist  # noqa: E402
from jax import random  # noqa: E402
from numpyro.infer.autoguide import AutoDelta as NAutoDelta  # noqa: E402
from pyro import poutine  # noqa: E402
from pyro.infer.autoguide import AutoDelta  # noqa: E402

import ppl_score.jax as sjax  # noqa: E402
import ppl_score.numpyro as snp  # noqa: E402
import ppl_score.pyro as spy  # noqa: E402
import ppl_score.torch as storch  # noqa: E402
from ppl_score.spec import OBJECTIVES, UNCONDITIONAL_METHODS  # noqa: E402
from tests.helpers.joint_density import F64, D, N, _esm, held_out_pyro, t
from tests.helpers.shared import empty_guide

pytestmark = pytest.mark.usefixtures("one_torch_thread")


KEY = random.PRNGKey(0)


def _options(method):
    opts = {"sigma": 0.5} if "dsm" in method else {}
    if OBJECTIVES[method].uses_projections:
        opts["n_projections"] = 2
    if method in ("ssm", "ssm_vr"):
        opts["projection"] = "gaussian"
    return opts


def _np_key_for_objective(key=KEY):
    return random.split(key, 3)[2]


def held_out_numpyro(x, y):
    with numpyro.plate("data", x.shape[0]):
        xs = numpyro.sample("x", snp.Unnormalized(lambda v: -0.5 * (v**2).sum(-1), event_shape=(D,)), obs=x)
        numpyro.sample("y", ndist.Normal(xs, 1.0).to_event(1), obs=y)


def test_held_out_case_closed_form_in_both_front_ends(rng):
    x, y = rng.normal(size=(N, D)), rng.normal(size=(N, D))
    s = y - 2 * x  # the score of the joint density in x; its Hessian is -2I
    per_datum = 0.5 * (s**2).sum(-1) - 2 * D
    elbo = spy.ScoreMatching("esm", sites=["x"])
    assert elbo.loss(held_out_pyro, empty_guide, t(x), t(y)) == pytest.approx(per_datum.sum(), rel=1e-10)
    losses, weights = elbo.datum_losses(held_out_pyro, empty_guide, t(x), t(y))
    np.testing.assert_allclose(losses.detach().numpy(), per_datum, rtol=1e-10)
    assert weights is None

    nelbo = snp.ScoreMatching("esm", sites=["x"])
    value = jax.jit(lambda a, b: nelbo.loss(KEY, {}, held_out_numpyro, empty_guide, a, b))(
        jnp.asarray(x), jnp.asarray(y)
    )
    assert float(value) == pytest.approx(per_datum.sum(), rel=1e-10)
    losses, _ = nelbo.datum_losses(KEY, {}, held_out_numpyro, empty_guide, jnp.asarray(x), jnp.asarray(y))
    np.testing.assert_allclose(np.asarray(losses), per_datum, rtol=1e-10)


@pytest.mark.parametrize("method", sorted(UNCONDITIONAL_METHODS))
def test_every_method_equals_the_backend_on_the_joint_density(rng, method):
    x, y = rng.normal(size=(N, D)), rng.normal(size=(N, D))
    opts = _options(method)

    def joint_torch(v):
        yk = t(y).repeat(v.shape[0] // N, 1)  # the backend stacks k copies of the batch
        return -0.5 * (v**2).sum(-1) + pdist.Normal(v, 1.0).log_prob(yk).sum(-1)

    pyro.set_rng_seed(3)
    value = spy.ScoreMatching(method, sites=["x"], **opts).loss(held_out_pyro, empty_guide, t(x), t(y))
    pyro.set_rng_seed(3)
    direct = storch.score_matching_loss(joint_torch, t(x), method, reduction="sum", **opts)
    assert value == pytest.approx(direct.item(), rel=1e-10)

    def joint_jax(v):
        yk = jnp.tile(jnp.asarray(y), (v.shape[0] // N, 1))
        return -0.5 * (v**2).sum(-1) + ndist.Normal(v, 1.0).log_prob(yk).sum(-1)

    nvalue = snp.ScoreMatching(method, sites=["x"], **opts).loss(
        KEY, {}, held_out_numpyro, empty_guide, jnp.asarray(x), jnp.asarray(y)
    )
    ndirect = sjax.score_matching_loss(
        joint_jax, jnp.asarray(x), method, key=_np_key_for_objective(), reduction="sum", **opts
    )
    assert float(nvalue) == pytest.approx(float(ndirect), rel=1e-10)


# ---------------------------------------------------------------------------------------
# A Gaussian AR(1) series observed at every step
# ---------------------------------------------------------------------------------------

S, T = 300, 4


def ar_data(seed=1, rho=0.6, sigma=0.8):
    rng = np.random.default_rng(seed)
    x = np.zeros((S, T))
    x[:, 0] = rng.normal(0, sigma, S)
    for k in range(1, T):
        x[:, k] = rho * x[:, k - 1] + rng.normal(0, sigma, S)
    return x


def ar_pyro(x, rho, log_sigma):
    sigma = log_sigma.exp()
    with pyro.plate("series", x.shape[0]):
        prev = pyro.sample("x_0", pdist.Normal(0.0, sigma), obs=x[:, 0])
        for k in range(1, x.shape[1]):
            prev = pyro.sample(f"x_{k}", pdist.Normal(rho * prev, sigma), obs=x[:, k])


def ar_numpyro(x, rho, log_sigma):
    sigma = jnp.exp(log_sigma)
    with numpyro.plate("series", x.shape[0]):
        prev = numpyro.sample("x_0", ndist.Normal(0.0, sigma), obs=x[:, 0])
        for k in range(1, x.shape[1]):
            prev = numpyro.sample(f"x_{k}", ndist.Normal(rho * prev, sigma), obs=x[:, k])


def ar_closed_form_fit(x):
    """The minimizer of exact score matching for AR(1): per series ``x ~ N(0, Lambda^{-1})``
    with ``Lambda = B(rho) / sigma^2`` tridiagonal, ``SM = 1/2 x' Lambda^2 x - tr Lambda``."""

    def precision(rho, sigma):
        b = np.diag([1 + rho**2] * (T - 1) + [1.0]) - rho * (np.eye(T, k=1) + np.eye(T, k=-1))
        return b / sigma**2

    sxx = x.T @ x

    def objective(p):
        lam = precision(p[0], np.exp(p[1]))
        return 0.5 * np.trace(lam @ lam @ sxx) - len(x) * np.trace(lam)

    res = minimize(objective, [0.0, 0.0], method="BFGS", options={"gtol": 1e-10})
    return res.x[0], np.exp(res.x[1])


def ar_mle(x):
    rho = (x[:, 1:] * x[:, :-1]).sum() / (x[:, :-1] ** 2).sum()
    resid = np.concatenate([x[:, :1], x[:, 1:] - rho * x[:, :-1]], 1)
    return rho, np.sqrt((resid**2).mean())


def _fit(value_and_grad):
    res = minimize(value_and_grad, [0.0, 0.0], jac=True, method="BFGS", options={"gtol": 1e-9})
    return res.x[0], np.exp(res.x[1])


def test_ar1_fit_is_the_score_matching_estimator_and_close_to_the_mle():
    x = ar_data()
    expected = ar_closed_form_fit(x)
    rho_mle, sigma_mle = ar_mle(x)
    elbo = spy.ScoreMatching("esm")

    def torch_vg(p):
        rho, ls = t(p[0]).requires_grad_(), t(p[1]).requires_grad_()
        loss = elbo.differentiable_loss(ar_pyro, empty_guide, t(x), rho, ls)
        grads = torch.autograd.grad(loss, [rho, ls])
        return loss.item(), np.array([g.item() for g in grads])

    nelbo = snp.ScoreMatching("esm")
    vg = jax.jit(jax.value_and_grad(lambda p, xs: nelbo.loss(KEY, {}, ar_numpyro, empty_guide, xs, p[0], p[1])))

    def jax_vg(p):
        v, g = vg(jnp.asarray(p), jnp.asarray(x))
        return float(v), np.asarray(g, dtype=np.float64)

    for fit in (_fit(torch_vg), _fit(jax_vg)):
        np.testing.assert_allclose(fit, expected, rtol=1e-5)
        # both estimators are consistent: their difference is well within one standard error
        # of rho (about 1 / sqrt(S (T - 1)) = 0.03 here)
        assert abs(fit[0] - rho_mle) < 0.03 and abs(fit[1] - sigma_mle) < 0.03
    # the data points are the series: a per-series objective
    losses, _ = elbo.datum_losses(ar_pyro, empty_guide, t(x), t(0.5), t(0.0))
    assert losses.shape == (S,)


# ---------------------------------------------------------------------------------------
# Hierarchical: a positive matched site another site depends on, a latent mean
# ---------------------------------------------------------------------------------------


def hier_pyro(s, y):
    mu = pyro.sample("mu", pdist.Normal(t(0.0), t(1.0)))
    with pyro.plate("groups", 2, dim=-2):
        with pyro.plate("data", s.shape[-1], dim=-1):
            sv = pyro.sample("s", pdist.LogNormal(mu, t(0.5)), obs=s)
            pyro.sample("y", pdist.Normal(t(0.0), sv), obs=y)


def hier_numpyro(s, y):
    mu = numpyro.sample("mu", ndist.Normal(0.0, 1.0))
    with numpyro.plate("groups", 2, dim=-2):
        with numpyro.plate("data", s.shape[-1], dim=-1):
            sv = numpyro.sample("s", ndist.LogNormal(mu, 0.5), obs=s)
            numpyro.sample("y", ndist.Normal(0.0, sv), obs=y)


def test_hierarchical_constrained_site_matched_in_log_space(rng):
    s, y = rng.lognormal(0.2, 0.5, size=(2, N)), rng.normal(size=(2, N))
    mu0 = 0.3

    def joint_torch(u):  # u = log s, rows [2N, 1]
        sv = u.exp()[:, 0]
        lp = pdist.LogNormal(t(mu0), t(0.5)).log_prob(sv) + u[:, 0]
        return lp + pdist.Normal(t(0.0), sv).log_prob(t(y).reshape(-1))

    expected = storch.score_matching_loss(joint_torch, t(np.log(s)).reshape(-1, 1), "esm", reduction="sum").item()
    expected -= float(pdist.Normal(t(0.0), t(1.0)).log_prob(t(mu0)))  # E_q[log q - log p(mu)], q a point mass

    guide = lambda s, y: pyro.sample("mu", pdist.Delta(t(mu0)))  # noqa: E731
    assert spy.ScoreMatching("esm", sites=["s"]).loss(hier_pyro, guide, t(s), t(y)) == pytest.approx(
        expected, rel=1e-10
    )

    nguide = lambda s, y: numpyro.sample("mu", ndist.Delta(jnp.asarray(mu0)))  # noqa: E731
    value = snp.ScoreMatching("esm", sites=["s"]).loss(KEY, {}, hier_numpyro, nguide, jnp.asarray(s), jnp.asarray(y))
    assert float(value) == pytest.approx(expected, rel=1e-10)


def test_generalized_bayes_fit_of_a_dependent_model_with_autodelta(rng):
    """SVI with an AutoDelta guide runs on the joint path and moves the latent."""
    s, y = rng.lognormal(0.5, 0.5, size=(2, N)), rng.normal(size=(2, N))
    pyro.clear_param_store()
    guide = AutoDelta(hier_pyro)
    svi = pyro.infer.SVI(hier_pyro, guide, pyro.optim.Adam({"lr": 0.05}), loss=spy.ScoreMatching("esm", sites=["s"]))
    losses = [svi.step(t(s), t(y)) for _ in range(30)]
    assert losses[-1] < losses[0]

    nguide = NAutoDelta(hier_numpyro)
    svi = numpyro.infer.SVI(hier_numpyro, nguide, numpyro.optim.Adam(0.05), loss=snp.ScoreMatching("esm", sites=["s"]))
    result = svi.run(KEY, 30, jnp.asarray(s), jnp.asarray(y), progress_bar=False)
    assert result.losses[-1] < result.losses[0]


# ---------------------------------------------------------------------------------------
# Coupled data points, subsampling and masks
# ---------------------------------------------------------------------------------------


def test_a_site_coupling_the_data_points_makes_the_batch_one_datum(rng):
    """``z ~ N(sum_i x_i, 1)`` outside the plate couples the data: the batch is one datum."""
    x, z = rng.normal(size=(N, D)), rng.normal(size=D)

    def model(x, z):
        with pyro.plate("data", x.shape[0]):
            xs = pyro.sample("x", pdist.Normal(0.0, 1.0).expand([D]).to_event(1), obs=x)
        pyro.sample("z", pdist.Normal(xs.sum(-2), 1.0).to_event(1), obs=z)

    def nmodel(x, z):
        with numpyro.plate("data", x.shape[0]):
            xs = numpyro.sample("x", ndist.Normal(0.0, 1.0).expand([D]).to_event(1), obs=x)
        numpyro.sample("z", ndist.Normal(xs.sum(-2), 1.0).to_event(1), obs=z)

    def joint(v):  # v [k, N * D]
        xs = v.reshape(-1, N, D)
        return -0.5 * (xs**2).sum((-1, -2)) + pdist.Normal(xs.sum(-2), 1.0).log_prob(t(z)).sum(-1)

    expected = storch.score_matching_loss(joint, t(x).reshape(1, -1), "esm", reduction="sum").item()
    elbo = spy.ScoreMatching("esm", sites=["x"])
    assert elbo.loss(model, empty_guide, t(x), t(z)) == pytest.approx(expected, rel=1e-10)
    assert elbo.datum_losses(model, empty_guide, t(x), t(z))[0].shape == (1,)
    value = snp.ScoreMatching("esm", sites=["x"]).loss(KEY, {}, nmodel, empty_guide, jnp.asarray(x), jnp.asarray(z))
    assert float(value) == pytest.approx(expected, rel=1e-10)


def test_subsampling_and_masks_on_the_joint_path(rng):
    n_full, idx = 10, np.array([1, 4, 6, 7, 9])
    x, y = rng.normal(size=(n_full, D)), rng.normal(size=(n_full, D))
    keep_x = np.array([True, False, True, True, True])
    keep_y = np.array([True, True, False, True, True])
    y_bad = y.copy()
    y_bad[idx[~keep_y]] = np.nan  # a masked entry may hold anything

    def model(x, y):
        with pyro.plate("data", n_full, subsample=torch.as_tensor(idx)) as i:
            with poutine.mask(mask=torch.as_tensor(keep_x)):
                xs = pyro.sample("x", spy.Unnormalized(lambda v: -0.5 * (v**2).sum(-1), event_shape=(D,)), obs=x[i])
            pyro.sample("y", pdist.Normal(xs, 1.0).to_event(1).mask(torch.as_tensor(keep_y)), obs=y[i])

    def nmodel(x, y):
        with numpyro.plate("data", n_full, subsample_size=len(idx)):
            with numpyro.handlers.mask(mask=keep_x):
                xs = numpyro.sample(
                    "x", snp.Unnormalized(lambda v: -0.5 * (v**2).sum(-1), event_shape=(D,)), obs=x[idx]
                )
            numpyro.sample("y", ndist.Normal(xs, 1.0).to_event(1).mask(keep_y), obs=y[idx])

    xs, ys = x[idx], y[idx]
    s = np.where(keep_y[:, None], ys - 2 * xs, -xs)
    tr = np.where(keep_y, -2 * D, -D)
    expected = (n_full / len(idx)) * ((0.5 * (s**2).sum(-1) + tr) * keep_x).sum()
    value = spy.ScoreMatching("esm", sites=["x"]).loss(model, empty_guide, t(x), t(y_bad))
    assert value == pytest.approx(expected, rel=1e-10)

    nmodel = numpyro.handlers.substitute(nmodel, data={"data": jnp.asarray(idx)})
    nvalue = snp.ScoreMatching("esm", sites=["x"]).loss(
        KEY, {}, nmodel, empty_guide, jnp.asarray(x), jnp.asarray(y_bad)
    )
    assert float(nvalue) == pytest.approx(expected, rel=1e-10)
    # the NaN of a masked dependent entry reaches no gradient
    grad = jax.grad(
        lambda a: snp.ScoreMatching("esm", sites=["x"]).loss(KEY, {}, nmodel, empty_guide, a, jnp.asarray(y_bad))
    )(jnp.asarray(x))
    assert np.isfinite(np.asarray(grad)).all()


# ---------------------------------------------------------------------------------------
# Particles and ELBO keyword arguments
# ---------------------------------------------------------------------------------------


def test_vectorized_particles_and_elbo_keyword_arguments(rng):
    s, y = rng.lognormal(0.2, 0.5, size=(2, N)), rng.normal(size=(2, N))
    guide = lambda s, y: pyro.sample("mu", pdist.Delta(t(0.3)))  # noqa: E731
    one = spy.ScoreMatching("esm", sites=["s"]).loss(hier_pyro, guide, t(s), t(y))
    for kwargs in (
        {},
        {"vectorize_particles": False},
        {"max_plate_nesting": 2},
        {"vectorize_particles": True, "max_plate_nesting": 2},
    ):
        elbo = spy.ScoreMatching("esm", sites=["s"], num_particles=4, **kwargs)
        assert elbo.vectorize_particles == kwargs.get("vectorize_particles", True)
        assert elbo.loss(hier_pyro, guide, t(s), t(y)) == pytest.approx(one, rel=1e-10)

    nguide = lambda s, y: numpyro.sample("mu", ndist.Delta(jnp.asarray(0.3)))  # noqa: E731
    args = (jnp.asarray(s), jnp.asarray(y))
    none = snp.ScoreMatching("esm", sites=["s"]).loss(KEY, {}, hier_numpyro, nguide, *args)
    for vec in (True, False):
        elbo = snp.ScoreMatching("esm", sites=["s"], num_particles=3, vectorize_particles=vec)
        assert float(elbo.loss(KEY, {}, hier_numpyro, nguide, *args)) == pytest.approx(float(none), rel=1e-10)
    with pytest.raises(TypeError, match="vectorize_particles"):
        spy.ScoreMatching("esm", vectorize_particles="yes")
    with pytest.raises(ValueError, match="unknown option"):
        spy.ScoreMatching("esm", max_plate_nestin=1)
    with pytest.raises(ValueError, match="'max_plate_nesting' must be an int >= 0"):
        spy.ScoreMatching("esm", max_plate_nesting=-1)
    with pytest.raises(TypeError, match="'max_plate_nesting'"):
        spy.ScoreMatching("esm", max_plate_nesting=1.5)
    for unnormalized in (spy.Unnormalized, snp.Unnormalized):
        with pytest.raises(TypeError, match="'batch_shape' must be an int or a tuple of ints"):
            unnormalized(lambda v: -(v**2).sum(-1), (D,), batch_shape=("a",))


# ---------------------------------------------------------------------------------------
# The errors that remain
# ---------------------------------------------------------------------------------------


def test_a_latent_site_depending_on_a_matched_value_is_an_error(rng):
    x = rng.normal(size=(N, D))

    def model(x):
        with pyro.plate("data", x.shape[0]):
            xs = pyro.sample("x", pdist.Normal(0.0, 1.0).expand([D]).to_event(1), obs=x)
            pyro.sample("z", pdist.Normal(xs.sum(-1), 1.0))

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", pdist.Normal(torch.zeros(N, dtype=F64), 1.0))

    with pytest.raises(ValueError, match=r"latent site.*'z' depends on \['x'\]"):
        spy.ScoreMatching("esm").loss(model, guide, t(x))

    def nmodel(x):
        with numpyro.plate("data", x.shape[0]):
            xs = numpyro.sample("x", ndist.Normal(0.0, 1.0).expand([D]).to_event(1), obs=x)
            numpyro.sample("z", ndist.Normal(xs.sum(-1), 1.0))

    def nguide(x):
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("z", ndist.Normal(jnp.zeros(N), 1.0))

    with pytest.raises(ValueError, match=r"latent site.*'z' depends on \['x'\]"):
        snp.ScoreMatching("esm").loss(KEY, {}, nmodel, nguide, jnp.asarray(x))


def test_an_enumerated_discrete_latent_says_what_is_supported(rng):
    x = rng.normal(size=(N, D))

    @pyro.infer.config_enumerate
    def model(x):
        c = pyro.sample("c", pdist.Categorical(torch.ones(2, dtype=F64) / 2))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", pdist.Normal(c.to(F64), 1.0).expand([D]).to_event(1), obs=x)

    with pytest.raises(ValueError, match=r"'c' has a discrete support.*MixtureSameFamily"):
        spy.ScoreMatching("esm").loss(model, empty_guide, t(x))

    def nmodel(x):
        c = numpyro.sample("c", ndist.Categorical(jnp.ones(2) / 2), infer={"enumerate": "parallel"})
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("x", ndist.Normal(c * 1.0, 1.0).expand([D]).to_event(1), obs=x)

    with pytest.raises(ValueError, match=r"'c' has a discrete support.*MixtureSameFamily"):
        snp.ScoreMatching("esm").loss(KEY, {}, nmodel, empty_guide, jnp.asarray(x))


def test_a_factor_depending_on_a_matched_value_joins_the_joint_density(rng):
    """``factor(-c x^2 / 2)`` per datum is part of the log joint density in ``x`` (not of
    ``log p(z)``): the joint is ``N(0, 1 / (1 + c))``, ESM per datum ``(1+c)^2 x^2 / 2 - (1+c)``."""
    x, c = rng.normal(size=N), 0.7
    expected = (0.5 * (1 + c) ** 2 * x**2 - (1 + c)).sum()

    def model(x):
        with pyro.plate("data", x.shape[0]):
            xs = pyro.sample("x", pdist.Normal(t(0.0), t(1.0)), obs=x)
            pyro.factor("penalty", -0.5 * c * xs**2)

    assert spy.ScoreMatching("esm").loss(model, empty_guide, t(x)) == pytest.approx(expected, rel=1e-10)

    def nmodel(x):
        with numpyro.plate("data", x.shape[0]):
            xs = numpyro.sample("x", ndist.Normal(0.0, 1.0), obs=x)
            numpyro.factor("penalty", -0.5 * c * xs**2)

    value = snp.ScoreMatching("esm").loss(KEY, {}, nmodel, empty_guide, jnp.asarray(x))
    assert float(value) == pytest.approx(expected, rel=1e-10)


def test_masked_entries_are_held_at_their_data_in_dependent_densities(rng):
    """A masked entry of a matched site is not matched (zero score) and a dependent site sees
    its data, as ``Trace_ELBO``'s model would."""
    x, y = rng.normal(size=N), rng.normal(size=1)
    keep = np.array([True, False, True, True, False, True])
    rest = x[~keep].sum()

    def joint(r):  # the unmasked entries
        return pdist.Normal(t(0.0), t(1.0)).log_prob(r).sum(-1) + pdist.Normal(r.sum(-1) + rest, t(1.0)).log_prob(
            t(y[0])
        )

    expected = _esm(joint, t(x[keep])[None])

    def model(x, y):
        with pyro.plate("d", N), poutine.mask(mask=torch.as_tensor(keep)):
            xs = pyro.sample("x", pdist.Normal(t(0.0), t(1.0)), obs=x)
        pyro.sample("y", pdist.Normal(xs.sum(-1), t(1.0)), obs=y[0])

    assert spy.ScoreMatching("esm", sites=["x"]).loss(model, empty_guide, t(x), t(y)) == pytest.approx(
        expected, rel=1e-10
    )

    def nmodel(x, y):
        with numpyro.plate("d", N), numpyro.handlers.mask(mask=keep):
            xs = numpyro.sample("x", ndist.Normal(0.0, 1.0), obs=x)
        numpyro.sample("y", ndist.Normal(xs.sum(-1), 1.0), obs=y[0])

    value = snp.ScoreMatching("esm", sites=["x"]).loss(KEY, {}, nmodel, empty_guide, jnp.asarray(x), jnp.asarray(y))
    assert float(value) == pytest.approx(expected, rel=1e-10)


def test_obs_mask_with_a_dependent_site(rng):
    """``obs_mask`` (Pyro: a deterministic ``where`` of ``x_observed`` and the latent
    ``x_unobserved``): the dependent ``y`` sees the observed entries through the matched
    ``x_observed`` and the missing ones through the guide's values."""
    x, y, fill = rng.normal(size=N), rng.normal(size=N), rng.normal(size=N)
    keep = np.array([True, False, True, True, False, True])
    x_bad = np.where(keep, x, np.nan)
    expected = (
        ((0.5 * (y - 2 * x) ** 2 - 2) * keep).sum()
        + 0.5 * (fill[~keep] ** 2).sum()
        + 0.5 * np.log(2 * np.pi) * (~keep).sum()
    )

    def model(x, y):
        with pyro.plate("d", N):
            xs = pyro.sample("x", pdist.Normal(t(0.0), t(1.0)), obs=x, obs_mask=torch.as_tensor(keep))
            pyro.sample("y", pdist.Normal(xs, t(1.0)), obs=y)

    def guide(x, y):
        with pyro.plate("d", N):
            pyro.sample("x_unobserved", pdist.Delta(t(fill)))

    value = spy.ScoreMatching("esm", sites=["x_observed"]).loss(model, guide, t(x_bad), t(y))
    assert value == pytest.approx(expected, rel=1e-10)

    def nmodel(x, y):
        with numpyro.plate("d", N):
            xs = numpyro.sample("x", ndist.Normal(0.0, 1.0), obs=x, obs_mask=keep)
            numpyro.sample("y", ndist.Normal(xs, 1.0), obs=y)

    def nguide(x, y):
        with numpyro.plate("d", N):
            numpyro.sample("x_unobserved", ndist.Delta(jnp.asarray(fill)))

    nvalue = snp.ScoreMatching("esm", sites=["x_observed"]).loss(
        KEY, {}, nmodel, nguide, jnp.asarray(x_bad), jnp.asarray(y)
    )
    assert float(nvalue) == pytest.approx(expected, rel=1e-10)
