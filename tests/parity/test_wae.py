"""The WAE / implicit-VI logic written once (issue 11): ``ppl_score.common`` holds the site
choice, the checks and the WAE loss, ``ppl_score.{torch,jax}.mmd`` the MMD maths, and the
Pyro and NumPyro front ends only translate traces. So: the same names, the same messages
from both PPLs, and the same numbers from both PPLs on a deterministic encoder."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pyro = pytest.importorskip("pyro")
jax = pytest.importorskip("jax")
numpyro = pytest.importorskip("numpyro")
import jax.numpy as jnp  # noqa: E402
import numpyro.distributions as ndist  # noqa: E402
import pyro.distributions as pdist  # noqa: E402

from ppl_score.common import implicit, mmd, wae  # noqa: E402
from ppl_score.jax import mmd as jmmd  # noqa: E402
from ppl_score.numpyro import implicit as nimplicit  # noqa: E402
from ppl_score.numpyro import wae as nwae  # noqa: E402
from ppl_score.pyro import implicit as pimplicit  # noqa: E402
from ppl_score.pyro import wae as pwae  # noqa: E402
from ppl_score.torch import mmd as tmmd  # noqa: E402
from tests.helpers.wae import W, X

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_public_names_are_the_shared_ones():
    assert pwae.imq_mmd2 is tmmd.imq_mmd2 and nwae.imq_mmd2 is jmmd.imq_mmd2
    assert pwae.MMD_SCALES is nwae.MMD_SCALES is mmd.MMD_SCALES
    assert nimplicit.score_state_name("z") == implicit.score_state_name("z") == "z_score_state"
    assert issubclass(pwae.WAE, wae.WAEOptions) and issubclass(nwae.WAE, wae.WAEOptions)


def _pyro_pair(code_shape=(6, 2), prior=True, extra_code=False):
    def model(x):
        with pyro.plate("data", x.shape[0]):
            if prior:
                z = pyro.sample("z", pdist.Normal(torch.zeros(2, dtype=x.dtype), 1.0).to_event(1))
            else:
                z = torch.zeros(x.shape[0], 2, dtype=x.dtype)
            pyro.sample("x", pdist.Normal(z @ torch.as_tensor(W).T, 0.5).to_event(1), obs=x)
        if extra_code:
            pyro.sample("u", pdist.Normal(torch.zeros(3, 2, dtype=x.dtype), 1.0).to_event(1))

    def guide(x):
        code = torch.tanh(x @ torch.as_tensor(W))[: code_shape[0]]
        with pyro.plate("data", code_shape[0]):
            pyro.sample("z", pdist.Delta(code, event_dim=1))
        if extra_code:
            pyro.sample("u", pdist.Delta(torch.zeros(3, 2, dtype=x.dtype), event_dim=1))

    return model, guide


def _numpyro_pair(code_shape=(6, 2), prior=True, extra_code=False):
    def model(x):
        with numpyro.plate("data", x.shape[0]):
            if prior:
                z = numpyro.sample("z", ndist.Normal(jnp.zeros(2), 1.0).to_event(1))
            else:
                z = jnp.zeros((x.shape[0], 2))
            numpyro.sample("x", ndist.Normal(z @ jnp.asarray(W).T, 0.5).to_event(1), obs=x)
        if extra_code:
            numpyro.sample("u", ndist.Normal(jnp.zeros((3, 2)), 1.0).to_event(1))

    def guide(x):
        code = jnp.tanh(x @ jnp.asarray(W))[: code_shape[0]]
        with numpyro.plate("data", code_shape[0]):
            numpyro.sample("z", ndist.Delta(code, event_dim=1))
        if extra_code:
            numpyro.sample("u", ndist.Delta(jnp.zeros((3, 2)), event_dim=1))

    return model, guide


def _pyro_terms(loss, **kw):
    model, guide = _pyro_pair(**kw)
    return loss.terms(model, guide, torch.as_tensor(X))


def _numpyro_terms(loss, **kw):
    model, guide = _numpyro_pair(**kw)
    out = loss.terms(jax.random.PRNGKey(0), {}, model, guide, jnp.asarray(X))
    return {k: float(v) for k, v in out.items()}


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(prior=False), "code site 'z' of the guide has no prior"),
        (dict(code_shape=(1, 2)), "site 'z' holds 1 code"),
        (dict(extra_code=True), "different numbers of codes"),
    ],
)
def test_same_wae_messages_in_both_ppls(kw, match):
    for run, WAE in ((_pyro_terms, pwae.WAE), (_numpyro_terms, nwae.WAE)):
        with pytest.raises(ValueError, match=match):
            run(WAE("mmd"), **kw)
    for WAE in (pwae.WAE, nwae.WAE):
        with pytest.raises(ValueError, match="'sites'.*'v' is not an unobserved sample site"):
            (_pyro_terms if WAE is pwae.WAE else _numpyro_terms)(WAE("mmd", sites=["v"]))


def test_same_wae_numbers_in_both_ppls():
    """A deterministic encoder and the exact prior score: reconstruction and cross-entropy
    are the same numbers in both PPLs (the MMD monitor uses each PPL's prior draws)."""
    exact = lambda z, context: -z  # noqa: E731  (the score of N(0, I); any callable works)
    for reconstruction in ("likelihood", "squared_error"):
        tp = _pyro_terms(pwae.WAE("score", estimator=exact, reconstruction=reconstruction))
        tn = _numpyro_terms(nwae.WAE("score", estimator=exact, reconstruction=reconstruction))
        for key in ("reconstruction", "divergence"):
            np.testing.assert_allclose(tp[key], tn[key], rtol=1e-10)
    codes = np.tanh(X @ W)
    np.testing.assert_allclose(tp["divergence"], 0.5 * (codes**2).sum(1).mean() + np.log(2 * np.pi), rtol=1e-10)


def test_same_implicit_site_messages_in_both_ppls():
    trace_like = {"z": {"type": "sample", "is_observed": False, "fn": pdist.Normal(0.0, 1.0)}}
    with pytest.raises(ValueError, match=r"'z' is not implicit; write it as pyro\.sample"):
        implicit.implicit_site_names(trace_like, ("z",), pdist.Delta, "pyro")
    with pytest.raises(ValueError, match="'w' is not a sample site"):
        implicit.implicit_site_names(trace_like, ("w",), pdist.Delta, "pyro")
    for ELBO in (pimplicit.ImplicitELBO, nimplicit.ImplicitELBO):
        with pytest.raises(TypeError, match="'estimator' must be a LearnedScoreEstimator"):
            ELBO(3.0)
        with pytest.raises(ValueError, match="'num_particles' must be >= 2"):
            ELBO("stein")
