"""The JAX flow and the NumPyro transform and MLE survive ``pickle`` and ``copy.deepcopy`` (issue 10, item 5)."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

from tests.helpers.flows_faults import COPIES, D, _pair

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("how", ["pickle", "deepcopy"])
def test_jax_and_numpyro_flow_objects_survive_copies(how):
    import numpyro.distributions as ndist

    from ppl_score.numpyro.flows import InvertibleMLPTransform, RelativeGradientMLE

    copy_of = COPIES[how]
    _, jflow, params = _pair()
    x = jnp.asarray(np.random.default_rng(3).normal(size=(4, D)))
    c_flow, c_params = copy_of((jflow, params))
    assert c_flow == jflow and hash(c_flow) == hash(jflow)  # still a valid static argument
    assert type(c_params[0]).__name__ == "FlowLayer"
    np.testing.assert_array_equal(np.asarray(c_flow.log_prob(c_params, x)), np.asarray(jflow.log_prob(params, x)))

    t = InvertibleMLPTransform(jflow, params, {"max_iter": 50})
    t_clone = copy_of(t)
    assert type(t_clone) is InvertibleMLPTransform and t_clone.inverse_kwargs == {"max_iter": 50}
    base = ndist.Normal(jnp.zeros(D), 1.0).to_event(1)
    lp = ndist.TransformedDistribution(base, t).log_prob(x)
    np.testing.assert_array_equal(np.asarray(ndist.TransformedDistribution(base, t_clone).log_prob(x)), np.asarray(lp))
    np.testing.assert_array_equal(np.asarray(t_clone(x)), np.asarray(t(x)))
    assert isinstance(copy_of(RelativeGradientMLE()), RelativeGradientMLE)
