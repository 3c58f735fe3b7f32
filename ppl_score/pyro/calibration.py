r"""A calibrated generalized-Bayes weight for :class:`~ppl_score.pyro.ScoreMatching`:
:func:`calibrate_beta`, a thin adapter from a Pyro model to
``ppl_score.torch.calibration`` (the NumPyro twin is ``ppl_score.numpyro.calibrate_beta``).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import pyro
import pyro.distributions as dist
import torch

from ..common import calibration as shared
from ..torch import calibration as backend
from .score_matching import ScoreMatching

__all__ = ["calibrate_beta"]


def calibrate_beta(
    loss: ScoreMatching,
    model: Callable,
    latents: Mapping[str, Any],
    *args: Any,
    rule: str = "lyddon",
    **kwargs: Any,
) -> float:
    r"""The weight ``beta`` that calibrates the generalized posterior of ``loss``.

    ``ScoreMatching(method, beta=beta)`` targets the generalized posterior [1]
    :math:`\pi_\beta(z) \propto p(z) \exp(-\beta \sum_i w_i \mathrm{SM}_i(z))`; ``beta``
    matches its asymptotic covariance to the estimator's sandwich covariance by ``rule``:
    ``"lyddon"`` [2] or ``"magnitude"`` [3] (the maths of both rules:
    ``ppl_score.common.calibration``).

    The per-datum losses are ``loss.datum_losses(model, guide, *args, **kwargs)`` with a
    guide that puts a point mass (``Delta``) on ``latents``; ``loss.beta`` is not used
    (``beta`` is in units of the unweighted :math:`\mathrm{SM}_i`). Derivatives are in the
    coordinates ``latents`` are given in (the model's own, constrained, ones).

    Args:
        loss: the :class:`~ppl_score.pyro.ScoreMatching` loss (``method="esm"`` advised:
            a stochastic method warns, see ``ppl_score.common.calibration``).
        model: the Pyro model; its latent sites must be global (outside data plates).
        latents: ``{site name: value}`` for every latent sample site of ``model``: the
            point :math:`\hat z` (the score-matching estimate, or the generalized
            posterior's mode or mean): floating tensors (or numbers), in the site's support.
        *args: the model's arguments (the data).
        rule: ``"lyddon"`` or ``"magnitude"`` (keyword only: a model keyword argument
            named ``rule`` cannot be passed through).
        **kwargs: the model's keyword arguments.

    Returns:
        ``beta``, a float ``> 0``: use it as
        ``ScoreMatching(loss.method, sites=loss.sites, beta=beta, ...)``.

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
        [1] T. Matsubara, J. Knoblauch, F.-X. Briol, C. J. Oates, "Robust generalised Bayesian
        inference for intractable likelihoods", Journal of the Royal Statistical Society Series B,
        2022.

        [2] S. P. Lyddon, C. C. Holmes, S. G. Walker, "General Bayesian updating and the
        loss-likelihood bootstrap", Biometrika, 2019.

        [3] M. Ribatet, D. Cooley, A. C. Davison, "Bayesian inference from composite likelihoods,
        with an application to spatial extremes", Statistica Sinica, 2012.
    """
    names, rule, stochastic = shared.check_calibrate_args(loss, ScoreMatching, "pyro", latents, rule)
    if stochastic:
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
