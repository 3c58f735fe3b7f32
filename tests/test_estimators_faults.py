"""Score estimators and ``ImplicitELBO`` under faults (issue 10): a numerically singular
Stein system, tiny bandwidths, non-finite learned-estimator steps, non-finite estimator
output in both front ends, and pickling / deep-copying / ``torch.save`` of the estimators
and ELBOs. Tiny shapes throughout."""

from __future__ import annotations

import copy
import io
import pickle

import numpy as np
import pytest

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
pyro = pytest.importorskip("pyro")
numpyro = pytest.importorskip("numpyro")

import jax.numpy as jnp  # noqa: E402
import numpyro.distributions as ndist  # noqa: E402
import pyro.distributions as pdist  # noqa: E402

from ppl_score import validation_enabled  # noqa: E402
from ppl_score.jax import estimators as je  # noqa: E402
from ppl_score.numpyro.implicit import ImplicitELBO as NImplicitELBO  # noqa: E402
from ppl_score.pyro.implicit import ImplicitELBO as PImplicitELBO  # noqa: E402
from ppl_score.torch import estimators as te  # noqa: E402

DUP = np.array([[0.0, 0.0], [0.0, 0.0], [1.0, 1.0], [2.0, 0.5]])  # two identical samples
AT = DUP[:2] + 0.1


def _both(dtype=np.float64, **kw):
    """``stein_scores`` of both backends on ``DUP``: in-sample and at ``AT``."""
    out = []
    for at in (None, AT):
        t = te.stein_scores(
            torch.as_tensor(DUP.astype(dtype)), None if at is None else torch.as_tensor(at.astype(dtype)), **kw
        )
        j = je.stein_scores(jnp.asarray(DUP.astype(dtype)), None if at is None else jnp.asarray(at.astype(dtype)), **kw)
        out.append((t.numpy(), np.asarray(j)))
    return out


# --------------------------------------------------------------------------------------
# item 10: stein_scores, duplicate samples with a tiny eta, and a tiny bandwidth


@pytest.mark.parametrize("dtype,eta", [(np.float64, 1e-30), (np.float32, 1e-12), (np.float32, 1e-30)])
def test_stein_numerically_singular_is_the_same_error_in_both_backends(dtype, eta):
    for at in (None, AT):
        with pytest.raises(ValueError, match=r"'eta'.*'bandwidth'"):
            te.stein_scores(
                torch.as_tensor(DUP.astype(dtype)), None if at is None else torch.as_tensor(at.astype(dtype)), eta=eta
            )
        with pytest.raises(ValueError, match=r"'eta'.*'bandwidth'"):
            je.stein_scores(
                jnp.asarray(DUP.astype(dtype)), None if at is None else jnp.asarray(at.astype(dtype)), eta=eta
            )


def test_stein_small_eta_resolvable_gives_close_finite_numbers():
    """eta = 1e-12 is above float64's round-off of the solve: finite, and the backends agree
    to the conditioning (eps / eta ~ 1e-4)."""
    for t, j in _both(eta=1e-12):
        assert np.isfinite(t).all() and np.isfinite(j).all()
        np.testing.assert_allclose(t, j, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("bandwidth", [1e-3, 1e-12, 1e-160, 1e-200])
def test_stein_tiny_bandwidth_finite_and_equal(bandwidth):
    """K -> I and every kernel gradient -> 0: the limit 0, with no 0 / 0 from h^2 underflowing."""
    for t, j in _both(bandwidth=bandwidth):
        np.testing.assert_array_equal(t, 0.0)
        np.testing.assert_array_equal(j, 0.0)
    samples = np.random.default_rng(0).normal(size=(5, 2))
    t = te.spectral_scores(torch.as_tensor(samples), bandwidth=1e-200).numpy()
    j = np.asarray(je.spectral_scores(jnp.asarray(samples), bandwidth=1e-200))
    assert np.isfinite(t).all() and np.isfinite(j).all()


def test_stein_bandwidth_zero_in_dtype_names_bandwidth():
    with pytest.raises(ValueError, match="'bandwidth'.*float32"):
        te.stein_scores(torch.as_tensor(DUP, dtype=torch.float32), bandwidth=1e-200)
    with pytest.raises(ValueError, match="'bandwidth'.*float32"):
        je.stein_scores(jnp.asarray(DUP, jnp.float32), bandwidth=1e-200)


def test_stein_singular_under_jit_is_nan_not_garbage():
    out = jax.jit(lambda s: je.kernel_scores_batched("stein", s, eta=1e-30))(jnp.asarray(DUP)[None])
    assert np.isnan(np.asarray(out)).all()


# --------------------------------------------------------------------------------------
# item 11: a learned-estimator step on overflowing samples is refused


@pytest.mark.filterwarnings("ignore::ppl_score.validation.NonFiniteWarning")
def test_torch_learned_update_refuses_a_nonfinite_step():
    est = te.LearnedScoreEstimator(2, hidden=(8,), generator=torch.Generator().manual_seed(0))
    x = torch.as_tensor(np.random.default_rng(0).normal(size=(16, 2)), dtype=torch.float32)
    est.update(x)
    net = copy.deepcopy(est.net.state_dict())
    opt = copy.deepcopy(est.optimizer.state_dict())
    with pytest.raises(ValueError, match="'samples'.*refused"):
        est.update(x * 1e30)  # finite, but the network's loss overflows
    for k, v in est.net.state_dict().items():
        torch.testing.assert_close(v, net[k], rtol=0, atol=0)
    assert est.optimizer.state_dict()["state"][0]["step"] == opt["state"][0]["step"]
    with validation_enabled(False):
        value = est.update(x * 1e30)  # skipped, state unchanged, non-finite loss returned
    assert not np.isfinite(value)
    for k, v in est.net.state_dict().items():
        torch.testing.assert_close(v, net[k], rtol=0, atol=0)
    assert np.isfinite(est.update(x))


def test_jax_learned_update_refuses_a_nonfinite_step():
    est = je.learned_score_estimator(2, hidden=(8,), n_steps=2, method="dsm")
    x = jnp.asarray(np.random.default_rng(0).normal(size=(16, 2)), jnp.float32)
    state, _ = est.update(est.init(jax.random.PRNGKey(0)), jax.random.PRNGKey(1), x)
    with pytest.raises(ValueError, match="'samples'.*refused"):
        est.update(state, jax.random.PRNGKey(2), x * 1e30)
    new, loss = jax.jit(est.update)(state, jax.random.PRNGKey(2), x * 1e30)  # traced: skipped, no error
    assert not np.isfinite(float(loss))
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert np.isfinite(float(est.update(new, jax.random.PRNGKey(3), x)[1]))


# --------------------------------------------------------------------------------------
# item 11: a callable estimator that returns NaN names the site in both front ends


def test_nonfinite_callable_estimator_names_the_site():
    def pmodel():
        pyro.sample("z", pdist.Normal(torch.zeros(2), 1.0).to_event(1))

    def pguide():
        pyro.sample("z", pdist.Delta(pyro.param("m", torch.zeros(2)) + torch.randn(2), event_dim=1))

    elbo = PImplicitELBO(lambda z, c: torch.full_like(z, float("nan")), num_particles=2)
    with pytest.raises(ValueError, match="site 'z'.*non-finite"):
        elbo.loss_and_grads(pmodel, pguide)

    def nmodel():
        numpyro.sample("z", ndist.Normal(jnp.zeros(2), 1.0).to_event(1))

    def nguide():
        eps = jax.random.normal(numpyro.prng_key(), (2,))
        numpyro.sample("z", ndist.Delta(numpyro.param("m", jnp.zeros(2)) + eps, event_dim=1))

    nelbo = NImplicitELBO(lambda z, c: jnp.full_like(z, jnp.nan), num_particles=2)
    with pytest.raises(ValueError, match="site 'z'.*non-finite"):
        nelbo.loss(jax.random.PRNGKey(0), {"m": jnp.zeros(2)}, nmodel, nguide)
    # under tracing nothing can raise (the loss is then NaN, as the estimator's output)
    loss = jax.jit(lambda p: nelbo.loss(jax.random.PRNGKey(0), p, nmodel, nguide))({"m": jnp.zeros(2)})
    assert np.isnan(float(loss)) or np.isfinite(float(loss))


# --------------------------------------------------------------------------------------
# item 5: estimators and ELBOs survive pickle, deepcopy and torch.save


def _torch_roundtrips(obj):
    yield pickle.loads(pickle.dumps(obj))
    yield copy.deepcopy(obj)
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    yield torch.load(buf, weights_only=False)


def test_torch_learned_estimator_roundtrips_and_keeps_computing():
    est = te.LearnedScoreEstimator(2, context_dim=1, hidden=(8,), generator=torch.Generator().manual_seed(0))
    x = torch.as_tensor(np.random.default_rng(0).normal(size=(16, 2)), dtype=torch.float32)
    c = torch.ones(16, 1)
    est.update(x, c)
    for other in _torch_roundtrips(est):
        torch.testing.assert_close(other(x, c), est(x, c), rtol=0, atol=0)
        # the optimizer and generator state came along: the next step is the same
        twin = copy.deepcopy(est)
        assert other.update(x, c) == twin.update(x, c)
        torch.testing.assert_close(other(x, c), twin(x, c), rtol=0, atol=0)


def test_jax_learned_estimator_and_state_roundtrip():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(16, 2)), jnp.float32)
    est = je.learned_score_estimator(2, hidden=(8,), method="dsm", sigma=0.3)  # default jax.nn.softplus
    state, _ = est.update(est.init(jax.random.PRNGKey(0)), jax.random.PRNGKey(1), x)
    other, ostate = pickle.loads(pickle.dumps(est)), pickle.loads(pickle.dumps(state))
    np.testing.assert_array_equal(np.asarray(other.apply(ostate.params, x)), np.asarray(est.apply(state.params, x)))
    assert float(other.update(ostate, jax.random.PRNGKey(2), x)[1]) == float(
        est.update(state, jax.random.PRNGKey(2), x)[1]
    )
    deep, dstate = copy.deepcopy(est), copy.deepcopy(state)
    np.testing.assert_array_equal(np.asarray(deep.apply(dstate.params, x)), np.asarray(est.apply(state.params, x)))
    tanh = pickle.loads(pickle.dumps(je.learned_score_estimator(2, hidden=(8,), activation=jax.nn.tanh)))
    assert tanh.activation is jax.nn.tanh
    import functools

    import optax

    est = je.learned_score_estimator(2, hidden=(4,), optimizer=functools.partial(optax.sgd, 1e-2))
    assert pickle.loads(pickle.dumps(est)).optimizer is not None
    with pytest.raises(TypeError, match="'optimizer'.*functools.partial"):
        pickle.dumps(je.learned_score_estimator(2, hidden=(4,), optimizer=optax.sgd(1e-2)))


def _pyro_pair():
    def model():
        pyro.sample("z", pdist.Normal(torch.zeros(2, dtype=torch.float64), 1.0).to_event(1))

    def guide():
        eps = torch.as_tensor([[0.3, -0.2], [-0.5, 0.9], [1.0, 0.1]], dtype=torch.float64)
        guide.i = (getattr(guide, "i", -1) + 1) % 3
        pyro.sample("z", pdist.Delta(pyro.param("m", torch.zeros(2, dtype=torch.float64)) + eps[guide.i], event_dim=1))

    return model, guide


def test_pyro_implicit_elbo_roundtrips():
    model, guide = _pyro_pair()
    for est in ("stein", te.LearnedScoreEstimator(2, hidden=(4,), dtype=torch.float64)):
        pyro.clear_param_store()
        elbo = PImplicitELBO(est, num_particles=3, update_estimator=False)
        want = elbo.loss(model, guide)
        elbo.loss_and_grads(model, guide)
        for other in _torch_roundtrips(elbo):
            guide.i = -1
            assert other.loss(model, guide) == pytest.approx(want, rel=1e-12)
            guide.i = -1
            other.loss_and_grads(model, guide)
    pyro.clear_param_store()


def test_numpyro_implicit_elbo_roundtrips():
    def model():
        numpyro.sample("z", ndist.Normal(jnp.zeros(2), 1.0).to_event(1))

    def guide():
        eps = jax.random.normal(numpyro.prng_key(), (2,))
        numpyro.sample("z", ndist.Delta(numpyro.param("m", jnp.zeros(2)) + eps, event_dim=1))

    params = {"m": jnp.zeros(2)}
    elbo = NImplicitELBO("stein", num_particles=3, estimator_options={"eta": 0.1})
    want = float(elbo.loss(jax.random.PRNGKey(0), params, model, guide))
    for other in (pickle.loads(pickle.dumps(elbo)), copy.deepcopy(elbo)):
        assert float(other.loss(jax.random.PRNGKey(0), params, model, guide)) == want
