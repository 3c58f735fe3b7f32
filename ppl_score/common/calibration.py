r"""Calibrating the weight ``beta`` of a generalized (Hyvarinen-score) posterior.
Framework-free: the formulas, argument checks and messages shared by the torch and JAX
backends (``ppl_score.torch.calibration``, ``ppl_score.jax.calibration``) and the Pyro and
NumPyro adapters (``ppl_score.pyro.calibrate_beta``, ``ppl_score.numpyro.calibrate_beta``).
Imports neither torch nor JAX.

The problem. ``ScoreMatching(beta=beta)`` with latent sites ``z`` targets the generalized
Bayes posterior [1]

    pi_beta(z)  ∝  p(z) exp(-beta L(z)),    L(z) = sum_i w_i SM_i(z),

(the spec, docs page *Spec*, section 3). ``L`` is a loss, not a log likelihood: its scale
is arbitrary (the Hyvarinen score of a model is not in nats), so ``beta = 1`` has no reason
to give credible sets of the right size. Both objects below are asymptotic (``n`` data, ``z`` of dimension
``D``, regular model, ``z_hat`` the minimizer of ``L``):

- the generalized posterior is approximately ``N(z_hat, (beta H)^{-1})`` (a Bernstein-von
  Mises theorem for Gibbs posteriors; Miller 2021 [2]), where
  ``H = grad_z^2 L(z_hat) = sum_i w_i grad_z^2 SM_i(z_hat)``;
- the score-matching estimator ``z_hat`` (an M-estimator) has sampling covariance
  ``H^{-1} J H^{-1}`` (the sandwich), where
  ``J = sum_i w_i (g_i - g_bar)(g_i - g_bar)^T``, ``g_i = grad_z SM_i(z_hat)``,
  ``g_bar = sum_i w_i g_i / sum_i w_i`` (zero at an exact minimizer; centring makes ``J``
  the same when ``z`` is a posterior mean or mode rather than ``z_hat``).

A scalar ``beta`` can make ``(beta H)^{-1}`` equal to ``H^{-1} J H^{-1}`` only when ``J`` is
proportional to ``H``; in general it matches them in one summary. Two rules (``RULES``):

- ``"lyddon"`` (default; Lyddon, Holmes & Walker 2019 [3], section 3.3, the calibration
  Jewson & Rossell 2022 [4] use for Hyvarinen-score posteriors): match the traces of the two
  precision matrices, ``beta tr(H) = tr(H J^{-1} H)``::

      beta = tr(H J^{-1} H) / tr(H)

- ``"magnitude"`` (the "magnitude adjustment" of composite likelihoods, Ribatet, Cooley &
  Davison 2012 [5]): the ratio of the two covariances, ``beta J H^{-1}``, has the eigenvalues
  ``beta lambda_k``, ``lambda_k`` those of ``H^{-1} J``; set their mean to one::

      beta = D / tr(H^{-1} J)

Both give ``beta = H / J`` for ``D = 1``, where the calibrated posterior's sd equals the
sandwich sd ``sqrt(J) / H`` (asymptotically). Both are invariant to rescaling the loss
(``SM -> c SM`` gives ``beta -> beta / c``: ``beta SM`` is unchanged), and both are
``1`` for a correctly specified log likelihood (``J = H``, the information identity).
``"magnitude"`` is also invariant to reparametrizing ``z`` (it depends on ``H`` and ``J``
only through the eigenvalues of ``H^{-1} J``); ``"lyddon"`` only to orthogonal ones, so its
value depends on the coordinates ``latents`` are given in when ``D > 1``.

``w_i`` are the data weights of ``ScoreMatching`` (scale times mask): a subsampled plate
with scale ``N / B`` makes ``H`` and ``J`` unbiased estimates of their full-data values.
The prior does not enter (it is ``O(1)`` against ``O(n)``). With a stochastic ``method``
(random projections or noise) ``J`` also holds the method's own noise and ``beta`` comes out
too small: calibrate with ``method="esm"`` where the model allows.

References:
    [1] T. Matsubara, J. Knoblauch, F.-X. Briol, C. J. Oates, "Robust generalised Bayesian
    inference for intractable likelihoods", Journal of the Royal Statistical Society Series B,
    2022.

    [2] J. W. Miller, "Asymptotic normality, concentration, and coverage of generalized
    posteriors", Journal of Machine Learning Research, 2021.

    [3] S. P. Lyddon, C. C. Holmes, S. G. Walker, "General Bayesian updating and the
    loss-likelihood bootstrap", Biometrika, 2019.

    [4] J. Jewson, D. Rossell, "General Bayesian loss function selection and the use of improper
    models", Journal of the Royal Statistical Society Series B, 2022.

    [5] M. Ribatet, D. Cooley, A. C. Davison, "Bayesian inference from composite likelihoods,
    with an application to spatial extremes", Statistica Sinica, 2012.
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Any, Mapping, Sequence

from . import objectives as spec
from .validate import check_choice

__all__ = [
    "RULES",
    "FORMULAS",
    "check_rule",
    "check_loss_kind",
    "check_latents",
    "check_latent_value",
    "check_calibrate_args",
    "check_z_shape",
    "check_fn_output",
    "check_matrices",
    "check_beta_value",
    "is_stochastic",
    "stochastic_method_warning",
    "no_dependence_error",
    "unused_latents",
    "too_few_data_error",
    "not_positive_definite_error",
    "nonfinite_beta_error",
]

RULES = ("lyddon", "magnitude")

FORMULAS = {
    "lyddon": "beta = tr(H J^{-1} H) / tr(H)",
    "magnitude": "beta = D / tr(H^{-1} J)",
}


def check_rule(rule: Any) -> str:
    """One of ``RULES``.

    Raises:
        TypeError, ValueError: naming ``rule``.
    """
    return check_choice("rule", rule, RULES)


def check_loss_kind(loss: Any, cls: type, frontend: str) -> None:
    """``loss`` is the front end's ``ScoreMatching``.

    Raises:
        TypeError: naming ``loss``.
    """
    if not isinstance(loss, cls):
        raise TypeError(f"argument 'loss' must be a ppl_score.{frontend}.ScoreMatching, got {type(loss).__name__}")


def check_latents(latents: Any) -> list:
    """The names of ``latents``, a non-empty mapping from site names (str) to values.

    Raises:
        TypeError: ``latents`` is not a mapping, or a key is not a str.
        ValueError: ``latents`` is empty.
    """
    if not isinstance(latents, Mapping):
        raise TypeError(
            f"argument 'latents' must be a dict from latent site names to values, got {type(latents).__name__}"
        )
    if not latents:
        raise ValueError("argument 'latents' is empty: give a value for every latent site of the model")
    names = list(latents)
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"argument 'latents': keys must be site names (str), got {type(name).__name__}")
    return names


def check_latent_value(name: str, is_floating: bool, dtype: Any) -> None:
    """A latent value has a floating dtype (derivatives in it are taken).

    Raises:
        TypeError: naming ``latents`` and the site.
    """
    if not is_floating:
        raise TypeError(f"argument 'latents': the value of site {name!r} must be floating point, got dtype {dtype}")


def check_z_shape(shape: tuple) -> int:
    """``z`` is a vector ``[D]``, ``D >= 1``; returns ``D``.

    Raises:
        ValueError: naming ``z``.
    """
    if len(shape) != 1 or shape[0] < 1:
        raise ValueError(f"argument 'z' must be a vector [D] with D >= 1, got shape {tuple(shape)}")
    return int(shape[0])


def check_fn_output(losses_shape: tuple, weights_shape: tuple | None) -> int:
    """``fn(z)`` gave per-datum losses ``[n]`` and weights ``[n]`` (or None); returns ``n``.

    Raises:
        ValueError: naming ``fn``.
    """
    if len(losses_shape) != 1:
        raise ValueError(f"argument 'fn' must return per-datum losses of shape [n], got shape {tuple(losses_shape)}")
    if weights_shape is not None and tuple(weights_shape) != tuple(losses_shape):
        raise ValueError(
            f"argument 'fn' returned weights of shape {tuple(weights_shape)} for losses of shape "
            f"{tuple(losses_shape)}; they must match"
        )
    return int(losses_shape[0])


def check_matrices(hessian_shape: tuple, meat_shape: tuple) -> int:
    """``H`` and ``J`` are square ``[D, D]`` of the same shape; returns ``D``.

    Raises:
        ValueError: naming ``hessian`` or ``meat``.
    """
    if len(hessian_shape) != 2 or hessian_shape[0] != hessian_shape[1] or hessian_shape[0] < 1:
        raise ValueError(f"argument 'hessian' must be a square matrix [D, D], got shape {tuple(hessian_shape)}")
    if tuple(meat_shape) != tuple(hessian_shape):
        raise ValueError(
            f"argument 'meat' must have the shape of 'hessian' {tuple(hessian_shape)}, got {tuple(meat_shape)}"
        )
    return int(hessian_shape[0])


def is_stochastic(method: str) -> bool:
    """Whether ``method`` draws projections or noise (``spec.OBJECTIVES``)."""
    s = spec.OBJECTIVES[method]
    return bool(s.uses_projections or s.uses_noise)


def stochastic_method_warning(method: str) -> None:
    """Warn that a stochastic method's own noise inflates ``J`` (``beta`` too small)."""
    warnings.warn(
        f"calibrate_beta with ScoreMatching(method={method!r}): the method draws random projections "
        f"or noise, which add to the per-datum gradients' spread J, so beta comes out too small; "
        f"calibrate with a ScoreMatching('esm', ...) loss where the model allows",
        UserWarning,
        stacklevel=3,
    )


def check_calibrate_args(loss: Any, cls: type, frontend: str, latents: Any, rule: Any) -> tuple[list, str, bool]:
    """The checks both front ends' ``calibrate_beta`` open with: ``loss`` is the front end's
    ``ScoreMatching`` (``cls``), ``latents`` a non-empty mapping from site names, ``rule`` one
    of ``RULES``. A stochastic ``loss.method`` is only reported: the front end warns
    (``stochastic_method_warning``) after its own checks of the method's randomness.

    Returns:
        ``(names, rule, stochastic)``: the site names of ``latents`` in order, the rule, and
        whether the method draws projections or noise.

    Raises:
        TypeError, ValueError: as ``check_loss_kind``, ``check_latents`` and ``check_rule``.
    """
    check_loss_kind(loss, cls, frontend)
    names = check_latents(latents)
    rule = check_rule(rule)
    return names, rule, is_stochastic(loss.method)


def no_dependence_error() -> ValueError:
    return ValueError(
        "the per-datum score-matching losses do not depend on the latent values given in 'latents' "
        "(no gradient in z): nothing to calibrate"
    )


def unused_latents(names: Sequence[str], sizes: Sequence[int], used: Sequence[bool]) -> None:
    """Raise when a site of ``latents`` does not enter the per-datum losses.

    Args:
        names: the site names, in the order of ``z``.
        sizes: their flattened sizes.
        used: per coordinate of ``z``, whether its per-datum gradients or its Hessian row
            are non-zero.

    Raises:
        ValueError: naming ``latents`` and the sites (a site the model does not have, or
            one the matched sites' log densities do not depend on).
    """
    out, start = [], 0
    for name, size in zip(names, sizes):
        if size and not any(used[start : start + size]):
            out.append(name)
        start += size
    if out:
        raise ValueError(
            f"argument 'latents': the per-datum score-matching losses do not depend on site(s) {out} "
            f"(not a latent site of the model, or not one the matched sites' densities use); leave them out"
        )


def too_few_data_error(n: int) -> ValueError:
    return ValueError(
        f"calibration needs at least 2 data points (J is the spread of the per-datum gradients), got n={n}"
    )


def not_positive_definite_error(which: str, detail: str = "") -> ValueError:
    """``H`` (``which="hessian"``) or ``J`` (``"meat"``) is not positive definite."""
    if which == "hessian":
        what = (
            "the Hessian H of sum_i w_i SM_i(z) at 'latents' is not positive definite: the values are not "
            "at a minimum of the score-matching loss (give the score-matching estimate, or the generalized "
            "posterior's mode or mean, of every latent site)"
        )
    else:
        what = (
            "J = sum_i w_i (g_i - g_bar)(g_i - g_bar)^T of the per-datum gradients at 'latents' is singular: "
            "the data do not inform every latent direction"
        )
    return ValueError(what + (f" ({detail})" if detail else ""))


def nonfinite_beta_error(rule: str, value: float) -> ValueError:
    return ValueError(
        f"calibrated beta ({FORMULAS[rule]}) is {value!r}, not a finite number > 0: check that the per-datum "
        f"losses and their derivatives at 'latents' are finite"
    )


def check_beta_value(rule: str, value: float) -> float:
    """The calibrated ``beta`` is finite and ``> 0``.

    Raises:
        ValueError: naming the rule's formula.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise nonfinite_beta_error(rule, value)
    return float(value)
