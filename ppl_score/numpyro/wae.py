"""Wasserstein auto-encoders as an SVI loss (NumPyro); mirrors ``ppl_score.pyro.wae`` (see
its docstring for the loss). Works inside the jitted ``SVI.update`` / ``SVI.run``; a learned
score estimator keeps its state in NumPyro's mutable state, declared in the guide with
``ppl_score.numpyro.implicit.score_state(site, estimator)``.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax import random
from numpyro.handlers import replay, seed, substitute, trace
from numpyro.infer import ELBO

from .. import frontend, validation
from .. import implicit_spec as ispec
from ..jax.checks import is_concrete
from ..jax.estimators import LearnedScoreEstimator
from .implicit import _check_estimator, score_state_name, site_scores

__all__ = ["WAE", "imq_mmd2", "MMD_SCALES"]

MMD_SCALES = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)


def imq_mmd2(x, y, c, scales=MMD_SCALES):
    """Unbiased MMD^2 between ``x [N, D]`` and ``y [M, D]`` with the kernel
    ``sum_s c s / (c s + ||x - y||^2)``."""

    def k(a, b):
        d2 = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
        return sum(c * s / (c * s + d2) for s in scales)

    n, m = x.shape[0], y.shape[0]
    kxx, kyy = k(x, x), k(y, y)
    off = lambda kk, r: (kk.sum() - jnp.trace(kk)) / (r * (r - 1))
    return off(kxx, n) + off(kyy, m) - 2.0 * k(x, y).mean()


def _prior_variance(fn, draws):
    """Mean variance of the prior ``p_Z``: analytic where the distribution has it, else that
    of its ``draws [N, D]`` (a prior without ``variance``, e.g. a mixture or a custom one)."""
    try:
        return jax.lax.stop_gradient(jnp.mean(fn.variance))
    except (NotImplementedError, AttributeError):
        return jnp.mean(jnp.var(draws, axis=0))


class WAE(ELBO):
    """Wasserstein auto-encoder loss for a (decoder model, encoder guide) pair.

    Arguments as ``ppl_score.pyro.wae.WAE``: ``regularizer`` (``"score"`` | ``"mmd"``),
    ``lam``, ``estimator`` (``"stein"``, ``"spectral"``, a ``LearnedScoreEstimator`` with
    ``context_dim=0`` whose state the guide declares with ``score_state``, or a callable),
    ``estimator_options``, ``reconstruction`` (``"likelihood"`` | ``"squared_error"``),
    ``sites``, ``mmd_scales``, ``update_estimator``.

    ``terms(rng_key, params, model, guide, *args)`` returns the reconstruction, the reported
    divergence and the MMD^2 of the codes to prior draws (with a learned estimator,
    ``params`` must include the mutable state: ``{**svi.get_params(s), **s.mutable_state}``).
    """

    def __init__(
        self,
        regularizer: str = "score",
        *,
        lam: float = 10.0,
        estimator: Any = "stein",
        estimator_options: Mapping | None = None,
        reconstruction: str = "likelihood",
        sites=None,
        mmd_scales=MMD_SCALES,
        update_estimator: bool = True,
    ):
        super().__init__(num_particles=1)
        self.regularizer = ispec.check_regularizer(regularizer)
        self.lam = ispec.check_positive("lam", lam)
        self.reconstruction = ispec.check_reconstruction(reconstruction)
        self.sites = ispec.check_sites(sites)
        self.mmd_scales = frontend.check_mmd_scales(mmd_scales)
        self.update_estimator = bool(update_estimator)
        for est in estimator.values() if isinstance(estimator, Mapping) else [estimator]:
            if isinstance(est, LearnedScoreEstimator) and est.context_dim:
                raise ValueError("argument 'estimator': the aggregate posterior's score takes no context (context_dim=0)")
            _check_estimator(est, 2)
        self.estimator = estimator
        self.estimator_options = estimator_options

    def _for_site(self, name):
        est, opts = ispec.for_site(self.estimator, self.estimator_options or {}, name, "code site")
        return est, dict(opts)

    def _terms(self, rng_key, param_map, model, guide, args, kwargs, train):
        k_model, k_guide, k_prior, k_est = random.split(rng_key, 4)
        guide_trace = trace(substitute(seed(guide, k_guide), data=param_map)).get_trace(*args, **kwargs)
        params = dict(param_map)
        mutable = {n: s["value"] for n, s in guide_trace.items() if s["type"] == "mutable"}
        params.update(mutable)
        model_trace = trace(substitute(replay(seed(model, k_model), guide_trace), data=params)).get_trace(*args, **kwargs)
        mutable.update({n: s["value"] for n, s in model_trace.items() if s["type"] == "mutable"})
        names = [n for n, s in guide_trace.items() if s["type"] == "sample" and not s["is_observed"]]
        if self.sites is not None:
            for n in self.sites:
                if n not in names:
                    raise ValueError(f"argument 'sites': {n!r} is not an unobserved sample site of the guide")
            names = list(self.sites)
        if not names:
            raise ValueError("WAE: the guide has no code site (an unobserved sample site, e.g. a Delta)")
        n_codes = None
        divergence, reported, monitor = 0.0, 0.0, 0.0
        new_state = {}
        for i, name in enumerate(names):
            gsite = guide_trace[name]
            if name not in model_trace or model_trace[name]["type"] != "sample":
                raise ValueError(f"WAE: code site {name!r} of the guide has no prior in the model")
            if not gsite["fn"].has_rsample:
                raise ValueError(f"WAE: guide site {name!r} is not reparameterizable; encode with a Delta")
            z = gsite["value"]
            event_dim = gsite["fn"].event_dim
            b = math.prod(z.shape[: z.ndim - event_dim])
            if n_codes is not None and b != n_codes:
                raise ValueError(f"WAE: code sites have different numbers of codes ({n_codes} vs {b} at {name!r})")
            n_codes = b
            if b < 2:
                raise ValueError(f"WAE: site {name!r} holds {b} code; the aggregate posterior needs a minibatch of >= 2")
            codes = z.reshape(b, -1)
            prior = model_trace[name]["fn"]
            draws = jax.lax.stop_gradient(prior.sample(random.fold_in(k_prior, i)).reshape(b, -1).astype(codes.dtype))
            c = 2.0 * codes.shape[1] * _prior_variance(prior, draws)
            mmd = imq_mmd2(codes, draws, c, self.mmd_scales)
            monitor = monitor + jax.lax.stop_gradient(mmd)
            if self.regularizer == "mmd":
                divergence = divergence + mmd
                reported = reported + jax.lax.stop_gradient(mmd)
            else:
                cross = -prior.log_prob(z).sum() / b
                est, opts = self._for_site(name)
                s_hat, state = site_scores(
                    name, est, opts, jax.lax.stop_gradient(codes), 0, None, params, random.fold_in(k_est, i), train
                )
                s_hat = jax.lax.stop_gradient(s_hat)
                if state is not None:
                    new_state[score_state_name(name)] = state
                divergence = divergence + cross + (s_hat * (codes - jax.lax.stop_gradient(codes))).sum() / b
                reported = reported + jax.lax.stop_gradient(cross)
        recon = 0.0
        for site in model_trace.values():
            if site["type"] != "sample" or not site["is_observed"]:
                continue
            if self.reconstruction == "likelihood":
                recon = recon - site["fn"].log_prob(site["value"]).sum()
            else:
                recon = recon + ((site["value"] - site["fn"].mean) ** 2).sum()
        recon = recon / n_codes
        loss = recon + self.lam * divergence  # its value: recon + lam * reported
        terms = {"reconstruction": jax.lax.stop_gradient(recon), "divergence": reported, "mmd": monitor}
        state_out = None
        if mutable or new_state:
            state_out = dict(mutable)
            state_out.update(new_state)
        return loss, terms, state_out, names

    def loss_with_mutable_state(self, rng_key, param_map, model, guide, *args, **kwargs):
        """The loss (``{"loss", "mutable_state"}``); eagerly and under ``ppl_score.validation``,
        a non-finite value warns (``NonFiniteWarning``) naming the code sites."""
        loss, terms, state, names = self._terms(rng_key, param_map, model, guide, args, kwargs, self.update_estimator)
        value = terms["reconstruction"] + self.lam * terms["divergence"]
        if validation.is_validation_enabled() and is_concrete(value):
            if not np.isfinite(np.asarray(value)).all():
                what, cause = frontend.nonfinite_loss_warning(f"WAE(regularizer={self.regularizer!r})", names)
                validation.warn_nonfinite(what, cause, stacklevel=3)
        return {"loss": loss, "mutable_state": state}

    def terms(self, rng_key, param_map, model, guide, *args, **kwargs) -> dict:
        """``{"reconstruction", "divergence", "mmd"}`` at one draw (no estimator update)."""
        return self._terms(rng_key, param_map, model, guide, args, kwargs, False)[1]
