"""The torch half of the validation path (:mod:`ppl_score.common.validate` holds the
framework-free half): the array checks every module of the torch backend and the Pyro
front end share, so one rule gives one message.

Type errors raise ``TypeError`` and value errors ``ValueError``, naming the argument. The
finiteness checks need the values on the host (a device synchronisation, and a graph break
under ``torch.compile``), so they run only with validation on (``ppl_score.set_validation``)
and not while ``torch.compile`` traces.
"""

from __future__ import annotations

from typing import Any

import torch

from ..common.validate import inference_mode_error, is_validation_enabled

__all__ = ["all_finite", "check_array", "check_grad_mode", "validating"]

_INTEGER_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64)


def validating() -> bool:
    """Whether the host-syncing checks run: validation on, and not while ``torch.compile`` traces."""
    return is_validation_enabled() and not torch.compiler.is_compiling()


def all_finite(t: torch.Tensor) -> bool:
    """Whether every entry of ``t`` is finite: one sum (nan/inf propagate) and one host sync
    in the usual case; the elementwise test only when the sum is not finite (it may overflow)."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def check_array(name: str, a: Any, *, dtype: str | None = "floating", finite: bool = True) -> torch.Tensor:
    """Check that argument ``name`` is a ``torch.Tensor`` of the right kind and return it.

    Args:
        name: the argument's name, for the message.
        a: the value passed.
        dtype: ``"floating"`` (a floating dtype), ``"real"`` (floating or integer) or ``None``
            (any dtype).
        finite: also check that every entry is finite (with validation on, see :func:`validating`).

    Raises:
        TypeError: ``a`` is not a tensor, or has the wrong dtype.
        ValueError: ``a`` holds nan or inf.
    """
    if not isinstance(a, torch.Tensor):
        raise TypeError(f"argument {name!r} must be a torch.Tensor, got {type(a).__name__}")
    if dtype == "floating" and not a.is_floating_point():
        raise TypeError(f"argument {name!r} must have a floating dtype, got {a.dtype}")
    if dtype == "real" and not (a.is_floating_point() or a.dtype in _INTEGER_DTYPES):
        raise TypeError(f"argument {name!r} must be a real tensor, got dtype {a.dtype}")
    if finite and validating() and not all_finite(a):
        raise ValueError(f"argument {name!r} contains non-finite values (nan or inf)")
    return a


def check_grad_mode(what: str, derivatives: str = "its derivatives in x") -> None:
    """Raise :func:`~ppl_score.common.validate.inference_mode_error` under ``torch.inference_mode()``.

    Args:
        what: the function or object as the user called it, e.g. ``"score_matching_loss"``.
        derivatives: which derivatives it needs autograd for.
    """
    if torch.is_inference_mode_enabled():
        raise inference_mode_error(what, derivatives)
