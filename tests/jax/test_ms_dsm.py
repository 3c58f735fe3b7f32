"""``ms_dsm`` under ``jax.jit``: drawn or traced noise levels, new batch shapes, and the
checks that still apply to traced arguments."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

from ppl_score.jax import score_matching_loss  # noqa: E402

SIGMAS = (1.0, 0.3)


def fn(x, sigma):
    return -x / (1.0 + sigma[:, None] ** 2)


def test_jit_with_drawn_and_traced_levels():
    drawn = jax.jit(lambda x, k: score_matching_loss(fn, x, "ms_dsm", key=k, kind="score", sigmas=SIGMAS))
    for b in (3, 5):  # a new shape compiles again and works
        x = jnp.asarray(np.random.default_rng(b).normal(size=(b, 2)))
        assert np.isfinite(float(drawn(x, jax.random.PRNGKey(0))))

    given = jax.jit(
        lambda x, n, lv: score_matching_loss(fn, x, "ms_dsm", kind="score", noise=n, noise_levels=lv, sigmas=SIGMAS)
    )
    x, n = jnp.ones((2, 2)), jnp.zeros((2, 2))
    levels = jnp.array([1.0, 0.3])
    eager = score_matching_loss(fn, x, "ms_dsm", kind="score", noise=n, noise_levels=levels, sigmas=SIGMAS)
    np.testing.assert_allclose(float(given(x, n, levels)), float(eager), rtol=1e-12)
    with pytest.raises(ValueError, match="argument 'noise_levels' must have shape"):
        given(x, n, jnp.ones(3))
    with pytest.raises(ValueError, match="argument 'key' is required: method 'ms_dsm' draws random noise levels"):
        score_matching_loss(fn, x, "ms_dsm", kind="score", noise=n, sigmas=SIGMAS)


@pytest.mark.parametrize("which", ["score", "energy"])
def test_networks_check_the_shape_of_sigma(which):
    """One level for the batch or one per row; any other shape is a ``ValueError`` naming ``sigma``."""
    from ppl_score.jax import nets

    init, apply = {
        "score": (nets.noise_conditional_score_init, nets.noise_conditional_score_apply),
        "energy": (nets.noise_conditional_energy_init, nets.noise_conditional_energy_apply),
    }[which]
    params = init(jax.random.key(0), 3, (8,))
    x = jnp.ones((6, 3))
    np.testing.assert_allclose(apply(params, x, 0.5), apply(params, x, jnp.full((6,), 0.5)))
    for bad in (jnp.full((6, 1), 0.5), jnp.full((5,), 0.5)):
        with pytest.raises(ValueError, match=r"'sigma'.*\[B\] = \[6\].*got shape"):
            apply(params, x, bad)
