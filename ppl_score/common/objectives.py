"""Backend-neutral registry of score-matching objectives and validation of their options.

This module is the single source of truth for names, defaults and error messages shared
by the torch and JAX backends and by the Pyro and NumPyro front ends. It imports neither
framework, so ``import ppl_score`` stays light.

Notation: ``x`` has shape ``[B, *event]``, ``D = prod(event)``, ``s(x) = grad_x log p(x)``,
``H(x) = grad_x s(x)``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

from .validate import check_choice, check_int, check_positive_float

__all__ = [
    "OBJECTIVES",
    "UNCONDITIONAL_METHODS",
    "DEFAULT_SIGMAS",
    "WEIGHTINGS",
    "geometric_sigmas",
    "ms_dsm_weight",
    "check_noise_levels",
    "check_sigmas",
    "check_noise_conditioning",
    "check_noise_conditional_fn",
    "check_noise_levels_shape",
    "check_sigma_shape",
    "KINDS",
    "PROJECTIONS",
    "REDUCTIONS",
    "FrozenMapping",
    "ObjectiveSpec",
    "Resolved",
    "resolve",
    "check_reduction",
    "check_unused",
    "check_x_shape",
    "check_dtype",
    "check_projection_shape",
    "check_noise_shape",
    "check_fn_output_shape",
    "fd_roundoff_warning",
    "nonfinite_cause",
    "event_size",
]

KINDS = ("log_prob", "score")
WEIGHTINGS = ("sigma2", "none")


def geometric_sigmas(sigma_max: float = 1.0, sigma_min: float = 0.01, n: int = 10) -> tuple:
    """``n`` noise levels from ``sigma_max`` down to ``sigma_min`` in geometric progression
    (Song & Ermon 2019), as a tuple of floats."""
    sigma_max = check_positive_float("sigma_max", sigma_max)
    sigma_min = check_positive_float("sigma_min", sigma_min)
    n = check_int("n", n)
    if n > 1 and not sigma_min < sigma_max:
        raise ValueError(f"argument 'sigma_min'={sigma_min} must be below 'sigma_max'={sigma_max}")
    if n == 1:
        return (sigma_max,)
    ratio = (sigma_min / sigma_max) ** (1.0 / (n - 1))
    return tuple(sigma_max * ratio**i for i in range(n - 1)) + (sigma_min,)


# ms_dsm's default noise levels: geometric from 1.0 to 0.01 over 10 levels (the and
# the paper's shape; the paper's CIFAR-10 run uses 1.0..0.01 as well)
DEFAULT_SIGMAS = geometric_sigmas(1.0, 0.01, 10)


def ms_dsm_weight(sigma, weighting: str):
    """``lambda(sigma)``: ``sigma^2`` (``"sigma2"``, the paper's choice, which makes every
    level's term of order one) or 1 (``"none"``, a scalar that broadcasts). Works on floats
    and on arrays."""
    return sigma * sigma if weighting == "sigma2" else 1.0


PROJECTIONS = ("rademacher", "gaussian", "sphere")
REDUCTIONS = ("mean", "sum", "none")


class FrozenMapping(Mapping):
    """A read-only mapping that, unlike ``types.MappingProxyType``, survives ``pickle`` and
    ``copy.deepcopy`` (so a ``Resolved`` inside a loss object does not block checkpoints)."""

    __slots__ = ("_data",)

    def __init__(self, data: Mapping | None = None):
        object.__setattr__(self, "_data", dict(data or {}))

    def __getitem__(self, key):
        return self._data[key]

    def __iter__(self) -> Iterator:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __setattr__(self, name, value):
        raise AttributeError("FrozenMapping is read-only")

    def __reduce__(self):
        return (type(self), (self._data,))

    def __hash__(self):
        return hash(tuple(sorted(self._data.items(), key=lambda kv: str(kv[0]))))

    def __repr__(self) -> str:
        return f"FrozenMapping({self._data!r})"


@dataclass(frozen=True)
class ObjectiveSpec:
    """One score-matching objective: what it estimates and which options it takes."""

    name: str
    summary: str
    formula: str
    defaults: Mapping[str, Any]
    kinds: tuple = KINDS
    uses_projections: bool = False  # draws v (ssm, ssm_vr) or directions u (fd_*)
    uses_noise: bool = False  # draws n ~ N(0, I) (dsm, fd_dsm)
    reference: str = ""
    # derivatives by central differences along directions u scaled to length eps (fd_*): the
    # drawn directions are unit vectors, explicit ones are normalized, zero ones rejected
    finite_difference: bool = False
    # fn is noise-conditional, fn(x, sigma) with sigma [B] (ms_dsm): a level per example,
    # drawn uniformly from the option `sigmas` or given as `noise_levels`
    noise_conditional: bool = False

    def __post_init__(self):
        object.__setattr__(self, "defaults", FrozenMapping(self.defaults))


OBJECTIVES: Mapping[str, ObjectiveSpec] = FrozenMapping(
    {
        "esm": ObjectiveSpec(
            name="esm",
            summary="Exact score matching: Hessian trace plus half the squared score norm.",
            formula="tr H(x) + 1/2 ||s(x)||^2",
            defaults={},
            reference="Hyvarinen (2005), JMLR 6.",
        ),
        "ssm": ObjectiveSpec(
            name="ssm",
            summary="Sliced score matching: random projections of the Hessian and the score.",
            formula="mean_m [ v_m^T H(x) v_m + 1/2 (v_m^T s(x))^2 ],  E[v v^T] = I",
            defaults={"n_projections": 1, "projection": "rademacher"},
            uses_projections=True,
            reference="Song, Garg, Shi, Ermon (2019), UAI.",
        ),
        "ssm_vr": ObjectiveSpec(
            name="ssm_vr",
            summary="Sliced score matching with variance reduction (score norm in closed form).",
            formula="mean_m [ v_m^T H(x) v_m ] + 1/2 ||s(x)||^2,  E[v v^T] = I",
            defaults={"n_projections": 1, "projection": "rademacher"},
            uses_projections=True,
            reference="Song, Garg, Shi, Ermon (2019), UAI.",
        ),
        "dsm": ObjectiveSpec(
            name="dsm",
            summary="Denoising score matching with Gaussian noise of scale sigma.",
            formula="1/2 || s(x~) + (x~ - x)/sigma^2 ||^2,  x~ = x + sigma n,  n ~ N(0, I)",
            defaults={"sigma": 0.1},
            uses_noise=True,
            reference="Vincent (2011), Neural Computation 23.",
        ),
        "fd_ssm": ObjectiveSpec(
            name="fd_ssm",
            finite_difference=True,
            summary="Finite-difference sliced score matching (derivatives by central differences).",
            formula=(
                "log_prob: c [ l(x+v) + l(x-v) - 2 l(x) + 1/8 (l(x+v) - l(x-v))^2 ]; "
                "score: 1/8 ||s(x+v) + s(x-v)||^2 + c/2 (s(x+v) - s(x-v))^T v; "
                "v = eps u/||u||, c = D/eps^2"
            ),
            defaults={"eps": 0.1, "n_projections": 1},
            uses_projections=True,
            reference="Pang, Xu, Li, Song, Ermon, Zhu (2020), NeurIPS.",
        ),
        "fd_dsm": ObjectiveSpec(
            name="fd_dsm",
            finite_difference=True,
            summary="Finite-difference denoising score matching.",
            formula=(
                "log_prob: c/2 [ (l(x~+v) - l(x~-v))/2 + v^T (x~ - x)/sigma^2 ]^2; "
                "score: c/2 [ v^T ((s(x~+v) + s(x~-v))/2 + (x~ - x)/sigma^2) ]^2; "
                "v = eps u/||u||, c = D/eps^2"
            ),
            defaults={"sigma": 0.1, "eps": 0.1, "n_projections": 1},
            uses_projections=True,
            uses_noise=True,
            reference="Pang, Xu, Li, Song, Ermon, Zhu (2020), NeurIPS.",
        ),
        "ms_dsm": ObjectiveSpec(
            name="ms_dsm",
            noise_conditional=True,
            summary=(
                "Multi-scale denoising score matching of a noise-conditional model, a noise level "
                "per example drawn uniformly from sigmas."
            ),
            formula=(
                "lambda(sigma_b)/2 || s(x~, sigma_b) + (x~ - x)/sigma_b^2 ||^2,  x~ = x + sigma_b n,  "
                "n ~ N(0, I),  sigma_b ~ U(sigmas),  lambda = sigma^2 ('sigma2') or 1 ('none')"
            ),
            defaults={"sigmas": DEFAULT_SIGMAS, "weighting": "sigma2"},
            uses_noise=True,
            reference="Song, Ermon (2019), NeurIPS.",
        ),
    }
)

# The methods whose fn is a plain fn(x) (every one but the noise-conditional ms_dsm): what
# the front ends' plain models, the demo and fit_energy's MLP energies take.
UNCONDITIONAL_METHODS: tuple = tuple(name for name, obj in OBJECTIVES.items() if not obj.noise_conditional)


@dataclass(frozen=True)
class Resolved:
    """A validated ``(method, kind, options)`` triple.

    ``explicit`` holds the option names the caller passed (an explicit ``n_projections``
    must agree with the shape of explicit ``projections``).
    """

    spec: ObjectiveSpec
    kind: str
    options: Mapping[str, Any]
    explicit: frozenset = field(default_factory=frozenset)

    @property
    def method(self) -> str:
        return self.spec.name


def _check_eps(eps: float) -> float:
    """``c = D / eps^2`` needs ``eps^2`` to be a normal, finite float."""
    if not (eps * eps > 0.0 and math.isfinite(eps * eps)):
        raise ValueError(
            f"option 'eps'={eps!r} is out of range: eps^2 {'underflows to 0' if eps < 1 else 'overflows'} "
            "in double precision; use a step of the scale of the data (default 0.1)"
        )
    return eps


def check_sigmas(value: Any, what: str = "option") -> tuple:
    """A non-empty, strictly decreasing sequence of positive finite floats, as a tuple;
    errors name ``what 'sigmas'`` (the objective's option, or a sampler's argument)."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise TypeError(
            f"{what} 'sigmas' must be a sequence of noise levels (e.g. ppl_score.spec.geometric_sigmas(1.0, 0.01, 10)), "
            f"got {type(value).__name__}"
        )
    value = list(value)
    if any(isinstance(v, bool) or str(getattr(v, "dtype", "")) in ("bool", "torch.bool") for v in value):
        raise TypeError(f"{what} 'sigmas' must hold real numbers, got a bool")
    try:
        levels = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise TypeError(f"{what} 'sigmas' must hold real numbers") from None
    if not levels:
        raise ValueError(f"{what} 'sigmas' must hold at least one noise level")
    for v in levels:
        if not (math.isfinite(v) and v > 0.0):
            raise ValueError(f"{what} 'sigmas' must hold positive finite noise levels, got {v!r}")
    if any(b >= a for a, b in zip(levels, levels[1:])):
        raise ValueError(f"{what} 'sigmas' must be strictly decreasing (largest first), got {levels}")
    return levels


def check_noise_conditional_fn(fn: Any, method: str) -> None:
    """``fn`` of a noise-conditional method must accept ``fn(x, sigma)``: a ``TypeError`` up
    front instead of one from inside the objective. Callables whose signature cannot be
    read are let through."""
    import inspect

    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return
    try:
        signature.bind(None, None)
    except TypeError:
        raise TypeError(
            f"method {method!r} needs a noise-conditional argument 'fn': fn(x, sigma) with sigma of shape [B] "
            f"(e.g. ppl_score.torch.nets.NoiseConditionalScore); got a callable with signature {signature}"
        ) from None


def check_noise_conditioning(condition_on_sigma: Any, divide_by_sigma: Any) -> None:
    """The noise-conditional score networks' two switches: bools, at least one on."""
    for name, value in (("condition_on_sigma", condition_on_sigma), ("divide_by_sigma", divide_by_sigma)):
        if not isinstance(value, bool):
            raise TypeError(f"argument {name!r} must be a bool, got {type(value).__name__}")
    if not (condition_on_sigma or divide_by_sigma):
        raise ValueError(
            "a noise-conditional score network needs condition_on_sigma=True or divide_by_sigma=True "
            "(else it does not depend on sigma)"
        )


def check_sigma_shape(shape: tuple, batch: int) -> None:
    """The ``sigma`` of a noise-conditional network's ``forward(x, sigma)``: one level for
    the batch (``()`` or ``(1,)``) or one per row (``(B,)``)."""
    if tuple(shape) not in ((), (1,), (batch,)):
        raise ValueError(
            f"argument 'sigma' must be a scalar or shaped [B] = [{batch}] (one noise level per row of x), "
            f"got shape {tuple(shape)}"
        )


def check_noise_levels_shape(shape: tuple, batch: int) -> None:
    if tuple(shape) != (batch,):
        raise ValueError(f"argument 'noise_levels' must have shape [B] = ({batch},), got {tuple(shape)}")


def check_noise_levels(levels: Any, sigmas: tuple, batch: int) -> None:
    """Explicit ``noise_levels`` (numpy-convertible ``[B]``): each value one of ``sigmas``
    (to float32 precision, so levels cast to float32 still match)."""
    import numpy as np

    values = np.asarray(levels, dtype=np.float64)
    check_noise_levels_shape(values.shape, batch)
    table = np.asarray(sigmas, dtype=np.float64)
    close = np.abs(values[:, None] - table[None, :]) <= 1e-6 * table[None, :]
    bad = ~close.any(axis=1)
    if bad.any():
        raise ValueError(
            f"argument 'noise_levels' must hold values of option 'sigmas' {tuple(round(t, 6) for t in sigmas)}; "
            f"got {values[bad][:3].tolist()} (at positions {np.flatnonzero(bad)[:3].tolist()})"
        )


_OPTION_CHECKS = {
    "sigmas": check_sigmas,
    "weighting": lambda v: check_choice("weighting", v, WEIGHTINGS, what="option"),
    "sigma": lambda v: check_positive_float("sigma", v, what="option"),
    "eps": lambda v: _check_eps(check_positive_float("eps", v, what="option")),
    "n_projections": lambda v: check_int("n_projections", v, what="option"),
    "projection": lambda v: check_choice("projection", v, PROJECTIONS, what="option"),
}


def resolve(method: Any, kind: Any = "log_prob", options: Mapping[str, Any] | None = None) -> Resolved:
    """Validate ``method``, ``kind`` and ``options`` and fill in the defaults.

    Raises ``ValueError`` (``TypeError`` for a wrong type) naming the offending argument.
    """
    if not isinstance(method, str):
        raise TypeError(f"argument 'method' must be a string, got {type(method).__name__}")
    if method not in OBJECTIVES:
        raise ValueError(f"unknown method {method!r}; argument 'method' must be one of {tuple(OBJECTIVES)}")
    spec = OBJECTIVES[method]
    if not isinstance(kind, str):
        raise TypeError(f"argument 'kind' must be a string, got {type(kind).__name__}")
    if kind not in spec.kinds:
        raise ValueError(f"argument 'kind' must be one of {spec.kinds} for method {method!r}, got {kind!r}")
    options = dict(options or {})
    unknown = sorted(set(options) - set(spec.defaults))
    if unknown:
        allowed = tuple(spec.defaults) or "none"
        raise ValueError(f"unknown option(s) {unknown} for method {method!r}; its options are {allowed}")
    resolved = dict(spec.defaults)
    for name, value in options.items():
        resolved[name] = _OPTION_CHECKS[name](value)
    return Resolved(spec=spec, kind=kind, options=FrozenMapping(resolved), explicit=frozenset(options))


def check_reduction(reduction: Any) -> str:
    if not isinstance(reduction, str):
        raise TypeError(f"argument 'reduction' must be a string, got {type(reduction).__name__}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"argument 'reduction' must be one of {REDUCTIONS}, got {reduction!r}")
    return reduction


def event_size(shape: tuple) -> int:
    """``D = prod(event)`` for ``x`` of shape ``[B, *event]``."""
    return int(math.prod(shape[1:]))


def check_x_shape(shape: tuple) -> None:
    if len(shape) < 1:
        raise ValueError("argument 'x' must have shape [B, *event] with a batch dimension, got a scalar")
    if shape[0] < 1:
        raise ValueError(f"argument 'x' must have a non-empty batch dimension, got shape {tuple(shape)}")


def check_projection_shape(resolved: Resolved, proj_shape: tuple, x_shape: tuple) -> int:
    """Return the number of projections M implied by explicit ``projections``.

    Accepts ``[M, B, *event]`` or ``[B, *event]`` (M = 1).
    """
    proj_shape, x_shape = tuple(proj_shape), tuple(x_shape)
    if proj_shape == x_shape:
        m = 1
    elif len(proj_shape) == len(x_shape) + 1 and proj_shape[1:] == x_shape:
        m = proj_shape[0]
    else:
        raise ValueError(
            f"argument 'projections' must have shape [M, *x.shape] or x.shape = {x_shape}, got {proj_shape}"
        )
    if m < 1:
        raise ValueError("argument 'projections' must hold at least one projection (M >= 1)")
    if "n_projections" in resolved.explicit and resolved.options["n_projections"] != m:
        raise ValueError(
            f"option 'n_projections'={resolved.options['n_projections']} disagrees with "
            f"argument 'projections', which holds {m}"
        )
    return m


def check_unused(resolved: Resolved, has_projections: bool, has_noise: bool, has_noise_levels: bool = False) -> None:
    """Explicit ``projections`` / ``noise`` / ``noise_levels`` for a method that draws none is
    an error."""
    if has_projections and not resolved.spec.uses_projections:
        raise ValueError(f"argument 'projections' is not used by method {resolved.method!r}")
    if has_noise and not resolved.spec.uses_noise:
        raise ValueError(f"argument 'noise' is not used by method {resolved.method!r}")
    if has_noise_levels and not resolved.spec.noise_conditional:
        raise ValueError(f"argument 'noise_levels' is only used by method 'ms_dsm', not {resolved.method!r}")


def check_noise_shape(resolved: Resolved, noise_shape: tuple, x_shape: tuple) -> None:
    if tuple(noise_shape) != tuple(x_shape):
        raise ValueError(f"argument 'noise' must have the shape of x, {tuple(x_shape)}, got {tuple(noise_shape)}")


def check_fn_output_shape(kind: str, out_shape: tuple, in_shape: tuple) -> None:
    out_shape, in_shape = tuple(out_shape), tuple(in_shape)
    expected = in_shape[:1] if kind == "log_prob" else in_shape
    if out_shape != expected:
        what = "[B] (one log density per example)" if kind == "log_prob" else "[B, *event] (the shape of x)"
        raise ValueError(
            f"argument 'fn' with kind={kind!r} must map x of shape {in_shape} to {what} = {expected}, got {out_shape}"
        )


def check_dtype(is_floating: bool, dtype: Any) -> None:
    if not is_floating:
        raise TypeError(f"argument 'x' must have a floating dtype, got {dtype}")


def nonfinite_cause(method: str | None, options: Mapping[str, Any], subject: str = "fn") -> str:
    """The likely causes of a non-finite value of ``method`` with ``options``, for a warning.

    Args:
        method: the objective, or None (only the generic causes).
        options: its resolved options (``eps`` and ``sigma`` are named with their values).
        subject: what computes the log density or score (``fn``, or a model's sites).
    """
    causes = [f"a nan/inf parameter or output of {subject}"]
    if method is not None and "eps" in options:
        causes.append(f"eps={options['eps']:g} out of range for {subject} and the dtype (c = D/eps^2)")
    if method is not None and "sigma" in options:
        causes.append(f"sigma={options['sigma']:g} too small (the target (x~ - x)/sigma^2 overflows)")
    if method is not None and "sigmas" in options:
        causes.append(f"the smallest of sigmas, {min(options['sigmas']):g}, too small (the target overflows)")
    causes.append("an overflow in float32 (try float64)")
    return "; or ".join(causes)


def fd_roundoff_warning(eps: float, dtype_eps: float, dtype_name: str) -> None:
    """Warn when central differences at ``eps`` drown in round-off for this dtype.

    The second difference ``l(x+v) + l(x-v) - 2 l(x)`` has relative round-off of order
    ``dtype_eps / eps^2``; below ``eps ~ 10 sqrt(dtype_eps)`` it exceeds about 1%.
    """
    threshold = 10.0 * math.sqrt(dtype_eps)
    if eps < threshold:
        warnings.warn(
            f"option 'eps'={eps:g} is small for {dtype_name} (round-off in the finite differences "
            f"grows like machine-eps/eps^2); use eps >= {threshold:.1e} or float64",
            RuntimeWarning,
            stacklevel=3,
        )
