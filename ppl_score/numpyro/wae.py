"""Wasserstein auto-encoders as an SVI loss (NumPyro); mirrors ``ppl_score.pyro.wae`` (see
its docstring for the loss). Works inside the jitted ``SVI.update`` / ``SVI.run``; a learned
score estimator keeps its state in NumPyro's mutable state, declared in the guide with
``ppl_score.numpyro.implicit.score_state(site, estimator)``.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import numpy as np
from jax import random
from numpyro.handlers import replay, seed, substitute, trace
from numpyro.infer import ELBO

from ..common import validate
from ..common import wae as common
from ..common.mmd import MMD_SCALES
from ..jax import mmd as backend
from ..jax.estimators import LearnedScoreEstimator, check_scores_finite
from ..jax.mmd import imq_mmd2
from ..jax.validate import is_concrete
from .implicit import score_state_name, site_scores

__all__ = ["WAE", "imq_mmd2", "MMD_SCALES"]


class WAE(common.WAEOptions, ELBO):
    """Wasserstein auto-encoder loss [1] for a (decoder model, encoder guide) pair:
    ``mean_i c(x_i, z_i) + lam * D(q_Z, p_Z)``, with ``D`` the KL divergence through an
    estimated score of the aggregate posterior [2] or the MMD [1] (see
    ``ppl_score.pyro.wae``).

    Args:
        regularizer: ``"score"`` or ``"mmd"``.
        lam: weight of the divergence (default 10, as in [1] and [2]).
        estimator: for ``"score"``: ``"stein"``, ``"spectral"``, a ``LearnedScoreEstimator``
            with ``context_dim=0`` whose state the guide declares with ``score_state``, a
            callable ``score(z, None)``, or a dict per site.
        estimator_options: kernel options (``eta``, ``bandwidth``, ``n_eigen``, ``threshold``).
        reconstruction: ``"likelihood"`` or ``"squared_error"``.
        sites: the code sites (default: every unobserved sample site of the guide).
        mmd_scales: the IMQ scales ``s``.
        update_estimator: take a learned-estimator step in every loss evaluation.

    ``terms(rng_key, params, model, guide, *args)`` returns the reconstruction, the reported
    divergence and the MMD^2 of the codes to prior draws (with a learned estimator,
    ``params`` must include the mutable state: ``{**svi.get_params(s), **s.mutable_state}``).

    Raises:
        TypeError, ValueError: as the Pyro ``WAE`` (the same checks and messages, from
            ``ppl_score.common.wae``).

    References:
        [1] I. Tolstikhin, O. Bousquet, S. Gelly, B. Schoelkopf, "Wasserstein auto-encoders", ICLR,
        2018.

        [2] Y. Song, S. Garg, J. Shi, S. Ermon, "Sliced score matching: a scalable approach to
        density and score estimation", UAI, 2019.
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
        sites: str | Iterable[str] | None = None,
        mmd_scales: Sequence[float] = MMD_SCALES,
        update_estimator: bool = True,
    ) -> None:
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

    def loss_with_mutable_state(
        self,
        rng_key: jax.Array,
        param_map: Mapping[str, Any],
        model: Callable,
        guide: Callable,
        *args: Any,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """The loss (``{"loss", "mutable_state"}``); eagerly and with validation on (``ppl_score.set_validation``),
        a non-finite value warns (``NonFiniteWarning``) naming the code sites."""
        loss, terms, state, names = self._terms(rng_key, param_map, model, guide, args, kwargs, self.update_estimator)
        value = terms["reconstruction"] + self.lam * terms["divergence"]
        if validate.is_validation_enabled() and is_concrete(value):
            if not np.isfinite(np.asarray(value)).all():
                what, cause = self.nonfinite_warning(names)
                validate.warn_nonfinite(what, cause, stacklevel=3)
        return {"loss": loss, "mutable_state": state}

    def terms(
        self,
        rng_key: jax.Array,
        param_map: Mapping[str, Any],
        model: Callable,
        guide: Callable,
        *args: Any,
        **kwargs: Any,
    ) -> dict[str, jax.Array]:
        """``{"reconstruction", "divergence", "mmd"}`` at one draw (no estimator update)."""
        return self._terms(rng_key, param_map, model, guide, args, kwargs, False)[1]
