"""Wasserstein auto-encoders as an SVI loss (NumPyro); mirrors ``ppl_score.pyro.wae`` (see
its docstring for the loss). Works inside the jitted ``SVI.update`` / ``SVI.run``; a learned
score estimator keeps its state in NumPyro's mutable state, declared in the guide with
``ppl_score.numpyro.implicit.score_state(site, estimator)``.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np
from jax import random
from numpyro.handlers import replay, seed, substitute, trace
from numpyro.infer import ELBO

from .. import implicit_spec as ispec
from .. import validation
from ..implicit_spec import MMD_SCALES
from ..jax import mmd as backend
from ..jax.checks import is_concrete
from ..jax.estimators import LearnedScoreEstimator, check_scores_finite
from ..jax.mmd import imq_mmd2
from .implicit import score_state_name, site_scores

__all__ = ["WAE", "imq_mmd2", "MMD_SCALES"]


class WAE(ispec.WAEOptions, ELBO):
    """Wasserstein auto-encoder loss for a (decoder model, encoder guide) pair.

    Arguments as ``ppl_score.pyro.wae.WAE``: ``regularizer`` (``"score"`` | ``"mmd"``),
    ``lam``, ``estimator`` (``"stein"``, ``"spectral"``, a ``LearnedScoreEstimator`` with
    ``context_dim=0`` whose state the guide declares with ``score_state``, or a callable),
    ``estimator_options``, ``reconstruction`` (``"likelihood"`` | ``"squared_error"``),
    ``sites``, ``mmd_scales``, ``update_estimator``.

    ``terms(rng_key, params, model, guide, *args)`` returns the reconstruction, the reported
    divergence and the MMD^2 of the codes to prior draws (with a learned estimator,
    ``params`` must include the mutable state: ``{**svi.get_params(s), **s.mutable_state}``).

    Raises:
        TypeError, ValueError: as the Pyro ``WAE`` (the same checks and messages, from
            ``ppl_score.implicit_spec``).
    """

    mmd_backend = backend
    learned_type = LearnedScoreEstimator
    check_scores = staticmethod(check_scores_finite)

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
        self.set_options(
            regularizer, lam, estimator, estimator_options, reconstruction, sites, mmd_scales, update_estimator
        )

    def _terms(self, rng_key, param_map, model, guide, args, kwargs, train):
        k_model, k_guide, k_prior, k_est = random.split(rng_key, 4)
        guide_trace = trace(substitute(seed(guide, k_guide), data=param_map)).get_trace(*args, **kwargs)
        params = dict(param_map)
        mutable = {n: s["value"] for n, s in guide_trace.items() if s["type"] == "mutable"}
        params.update(mutable)
        model_trace = trace(substitute(replay(seed(model, k_model), guide_trace), data=params)).get_trace(
            *args, **kwargs
        )
        mutable.update({n: s["value"] for n, s in model_trace.items() if s["type"] == "mutable"})
        new_state = {}

        def draw(prior, i, codes):
            return jax.lax.stop_gradient(
                prior.sample(random.fold_in(k_prior, i)).reshape(codes.shape[0], -1).astype(codes.dtype)
            )

        def scores(name, i, codes):
            est, options = self.code_estimator(name)
            s_hat, state = site_scores(name, est, options, codes, 0, None, params, random.fold_in(k_est, i), train)
            if state is not None:
                new_state[score_state_name(name)] = state
            return s_hat

        t = self.wae_terms(model_trace, guide_trace, draw, scores)
        loss = t["reconstruction"] + self.lam * t["divergence"]  # its value: recon + lam * reported
        terms = {
            "reconstruction": jax.lax.stop_gradient(t["reconstruction"]),
            "divergence": t["reported"],
            "mmd": t["mmd"],
        }
        state_out = None
        if mutable or new_state:
            state_out = dict(mutable)
            state_out.update(new_state)
        return loss, terms, state_out, t["names"]

    def loss_with_mutable_state(self, rng_key, param_map, model, guide, *args, **kwargs):
        """The loss (``{"loss", "mutable_state"}``); eagerly and under ``ppl_score.validation``,
        a non-finite value warns (``NonFiniteWarning``) naming the code sites."""
        loss, terms, state, names = self._terms(rng_key, param_map, model, guide, args, kwargs, self.update_estimator)
        value = terms["reconstruction"] + self.lam * terms["divergence"]
        if validation.is_validation_enabled() and is_concrete(value):
            if not np.isfinite(np.asarray(value)).all():
                what, cause = self.nonfinite_warning(names)
                validation.warn_nonfinite(what, cause, stacklevel=3)
        return {"loss": loss, "mutable_state": state}

    def terms(self, rng_key, param_map, model, guide, *args, **kwargs) -> dict:
        """``{"reconstruction", "divergence", "mmd"}`` at one draw (no estimator update)."""
        return self._terms(rng_key, param_map, model, guide, args, kwargs, False)[1]
