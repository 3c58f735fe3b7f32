r"""A calibrated generalized-Bayes weight for :class:`~ppl_score.numpyro.ScoreMatching`:
:func:`calibrate_beta`, a thin adapter from a NumPyro model to
``ppl_score.jax.calibration`` (the Pyro twin is ``ppl_score.pyro.calibrate_beta``).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist

from ..common import calibration as shared
from ..jax import calibration as backend
from ..jax.validate import check_key
from .score_matching import ScoreMatching

__all__ = ["calibrate_beta"]


def calibrate_beta(
    loss: ScoreMatching,
    model: Callable,
    latents: Mapping[str, Any],
    *args: Any,
    key: jax.Array | None = None,
    params: dict | None = None,
    rule: str = "lyddon",
    **kwargs: Any,
) -> float:
    r"""The weight ``beta`` that calibrates the generalized posterior of ``loss``.

    ``ScoreMatching(method, beta=beta)`` targets the generalized posterior [1]
    :math:`\pi_\beta(z) \propto p(z) \exp(-\beta \sum_i w_i \mathrm{SM}_i(z))`; ``beta``
    matches its asymptotic covariance to the estimator's sandwich covariance by ``rule``:
    ``"lyddon"`` [2] or ``"magnitude"`` [3] (the maths of both rules:
    ``ppl_score.common.calibration``).

    The per-datum losses are ``loss.datum_losses(key, params, model, guide, *args,
    **kwargs)`` with a guide that puts a point mass (``Delta``) on ``latents``, differentiated
    with ``jax.jacfwd`` / ``jax.hessian``; ``loss.beta`` is not used (``beta`` is in units of
    the unweighted :math:`\mathrm{SM}_i`). Derivatives are in the coordinates ``latents`` are
    given in (the model's own, constrained, ones).

    Args:
        loss: the :class:`~ppl_score.numpyro.ScoreMatching` loss (``method="esm"`` advised:
            a stochastic method warns, see ``ppl_score.common.calibration``).
        model: the NumPyro model; its latent sites must be global (outside data plates).
        latents: ``{site name: value}`` for every latent sample site of ``model``: the
            point :math:`\hat z` (the score-matching estimate, or the generalized
            posterior's mode or mean): floating arrays (or numbers), in the site's support.
        *args: the model's arguments (the data).
        key: a PRNG key for the model's and the method's randomness; required by a
            stochastic ``method`` (projections, noise), optional for ``"esm"``.
        params: the model's parameters (``numpyro.param`` values, e.g. ``svi_result.params``
            with the guide's entries ignored); default none.
        rule: ``"lyddon"`` or ``"magnitude"``.
        **kwargs: the model's keyword arguments (``key``, ``params`` and ``rule`` are taken
            by this function).

    Returns:
        ``beta``, a float ``> 0``: use it as
        ``ScoreMatching(loss.method, sites=loss.sites, beta=beta, ...)``.

    Raises:
        TypeError: ``loss`` is not a ``ScoreMatching``; ``latents`` is not a dict of site
            names to floating values; a bad ``key`` or ``rule``.
        ValueError: an empty ``latents``, a latent site missing from it or one the losses do
            not depend on (e.g. not in the model), a missing ``key``
            for a stochastic method, fewer than two data points, losses that do not depend on
            ``latents``, :math:`H` (or :math:`J` for ``"lyddon"``) not positive definite
            (``latents`` not at a minimum), a bad ``rule``.

    References:
        [1] T. Matsubara, J. Knoblauch, F.-X. Briol, C. J. Oates, "Robust generalised Bayesian
        inference for intractable likelihoods", Journal of the Royal Statistical Society Series B,
        2022.

        [2] S. P. Lyddon, C. C. Holmes, S. G. Walker, "General Bayesian updating and the
        loss-likelihood bootstrap", Biometrika, 2019.

        [3] M. Ribatet, D. Cooley, A. C. Davison, "Bayesian inference from composite likelihoods,
        with an application to spatial extremes", Statistica Sinica, 2012.
    """
    names, rule, stochastic = shared.check_calibrate_args(loss, ScoreMatching, "numpyro", latents, rule)
    if stochastic:
        if key is None:
            raise ValueError(
                f"argument 'key' is required (a jax.random key): ScoreMatching(method={loss.method!r}) "
                f"draws projections or noise"
            )
        shared.stochastic_method_warning(loss.method)
    key = jax.random.PRNGKey(0) if key is None else check_key(key)
    if params is not None and not isinstance(params, dict):
        raise TypeError(f"argument 'params' must be a dict of parameter values or None, got {type(params).__name__}")
    params = {} if params is None else params
    values = {}
    for name in names:
        v = jnp.asarray(latents[name])
        if jnp.issubdtype(v.dtype, jnp.integer) or v.dtype == jnp.bool_:
            shared.check_latent_value(name, False, v.dtype)
        values[name] = v
    dtype = jnp.result_type(*values.values())
    shapes = [values[name].shape for name in names]
    sizes = [math.prod(s) for s in shapes]
    z0 = jnp.concatenate([values[name].reshape(-1).astype(dtype) for name in names])
    cuts = [sum(sizes[:k]) for k in range(1, len(sizes))]

    def fn(z):
        parts = dict(zip(names, (p.reshape(s) for p, s in zip(jnp.split(z, cuts), shapes))))

        def guide(*_args, **_kwargs):
            for name in names:
                numpyro.sample(name, dist.Delta(parts[name], event_dim=parts[name].ndim))

        return loss.datum_losses(key, params, model, guide, *args, **kwargs)

    fn(z0)  # once eagerly: the loss's own checks of the model, the guide and the data
    s = jax.jit(lambda z: backend.sandwich(fn, z))(z0)  # (one compilation beats eager derivatives)
    if not np.any(np.asarray(s.grads)):
        raise shared.no_dependence_error()
    used = (np.any(np.asarray(s.grads) != 0, 0) | np.any(np.asarray(s.hessian) != 0, 1)).tolist()
    shared.unused_latents(names, sizes, used)
    return float(backend.sandwich_beta(s.hessian, s.meat, rule))
