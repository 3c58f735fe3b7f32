"""Langevin samplers over a batch of chains (torch): unadjusted (ULA) and
Metropolis-adjusted (MALA).

One step of size ``h`` proposes ``x' = x + h s(x) + sqrt(2 h) z`` with ``z ~ N(0, I)`` and
``s = grad log p``; ULA keeps every proposal (stationary law biased by O(h)), MALA accepts
with probability ``min(1, p(x') q(x | x') / (p(x) q(x' | x)))``,
``q(b | a) = N(b; a + h s(a), 2 h I)`` (exact for every ``h``). The math and the shared
argument checks live in ``ppl_score.common.langevin``; ``ppl_score.jax.langevin`` mirrors this file.

``fn`` maps chains ``x[C, *event]`` to log densities ``[C]`` (``kind="log_prob"``, up to a
constant) or, for ULA only, to scores ``[C, *event]`` (``kind="score"``); row ``c`` of its
output may depend only on ``x[c]``.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Callable, NamedTuple

import torch
from tqdm.auto import tqdm

from ..common import langevin as shared
from ..common import objectives as spec
from .derivatives import flat_sum
from .validate import check_array, check_grad_mode

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


class LangevinState(NamedTuple):
    x: torch.Tensor  # [C, *event]
    log_prob: torch.Tensor  # [C]; zeros for kind="score"
    score: torch.Tensor  # [C, *event]


class LangevinInfo(NamedTuple):
    accept_prob: torch.Tensor  # [C]: Metropolis-Hastings acceptance probability (ones for ULA)
    is_accepted: torch.Tensor  # [C] bool


class LangevinResult(NamedTuple):
    samples: torch.Tensor  # [num_steps // thin, C, *event]; samples[-1] is the last state
    accept_rate: torch.Tensor  # [C]: mean acceptance probability over the kept-phase steps


class AnnealedLangevinResult(NamedTuple):
    samples: torch.Tensor  # [C, *event]: the final states (denoised when asked)
    levels: torch.Tensor  # [L, C, *event]: the state at the end of each noise level


def _evaluate(fn, kind: str, x: torch.Tensor):
    """``(log p(x) [C], s(x) [C, *event])`` detached; ``log p`` is zeros for ``kind="score"``.

    Only ``x`` is differentiated, so nothing accumulates in the parameters ``fn`` closes over.
    Grad is switched on here, so the result is the same under ``torch.no_grad()``; under
    ``torch.inference_mode()``, which cannot be left from inside, ``kind="log_prob"`` is a
    ``RuntimeError`` (a score network, ``kind="score"``, needs no autograd and runs).
    """
    if kind == "log_prob":
        check_grad_mode("Langevin sampling", "the score of the log density in x")
    with torch.enable_grad():
        xg = x.detach()
        if xg.is_inference():  # made under inference_mode: a normal tensor can require grad
            xg = xg.clone()
        xg = xg.requires_grad_(kind == "log_prob")
        out = fn(xg)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"argument 'fn' must return a torch.Tensor, got {type(out).__name__}")
        spec.check_fn_output_shape(kind, tuple(out.shape), tuple(x.shape))
        if kind == "score":
            return x.new_zeros(x.shape[0]), out.detach()
        (s,) = torch.autograd.grad(out.sum(), xg)
    return out.detach(), s.detach()


def init(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, kind: str = "log_prob") -> LangevinState:
    """The state at ``x[C, *event]``: its log density and score."""
    log_prob, score = _evaluate(fn, kind, x)
    return LangevinState(x.detach().clone(), log_prob, score)


def step(
    state: LangevinState,
    fn: Callable[[torch.Tensor], torch.Tensor],
    step_size: float,
    *,
    adjusted: bool = True,
    kind: str = "log_prob",
    generator: torch.Generator | None = None,
) -> tuple[LangevinState, LangevinInfo]:
    """One Langevin transition of every chain; returns ``(state, info)``.

    The arguments come in the order of ``ppl_score.jax.langevin.step(key, state, fn,
    step_size)``, whose randomness (``key``) torch takes as ``generator=``. The former order
    ``step(fn, state, step_size)`` still works, with a ``DeprecationWarning``.
    """
    if isinstance(fn, LangevinState) and not isinstance(state, LangevinState):
        warnings.warn(
            "ppl_score.torch.langevin.step(fn, state, step_size) is deprecated: pass step(state, fn, "
            "step_size), the order of ppl_score.jax.langevin.step(key, state, fn, step_size)",
            DeprecationWarning,
            stacklevel=2,
        )
        state, fn = fn, state
    x, log_prob, score = state
    h = step_size
    z = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    proposal = x + h * score + math.sqrt(2.0 * h) * z
    try:
        prop_log_prob, prop_score = _evaluate(fn, kind, proposal)
    except Exception as err:
        # a diverged chain is the sampler's failure, not fn's (e.g. Pyro's support check)
        if not bool(torch.isfinite(proposal).all()):
            raise shared.divergence_error(h, adjusted) from err
        raise
    c = x.shape[0]
    if not adjusted:
        ones = x.new_ones(c)
        return LangevinState(proposal, prop_log_prob, prop_score), LangevinInfo(ones, ones.bool())
    # log q(x'|x) = -||z||^2 / 2 and log q(x|x') = -||x - x' - h s(x')||^2 / (4 h), up to the same constant
    log_fwd = -0.5 * flat_sum(z * z)
    back = x - proposal - h * prop_score
    log_bwd = -flat_sum(back * back) / (4.0 * h)
    log_alpha = prop_log_prob - log_prob + log_bwd - log_fwd
    # a non-finite proposal (nan log density or score) is rejected, never accepted
    log_alpha = torch.where(torch.isnan(log_alpha), torch.full_like(log_alpha, -math.inf), log_alpha)
    accept_prob = log_alpha.clamp(max=0.0).exp()
    u = torch.rand(c, generator=generator, dtype=x.dtype, device=x.device)
    accepted = torch.log(u) < log_alpha
    mask = accepted.reshape(c, *([1] * (x.dim() - 1)))
    new = LangevinState(
        torch.where(mask, proposal, x),
        torch.where(accepted, prop_log_prob, log_prob),
        torch.where(mask, prop_score, score),
    )
    return new, LangevinInfo(accept_prob, accepted)


def _run(fn, x0, step_size, num_steps, *, adjusted, kind, num_warmup, thin, generator, progress_bar) -> LangevinResult:
    if not callable(fn):
        raise TypeError(f"argument 'fn' must be callable, got {type(fn).__name__}")
    plan = shared.check_plan(step_size, num_steps, num_warmup, thin)
    shared.check_kind(kind, adjusted)
    check_array("x0", x0)
    shared.check_chains_shape(tuple(x0.shape), "x0")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"argument 'generator' must be a torch.Generator, got {type(generator).__name__}")
    state = init(fn, x0, kind)
    if not (torch.isfinite(state.log_prob).all() and torch.isfinite(state.score).all()):
        raise shared.init_error("x0")
    samples = x0.new_empty((plan.num_samples, *x0.shape))
    accept_sum = x0.new_zeros(x0.shape[0])
    with tqdm(
        total=plan.num_warmup + plan.num_steps, disable=not progress_bar, desc="warmup" if plan.num_warmup else "sample"
    ) as bar:
        for i in range(plan.num_warmup + plan.num_steps):
            state, info = step(state, fn, plan.step_size, adjusted=adjusted, kind=kind, generator=generator)
            j = i - plan.num_warmup
            if j >= 0:
                accept_sum += info.accept_prob
                if (j + 1) % plan.thin == 0:
                    samples[j // plan.thin] = state.x
            if j == 0 and plan.num_warmup:
                bar.set_description("sample")
            bar.update()
    if not (torch.isfinite(samples).all() and torch.isfinite(state.score).all()):
        raise shared.divergence_error(plan.step_size, adjusted)
    accept_rate = accept_sum / plan.num_steps
    if adjusted:
        shared.warn_low_acceptance(float(accept_rate.mean()), float(accept_rate.min()), plan.step_size)
    return LangevinResult(samples, accept_rate)


def ula(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x0: torch.Tensor,
    step_size: float,
    num_steps: int,
    *,
    kind: str = "log_prob",
    num_warmup: int = 0,
    thin: int = 1,
    generator: torch.Generator | None = None,
    progress_bar: bool = False,
) -> LangevinResult:
    """Unadjusted Langevin: ``x <- x + h s(x) + sqrt(2 h) z`` for ``C`` chains in parallel.

    Args:
        fn: ``x[C, *event] -> [C]`` log density (``kind="log_prob"``) or
            ``-> [C, *event]`` score (``kind="score"``).
        x0: initial states ``[C, *event]`` (not modified).
        step_size: ``h > 0``; the stationary law is biased by O(h).
        num_steps: steps after warmup (a multiple of ``thin``).
        num_warmup: steps run first and discarded.
        thin: keep every ``thin``-th state.
        generator: ``torch.Generator`` for the noise (default: the global one).
        progress_bar: show a tqdm bar.

    Returns:
        ``LangevinResult(samples [num_steps // thin, C, *event], accept_rate [C])``;
        ``accept_rate`` is all ones.

    Raises:
        ValueError: bad arguments, a non-finite density or score at ``x0``, or a run that
            reaches non-finite states (also when ``fn`` itself rejects a diverged state,
            e.g. Pyro's support validation): decrease ``step_size``.
        RuntimeError: ``kind="log_prob"`` under ``torch.inference_mode()`` (the score needs
            autograd; ``torch.no_grad()`` is fine and gives the same result).
    """
    return _run(
        fn,
        x0,
        step_size,
        num_steps,
        adjusted=False,
        kind=kind,
        num_warmup=num_warmup,
        thin=thin,
        generator=generator,
        progress_bar=progress_bar,
    )


def mala(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x0: torch.Tensor,
    step_size: float,
    num_steps: int,
    *,
    num_warmup: int = 0,
    thin: int = 1,
    generator: torch.Generator | None = None,
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
        adjusted=True,
        kind="log_prob",
        num_warmup=num_warmup,
        thin=thin,
        generator=generator,
        progress_bar=progress_bar,
    )


def annealed_langevin(
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x0: torch.Tensor,
    sigmas,
    n_steps_each: int = 100,
    step_lr: float = 2e-5,
    *,
    denoise: bool = True,
    kind: str = "score",
    generator: torch.Generator | None = None,
    progress_bar: bool = False,
) -> AnnealedLangevinResult:
    """Annealed Langevin dynamics (Song & Ermon 2019, Algorithm 1) with a noise-conditional
    model, ``C`` chains in parallel.

    For each level ``sigma_i`` of ``sigmas`` (largest first), ``n_steps_each`` unadjusted
    steps ``x <- x + h_i s(x, sigma_i) + sqrt(2 h_i) z`` with ``h_i = step_lr sigma_i^2 /
    sigma_L^2`` (the paper's ``alpha_i = 2 h_i``; the step size of the NCSN reference code);
    then, with ``denoise``, ``x <- x + sigma_L^2 s(x, sigma_L)``, Tweedie's formula for the
    mean of the clean point given ``x`` (Jolicoeur-Martineau et al. 2021). Large levels
    mix between modes that plain Langevin at a small level cannot cross, and so recover
    the modes' relative weights.

    Args:
        fn: ``fn(x, sigma)`` with ``x[C, *event]``, ``sigma[C]``: a score ``-> [C, *event]``
            (``kind="score"``, e.g. ``nets.NoiseConditionalScore``) or a log density
            ``-> [C]`` (``kind="log_prob"``), as trained by ``ms_dsm``.
        x0: initial states ``[C, *event]`` (not modified), e.g. uniform noise.
        sigmas: the noise levels, strictly decreasing (those ``ms_dsm`` trained on).
        n_steps_each: steps per level.
        step_lr: ``h_L``, the step size at the smallest level.
        denoise: finish with the Tweedie step.
        generator: ``torch.Generator`` for the noise (default: the global one).
        progress_bar: a tqdm bar over the levels.

    Returns:
        ``AnnealedLangevinResult(samples [C, *event], levels [L, C, *event])``.

    Raises:
        TypeError / ValueError: bad arguments (named); non-finite states (decrease ``step_lr``).

    References:
        1. Y. Song, S. Ermon. Generative modeling by estimating gradients of the data
           distribution. NeurIPS, 2019.
        2. Y. Song, S. Ermon. Improved techniques for training score-based generative models.
           NeurIPS, 2020.
        3. A. Jolicoeur-Martineau, R. Piche-Taillefer, I. Mitliagkas, R. Tachet des Combes.
           Adversarial score matching and improved sampling for image generation. ICLR, 2021.
    """
    if not callable(fn):
        raise TypeError(f"argument 'fn' must be callable, got {type(fn).__name__}")
    plan = shared.check_annealed(sigmas, n_steps_each, step_lr, denoise)
    shared.check_kind(kind, adjusted=False)
    spec.check_noise_conditional_fn(fn, "annealed_langevin")
    check_array("x0", x0)
    shared.check_chains_shape(tuple(x0.shape), "x0")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"argument 'generator' must be a torch.Generator, got {type(generator).__name__}")
    x = x0.detach().clone()
    levels = x0.new_empty((len(plan.sigmas), *x0.shape))
    with tqdm(total=len(plan.sigmas), disable=not progress_bar, desc="annealed Langevin") as bar:
        for i, (sigma, h) in enumerate(zip(plan.sigmas, plan.step_sizes)):
            level = x.new_full((x.shape[0],), sigma)
            at_level = functools.partial(_at_level, fn, level)
            state = init(at_level, x, kind)
            for _ in range(plan.n_steps_each):
                state, _ = step(state, at_level, h, adjusted=False, kind=kind, generator=generator)
            if not bool(torch.isfinite(state.x).all()):
                raise ValueError(
                    f"annealed Langevin diverged at noise level {sigma:g} (step size {h:g}): decrease 'step_lr'"
                )
            x = levels[i] = state.x
            bar.update()
    if plan.denoise:
        last = plan.sigmas[-1]
        x = x + last**2 * _evaluate(functools.partial(_at_level, fn, x.new_full((x.shape[0],), last)), kind, x)[1]
    return AnnealedLangevinResult(x, levels)


def _at_level(fn, sigma, x):
    """``fn`` at a fixed noise level: ``x -> fn(x, sigma)``."""
    return fn(x, sigma)
