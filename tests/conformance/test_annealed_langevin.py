"""Annealed Langevin dynamics (``annealed_langevin`` of ``ppl_score.{torch,jax}.langevin``)
with the exact noisy score of a 2-D mixture of two well-separated modes: annealing recovers
the modes' weights, plain Langevin at the smallest level does not (its chains stay in the
basin they start in); the Tweedie step; errors.

The noisy score of ``sum_k w_k N(mu_k, v I)`` at level ``sigma`` is that of
``sum_k w_k N(mu_k, (v + sigma^2) I)``. With ``C`` chains the fraction in the heavy mode has
a standard error ``sqrt(w (1 - w) / C)``.
"""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.usefixtures("one_torch_thread")

W = np.array([0.8, 0.2])
MU = np.array([[-4.0, -4.0], [4.0, 4.0]])
V = 0.25
SIGMAS = tuple(np.geomspace(8.0, 0.1, 8))
C = 800


def _mixture_score(xp, softmax):
    def score(x, sigma):
        var = V + sigma[:, None] ** 2
        diffs = [x - xp.asarray(MU[k]) for k in range(2)]
        logits = xp.stack([np.log(W[k]) - (diffs[k] ** 2).sum(-1) / (2 * var[:, 0]) for k in range(2)], -1)
        r = softmax(logits)
        return -(r[:, :1] * diffs[0] + r[:, 1:] * diffs[1]) / var

    return score


class Torch:
    def __init__(self):
        import torch

        from ppl_score.torch import langevin

        self.t, self.mod = torch, langevin
        self.score = _mixture_score(torch, lambda a: torch.softmax(a, -1))

    def annealed(self, fn, x0, seed=0, **kw):
        out = self.mod.annealed_langevin(fn, self.t.as_tensor(x0), generator=self.t.Generator().manual_seed(seed), **kw)
        return out.samples.numpy(), out.levels.numpy()

    def plain(self, fn, x0, sigma, h, n, seed=0):
        t = self.t
        at = lambda x: fn(x, t.full((x.shape[0],), sigma, dtype=x.dtype))  # noqa: E731
        gen = t.Generator().manual_seed(seed)
        return self.mod.ula(at, t.as_tensor(x0), h, n, kind="score", thin=n, generator=gen).samples[-1].numpy()

    def at(self, fn, x, sigma):
        t = self.t
        return fn(t.as_tensor(x), t.full((len(x),), sigma, dtype=t.float64)).numpy()


class Jax:
    def __init__(self):
        import jax
        import jax.numpy as jnp

        from ppl_score.jax import langevin

        self.jax, self.jnp, self.mod = jax, jnp, langevin
        self.score = _mixture_score(jnp, lambda a: jax.nn.softmax(a, -1))

    def annealed(self, fn, x0, seed=0, **kw):
        out = self.mod.annealed_langevin(fn, self.jnp.asarray(x0), key=self.jax.random.PRNGKey(seed), **kw)
        return np.asarray(out.samples), np.asarray(out.levels)

    def plain(self, fn, x0, sigma, h, n, seed=0):
        jnp = self.jnp
        at = lambda x: fn(x, jnp.full((x.shape[0],), sigma, x.dtype))  # noqa: E731
        out = self.mod.ula(at, jnp.asarray(x0), h, n, kind="score", thin=n, key=self.jax.random.PRNGKey(seed))
        return np.asarray(out.samples[-1])

    def at(self, fn, x, sigma):
        return np.asarray(fn(self.jnp.asarray(x), self.jnp.full((len(x),), sigma)))


_SAMPLERS = {"torch": Torch, "jax": Jax}
_CACHE: dict = {}


@pytest.fixture(params=sorted(_SAMPLERS), scope="module")
def sampler(request):
    pytest.importorskip(request.param)
    if request.param not in _CACHE:
        _CACHE[request.param] = _SAMPLERS[request.param]()
    return _CACHE[request.param]


def _x0(n=C, seed=0):
    return np.random.default_rng(seed).uniform(-8, 8, (n, 2))


def test_annealing_recovers_the_weights_plain_langevin_does_not(sampler):
    x0 = _x0()
    samples, levels = sampler.annealed(sampler.score, x0, sigmas=SIGMAS, n_steps_each=40, step_lr=2e-3)
    assert levels.shape == (len(SIGMAS), C, 2)
    heavy = (samples[:, 0] < 0).mean()
    se = np.sqrt(W[0] * W[1] / C)
    assert abs(heavy - W[0]) < 0.03 + 3 * se, heavy  # 0.03: the finite-step bias of the annealing
    # every sample sits at a mode
    assert np.all(np.minimum(*(np.linalg.norm(samples - m, axis=1) for m in MU)) < 3.0)
    # plain (unannealed) Langevin at the smallest level, as many steps: the chains keep the
    # uniform start's split between the two basins, about 1/2, far from 0.8
    plain = sampler.plain(sampler.score, x0, SIGMAS[-1], 2e-3, len(SIGMAS) * 40)
    assert abs((plain[:, 0] < 0).mean() - 0.5) < 4 * np.sqrt(0.25 / C)


def test_tweedie_step_and_levels(sampler):
    x0 = _x0(50, 1)
    kw = dict(sigmas=(1.0, 0.5), n_steps_each=3, step_lr=1e-2)
    denoised, levels = sampler.annealed(sampler.score, x0, seed=4, **kw)
    raw, levels2 = sampler.annealed(sampler.score, x0, seed=4, denoise=False, **kw)
    np.testing.assert_array_equal(levels, levels2)  # same key / generator, same chains
    np.testing.assert_array_equal(raw, levels[-1])
    expected = levels[-1] + 0.25 * sampler.at(sampler.score, levels[-1], 0.5)
    np.testing.assert_allclose(denoised, expected, rtol=1e-12, atol=1e-12)


def test_log_prob_kind(sampler):
    # a noise-conditional log density, N(0, (1 + sigma^2) I), the same code in both frameworks
    fn = lambda x, s: -0.5 * (x * x).sum(-1) / (1 + s**2)  # noqa: E731
    samples, levels = sampler.annealed(
        fn, _x0(1000, 2) / 4, sigmas=(1.0, 0.5), n_steps_each=60, step_lr=0.05, kind="log_prob", denoise=False
    )
    # ULA with h = 0.05 on N(0, 1.25 I) is stationary at variance 1.25 / (1 - h / 2.5) = 1.2755;
    # its sample variance over 2000 coordinates has a standard error of about 1.28 sqrt(2 / 2000) = 0.04
    assert abs(samples.var() - 1.2755) < 0.16


@pytest.mark.parametrize(
    "kw, error, match",
    [
        (dict(sigmas=(0.1, 1.0)), ValueError, "argument 'sigmas' must be strictly decreasing"),
        (dict(sigmas="big"), TypeError, "argument 'sigmas' must be a sequence"),
        (dict(n_steps_each=0), ValueError, "n_steps_each"),
        (dict(step_lr=0.0), ValueError, "step_lr"),
        (dict(denoise=1), TypeError, "argument 'denoise' must be a bool"),
        (dict(kind="energy"), ValueError, "kind"),
    ],
)
def test_errors(sampler, kw, error, match):
    kw = {"sigmas": (1.0, 0.1), "n_steps_each": 1, "step_lr": 1e-3, **kw}
    with pytest.raises(error, match=match):
        sampler.annealed(sampler.score, _x0(4), **kw)


def test_fn_must_be_callable(sampler):
    with pytest.raises(TypeError, match="argument 'fn' must be callable"):
        sampler.annealed(3, _x0(4), sigmas=(1.0, 0.1), n_steps_each=1, step_lr=1e-3)


def test_fn_must_be_noise_conditional_and_divergence_is_reported(sampler):
    with pytest.raises(TypeError, match="noise-conditional"):
        sampler.annealed(lambda x: -x, _x0(4), sigmas=(1.0, 0.1), n_steps_each=1, step_lr=1e-3)
    with pytest.raises(ValueError, match="diverged at noise level .* decrease 'step_lr'"):
        sampler.annealed(sampler.score, _x0(4), sigmas=(10.0, 0.1), n_steps_each=200, step_lr=1.0)
