"""A small training loop for energy models with any score-matching objective (JAX).

Mirrors ``ppl_score.torch.training``. Used by ``python -m ppl_score demo``.
"""

from __future__ import annotations

import math
import time
import weakref
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpy.typing as npt

from ..common import objectives as spec
from ..common import training as common
from ..common.training import EVAL_CHUNK, LR_FLOOR
from .objectives import score_matching_loss
from .validate import check_array

__all__ = ["FitResult", "fit_energy", "evaluator"]

# a pytree of arrays (the energy's parameters)
Params = Any


class FitResult(NamedTuple):
    """Trained energy parameters and numpy callables to evaluate them.

    ``log_prob(x) -> [N]`` (unnormalized), ``score(x) -> [N, *event]`` and ``esm(x) -> [N]``
    (the per-example exact score-matching objective ``tr H + 1/2 ||s||^2``) take and return
    float64 numpy arrays, compiled once per ``apply_fn`` (see :func:`evaluator`). ``losses[t]``
    is the training objective at step ``t``.
    """

    params: Any
    losses: np.ndarray
    seconds: float
    log_prob: Callable[[np.ndarray], np.ndarray]
    score: Callable[[np.ndarray], np.ndarray]
    esm: Callable[[np.ndarray], np.ndarray]


def _chunked(f, x: np.ndarray, dtype) -> np.ndarray:
    x = np.asarray(x)
    n = len(x)
    size = min(EVAL_CHUNK, n)
    outs = []
    for start in range(0, n, size):
        xb = x[start : start + size]
        pad = size - len(xb)
        if pad:
            xb = np.concatenate([xb, np.broadcast_to(xb[:1], (pad, *xb.shape[1:]))])
        out = np.asarray(f(jnp.asarray(xb, dtype)), dtype=np.float64)
        outs.append(out[: size - pad])
    return np.concatenate(outs) if outs else np.zeros((0,))


# The jitted evaluators of an ``apply_fn``, with the parameters as an argument, held no longer
# than ``apply_fn`` itself: every model fitted with the same ``apply_fn`` reuses one
# compilation per chunk shape (closing over the parameters would compile again per model and
# embed the parameters in the program).
_COMPILED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _compiled(apply_fn: Callable[[Params, jax.Array], jax.Array]) -> tuple[Callable, Callable, Callable]:
    try:
        return _COMPILED[apply_fn]
    except (KeyError, TypeError):  # TypeError: not weak-referenceable (or unhashable)
        pass
    try:
        ref = weakref.ref(apply_fn)
    except TypeError:
        ref = lambda: apply_fn  # noqa: E731 - no cache: the closure may hold it
    # The compiled functions reach ``apply_fn`` through ``ref`` only, or the cache's values
    # would keep its keys alive; the callables ``evaluator`` returns hold it.

    def log_prob(p, x):
        return ref()(p, x)

    def score(p, x):
        return jax.grad(lambda y: ref()(p, y).sum())(x)

    def esm(p, x):
        return score_matching_loss(lambda y: ref()(p, y), x, "esm", reduction="none")

    fns = tuple(jax.jit(f) for f in (log_prob, score, esm))
    try:
        _COMPILED[apply_fn] = fns
    except TypeError:
        pass
    return fns


def evaluator(
    apply_fn: Callable[[Params, jax.Array], jax.Array], params: Params, dtype: jnp.dtype | type = jnp.float32
) -> tuple[Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]]:
    """``(log_prob, score, esm)`` numpy callables for the log density
    ``apply_fn(params, x) -> [B]``, jitted and chunked.

    The compilations are cached per ``apply_fn`` (weakly) with ``params`` as an argument, so
    that models fitted with the same ``apply_fn`` share them.
    """
    return tuple(
        (lambda x, f=f, keep=apply_fn: _chunked(lambda xb: f(params, xb), x, dtype)) for f in _compiled(apply_fn)
    )


def fit_energy(
    apply_fn: Callable[[Params, jax.Array], jax.Array],
    params: Params,
    data: npt.ArrayLike,
    method: str = "ssm_vr",
    *,
    steps: int = 2000,
    batch_size: int = 256,
    lr: float = 1e-3,
    seed: int = 0,
    progress: bool = True,
    dtype: jnp.dtype | type = jnp.float32,
    **options: Any,
) -> FitResult:
    """Fit the log density ``apply_fn(params, x)`` (``x[B, *event] -> [B]``, up to a
    constant) to ``data`` ``[N, *event]`` by minimizing
    ``score_matching_loss(lambda y: apply_fn(params, y), batch, method, key=..., **options)``
    with ``optax.adam`` on minibatches drawn with replacement, one jitted update per step.
    The learning rate decays from ``lr`` to ``LR_FLOOR * lr`` along a cosine.

    ``seed`` fixes the minibatches and the objective's projections and noise (not the
    initial ``params``). Returns new parameters; ``params`` are not modified.

    Raises:
        FloatingPointError: the loss became non-finite (lower ``lr``, or raise ``eps`` /
            ``sigma`` for the finite-difference and denoising methods).
    """
    import optax

    lr = common.check_fit(method, options, steps, batch_size, lr)  # fail before any work
    if not callable(apply_fn):
        raise TypeError(f"argument 'apply_fn' must be callable, got {type(apply_fn).__name__}")
    x = jnp.asarray(np.asarray(data), dtype)
    spec.check_x_shape(tuple(x.shape))
    check_array("data", x)

    params = jax.tree.map(lambda a: jnp.asarray(a, dtype), params)
    optimizer = optax.adam(optax.cosine_decay_schedule(lr, max(steps, 1), alpha=LR_FLOOR))

    def loss_fn(p, xb, key):
        return score_matching_loss(lambda y: apply_fn(p, y), xb, method, key=key, **options)

    @jax.jit
    def update(p, opt_state, key, data):
        key, k_batch, k_loss = jax.random.split(key, 3)
        idx = jax.random.randint(k_batch, (batch_size,), 0, data.shape[0])
        loss, grads = jax.value_and_grad(loss_fn)(p, data[idx], k_loss)
        updates, opt_state = optimizer.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, key, loss

    opt_state = optimizer.init(params)
    key = jax.random.PRNGKey(seed)
    losses = []
    report = common.report_every(steps)

    from tqdm.auto import tqdm

    start = time.perf_counter()
    with tqdm(range(steps), desc=f"jax {method}", disable=not progress, leave=False) as bar:
        for t in bar:
            params, opt_state, key, loss = update(params, opt_state, key, x)
            losses.append(loss)
            if (t + 1) % report == 0 or t + 1 == steps:
                value = float(loss)  # also waits for the step: the bar shows real progress
                if not math.isfinite(value):
                    raise common.nonfinite_loss_error(method, t + 1)
                bar.set_postfix(loss=f"{value:.4g}", refresh=False)
    jax.block_until_ready(params)
    seconds = time.perf_counter() - start
    losses = np.asarray(jnp.stack(losses), dtype=np.float64) if losses else np.zeros((0,))
    return FitResult(params, losses, seconds, *evaluator(apply_fn, params, dtype))
