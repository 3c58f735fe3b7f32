"""``ppl_score.jax.training.fit_energy`` rejects bad arguments."""

from __future__ import annotations

import numpy as np
import pytest

from tests.helpers.demo import _require


def test_jax_fit_energy_rejects_bad_arguments():
    _require("jax")
    import jax
    import jax.numpy as jnp

    from ppl_score.jax.nets import energy_apply, energy_init
    from ppl_score.jax.training import fit_energy

    params = energy_init(jax.random.PRNGKey(0), 2, (4,))
    x = np.zeros((10, 2))
    with pytest.raises(ValueError, match="method"):
        fit_energy(energy_apply, params, x, "nope", steps=1, progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        fit_energy(energy_apply, params, x, batch_size=0, progress=False)
    with pytest.raises(ValueError, match="lr"):
        fit_energy(energy_apply, params, x, lr=float("inf"), progress=False)
    with pytest.raises(ValueError, match="data"):
        fit_energy(energy_apply, params, np.full((10, 2), np.inf), steps=1, progress=False)
    with pytest.raises(TypeError, match="apply_fn"):
        fit_energy(None, params, x, steps=1, progress=False)
    with pytest.raises(FloatingPointError, match="non-finite by step 1"):
        fit_energy(lambda p, y: energy_apply(p, y) * jnp.nan, params, x, steps=2, progress=False)
