r"""A calibrated generalized-Bayes weight for :class:`~ppl_score.pyro.ScoreMatching`:
:func:`calibrate_beta`, a thin adapter from a Pyro model to
``ppl_score.torch.calibration`` (the NumPyro twin is ``ppl_score.numpyro.calibrate_beta``).
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch

from .. import calibration as shared
from ..torch import calibration as backend
from .score_matching import ScoreMatching

__all__ = ["calibrate_beta"]


def calibrate_beta(loss: ScoreMatching, model, latents: dict, *args, rule: str = "lyddon", **kwargs) -> float:
    r"""The weight ``beta`` that calibrates the generalized posterior of ``loss``.

    ``ScoreMatching(method, beta=beta)`` targets
    :math:`\pi_\beta(z) \propto p(z) \exp(-\beta \sum_i w_i \mathrm{SM}_i(z))`. With
    :math:`H = \nabla_z^2 \sum_i w_i \mathrm{SM}_i(\hat z)` and
    :math:`J = \sum_i w_i (g_i - \bar g)(g_i - \bar g)^\top`,
    :math:`g_i = \nabla_z \mathrm{SM}_i(\hat z)`, :math:`\pi_\beta` is asymptotically
    :math:`N(\hat z, (\beta H)^{-1})` while the estimator :math:`\hat z` has the sampling
    covariance :math:`H^{-1} J H^{-1}`. The returned ``beta`` matches the two:

    - ``rule="lyddon"`` (default): :math:`\beta = \mathrm{tr}(H J^{-1} H) / \mathrm{tr}(H)`
      (the precisions' traces; Lyddon, Holmes & Walker 2019, as used for Hyvarinen-score
      posteriors by Jewson & Rossell 2022);
    - ``rule="magnitude"``: :math:`\beta = D / \mathrm{tr}(H^{-1} J)` (the mean eigenvalue of
      the covariances' ratio; Ribatet, Cooley & Davison 2012), invariant to
      reparametrizing :math:`z`.

    Both are :math:`H / J` for one latent dimension, where the calibrated posterior's sd is
    the estimator's sandwich sd. Use it as
    ``ScoreMatching(loss.method, sites=loss.sites, beta=beta, ...)``. The derivation and full
    references are in ``ppl_score.calibration``.

    The per-datum losses are ``loss.datum_losses(model, guide, *args, **kwargs)`` with a
    guide that puts a point mass (``Delta``) on ``latents``; ``loss.beta`` is not used
    (``beta`` is in units of the unweighted :math:`\mathrm{SM}_i`). Derivatives are in the
    coordinates ``latents`` are given in (the model's own, constrained, ones).

    Args:
        loss: the :class:`~ppl_score.pyro.ScoreMatching` loss (``method="esm"`` advised:
            a stochastic method's own noise inflates :math:`J` and so shrinks ``beta``; such
            a method warns).
        model: the Pyro model; its latent sites must be global (outside data plates).
        latents: ``{site name: value}`` for every latent sample site of ``model``: the
            point :math:`\hat z`, ideally the score-matching estimate (the minimizer of
            :math:`\sum_i w_i \mathrm{SM}_i`), or the generalized posterior's mode or mean.
            Floating tensors (or numbers), in the site's support.
        *args: the model's arguments (the data).
        rule: ``"lyddon"`` or ``"magnitude"`` (keyword only: a model keyword argument
            named ``rule`` cannot be passed through).
        **kwargs: the model's keyword arguments.

    Returns:
        ``beta``, a float ``> 0``.

    Raises:
        TypeError: ``loss`` is not a ``ScoreMatching``; ``latents`` is not a dict of site
            names to floating values; a bad ``rule``.
        ValueError: an empty ``latents``, a latent site missing from it or one the losses do
            not depend on (e.g. not in the model), fewer than two data
            points, losses that do not depend on ``latents``, :math:`H` (or :math:`J` for
            ``"lyddon"``) not positive definite (``latents`` not at a minimum), a bad
            ``rule``.
        RuntimeError: under ``torch.inference_mode()``.

    References:
        Lyddon, Holmes & Walker (2019), Biometrika 106(2), 465-478; Jewson & Rossell (2022),
        JRSS-B 84(5); Ribatet, Cooley & Davison (2012), Statistica Sinica 22, 813-845;
        Miller (2021), JMLR 22(168).
    """
    shared.check_loss_kind(loss, ScoreMatching, "pyro")
    names = shared.check_latents(latents)
    rule = shared.check_rule(rule)
    if shared.is_stochastic(loss.method):
        shared.stochastic_method_warning(loss.method)
    values = {}
    for name in names:
        v = latents[name]
        v = torch.as_tensor(v)  # a Python number: the default dtype; numpy keeps its dtype
        shared.check_latent_value(name, v.is_floating_point(), v.dtype)
        values[name] = v.detach()
    dtype = torch.promote_types(*[v.dtype for v in values.values()]) if len(values) > 1 else values[names[0]].dtype
    shapes = [values[name].shape for name in names]
    sizes = [math.prod(s) for s in shapes]
    z0 = torch.cat([values[name].reshape(-1).to(dtype) for name in names])

    def fn(z):
        parts = dict(zip(names, (p.reshape(s) for p, s in zip(torch.split(z, sizes), shapes))))

        def guide(*_args, **_kwargs):
            for name in names:
                pyro.sample(name, dist.Delta(parts[name], event_dim=parts[name].dim()))

        return loss.datum_losses(model, guide, *args, **kwargs)

    s = backend.sandwich(fn, z0)
    used = ((s.grads != 0).any(0) | (s.hessian != 0).any(1)).tolist()
    shared.unused_latents(names, sizes, used)
    return float(backend.sandwich_beta(s.hessian, s.meat, rule))
