"""A small training loop for energy models with any score-matching objective (torch).

Mirrors ``ppl_score.jax.training``. Used by ``python -m ppl_score demo``.
"""

from __future__ import annotations

import copy
import math
import time
from typing import Any, Callable, NamedTuple

import numpy as np
import numpy.typing as npt
import torch

from ..common import objectives as spec
from ..common import training as common
from ..common.training import EVAL_CHUNK, LR_FLOOR
from .objectives import score_matching_loss
from .validate import check_array

__all__ = ["FitResult", "fit_energy", "evaluator"]


class FitResult(NamedTuple):
    """A trained energy model and numpy callables to evaluate it.

    ``log_prob(x) -> [N]`` (unnormalized), ``score(x) -> [N, *event]`` and ``esm(x) -> [N]``
    (the per-example exact score-matching objective ``tr H + 1/2 ||s||^2``) take and return
    float64 numpy arrays. ``losses[t]`` is the training objective at step ``t``.
    """

    model: torch.nn.Module
    losses: np.ndarray
    seconds: float
    log_prob: Callable[[np.ndarray], np.ndarray]
    score: Callable[[np.ndarray], np.ndarray]
    esm: Callable[[np.ndarray], np.ndarray]


def _chunked(f, x: np.ndarray, dtype) -> np.ndarray:
    outs = []
    for start in range(0, len(x), EVAL_CHUNK):
        xb = torch.as_tensor(np.asarray(x[start : start + EVAL_CHUNK]), dtype=dtype)
        outs.append(f(xb).detach().to(torch.float64).numpy())
    return np.concatenate(outs) if outs else np.zeros((0,))


def evaluator(
    model: torch.nn.Module, dtype: torch.dtype = torch.float32
) -> tuple[Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]]:
    """``(log_prob, score, esm)`` numpy callables for the log density ``model``, chunked."""

    def log_prob(x):
        with torch.no_grad():
            return _chunked(model, x, dtype)

    def score_fn(xb):
        with torch.enable_grad():
            xg = xb.requires_grad_(True)
            (s,) = torch.autograd.grad(model(xg).sum(), xg)
        return s

    def esm(x):
        with torch.enable_grad():
            return _chunked(lambda xb: score_matching_loss(model, xb, "esm", reduction="none"), x, dtype)

    return log_prob, (lambda x: _chunked(score_fn, x, dtype)), esm


def fit_energy(
    model: torch.nn.Module,
    data: npt.ArrayLike,
    method: str = "ssm_vr",
    *,
    steps: int = 2000,
    batch_size: int = 256,
    lr: float = 1e-3,
    seed: int = 0,
    progress: bool = True,
    dtype: torch.dtype = torch.float32,
    **options: Any,
) -> FitResult:
    """Fit the log density ``model`` (``x[B, *event] -> [B]``, up to a constant) to ``data``
    ``[N, *event]`` by minimizing ``score_matching_loss(model, batch, method, **options)``
    with Adam on minibatches drawn with replacement. The learning rate decays from ``lr``
    to ``LR_FLOOR * lr`` along a cosine.

    A deep copy of ``model`` is trained and returned; the caller's module is left as it
    was. ``seed`` fixes the minibatches and the objective's projections and noise (not the
    initial weights, which come with ``model``).

    Raises:
        FloatingPointError: the loss became non-finite (lower ``lr``, or raise ``eps`` /
            ``sigma`` for the finite-difference and denoising methods).
    """
    lr = common.check_fit(method, options, steps, batch_size, lr)  # fail before any work
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"argument 'model' must be a torch.nn.Module, got {type(model).__name__}")
    x = torch.as_tensor(np.asarray(data), dtype=dtype)
    spec.check_x_shape(tuple(x.shape))
    check_array("data", x)

    model = copy.deepcopy(model).to(dtype)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)

    # optax.cosine_decay_schedule(lr, steps, alpha=LR_FLOOR), as in the JAX loop
    def decay(t):
        return LR_FLOOR + (1 - LR_FLOOR) * 0.5 * (1 + math.cos(math.pi * min(t, steps) / max(steps, 1)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, decay)
    generator = torch.Generator().manual_seed(seed)
    losses = torch.empty(steps, dtype=torch.float64)
    report = common.report_every(steps)

    from tqdm.auto import tqdm

    start = time.perf_counter()
    with tqdm(range(steps), desc=f"torch {method}", disable=not progress, leave=False) as bar:
        for t in bar:
            idx = torch.randint(len(x), (batch_size,), generator=generator)
            loss = score_matching_loss(model, x[idx], method, generator=generator, **options)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses[t] = loss.detach()
            if (t + 1) % report == 0 or t + 1 == steps:
                value = float(losses[t])
                if not math.isfinite(value):
                    raise common.nonfinite_loss_error(method, t + 1)
                bar.set_postfix(loss=f"{value:.4g}", refresh=False)
    seconds = time.perf_counter() - start
    model.eval()
    return FitResult(model, losses.numpy(), seconds, *evaluator(model, dtype))
