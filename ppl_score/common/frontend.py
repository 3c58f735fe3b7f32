"""Framework-free logic shared by the Pyro and NumPyro front ends (``ppl_score.pyro``,
``ppl_score.numpyro``): argument validation of ``ScoreMatching`` and ``Unnormalized``, the
choice of matched sites, and every error message, so both front ends say the same thing.
Imports neither torch nor JAX.

The loss of ``ScoreMatching`` (the spec, docs page *Spec*, section 3), for a model with
observed sites ``x`` and latent sites ``z`` and a guide ``q(z)``::

    loss = E_q[ beta * sum_i w_i SM_i(z) + log q(z) - log p(z) ]

where ``SM_i(z)`` is the per-example objective (the spec, section 1) of the joint per-datum
log density of the matched sites (in the unconstrained space of ``biject_to(support)``, with
the log-abs-det-Jacobian added), and ``w_i`` the datum's scale (``N / B`` in a subsampled
plate) times its mask.
"""

from __future__ import annotations

import contextlib
import contextvars
import numbers
from types import TracebackType
from typing import Any, Callable, Collection, Iterator, Mapping, NamedTuple, Sequence

from . import objectives as spec
from .validate import check_int, check_positive_float, check_sites

__all__ = [
    "NoiseLevel",
    "noise_level",
    "current_noise_level",
    "noise_level_for_site",
    "noise_conditional_fn",
    "objective_values",
    "noise_level_repeats",
    "at_noise_level",
    "PLAIN_LANGEVIN_DEFAULTS",
    "check_annealed_options",
    "check_annealed_site",
    "check_default_sigma",
    "missing_noise_level_error",
    "not_noise_conditional_error",
    "Config",
    "make_config",
    "check_beta",
    "check_num_particles",
    "split_elbo_kwargs",
    "check_vectorize_particles",
    "particles_fallback_message",
    "check_shape",
    "check_event_shape",
    "check_batch_shape",
    "check_unnormalized_args",
    "unnormalized_lead",
    "unnormalized_repr",
    "select_matched",
    "discrete_site_error",
    "discrete_latent_error",
    "latent_dependency_error",
    "joint_scale_error",
    "missing_guide_site_error",
    "nonreparam_guide_site_error",
    "scale_mismatch_error",
    "log_density_output_error",
    "sampling_error",
    "check_mmd_scales",
    "nonfinite_observed_error",
    "outside_support_error",
    "event_shape_error",
    "unnormalized_shape_error",
    "failing_sample_frames",
    "mask_shape_error",
    "nonfinite_loss_warning",
]


class Config(NamedTuple):
    """A validated ``ScoreMatching`` configuration."""

    resolved: spec.Resolved
    sites: tuple | None
    beta: float
    num_particles: int

    @property
    def method(self) -> str:
        return self.resolved.method

    @property
    def options(self) -> dict:
        """The method's options as the caller passed them (the backend fills in defaults,
        and an explicit ``n_projections`` keeps its meaning there)."""
        return {k: self.resolved.options[k] for k in self.resolved.explicit}


def check_beta(beta: Any) -> float:
    return check_positive_float("beta", beta)


def check_num_particles(num_particles: Any) -> int:
    return check_int("num_particles", num_particles)


def make_config(method: Any, sites: Any, beta: Any, num_particles: Any, options: Mapping[str, Any]) -> Config:
    """Validate every constructor argument of ``ScoreMatching`` (unknown method, unknown
    option or bad option value raise here, at construction time)."""
    return Config(
        resolved=spec.resolve(method, "log_prob", options),
        sites=check_sites(sites),
        beta=check_beta(beta),
        num_particles=check_num_particles(num_particles),
    )


def split_elbo_kwargs(options: Mapping[str, Any], names: Sequence[str]) -> tuple[dict, dict]:
    """``(ELBO keyword arguments, method options)``: the PPL's own ``ELBO`` arguments
    (``max_plate_nesting``, ``vectorize_particles``, ...) are taken as ``Trace_ELBO`` takes
    them, the rest go to the method."""
    elbo = {k: v for k, v in options.items() if k in names}
    if "max_plate_nesting" in elbo and elbo["max_plate_nesting"] != float("inf"):
        elbo["max_plate_nesting"] = check_int("max_plate_nesting", elbo["max_plate_nesting"], low=0)
    return elbo, {k: v for k, v in options.items() if k not in names}


def check_vectorize_particles(vectorize: Any, num_particles: int) -> Any:
    """``vectorize_particles``: None means vectorized when ``num_particles > 1``."""
    if vectorize is None:
        return num_particles > 1
    if not isinstance(vectorize, bool) and not callable(vectorize):
        raise TypeError(
            f"argument 'vectorize_particles' must be a bool (or, in NumPyro, a map function such as "
            f"jax.lax.map), got {type(vectorize).__name__}"
        )
    return vectorize


def particles_fallback_message(err: BaseException) -> str:
    """The warning when vectorized particles fail and the loss runs one trace per particle."""
    return (
        "ScoreMatching: the model or guide does not broadcast over the plate of vectorized "
        f"particles ({type(err).__name__}: {err}); computing the particles one trace at a "
        "time instead. Pass vectorize_particles=False to choose this (and silence this "
        "warning), or make the model broadcast (e.g. Unnormalized(..., batched=True)) to "
        "vectorize them"
    )


def check_shape(name: str, shape: Any, minimum: int) -> tuple:
    """A shape argument: an int or a sequence of ints, each ``>= minimum``.

    Raises:
        TypeError: not an int or a sequence of ints (naming the argument).
        ValueError: a size below ``minimum``.
    """
    if isinstance(shape, numbers.Integral) and not isinstance(shape, bool):
        shape = (shape,)
    try:
        shape = tuple(shape)
    except TypeError:
        raise TypeError(f"argument {name!r} must be an int or a tuple of ints, got {type(shape).__name__}") from None
    if not all(isinstance(n, numbers.Integral) and not isinstance(n, bool) for n in shape):
        raise TypeError(f"argument {name!r} must be an int or a tuple of ints, got {shape!r}")
    if not all(n >= minimum for n in shape):
        kind = "positive" if minimum == 1 else "non-negative"
        raise ValueError(f"argument {name!r} must hold {kind} ints, got {shape!r}")
    return tuple(int(n) for n in shape)


def check_event_shape(event_shape: Any) -> tuple:
    """``event_shape`` of ``Unnormalized``: an int or a tuple of positive ints."""
    return check_shape("event_shape", event_shape, 1)


def check_batch_shape(batch_shape: Any) -> tuple:
    """``batch_shape`` of ``Unnormalized``: an int or a tuple of non-negative ints."""
    return check_shape("batch_shape", batch_shape, 0)


def check_unnormalized_args(
    log_density_fn: Any, event_shape: Any, support: Any, batched: Any, batch_shape: Any, constraint_type: type
) -> tuple[tuple, tuple, int]:
    """The arguments of ``Unnormalized`` (either PPL's; ``constraint_type`` is its
    ``constraints.Constraint``).

    Returns:
        ``(event_shape, batch_shape, extra)``: the shapes as tuples, and how many dims of
        ``event_shape`` lie beyond ``support.event_dim`` (the front end wraps ``support`` in
        ``constraints.independent(support, extra)`` when ``extra > 0``).

    Raises:
        TypeError: ``log_density_fn`` not callable, ``support`` not a constraint, ``batched``
            not a bool.
        ValueError: a discrete support, a bad ``event_shape`` / ``batch_shape``, or a support
            whose ``event_dim`` exceeds ``len(event_shape)``.
    """

    if not callable(log_density_fn):
        raise TypeError(f"argument 'log_density_fn' must be callable, got {type(log_density_fn).__name__}")
    if not isinstance(support, constraint_type):
        raise TypeError(f"argument 'support' must be a constraint, got {type(support).__name__}")
    if support.is_discrete:
        raise ValueError(f"argument 'support' must be a continuous constraint, got {support}")
    if not isinstance(batched, bool):
        raise TypeError(f"argument 'batched' must be a bool, got {type(batched).__name__}")
    event_shape = check_event_shape(event_shape)
    batch_shape = check_batch_shape(batch_shape)
    extra = len(event_shape) - support.event_dim
    if extra < 0:
        raise ValueError(
            f"argument 'support' has event_dim {support.event_dim} > len(event_shape) = {len(event_shape)}"
        )
    return event_shape, batch_shape, extra


def unnormalized_lead(value_shape: Any, event_shape: Any) -> tuple:
    """The leading (batch) dims of a value ``[*lead, *event_shape]`` of ``Unnormalized``.

    Raises:
        ValueError: the value does not end with ``event_shape`` (``unnormalized_shape_error``).
    """
    shape, event = tuple(value_shape), tuple(event_shape)
    k = len(event)
    if len(shape) < k or shape[len(shape) - k :] != event:
        raise unnormalized_shape_error(shape, event)
    return shape[: len(shape) - k]


def unnormalized_repr(log_density_fn: Any, event_shape: Any, batch_shape: Any, batched: bool) -> str:
    """``repr`` of ``Unnormalized`` (either PPL's)."""
    extra = f", batch_shape={tuple(batch_shape)}" if tuple(batch_shape) else ""
    extra += ", batched=True" if batched else ""
    return f"Unnormalized(log_density_fn={log_density_fn!r}, event_shape={tuple(event_shape)}{extra})"


def select_matched(observed: Sequence[str], latent: Collection[str], sites: tuple | None) -> tuple:
    """The matched sites, in model order: every observed site, or those named in ``sites``."""
    if not observed:
        raise ValueError(
            "the model has no observed sample sites; ScoreMatching matches the scores of observed "
            "sites (sample statements with obs=...)"
        )
    if sites is None:
        return tuple(observed)
    for name in sites:
        if name in latent:
            raise ValueError(
                f"argument 'sites' names {name!r}, a latent site of the model; it must name observed "
                f"sites, one of {list(observed)}"
            )
        if name not in observed:
            raise ValueError(
                f"argument 'sites' names {name!r}, which is not an observed sample site of the model; "
                f"its observed sites are {list(observed)}"
            )
    return tuple(name for name in observed if name in sites)


def discrete_site_error(name: str) -> ValueError:
    return ValueError(
        f"observed site {name!r} has a discrete support; score matching needs a continuous density "
        "(exclude it with sites=[...] to condition on it instead)"
    )


def discrete_latent_error(name: str) -> ValueError:
    """A latent site with a discrete support (possibly marked for enumeration)."""
    return ValueError(
        f"latent site {name!r} has a discrete support; ScoreMatching differentiates through the "
        "guide's samples, so latent sites must be continuous and reparameterized (AutoNormal, "
        "AutoDelta, AutoMultivariateNormal, ...) and enumeration (config_enumerate) is not "
        "supported. Marginalize the discrete site in the model instead, e.g. a mixture as "
        "MixtureSameFamily(Categorical(weights), components), or observe it"
    )


def latent_dependency_error(dependencies: Mapping[str, Sequence[str]]) -> ValueError:
    """A latent site's distribution depends on the value of a matched (observed) site."""
    desc = "; ".join(f"{site!r} depends on {sorted(on)}" for site, on in dependencies.items())
    return ValueError(
        "ScoreMatching matches the joint density of the observed sites given the latent ones; "
        f"a latent site whose distribution depends on a matched value is not supported: {desc}. "
        "Its log density would enter both the matched sites' joint density and log p(z); "
        "observe it, or draw it before the matched sites"
    )


def joint_scale_error(names: Sequence[str]) -> ValueError:
    """Matched sites that must be matched as one data point carry a per-datum scale."""
    return ValueError(
        f"matched sites {list(names)} are matched as one data point (a site couples their data "
        "points, or they sit in different plates), so their scale must be one number; got a "
        "scale per data point (poutine.scale / handlers.scale with an array)"
    )


def missing_guide_site_error(name: str) -> ValueError:
    return ValueError(
        f"latent site {name!r} of the model is not provided by the guide; ScoreMatching needs a guide "
        "sample site for every latent site (e.g. an AutoNormal or AutoDelta guide), or observe it"
    )


def nonreparam_guide_site_error(name: str) -> ValueError:
    return ValueError(
        f"guide site {name!r} has no reparameterized sampler (has_rsample is False); ScoreMatching "
        "differentiates through the guide's samples"
    )


def scale_mismatch_error(names: Sequence[str]) -> ValueError:
    return ValueError(
        f"matched sites {list(names)} have different scales (poutine.scale / subsampling); sites "
        "matched jointly must share one scale per data point"
    )


def log_density_output_error(shape: tuple, expected: tuple) -> ValueError:
    return ValueError(
        f"argument 'log_density_fn' must map x of shape [n, *event_shape] to [n] (one log density "
        f"per row), expected {tuple(expected)}, got {tuple(shape)}"
    )


def sampling_error(frontend: str) -> NotImplementedError:
    """What ``Unnormalized.sample`` raises: the density has no normalizer and no sampler."""
    return NotImplementedError(
        "Unnormalized has no exact sampler (its normalizing constant is unknown); sample an observed "
        f"site of a fitted model with Langevin dynamics, ppl_score.{frontend}.langevin, or with the "
        f"PPL's NUTS on its potential -log_prob, ppl_score.{frontend}.nuts / "
        f"ppl_score.{frontend}.potential_fn (see ppl_score.{frontend}.mcmc)"
    )


# ---------------------------------------------------------------------------------------
# WAE arguments
# ---------------------------------------------------------------------------------------


def check_mmd_scales(mmd_scales: Any) -> tuple:
    """``mmd_scales`` of ``WAE``: a non-empty sequence of positive floats.

    Args:
        mmd_scales: the IMQ kernel scales ``s`` the user passed.

    Returns:
        The scales as a tuple of floats.

    Raises:
        TypeError: ``mmd_scales`` is not a sequence of real numbers (e.g. a lone float).
        ValueError: it is empty, or a scale is not finite and positive.
    """
    if isinstance(mmd_scales, (str, bytes)) or isinstance(mmd_scales, numbers.Number):
        raise TypeError(
            "argument 'mmd_scales' must be a sequence of positive floats, e.g. (0.5, 1.0, 2.0) or "
            f"[{mmd_scales!r}] for a single scale; got {type(mmd_scales).__name__}"
        )
    try:
        scales = tuple(mmd_scales)
    except TypeError:
        raise TypeError(
            "argument 'mmd_scales' must be a sequence of positive floats, e.g. (0.5, 1.0, 2.0); "
            f"got {type(mmd_scales).__name__}"
        ) from None
    if not scales:
        raise ValueError("argument 'mmd_scales' must hold at least one scale")
    return tuple(check_positive_float("mmd_scales", s) for s in scales)


# ---------------------------------------------------------------------------------------
# Observed data, masks and shapes (ScoreMatching, Unnormalized)
# ---------------------------------------------------------------------------------------


def nonfinite_observed_error(name: str) -> ValueError:
    """An unmasked observed value of a matched site is NaN or infinite."""
    return ValueError(
        f"observed site {name!r} contains non-finite values (nan or inf); remove or impute them, or "
        "mask those data points out (a mask handler, Distribution.mask, or obs_mask with a guide "
        "for the missing values)"
    )


def outside_support_error(name: str) -> ValueError:
    """An observed value is finite but outside the site's support (its unconstrained value is
    not finite)."""
    return ValueError(
        f"observed site {name!r} has values outside its support (their unconstrained values, "
        "through biject_to(support), are not finite); check the data or the distribution"
    )


def event_shape_error(name: str, value_shape: tuple, event_shape: tuple) -> ValueError:
    """The observed value of a site does not end with its distribution's ``event_shape``."""
    return ValueError(
        f"observed site {name!r}: the value's shape {tuple(value_shape)} does not end with the "
        f"distribution's event_shape {tuple(event_shape)}; observations must have shape "
        "[*batch_shape, *event_shape]"
    )


def unnormalized_shape_error(value_shape: tuple, event_shape: tuple) -> ValueError:
    """``Unnormalized.log_prob`` got a value that does not end with its ``event_shape``."""
    return ValueError(
        f"Unnormalized.log_prob: the value's shape {tuple(value_shape)} does not end with "
        f"event_shape {tuple(event_shape)}; values must have shape [*batch_shape, *event_shape]"
    )


def failing_sample_frames(
    tb: TracebackType | None,
) -> tuple[dict[str, Any] | None, dict[str, Any] | None, dict[str, Any] | None]:
    """Walk a traceback raised while a PPL handled a sample statement and return
    ``(observe_locals, msg, msg_locals)``: the locals of the innermost ``_masked_observe``
    frame (the ``obs_mask`` route) and the innermost sample message with its frame's locals,
    each None when absent. Used, best effort, to name the site of a mask-shape error that
    Pyro's or NumPyro's plate handling raises without naming it."""
    observe = msg = msg_locals = None
    while tb is not None:
        local = tb.tb_frame.f_locals
        if tb.tb_frame.f_code.co_name == "_masked_observe" and "obs_mask" in local:
            observe = local
        m = local.get("msg")
        if isinstance(m, dict) and m.get("type") == "sample" and "fn" in m:
            msg, msg_locals = m, local
        tb = tb.tb_next
    return observe, msg, msg_locals


def mask_shape_error(name: str, mask_shape: tuple, batch_shape: tuple) -> ValueError:
    """A mask of a matched site does not broadcast to the site's batch shape."""
    return ValueError(
        f"the mask of site {name!r} has shape {tuple(mask_shape)}, which does not broadcast to the "
        f"site's batch (plate) shape {tuple(batch_shape)}; give the mask (of a mask handler, "
        "Distribution.mask or obs_mask) one entry per data point of the site's plates"
    )


# ---------------------------------------------------------------------------------------
# Grad modes (Pyro) and non-finite losses
# ---------------------------------------------------------------------------------------


def nonfinite_loss_warning(what: str, sites: Sequence[str], resolved: spec.Resolved | None = None) -> tuple:
    """``(what, cause)`` for :func:`ppl_score.common.validate.warn_nonfinite` when a front end's
    loss is NaN or infinite.

    Args:
        what: the loss object, e.g. ``"ScoreMatching(method='ssm')"`` or ``"WAE(regularizer='mmd')"``.
        sites: the sites the loss matched or regularized.
        resolved: the score-matching objective and options (their ``eps`` / ``sigma`` are
            named among the causes), or None.

    Returns:
        The two arguments of ``warn_nonfinite``.
    """
    names = list(dict.fromkeys(sites))
    where = f"site {names[0]!r}" if len(names) == 1 else f"sites {names}"
    method, options = (None, {}) if resolved is None else (resolved.method, resolved.options)
    cause = spec.nonfinite_cause(method, options, subject=f"the log density of {where}")
    return f"{what} loss at {where}", cause + "; or guide samples outside the prior's support"


# ---------------------------------------------------------------------------------------
# Noise-conditional models (ms_dsm): the noise level a NoiseConditional site is evaluated at
# ---------------------------------------------------------------------------------------


class NoiseLevel:
    """The noise level in force: ``sigma`` (a number, or an array ``[m]`` of one level per
    datum or per chain), and whether a ``NoiseConditional`` site read it (``used``)."""

    __slots__ = ("sigma", "used")

    def __init__(self, sigma: Any):
        self.sigma, self.used = sigma, False


_NOISE_LEVEL: contextvars.ContextVar = contextvars.ContextVar("ppl_score_noise_level", default=None)


@contextlib.contextmanager
def noise_level(sigma: Any) -> Iterator[NoiseLevel]:
    """Evaluate ``NoiseConditional`` sites at noise level ``sigma`` inside the block: a number,
    or an array ``[m]`` whose entries cover a site's points in ``m`` equal consecutive blocks
    (one level per datum, or per chain). ``ScoreMatching("ms_dsm")`` and the annealed mode of
    ``langevin`` set it; use it yourself to evaluate a fitted model at a level (e.g. under
    ``Predictive`` or ``poutine.trace``)."""
    if isinstance(sigma, numbers.Real) and not (sigma > 0 and sigma < float("inf")):
        raise ValueError(f"argument 'sigma' must be a positive finite noise level, got {sigma!r}")
    level = NoiseLevel(sigma)
    token = _NOISE_LEVEL.set(level)
    try:
        yield level
    finally:
        _NOISE_LEVEL.reset(token)


def current_noise_level() -> NoiseLevel | None:
    """The innermost ``noise_level`` in force, or None."""
    return _NOISE_LEVEL.get()


def noise_level_for_site(default_sigma: Any) -> Any:
    """The level a ``NoiseConditional`` site is evaluated at: the innermost ``noise_level``
    (marked as read), else the site's ``sigma=``.

    Raises:
        ValueError: neither is set (``missing_noise_level_error``).
    """
    level = current_noise_level()
    if level is not None:
        level.used = True
        return level.sigma
    if default_sigma is not None:
        return default_sigma
    raise missing_noise_level_error()


def objective_values(resolved: spec.Resolved, fn: Callable[[Any], Any], compute: Callable[[Callable], Any]) -> Any:
    """``compute(fn)``, the backend objective of a model's matched density ``fn(rows)``; for a
    noise-conditional method (``ms_dsm``) of ``fn`` made noise-conditional
    (``noise_conditional_fn``), which must read the level.

    Raises:
        ValueError: a noise-conditional method on a model whose matched sites ignore the
            level (``not_noise_conditional_error``).
    """
    if not resolved.spec.noise_conditional:
        return compute(fn)
    conditional, record = noise_conditional_fn(fn)
    values = compute(conditional)
    if not any(record):
        raise not_noise_conditional_error(resolved.method)
    return values


def noise_conditional_fn(fn: Callable[[Any], Any]) -> tuple[Callable[[Any, Any], Any], list]:
    """``fn(rows) -> log density`` of a model made noise-conditional for the backends:
    ``(rows, sigma) -> fn(rows)`` evaluated under ``noise_level(sigma)``. Returns it and a list
    that records, per call, whether a ``NoiseConditional`` site read the level."""
    record: list = []

    def conditional(rows, sigma):
        with noise_level(sigma) as level:
            out = fn(rows)
        record.append(level.used)
        return out

    return conditional, record


def at_noise_level(log_prob: Callable[[Any], Any]) -> Callable[[Any, Any], Any]:
    """``(u, sigma) -> log_prob(u)`` evaluated under ``noise_level(sigma)``: a sampled site's
    log density made noise-conditional for ``annealed_langevin``."""

    def conditional(u, sigma):
        with noise_level(sigma):
            return log_prob(u)

    return conditional


# The plain sampler's options and their defaults in both front ends' ``langevin``: with
# ``sigmas`` (annealed Langevin) they do not apply, so a value other than the default is an error.
PLAIN_LANGEVIN_DEFAULTS = {"num_warmup": 500, "step_size": 1e-2, "adjusted": True, "thin": 1}


def check_annealed_options(num_samples: Any, num_steps: Any, **plain: Any) -> None:
    """The annealed mode of ``langevin`` (``sigmas`` given) keeps one sample per chain and
    runs its own schedule: ``num_samples`` / ``num_steps`` must be left out, and the plain
    sampler's options (``PLAIN_LANGEVIN_DEFAULTS``) left at their defaults.

    Raises:
        ValueError: naming the arguments that do not apply.
    """
    if num_samples is not None or num_steps is not None:
        raise ValueError(
            "arguments 'num_samples' / 'num_steps' do not apply with 'sigmas' (annealed Langevin keeps one "
            "sample per chain: ask for more chains)"
        )
    given = [k for k, v in plain.items() if not (v is PLAIN_LANGEVIN_DEFAULTS[k] or v == PLAIN_LANGEVIN_DEFAULTS[k])]
    if given:
        names = ", ".join(repr(k) for k in given)
        raise ValueError(
            f"argument(s) {names} do not apply with 'sigmas': annealed Langevin runs 'n_steps_each' ULA steps "
            "of size 'step_lr * sigma_i^2 / sigma_L^2' per level, with no warm-up, thinning or MALA correction"
        )


def check_annealed_site(log_prob: Callable[[Any], Any], u0: Any, sigma: float, site: str) -> None:
    """The annealed mode of ``langevin`` samples a ``NoiseConditional`` site: evaluated once at
    ``u0`` and the first level, its log density must read the level.

    Raises:
        ValueError: a site whose density does not depend on the noise level.
    """
    with noise_level(sigma) as level:
        log_prob(u0)
    if not level.used:
        raise ValueError(
            f"argument 'sigmas' (annealed Langevin) needs a noise-conditional site: {site!r} is not observed "
            "with a NoiseConditional distribution"
        )


def noise_level_repeats(m: int, n_points: int) -> int:
    """How many consecutive points each of ``m`` levels covers among ``n_points``.

    Raises:
        ValueError: ``n_points`` is not a multiple of ``m``.
    """
    if m < 1 or n_points % m:
        raise ValueError(
            f"a NoiseConditional site with {n_points} points cannot be evaluated at {m} noise levels "
            "(one level per datum, or per chain, must divide the points evenly); give the site the "
            "batch of the data (the plate of the matched sites)"
        )
    return n_points // m


def check_default_sigma(sigma: Any) -> float | None:
    """``NoiseConditional``'s ``sigma=``: None or a positive finite number."""
    return None if sigma is None else check_positive_float("sigma", sigma)


def missing_noise_level_error() -> ValueError:
    return ValueError(
        "a NoiseConditional site needs a noise level: fit it with ScoreMatching('ms_dsm'), sample it with "
        "langevin(..., sigmas=...), evaluate it under `with noise_level(sigma):`, or give the distribution "
        "a default `sigma=`"
    )


def not_noise_conditional_error(method: str) -> ValueError:
    return ValueError(
        f"method {method!r} needs a noise-conditional model: observe the matched site with a "
        "NoiseConditional(log_density_fn(x, sigma), event_shape) distribution (no matched site read the "
        "noise level)"
    )
