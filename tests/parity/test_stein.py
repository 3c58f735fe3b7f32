"""The kernel Stein discrepancy across implementations: ``ppl_score.torch.stein`` and
``ppl_score.jax.stein`` give the same statistic (float64, to round-off) and, with the same
explicit multipliers, the same p-value; Pyro's and NumPyro's ``goodness_of_fit`` agree on the
same model and data, a constrained site included."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

from ppl_score.jax import stein as js  # noqa: E402
from ppl_score.torch import stein as ts  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("kernel, bandwidth", [("imq", None), ("rbf", None), ("rbf", 0.6)])
def test_torch_jax_parity(rng, kernel, bandwidth):
    n, d, b = 50, 3, 100
    x = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) + 3.0
    s = rng.normal(size=(n, d))
    w = rng.choice([-1.0, 1.0], size=(b, n))
    for statistic in ("u", "v"):
        kw = dict(kernel=kernel, bandwidth=bandwidth, statistic=statistic, n_bootstrap=b)
        t = ts.ksd_test(torch.as_tensor(x), torch.as_tensor(s), weights=torch.as_tensor(w), chunk_size=7, **kw)
        j = js.ksd_test(jnp.asarray(x), jnp.asarray(s), weights=jnp.asarray(w), **kw)
        np.testing.assert_allclose(float(t.statistic), float(j.statistic), rtol=1e-6)
        assert float(t.p_value) == pytest.approx(float(j.p_value), abs=1e-12)
        del kw["n_bootstrap"]
        np.testing.assert_allclose(float(ts.ksd(torch.as_tensor(x), torch.as_tensor(s), **kw)), float(j.statistic))


def test_pyro_numpyro_goodness_of_fit():
    pyro = pytest.importorskip("pyro")
    numpyro = pytest.importorskip("numpyro")
    import numpyro.distributions as ndist
    import pyro.distributions as pdist

    import ppl_score.numpyro as snp
    import ppl_score.pyro as spy

    rng = np.random.default_rng(3)
    x = rng.normal(size=(40, 2))
    y = np.exp(rng.normal(size=40))
    w = rng.choice([-1.0, 1.0], size=(100, 40))

    def pyro_model(x, y):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", spy.Unnormalized(lambda v: -0.5 * ((v - 0.2) ** 2).sum(-1), event_shape=(2,)), obs=x)
            pyro.sample("y", pdist.LogNormal(torch.tensor(0.1, dtype=y.dtype), 1.2), obs=y)

    def numpyro_model(x, y):
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("x", snp.Unnormalized(lambda v: -0.5 * ((v - 0.2) ** 2).sum(-1), event_shape=(2,)), obs=x)
            numpyro.sample("y", ndist.LogNormal(0.1, 1.2), obs=y)

    for site in ("x", "y"):
        p = spy.goodness_of_fit(
            pyro_model, site, torch.as_tensor(x), torch.as_tensor(y), n_bootstrap=100, weights=torch.as_tensor(w)
        )
        q = snp.goodness_of_fit(
            numpyro_model,
            site,
            jnp.asarray(x),
            jnp.asarray(y),
            rng_key=jax.random.key(0),
            n_bootstrap=100,
            weights=jnp.asarray(w),
        )
        np.testing.assert_allclose(float(p.statistic), float(q.statistic), rtol=1e-10)
        assert float(p.p_value) == float(q.p_value)
