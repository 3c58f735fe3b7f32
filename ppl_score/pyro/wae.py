"""Wasserstein auto-encoders as an SVI loss (Pyro).

A (decoder model, encoder guide) pair: the model draws codes from a prior and decodes them
(``pyro.sample("z", prior)``, ``pyro.sample("x", likelihood(decoder(z)), obs=x)`` in a data
plate); the guide encodes, deterministically ``pyro.sample("z", Delta(encoder(x),
event_dim=1))`` or implicitly ``Delta(encoder(x, eps), ...)``. With ``B`` codes ``z_i`` in
the minibatch (Tolstikhin et al. 2018; Song et al. 2019, section 4.2)::

    loss = mean_i c(x_i, z_i) + lam * D(q_Z, p_Z)

``c`` is ``-log p(x_i | z_i)`` over the observed sites (``reconstruction="likelihood"``) or
``||x_i - E[x_i | z_i]||^2`` (``"squared_error"``). ``q_Z`` is the aggregate posterior,
represented by the minibatch codes:

* ``regularizer="score"``: ``D = KL(q_Z || p_Z)``, minimized through its reparameterized
  gradient ``E[(grad_z log q_Z(z) - grad_z log p_Z(z))^T dz/dphi]``; the surrogate is
  ``mean_i [ -log p_Z(z_i) + stop_grad(s_hat(z_i))^T z_i ]`` with ``s_hat`` from a score
  estimator fitted to the codes (a learned network updated on them every step, or Stein /
  SSGE across the ``B`` codes). With ``p_Z = N(0, I)`` this is ``lam [||z||^2/2 +
  stop_grad(s_psi(z))^T z]`` of Song et al.; any prior with a ``log_prob`` works.
* ``regularizer="mmd"``: ``D = MMD^2`` (unbiased) between the codes and as many prior draws,
  with the inverse multiquadratic kernel ``sum_s C_s / (C_s + ||x - y||^2)``,
  ``C_s = 2 D var(p_Z) s`` over ``s`` in ``mmd_scales`` (WAE-MMD; ``var(p_Z)`` is the
  prior's own where it has one, else that of the prior draws the MMD uses).

The reported value is the reconstruction plus ``lam`` times MMD^2 or, for ``"score"``, the
cross-entropy ``mean_i -log p_Z(z_i)`` (the entropy of ``q_Z`` is unknown; its surrogate has
value zero). Scales and masks of plates are not used: both terms are minibatch means.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from pyro import poutine
from pyro.poutine.util import prune_subsample_sites
from pyro.infer import ELBO
from pyro.infer.util import torch_item

from .. import frontend, validation
from .. import implicit_spec as ispec
from ..torch.estimators import LearnedScoreEstimator
from .implicit import _Estimator

__all__ = ["WAE", "imq_mmd2", "MMD_SCALES"]

MMD_SCALES = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)


def imq_mmd2(x: torch.Tensor, y: torch.Tensor, c, scales=MMD_SCALES) -> torch.Tensor:
    """Unbiased MMD^2 between ``x [N, D]`` and ``y [M, D]`` (N, M >= 2) with the kernel
    ``sum_s c s / (c s + ||x - y||^2)``."""

    def k(a, b):
        d2 = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
        return sum(c * s / (c * s + d2) for s in scales)

    n, m = x.shape[0], y.shape[0]
    kxx, kyy = k(x, x), k(y, y)
    off = lambda kk, r: (kk.sum() - kk.diagonal().sum()) / (r * (r - 1))
    return off(kxx, n) + off(kyy, m) - 2.0 * k(x, y).mean()


def _prior_variance(fn, draws: torch.Tensor) -> float:
    """Mean variance of the prior ``p_Z``: analytic where the distribution has it, else that
    of its ``draws [N, D]`` (a prior without ``variance``, e.g. a mixture or a custom one)."""
    try:
        return float(fn.variance.detach().mean())
    except (NotImplementedError, AttributeError, RuntimeError):
        return float(draws.var(dim=0, correction=0).mean())  # as jnp.var in the NumPyro twin


class WAE(ELBO):
    """Wasserstein auto-encoder loss for a (decoder model, encoder guide) pair.

    Args:
        regularizer: ``"score"`` (KL through an estimated score of the aggregate posterior)
            or ``"mmd"`` (IMQ-kernel MMD).
        lam: weight of the divergence (default 10, as in Tolstikhin et al. and Song et al.).
        estimator: for ``"score"``: a ``LearnedScoreEstimator`` (unconditional), ``"stein"``,
            ``"spectral"``, a callable ``score(z, None)``, or a dict per site.
        estimator_options: kernel options (``eta``, ``bandwidth``, ``n_eigen``, ``threshold``).
        reconstruction: ``"likelihood"`` or ``"squared_error"``.
        sites: the code sites (default: every unobserved sample site of the guide).
        mmd_scales: the IMQ scales ``s``.
        update_estimator: update a learned estimator in ``loss_and_grads`` /
            ``differentiable_loss``.
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
        ests = estimator.values() if isinstance(estimator, Mapping) else [estimator]
        for est in ests:
            if isinstance(est, LearnedScoreEstimator) and est.context_dim:
                raise ValueError("argument 'estimator': the aggregate posterior's score takes no context (context_dim=0)")
            _Estimator(est, None)  # type / name check
        self._estimator_arg = estimator
        self._options_arg = estimator_options
        self._resolved: dict[str, _Estimator] = {}

    def _get_trace(self, model, guide, args, kwargs):
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
        return prune_subsample_sites(model_trace), prune_subsample_sites(guide_trace)

    def _estimator_for(self, name):
        if name not in self._resolved:
            est, opts = ispec.for_site(self._estimator_arg, self._options_arg, name, "code site")
            self._resolved[name] = _Estimator(est, opts)
        return self._resolved[name]

    def _code_sites(self, guide_trace, model_trace):
        names = [
            n for n, s in guide_trace.nodes.items() if s["type"] == "sample" and not s["is_observed"]
        ]
        if self.sites is not None:
            for n in self.sites:
                if n not in names:
                    raise ValueError(f"argument 'sites': {n!r} is not an unobserved sample site of the guide")
            names = list(self.sites)
        if not names:
            raise ValueError("WAE: the guide has no code site (an unobserved sample site, e.g. a Delta)")
        for n in names:
            site = guide_trace.nodes[n]
            if not site["fn"].has_rsample:
                raise ValueError(f"WAE: guide site {n!r} is not reparameterizable; encode with a Delta or an rsample-able distribution")
            if n not in model_trace.nodes or model_trace.nodes[n]["type"] != "sample":
                raise ValueError(f"WAE: code site {n!r} of the guide has no prior in the model")
        return names

    def _terms(self, model, guide, args, kwargs, train):
        model_trace, guide_trace = self._get_trace(model, guide, args, kwargs)
        names = self._code_sites(guide_trace, model_trace)
        if train and self.regularizer == "score" and torch.is_inference_mode_enabled():
            # a learned estimator's update is score matching on the codes: derivatives in z
            if any(self._estimator_for(n).kind == "learned" for n in names):
                raise validation.inference_mode_error(
                    "WAE(regularizer='score') with a learned estimator",
                    "the score matching that updates the estimator (derivatives in the codes z)",
                )
        n_codes = None
        divergence, reported, monitor = 0.0, 0.0, 0.0
        for name in names:
            gsite, msite = guide_trace.nodes[name], model_trace.nodes[name]
            z = gsite["value"]
            event_dim = len(gsite["fn"].event_shape)
            batch = z.shape[: z.dim() - event_dim]
            b = math.prod(batch)
            if n_codes is not None and b != n_codes:
                raise ValueError(f"WAE: code sites have different numbers of codes ({n_codes} vs {b} at {name!r})")
            n_codes = b
            if b < 2:
                raise ValueError(f"WAE: site {name!r} holds {b} code; the aggregate posterior needs a minibatch of >= 2")
            codes = z.reshape(b, -1)
            prior = msite["fn"]
            with torch.no_grad():
                draws = prior.sample().reshape(b, -1).to(codes.dtype)
            c = 2.0 * codes.shape[1] * _prior_variance(prior, draws)
            mmd = imq_mmd2(codes, draws, c, self.mmd_scales)
            monitor = monitor + mmd.detach()
            if self.regularizer == "mmd":
                divergence = divergence + mmd
                reported = reported + mmd.detach()
            else:
                cross = -prior.log_prob(z).sum() / b
                s_hat = self._estimator_for(name).scores(name, codes.detach(), 0, None, train)
                if not bool(torch.isfinite(s_hat).all()):
                    raise ValueError(f"site {name!r}: the score estimator returned non-finite values")
                entropy_surrogate = (s_hat * (codes - codes.detach())).sum() / b
                divergence = divergence + cross + entropy_surrogate
                reported = reported + cross.detach()
        recon = 0.0
        for name, site in model_trace.nodes.items():
            if site["type"] != "sample" or not site["is_observed"]:
                continue
            if self.reconstruction == "likelihood":
                recon = recon - site["fn"].log_prob(site["value"]).sum()
            else:
                recon = recon + ((site["value"] - site["fn"].mean) ** 2).sum()
        recon = recon / n_codes
        loss = recon + self.lam * divergence  # the entropy surrogate has value 0
        value = torch_item(recon) + self.lam * torch_item(reported)
        terms = {"reconstruction": torch_item(recon), "divergence": torch_item(reported), "mmd": torch_item(monitor)}
        return loss, value, terms, (model_trace, guide_trace), names

    def _warn_if_nonfinite(self, value, names) -> None:
        if validation.is_validation_enabled() and not math.isfinite(value):
            what, cause = frontend.nonfinite_loss_warning(f"WAE(regularizer={self.regularizer!r})", names)
            validation.warn_nonfinite(what, cause, stacklevel=4)

    def terms(self, model, guide, *args, **kwargs) -> dict:
        """``{"reconstruction", "divergence", "mmd"}`` at one draw (no estimator update):
        the two terms of the loss (divergence as reported, see the module docstring) and the
        MMD^2 of the codes to prior draws (a monitor for either regularizer)."""
        with torch.no_grad():
            return self._terms(model, guide, args, kwargs, False)[2]

    def loss(self, model, guide, *args, **kwargs):
        with torch.no_grad():
            _, value, _, _, names = self._terms(model, guide, args, kwargs, False)
        self._warn_if_nonfinite(value, names)
        return value

    def differentiable_loss(self, model, guide, *args, **kwargs):
        """The loss as a differentiable tensor (updates a learned estimator first).

        Raises:
            RuntimeError: under ``torch.inference_mode()`` when a learned estimator is to be
                updated (its score matching needs autograd; use ``torch.no_grad()``).
        """
        loss, value, _, _, names = self._terms(model, guide, args, kwargs, self.update_estimator)
        self._warn_if_nonfinite(value, names)
        return loss

    def loss_and_grads(self, model, guide, *args, **kwargs):
        """The loss as a float; backpropagates it into the parameters.

        Raises:
            RuntimeError: under ``torch.inference_mode()`` (see :meth:`differentiable_loss`).
        """
        loss, value, _, traces, names = self._terms(model, guide, args, kwargs, self.update_estimator)
        trainable = any(site["type"] == "param" for trace in traces for site in trace.nodes.values())
        if trainable and getattr(loss, "requires_grad", False):
            loss.backward(retain_graph=self.retain_graph)
        self._warn_if_nonfinite(value, names)
        return value
