"""Langevin samplers over a batch of chains (JAX): unadjusted (ULA) and
Metropolis-adjusted (MALA).

One step of size ``h`` proposes ``x' = x + h s(x) + sqrt(2 h) z`` with ``z ~ N(0, I)`` and
``s = grad log p``; ULA keeps every proposal (stationary law biased by O(h)), MALA accepts
with probability ``min(1, p(x') q(x | x') / (p(x) q(x' | x)))``,
``q(b | a) = N(b; a + h s(a), 2 h I)`` (exact for every ``h``). The math and the shared
argument checks live in ``ppl_score.common.langevin``; ``ppl_score.torch.langevin`` mirrors this file.

``init`` and ``step`` are pure and jit-compatible (a ``LangevinState`` NamedTuple in, one
out, randomness from an explicit key). ``ula`` / ``mala`` drive ``step`` with ``lax.scan``
under ``jit``, in chunks when a progress bar is shown; every step's key is split from
``key`` up front, so the draws do not depend on the chunking.

Compilation. Nothing the caller passes is kept alive by a cache, and a training loop that
samples with ``lambda x: energy(params, x)`` made afresh each time compiles once: the arrays
a plain Python function closes over (directly, in nested closures, or in dicts, lists and
tuples) are passed to the compiled program as dynamic arguments, and the compilation is
cached per code object (weakly) and per the closure's non-array contents (numbers,
strings, types). A ``jax.tree_util.Partial(energy, params)`` works the same way when
``energy`` is a plain function (a ``functools.partial`` inside it is a new object each time
``Partial`` wraps it, so it compiles each time: write ``def energy(params, x)`` instead). Any other
``fn`` (a bound method, an object holding arrays in its attributes) is compiled once per
``fn`` object and released with it.

``fn`` maps chains ``x[C, *event]`` to log densities ``[C]`` (``kind="log_prob"``, up to a
constant) or, for ULA only, to scores ``[C, *event]`` (``kind="score"``); row ``c`` of its
output may depend only on ``x[c]``.
"""

from __future__ import annotations

import math
import types
import weakref
from functools import partial
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from tqdm.auto import tqdm

from ..common import langevin as shared
from ..common import objectives as spec
from .derivatives import flat_sum
from .validate import check_array, check_key

__all__ = [
    "LangevinState",
    "LangevinInfo",
    "LangevinResult",
    "AnnealedLangevinResult",
    "init",
    "step",
    "ula",
    "mala",
    "annealed_langevin",
]

# Number of progress-bar updates over a run (each one ends a jitted chunk of scan).
PROGRESS_CHUNKS = 20


class LangevinState(NamedTuple):
    x: jax.Array  # [C, *event]
    log_prob: jax.Array  # [C]; zeros for kind="score"
    score: jax.Array  # [C, *event]


class LangevinInfo(NamedTuple):
    accept_prob: jax.Array  # [C]: Metropolis-Hastings acceptance probability (ones for ULA)
    is_accepted: jax.Array  # [C] bool


class LangevinResult(NamedTuple):
    samples: jax.Array  # [num_steps // thin, C, *event]; samples[-1] is the last state
    accept_rate: jax.Array  # [C]: mean acceptance probability over the kept-phase steps


class AnnealedLangevinResult(NamedTuple):
    samples: jax.Array  # [C, *event]: the final states (denoised when asked)
    levels: jax.Array  # [L, C, *event]: the state at the end of each noise level


def _evaluate(fn, kind: str, x: jax.Array):
    """``(log p(x) [C], s(x) [C, *event])``; ``log p`` is zeros for ``kind="score"``."""
    if kind == "score":
        out = fn(x)
        spec.check_fn_output_shape(kind, tuple(out.shape), tuple(x.shape))
        return jnp.zeros(x.shape[:1], x.dtype), out
    out, pullback = jax.vjp(fn, x)
    spec.check_fn_output_shape(kind, tuple(out.shape), tuple(x.shape))
    return out, pullback(jnp.ones_like(out))[0]


def init(fn: Callable[[jax.Array], jax.Array], x: jax.Array, kind: str = "log_prob") -> LangevinState:
    """The state at ``x[C, *event]``: its log density and score."""
    log_prob, score = _evaluate(fn, kind, x)
    return LangevinState(x, log_prob, score)


def step(
    key: jax.Array,
    state: LangevinState,
    fn: Callable[[jax.Array], jax.Array],
    step_size: float | jax.Array,
    *,
    adjusted: bool = True,
    kind: str = "log_prob",
) -> tuple[LangevinState, LangevinInfo]:
    """One Langevin transition of every chain; returns ``(state, info)``. Pure."""
    key = check_key(key)
    x, log_prob, score = state
    h = jnp.asarray(step_size, x.dtype)
    key_noise, key_accept = jax.random.split(key)
    z = jax.random.normal(key_noise, x.shape, x.dtype)
    proposal = x + h * score + jnp.sqrt(2.0 * h) * z
    prop_log_prob, prop_score = _evaluate(fn, kind, proposal)
    c = x.shape[0]
    if not adjusted:
        ones = jnp.ones((c,), x.dtype)
        return LangevinState(proposal, prop_log_prob, prop_score), LangevinInfo(ones, ones > 0)
    # log q(x'|x) = -||z||^2 / 2 and log q(x|x') = -||x - x' - h s(x')||^2 / (4 h), up to the same constant
    log_fwd = -0.5 * flat_sum(z * z)
    back = x - proposal - h * prop_score
    log_bwd = -flat_sum(back * back) / (4.0 * h)
    log_alpha = prop_log_prob - log_prob + log_bwd - log_fwd
    # a non-finite proposal (nan log density or score) is rejected, never accepted
    log_alpha = jnp.where(jnp.isnan(log_alpha), -jnp.inf, log_alpha)
    accept_prob = jnp.exp(jnp.minimum(log_alpha, 0.0))
    u = jax.random.uniform(key_accept, (c,), x.dtype)
    accepted = jnp.log(u) < log_alpha
    mask = accepted.reshape(c, *([1] * (x.ndim - 1)))
    new = LangevinState(
        jnp.where(mask, proposal, x),
        jnp.where(accepted, prop_log_prob, log_prob),
        jnp.where(mask, prop_score, score),
    )
    return new, LangevinInfo(accept_prob, accepted)


# ---------------------------------------------------------------------------------------
# compiled drivers, cached without keeping ``fn`` (or its arrays) alive
#
# ``fn`` cannot be a static jit argument: jit's caches would hold every closure ever passed
# (and the arrays it closes over) for the life of the process, and compile again for each
# new one. Instead ``_COMPILED``, a ``WeakKeyDictionary``, maps a weakly held base (a
# closure's code object, a ``Partial``'s ``func``, or else ``fn`` itself) to jitted drivers
# that reach it only through a weak reference. The arrays of a closure or ``Partial`` are
# pytree leaves passed as dynamic arguments, so a new closure of the same code over new
# arrays of the same shapes reuses the compilation.


class _Drivers:
    """The jitted ``init`` and ``scan`` for one ``fn``, which they hold weakly."""

    def __init__(self, base, assemble):
        try:
            ref = weakref.ref(base)
        except TypeError:  # not weak-referenceable: compiled for this call only
            ref = lambda: base  # noqa: E731
        self.init = jax.jit(partial(_init_checked_impl, ref, self), static_argnames=("kind",))
        self.scan = jax.jit(partial(_scan_impl, ref, self), static_argnames=("kind", "adjusted", "collect"))
        self.annealed = jax.jit(partial(_annealed_impl, ref, self), static_argnames=("kind",))
        self.traces = 0  # how many times fn was traced (compilations), for tests and debugging
        self.assemble = assemble  # (base, leaves) -> fn

    def rebuild(self, ref, leaves):
        self.traces += 1
        base = ref()
        if base is None:  # pragma: no cover - the caller holds fn during the call
            raise RuntimeError("argument 'fn' was garbage-collected during the run")
        return self.assemble(base, leaves)


_COMPILED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()

# Closure contents that may be baked into a compilation: immutable values whose equality
# is their meaning. Anything else (an object holding arrays, say) disables the code-keyed
# cache for that closure, which is then compiled per ``fn`` object as above.
_STATIC_TYPES = (type(None), bool, int, float, complex, str, bytes, type, np.dtype, types.BuiltinFunctionType)


class _Unkeyable(Exception):
    """A closure whose contents cannot be split into a static key and array leaves."""


class _FnSpec:
    """A plain Python function with its arrays taken out: code, globals and the structure of
    its closure cells and defaults, with each array replaced by a slot for a dynamic leaf.
    Equal specs rebuild functions that differ only in those arrays."""

    __slots__ = ("code", "globals", "name", "cells", "defaults", "_key")

    def __init__(self, fn, leaves):
        if fn.__kwdefaults__:
            raise _Unkeyable
        try:
            contents = [c.cell_contents for c in fn.__closure__ or ()]
        except ValueError:  # an empty cell (a function referring to itself before assignment)
            raise _Unkeyable from None
        self.code, self.globals, self.name = fn.__code__, fn.__globals__, fn.__name__
        self.cells = tuple(_split(v, leaves) for v in contents)
        self.defaults = tuple(_split(v, leaves) for v in fn.__defaults__ or ())
        self._key = (self.code, id(self.globals), self.cells, self.defaults)

    def __eq__(self, other):
        return isinstance(other, _FnSpec) and self._key == other._key

    def __hash__(self):
        return hash(self._key)

    def build(self, leaves):
        cells = tuple(types.CellType(_join(c, leaves)) for c in self.cells)
        defaults = tuple(_join(d, leaves) for d in self.defaults) or None
        return types.FunctionType(self.code, self.globals, self.name, defaults, cells or None)


def _split(obj, leaves):
    """A hashable spec of ``obj`` with its arrays appended to ``leaves``."""
    if isinstance(obj, (jax.Array, np.ndarray)):
        leaves.append(obj)
        return ("leaf",)
    if isinstance(obj, _STATIC_TYPES):
        return ("const", type(obj), obj)
    if isinstance(obj, types.FunctionType):
        return ("fn", _FnSpec(obj, leaves))
    children, treedef = jax.tree.flatten(obj, is_leaf=lambda o: o is not obj and isinstance(o, types.FunctionType))
    if treedef.num_leaves == 1 and children and children[0] is obj:  # an opaque object
        raise _Unkeyable
    return ("tree", treedef, tuple(_split(c, leaves) for c in children))


def _join(spec, leaves):
    """Inverse of :func:`_split`, taking the arrays from the iterator ``leaves``."""
    if spec[0] == "leaf":
        return next(leaves)
    if spec[0] == "const":
        return spec[2]
    if spec[0] == "fn":
        return spec[1].build(leaves)
    return jax.tree.unflatten(spec[1], [_join(c, leaves) for c in spec[2]])


def _drivers(fn):
    """``(drivers, leaves)`` for ``fn``: cached drivers and the dynamic leaves of ``fn``.

    A ``Partial``'s arguments, and the arrays a plain Python function closes over (also in
    nested closures, dicts, lists and tuples), are dynamic leaves: a new closure of the same
    code over new arrays of the same shapes reuses the compilation, and the cache, keyed
    weakly by the code object, holds none of the arrays.
    """
    if isinstance(fn, jax.tree_util.Partial):
        base = fn.func
        leaves, treedef = jax.tree.flatten((tuple(fn.args), dict(fn.keywords)))

        def assemble(base, leaves, treedef=treedef):
            args, keywords = jax.tree.unflatten(treedef, leaves)
            return jax.tree_util.Partial(base, *args, **keywords)

        key = ("partial", treedef)
    else:
        base, leaves, key = fn, [], None
        assemble = lambda base, leaves: base  # noqa: E731
        if isinstance(fn, types.FunctionType) and (fn.__closure__ or fn.__defaults__):
            try:
                found = []
                fspec = _FnSpec(fn, found)
            except _Unkeyable:
                pass
            else:
                base, leaves, key = fn.__code__, found, ("closure", fspec)
                assemble = lambda base, leaves, fspec=fspec: fspec.build(iter(leaves))  # noqa: E731
    try:
        per_base = _COMPILED.get(base)
        if per_base is None:
            per_base = _COMPILED[base] = {}
    except TypeError:  # unhashable or not weak-referenceable: no cache
        per_base = {}
    if key not in per_base:
        per_base[key] = _Drivers(base, assemble)
    return per_base[key], leaves


def _init_checked_impl(ref, drivers, leaves, x, *, kind):
    """``init`` under jit (eager dispatch of a traced model is slow), with a finiteness flag."""
    fn = drivers.rebuild(ref, leaves)
    state = init(fn, x, kind)
    return state, jnp.isfinite(state.log_prob).all() & jnp.isfinite(state.score).all()


def _scan_impl(ref, drivers, leaves, step_size, state, accept_sum, keys, *, kind, adjusted, collect):
    """Run ``keys.shape[0]`` transitions (``collect=False``: warmup keys ``[n]``) or
    ``n`` blocks of ``thin`` transitions keeping each block's last state (keys ``[n, thin]``)."""
    fn = drivers.rebuild(ref, leaves)

    def transition(carry, key):
        state, acc = carry
        state, info = step(key, state, fn, step_size, adjusted=adjusted, kind=kind)
        return (state, acc + info.accept_prob), None

    if not collect:
        (state, _), _ = lax.scan(transition, (state, accept_sum), keys)
        return state, accept_sum, None

    def block(carry, block_keys):
        carry, _ = lax.scan(transition, carry, block_keys)
        return carry, carry[0].x

    (state, accept_sum), xs = lax.scan(block, (state, accept_sum), keys)
    return state, accept_sum, xs


def _annealed_impl(ref, drivers, leaves, x, sigmas, step_sizes, keys, *, kind):
    """Annealed Langevin over the levels ``sigmas [L']`` (step sizes ``[L']``, keys
    ``[L', n_steps_each]``): the final state and each level's last state ``[L', C, *event]``."""
    fn = drivers.rebuild(ref, leaves)

    def level(x, inputs):
        sigma, h, level_keys = inputs
        at_level = partial(_at_level, fn, jnp.full(x.shape[:1], sigma, x.dtype))

        def transition(state, key):
            return step(key, state, at_level, h, adjusted=False, kind=kind)[0], None

        state, _ = lax.scan(transition, init(at_level, x, kind), level_keys)
        return state.x, state.x

    return lax.scan(level, x, (sigmas, step_sizes, keys))


def _at_level(fn, sigma, x):
    """``fn`` at a fixed noise level: ``x -> fn(x, sigma)``."""
    return fn(x, sigma)


def _chunks(n: int, progress_bar: bool):
    size = max(1, math.ceil(n / PROGRESS_CHUNKS)) if progress_bar else max(n, 1)
    return [(start, min(start + size, n)) for start in range(0, n, size)]


def _run(fn, x0, step_size, num_steps, *, key, adjusted, kind, num_warmup, thin, progress_bar) -> LangevinResult:
    if not callable(fn):
        raise TypeError(f"argument 'fn' must be callable, got {type(fn).__name__}")
    plan = shared.check_plan(step_size, num_steps, num_warmup, thin)
    shared.check_kind(kind, adjusted)
    x0 = check_array("x0", x0)
    shared.check_chains_shape(tuple(x0.shape), "x0")
    if key is None:
        raise ValueError("argument 'key' is required (a jax.random key)")
    key = check_key(key)
    drivers, leaves = _drivers(fn)
    state, finite = drivers.init(leaves, x0, kind=kind)
    if not bool(finite):
        raise shared.init_error("x0")
    h = jnp.asarray(plan.step_size, x0.dtype)
    keys = jax.random.split(key, plan.num_warmup + plan.num_steps)
    warm_keys = keys[: plan.num_warmup]
    sample_keys = keys[plan.num_warmup :].reshape(plan.num_samples, plan.thin, *keys.shape[1:])
    accept_sum = jnp.zeros(x0.shape[:1], x0.dtype)
    pieces = []
    with tqdm(
        total=plan.num_warmup + plan.num_steps, disable=not progress_bar, desc="warmup" if plan.num_warmup else "sample"
    ) as bar:
        for a, b in _chunks(plan.num_warmup, progress_bar) if plan.num_warmup else []:
            state, accept_sum, _ = drivers.scan(
                leaves, h, state, accept_sum, warm_keys[a:b], kind=kind, adjusted=adjusted, collect=False
            )
            jax.block_until_ready(state.x)
            bar.update(b - a)
        bar.set_description("sample")
        for a, b in _chunks(plan.num_samples, progress_bar):
            state, accept_sum, xs = drivers.scan(
                leaves, h, state, accept_sum, sample_keys[a:b], kind=kind, adjusted=adjusted, collect=True
            )
            pieces.append(xs)
            jax.block_until_ready(xs)
            bar.update((b - a) * plan.thin)
    samples = pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces)
    if not (bool(jnp.isfinite(samples).all()) and bool(jnp.isfinite(state.score).all())):
        raise shared.divergence_error(plan.step_size, adjusted)
    accept_rate = accept_sum / plan.num_steps
    if adjusted:
        shared.warn_low_acceptance(float(accept_rate.mean()), float(accept_rate.min()), plan.step_size)
    return LangevinResult(samples, accept_rate)


def ula(
    fn: Callable[[jax.Array], jax.Array],
    x0: jax.Array | np.ndarray,
    step_size: float,
    num_steps: int,
    *,
    key: jax.Array,
    kind: str = "log_prob",
    num_warmup: int = 0,
    thin: int = 1,
    progress_bar: bool = False,
) -> LangevinResult:
    """Unadjusted Langevin: ``x <- x + h s(x) + sqrt(2 h) z`` for ``C`` chains in parallel.

    Args:
        fn: ``x[C, *event] -> [C]`` log density (``kind="log_prob"``) or
            ``-> [C, *event]`` score (``kind="score"``); jax-traceable. Compiled once per
            ``fn`` object and released with it; a ``jax.tree_util.Partial`` keeps its
            arguments dynamic, so new arrays of the same shapes reuse the compilation
            (see the module docstring).
        x0: initial states ``[C, *event]``.
        step_size: ``h > 0``; the stationary law is biased by O(h).
        num_steps: steps after warmup (a multiple of ``thin``).
        key: a ``jax.random`` key; the same key gives the same draws.
        num_warmup: steps run first and discarded.
        thin: keep every ``thin``-th state.
        progress_bar: show a tqdm bar (the scan then runs in ``PROGRESS_CHUNKS`` pieces).

    Returns:
        ``LangevinResult(samples [num_steps // thin, C, *event], accept_rate [C])``;
        ``accept_rate`` is all ones.

    Raises:
        ValueError: bad arguments, a non-finite density or score at ``x0``, or a run that
            reaches non-finite states (decrease ``step_size``).
    """
    return _run(
        fn,
        x0,
        step_size,
        num_steps,
        key=key,
        adjusted=False,
        kind=kind,
        num_warmup=num_warmup,
        thin=thin,
        progress_bar=progress_bar,
    )


def mala(
    fn: Callable[[jax.Array], jax.Array],
    x0: jax.Array | np.ndarray,
    step_size: float,
    num_steps: int,
    *,
    key: jax.Array,
    num_warmup: int = 0,
    thin: int = 1,
    progress_bar: bool = False,
) -> LangevinResult:
    """Metropolis-adjusted Langevin for ``C`` chains in parallel; exact stationary law ``p``.

    Same arguments as ``ula`` (``fn`` must be a log density). ``accept_rate`` is each
    chain's mean Metropolis-Hastings acceptance probability over the ``num_steps`` steps
    after warmup (about 0.57 is optimal in high dimension, Roberts & Rosenthal 1998).
    A mean rate below ``ppl_score.common.langevin.LOW_ACCEPTANCE`` (the chains barely moved, e.g.
    ``step_size`` far too large) gives a ``LowAcceptanceWarning`` (a ``RuntimeWarning``)
    naming the rate. Errors as in ``ula``.
    """
    return _run(
        fn,
        x0,
        step_size,
        num_steps,
        key=key,
        adjusted=True,
        kind="log_prob",
        num_warmup=num_warmup,
        thin=thin,
        progress_bar=progress_bar,
    )


def annealed_langevin(
    fn: Callable[[jax.Array, jax.Array], jax.Array],
    x0: jax.Array | np.ndarray,
    sigmas,
    n_steps_each: int = 100,
    step_lr: float = 2e-5,
    *,
    denoise: bool = True,
    kind: str = "score",
    key: jax.Array,
    progress_bar: bool = False,
) -> AnnealedLangevinResult:
    """Annealed Langevin dynamics (Song & Ermon 2019, Algorithm 1) with a noise-conditional
    model, ``C`` chains in parallel; mirrors ``ppl_score.torch.langevin.annealed_langevin``.

    For each level ``sigma_i`` of ``sigmas`` (largest first), ``n_steps_each`` unadjusted
    steps ``x <- x + h_i s(x, sigma_i) + sqrt(2 h_i) z`` with ``h_i = step_lr sigma_i^2 /
    sigma_L^2`` (the paper's ``alpha_i = 2 h_i``); then, with ``denoise``,
    ``x <- x + sigma_L^2 s(x, sigma_L)`` (Tweedie's formula). The whole run is one
    ``lax.scan`` under ``jit`` (one piece per level with a progress bar), compiled once per
    ``fn`` as ``ula`` is (see the module docstring).

    Args:
        fn: ``fn(x, sigma)`` with ``x[C, *event]``, ``sigma[C]``: a score ``-> [C, *event]``
            (``kind="score"``) or a log density ``-> [C]`` (``kind="log_prob"``).
        x0: initial states ``[C, *event]``.
        sigmas: the noise levels, strictly decreasing.
        n_steps_each: steps per level.
        step_lr: ``h_L``, the step size at the smallest level.
        denoise: finish with the Tweedie step.
        key: a ``jax.random`` key.
        progress_bar: a tqdm bar over the levels.

    Returns:
        ``AnnealedLangevinResult(samples [C, *event], levels [L, C, *event])``.

    Raises:
        TypeError / ValueError: bad arguments (named); non-finite states (decrease ``step_lr``).

    References:
        1. Y. Song, S. Ermon. Generative modeling by estimating gradients of the data
           distribution. NeurIPS, 2019.
        2. A. Jolicoeur-Martineau, R. Piche-Taillefer, I. Mitliagkas, R. Tachet des Combes.
           Adversarial score matching and improved sampling for image generation. ICLR, 2021.
    """
    if not callable(fn):
        raise TypeError(f"argument 'fn' must be callable, got {type(fn).__name__}")
    plan = shared.check_annealed(sigmas, n_steps_each, step_lr, denoise)
    shared.check_kind(kind, adjusted=False)
    spec.check_noise_conditional_fn(fn, "annealed_langevin")
    x0 = check_array("x0", x0)
    shared.check_chains_shape(tuple(x0.shape), "x0")
    if key is None:
        raise ValueError("argument 'key' is required (a jax.random key)")
    key = check_key(key)
    drivers, leaves = _drivers(fn)
    n_levels = len(plan.sigmas)
    sigmas_arr = jnp.asarray(plan.sigmas, x0.dtype)
    steps_arr = jnp.asarray(plan.step_sizes, x0.dtype)
    keys = jax.random.split(key, n_levels * plan.n_steps_each)
    keys = keys.reshape(n_levels, plan.n_steps_each, *keys.shape[1:])
    x, pieces = x0, []
    with tqdm(total=n_levels, disable=not progress_bar, desc="annealed Langevin") as bar:
        for a, b in _chunks(n_levels, progress_bar):
            x, xs = drivers.annealed(leaves, x, sigmas_arr[a:b], steps_arr[a:b], keys[a:b], kind=kind)
            pieces.append(xs)
            jax.block_until_ready(x)
            bar.update(b - a)
    levels = pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces)
    finite = np.asarray(jnp.isfinite(levels).reshape(n_levels, -1).all(axis=1))  # one transfer
    for i, sigma in enumerate(plan.sigmas):
        if not finite[i]:
            raise ValueError(
                f"annealed Langevin diverged at noise level {sigma:g} (step size {plan.step_sizes[i]:g}): "
                "decrease 'step_lr'"
            )
    if plan.denoise:
        last = plan.sigmas[-1]
        x = x + last**2 * _evaluate(partial(_at_level, fn, jnp.full(x.shape[:1], last, x.dtype)), kind, x)[1]
    return AnnealedLangevinResult(x, levels)
