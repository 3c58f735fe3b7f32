"""One validation path for the whole library: argument checks, the validation switch, warnings.

Argument checks (``check_*``) are used by every framework-free module in ``ppl_score.common``
and through them by both backends and both front ends, so one rule gives one message: a
wrong type raises ``TypeError``, a wrong value ``ValueError``, and the message names the
argument (``what`` says which kind of thing: ``"argument"`` or ``"option"``). The backends'
array-level checks live in ``ppl_score.{torch,jax}.validate``.

The validation switch and the non-finite warning, shared by every backend and front end.

Some checks need the values of arrays on the host: the finiteness of ``x`` and of explicit
projections or noise, and the warning for a non-finite result. On an accelerator each is a
device synchronisation per step, and under ``torch.compile`` a graph break. Like
``pyro.enable_validation``, one process-wide switch turns them off for production loops::

    import ppl_score
    ppl_score.set_validation(False)       # skip host-syncing checks everywhere
    with ppl_score.validation_enabled(False):     # or only inside a block
        ...

Checks that need no values (types, shapes, dtypes, option ranges) always run: they cost
nothing at run time and are the ones whose absence gives the worst errors. The switch is
read when a function runs (in JAX: when it is traced), so a jitted function keeps the
setting it was traced with.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import warnings
from typing import Any, Iterator, Sequence

__all__ = [
    "NonFiniteWarning",
    "check_choice",
    "check_int",
    "check_positive_float",
    "check_real_in",
    "check_sites",
    "inference_mode_error",
    "is_validation_enabled",
    "set_validation",
    "validation_enabled",
    "warn_nonfinite",
]


_ENABLED = True


class NonFiniteWarning(RuntimeWarning):
    """A loss, sample or estimate came out NaN or infinite (the counterpart of the warning
    Pyro's ``warn_if_nan`` gives; silence it with ``warnings.simplefilter``)."""


def set_validation(enabled: bool = True) -> None:
    """Turn the value checks that synchronise with the device on (default) or off.

    Args:
        enabled: ``True`` checks the finiteness of inputs and warns on non-finite results;
            ``False`` skips both (types, shapes and option values are still checked).
    """
    global _ENABLED
    if not isinstance(enabled, bool):
        raise TypeError(f"argument 'enabled' must be a bool, got {type(enabled).__name__}")
    _ENABLED = enabled


def is_validation_enabled() -> bool:
    """Whether the host-syncing value checks run (see :func:`set_validation`)."""
    return _ENABLED


@contextlib.contextmanager
def validation_enabled(enabled: bool = True) -> Iterator[None]:
    """Context manager that sets the validation switch inside a block and restores it."""
    previous = _ENABLED
    set_validation(enabled)
    try:
        yield
    finally:
        set_validation(previous)


def warn_nonfinite(what: str, cause: str = "", stacklevel: int = 3) -> None:
    """Warn that ``what`` (e.g. ``"score_matching_loss(method='ssm')"``) is NaN or infinite.

    Args:
        what: the computation whose result is non-finite, as the user called it.
        cause: the likely causes to name, e.g. ``"a NaN parameter in fn, or eps too large"``.
        stacklevel: as in ``warnings.warn``; the default points at the caller's caller.
    """
    msg = f"{what} is not finite (nan or inf)"
    if cause:
        msg += f"; likely cause: {cause}"
    warnings.warn(msg, NonFiniteWarning, stacklevel=stacklevel)


def inference_mode_error(what: str, derivatives: str = "its derivatives in x") -> RuntimeError:
    """The error for ``what`` called under ``torch.inference_mode()`` (torch and Pyro).

    Score matching and score-based samplers differentiate a log density in its argument;
    inference mode disables autograd in a way that cannot be undone inside it, whereas
    ``torch.no_grad()`` can (and every such function re-enables grad for those derivatives).

    Args:
        what: the function or object as the user called it, e.g. ``"score_matching_loss"``.
        derivatives: which derivatives it needs autograd for.
    """
    return RuntimeError(
        f"{what} needs autograd for {derivatives}, which torch.inference_mode() disables and "
        "cannot re-enable; call it under torch.no_grad() instead, which is supported (grad is "
        "switched back on for those derivatives only, the value is the same and carries no graph)"
    )


def check_positive_float(name: str, value: Any, what: str = "argument") -> float:
    """A finite real number ``> 0`` (``bool`` is not a number here)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{what} {name!r} must be a positive real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value <= 0.0:
        raise ValueError(f"{what} {name!r} must be a finite number > 0, got {value!r}")
    return value


def check_int(name: str, value: Any, low: int = 1, high: int | None = None, what: str = "argument") -> int:
    """An ``int`` in ``[low, high]`` (``bool`` is not an int here)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{what} {name!r} must be an int >= {low}, got {type(value).__name__}")
    value = int(value)
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{what} {name!r} must be an int {bound}, got {value}")
    return value


def check_real_in(
    name: str, value: Any, low: float, high: float, *, closed_low: bool = False, what: str = "argument"
) -> float:
    """A real number in ``(low, high]`` (``[low, high]`` with ``closed_low``; ``bool`` is not a number here)."""
    interval = f"{'[' if closed_low else '('}{low:g}, {high:g}]"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{what} {name!r} must be a real number in {interval}, got {type(value).__name__}")
    value = float(value)
    if not ((low <= value if closed_low else low < value) and value <= high):
        raise ValueError(f"{what} {name!r} must be a real number in {interval}, got {value!r}")
    return value


def check_sites(sites: Any, kind: str = "observed") -> tuple | None:
    """``None`` (every site of the kind), a site name, or a non-empty collection of distinct names.

    Args:
        sites: the value of the argument ``sites``.
        kind: which sites it names, for the message (``"observed"``, ``"latent"``, ``"code"``).
    """
    if sites is None:
        return None
    if isinstance(sites, str):
        sites = (sites,)
    try:
        sites = tuple(sites)
    except TypeError:
        raise TypeError(
            f"argument 'sites' must be None, a site name or a list of site names, got {type(sites).__name__}"
        ) from None
    if not sites:
        raise ValueError(f"argument 'sites' must name at least one {kind} site (or be None for all of them)")
    bad = [s for s in sites if not isinstance(s, str)]
    if bad:
        raise TypeError(f"argument 'sites' must hold site names (strings), got {bad!r}")
    if len(set(sites)) != len(sites):
        raise ValueError(f"argument 'sites' names a site twice: {list(sites)}")
    return sites


def check_choice(name: str, value: Any, allowed: Sequence[str], what: str = "argument") -> str:
    """One of the strings in ``allowed``."""
    if not isinstance(value, str):
        raise TypeError(f"{what} {name!r} must be one of {tuple(allowed)}, got {type(value).__name__}")
    if value not in allowed:
        raise ValueError(f"{what} {name!r} must be one of {tuple(allowed)}, got {value!r}")
    return value
