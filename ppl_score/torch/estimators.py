"""Score estimators for samples of an implicit distribution ``q`` (torch).

Kernel estimators (pure functions; ``samples [N, D]`` -> estimated ``grad log q`` at ``at``):

* ``stein_scores``: the Stein gradient estimator (Li & Turner, ICLR 2018),
  ``G = -(K + eta I)^{-1} <grad, K>`` with ``<grad, K>_i = sum_m grad_{x_m} k(x_m, x_i)``;
  for a new point ``x*`` the out-of-sample extension of their section 3.4: the row of
  ``x*`` in the Stein estimator on ``{x*} u samples``, by block (Schur complement) inversion
  with the in-sample ``G`` held fixed,
  ``g(x*) = -(k*^T G - sum_m (1 + a_m) grad_{x*} k(x*, x_m)) / (1 + eta - a^T k*)``,
  ``a = (K + eta I)^{-1} k*``.
* ``spectral_scores``: the spectral Stein gradient estimator (SSGE; Shi, Sun & Zhu, ICML
  2018): Nystrom eigenfunctions ``psi_j(x) = sqrt(N)/lambda_j sum_m k(x, x_m) u_jm`` of the
  kernel operator, ``beta_j = -mean_m grad psi_j(x_m)``, ``g(x) = sum_j beta_j psi_j(x)``,
  i.e. ``g(x) = -k(x)^T U diag(1/lambda^2) U^T <grad, K>`` over the kept eigenpairs: the
  fewest whose eigenvalues hold ``threshold`` of the total, recomputed on every call.

Both use ``k(x, y) = exp(-||x - y||^2 / (2 h^2))``, ``h`` by default the median of the
pairwise distances between distinct samples; the numbers match ``ppl_score.jax.estimators``.

Learned estimator: ``LearnedScoreEstimator``, a score network ``s_psi(z[, c])`` trained online
by ``ssm_vr``, ``fd_ssm`` or ``dsm`` (``score_matching_loss(kind="score")``) on fresh
samples, one optimizer step per ``update``.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from ..common import estimators as common
from ..common.validate import is_validation_enabled
from .distributed import (
    _default_state,
    _set_default_state,
    broadcast_generator_,
    broadcast_tensors_,
    check_process_group,
    gather_rows_detached,
    world,
)
from .objectives import score_matching_loss
from .validate import check_array

__all__ = [
    "stein_scores",
    "spectral_scores",
    "median_bandwidth",
    "ScoreMLP",
    "LearnedScoreEstimator",
    "kernel_scores_batched",
    "site_scores",
    "check_scores_finite",
]


# ---------------------------------------------------------------------------------------
# kernel estimators (batched internals over leading dims; public functions take [N, D])


def _sqdist(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``||x_i - y_j||^2``, ``[..., N, D] x [..., K, D] -> [..., N, K]``, clamped at 0."""
    d2 = (x * x).sum(-1)[..., :, None] + (y * y).sum(-1)[..., None, :] - 2.0 * x @ y.transpose(-1, -2)
    return d2.clamp_min(0.0)


def _median_bandwidth(d2: torch.Tensor) -> torch.Tensor:
    """Median of the distances between distinct samples, from ``d2 [..., N, N]``."""
    n = d2.shape[-1]
    iu = torch.triu_indices(n, n, offset=1, device=d2.device)
    pairs = torch.sort(d2[..., iu[0], iu[1]].sqrt(), dim=-1).values
    lo, hi = common.median_positions(pairs.shape[-1])
    return 0.5 * (pairs[..., lo] + pairs[..., hi])


def _kernel(d2: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``exp(-d2 / (2 h^2))``, dividing by ``h`` twice: ``h^2`` may underflow to 0 for a tiny
    bandwidth, where ``0 / 0`` would give NaN on the diagonal and for duplicate samples."""
    return torch.exp(-0.5 * (d2 / h / h))


def _prepare(samples, at, bandwidth):
    """Centre (the kernel is translation invariant; centring keeps ``||x||^2 + ||y||^2 -
    2 x.y`` accurate), kernel matrix, bandwidth ``[..., 1, 1]`` and ``<grad, K> [..., N, D]``."""
    mu = samples.mean(-2, keepdim=True)
    x = samples - mu
    d2 = _sqdist(x, x)
    n = x.shape[-2]
    d2 = d2 * (1.0 - torch.eye(n, dtype=x.dtype, device=x.device))  # k(x, x) = 1 exactly
    if bandwidth is None:
        h = _median_bandwidth(d2)
        if not bool((h > 0).all()):
            raise ValueError(
                "argument 'samples': the median heuristic gives bandwidth 0 (most samples coincide); "
                "pass 'bandwidth' explicitly"
            )
    else:
        h = torch.as_tensor(bandwidth, dtype=x.dtype, device=x.device).expand(x.shape[:-2])
        if float(h.reshape(-1)[0]) == 0.0:
            raise ValueError(common.bandwidth_underflow_message(bandwidth, str(x.dtype).replace("torch.", "")))
    hh = h[..., None, None]
    kxx = _kernel(d2, hh)
    # <grad, K>_i = sum_m grad_{x_m} k(x_m, x_i) = sum_m (x_i - x_m) k_im / h^2
    grad_k = (x * kxx.sum(-1, keepdim=True) - kxx @ x) / hh / hh
    xa = None if at is None else at - mu
    return x, xa, kxx, hh, grad_k


def _singular(pivots: torch.Tensor, eta: float, n: int) -> bool:
    """Whether a Cholesky factor's squared pivots show ``K + eta I`` numerically singular
    (see ``ppl_score.common.estimators.singular_tolerance``)."""
    return bool((pivots <= common.singular_tolerance(n, torch.finfo(pivots.dtype).eps, eta)).any())


def _stein(samples, at, eta, bandwidth):
    x, xa, kxx, hh, grad_k = _prepare(samples, at, bandwidth)
    n = x.shape[-2]
    chol, info = torch.linalg.cholesky_ex(kxx + eta * torch.eye(n, dtype=x.dtype, device=x.device))
    # one host sync, as torch.linalg.cholesky's own check: a numerically singular K + eta I
    # (duplicate samples with a tiny eta) gives round-off, not an estimate
    if bool((info != 0).any()) or _singular(torch.diagonal(chol, dim1=-2, dim2=-1) ** 2, eta, n):
        raise ValueError(common.singular_message(eta, bandwidth, str(x.dtype).replace("torch.", "")))
    g = -torch.cholesky_solve(grad_k, chol)
    if xa is None:
        return g
    kax = _kernel(_sqdist(xa, x), hh)  # [..., K, N]
    a = torch.cholesky_solve(kax.transpose(-1, -2), chol).transpose(-1, -2)  # k* (K + eta I)^{-1}
    schur = 1.0 + eta - (a * kax).sum(-1, keepdim=True)  # k(x*, x*) = 1; >= eta > 0
    if _singular(schur, eta, n):  # a row of `at` on a sample, with a tiny eta
        raise ValueError(common.singular_message(eta, bandwidth, str(x.dtype).replace("torch.", ""), "at"))
    w = (a + 1.0) * kax
    # sum_m (1 + a_m) grad_{x*} k(x*, x_m) = -sum_m w_m (x* - x_m) / h^2
    wgrad = -(xa * w.sum(-1, keepdim=True) - w @ x) / hh / hh
    return -(kax @ g - wgrad) / schur


def _spectral(samples, at, n_eigen, threshold, bandwidth):
    x, xa, kxx, hh, grad_k = _prepare(samples, at, bandwidth)
    n = x.shape[-2]
    lam, u = torch.linalg.eigh(kxx)
    lam, u = lam.flip(-1), u.flip(-1)  # descending
    if n_eigen is None:
        mass = lam.clamp_min(0.0).cumsum(-1)
        # the fewest leading eigenpairs holding `threshold` of the mass (recomputed per call)
        n_keep = (mass < threshold * mass[..., -1:]).sum(-1, keepdim=True) + 1
    else:
        n_keep = torch.full((*lam.shape[:-1], 1), n_eigen, device=lam.device)
    # numerically null eigenpairs (round-off, possibly negative) are always dropped: their
    # 1/lambda^2 would only amplify round-off
    floor = n * torch.finfo(lam.dtype).eps * lam[..., :1]
    keep = (torch.arange(n, device=lam.device) < n_keep) & (lam > floor)
    safe = torch.where(keep, lam, torch.ones_like(lam))
    inv_lam2 = torch.where(keep, 1.0 / (safe * safe), torch.zeros_like(lam))
    kax = kxx if xa is None else _kernel(_sqdist(xa, x), hh)
    coef = (u.transpose(-1, -2) @ grad_k) * inv_lam2[..., :, None]  # [..., J, D]
    return -(kax @ u) @ coef


def _check_inputs(samples, at):
    samples = check_array("samples", samples)
    n, d = common.check_samples_shape(tuple(samples.shape))
    if at is not None:
        at = check_array("at", at)
        common.check_at_shape(tuple(at.shape), d)
        at = at.to(dtype=samples.dtype, device=samples.device)
    return samples, at, n


def median_bandwidth(samples: torch.Tensor) -> torch.Tensor:
    """The median heuristic: median of ``||x_i - x_j||`` over pairs ``i < j`` of ``samples [N, D]``."""
    samples, _, n = _check_inputs(samples, None)
    x = samples - samples.mean(0)
    return _median_bandwidth(_sqdist(x, x))


def stein_scores(
    samples: torch.Tensor,
    at: torch.Tensor | None = None,
    *,
    eta: float = 0.1,
    bandwidth: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Stein gradient estimate of ``grad log q`` from ``samples [N, D]`` of ``q``.

    ``at=None``: at the samples, ``-(K + eta I)^{-1} <grad, K>`` (Li & Turner 2018, eq. 11).
    ``at [K, D]``: each row by the out-of-sample extension (their section 3.4), which is the
    estimate the in-sample formula would give that point were it added to the samples
    (also for a row that coincides with a sample). Returns ``[N, D]`` or ``[K, D]``.

    Args:
        samples: ``[N, D]``, ``N >= 2``, finite.
        at: ``[K, D]`` or None (the samples).
        eta: the ridge ``eta > 0`` of ``K + eta I``.
        bandwidth: ``h > 0``, or None for the median heuristic.

    Returns:
        The estimated scores, ``[N, D]`` or ``[K, D]``, in the dtype of ``samples``.

    Raises:
        ValueError: bad arguments; a ``bandwidth`` that is 0 in the samples' dtype; or
            ``K + eta I`` numerically singular: a squared Cholesky pivot (or, for ``at``, the
            Schur complement) at most ``(N + 1) * machine-eps * (1 + eta)``. That happens with
            duplicate samples (or a row of ``at`` on a sample) and a tiny ``eta``; the answer
            would be round-off, so ``eta`` and ``bandwidth`` are named instead (the JAX twin
            raises the same error, and returns NaN under tracing).
    """
    samples, at, _ = _check_inputs(samples, at)
    eta = common.check_eta(eta)
    bandwidth = common.check_bandwidth(bandwidth)
    return _stein(samples, at, eta, bandwidth)


def spectral_scores(
    samples: torch.Tensor,
    at: torch.Tensor | None = None,
    *,
    n_eigen: int | None = None,
    threshold: float = 0.99,
    bandwidth: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Spectral Stein gradient estimate (SSGE, Shi et al. 2018) of ``grad log q`` at ``at``
    (default: the samples) from ``samples [N, D]``.

    Keeps the ``n_eigen`` leading eigenpairs of ``K``, or when ``n_eigen`` is None the fewest
    whose eigenvalues sum to at least ``threshold`` of the total (counted anew on every call);
    eigenvalues below ``N * machine-eps * lambda_max`` are numerically zero and never kept.
    """
    samples, at, n = _check_inputs(samples, at)
    n_eigen = common.check_n_eigen(n_eigen, n)
    threshold = common.check_threshold(threshold)
    bandwidth = common.check_bandwidth(bandwidth)
    return _spectral(samples, at, n_eigen, threshold, bandwidth)


def kernel_scores_batched(kind: str, samples: torch.Tensor, **options: Any) -> torch.Tensor:
    """In-sample kernel estimates for independent sample sets ``samples [..., N, D]`` (one
    distribution per leading index); used by the implicit ELBO across particles."""
    if kind == "stein":
        return _stein(
            samples, None, common.check_eta(options.get("eta", 0.1)), common.check_bandwidth(options.get("bandwidth"))
        )
    common.check_kernel_name(kind)
    n = samples.shape[-2]
    return _spectral(
        samples,
        None,
        common.check_n_eigen(options.get("n_eigen"), n),
        common.check_threshold(options.get("threshold", 0.99)),
        common.check_bandwidth(options.get("bandwidth")),
    )


# ---------------------------------------------------------------------------------------
# learned estimator


class ScoreMLP(nn.Module):
    """Score network ``s(z[, c])``: an MLP on ``[z, c]`` (``[N, D]``, ``[N, C]``) -> ``[N, D]``.

    A smooth activation is required: ``ssm_vr`` differentiates the network once more.
    """

    def __init__(
        self,
        dim: int,
        context_dim: int = 0,
        hidden: Sequence[int] = (128, 128),
        activation: Callable[[], nn.Module] = nn.Softplus,
    ):
        super().__init__()
        self.dim = common.check_int("dim", dim)
        self.context_dim = common.check_int("context_dim", context_dim, 0)
        sizes = (self.dim + self.context_dim, *hidden)
        layers = []
        for a, b in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(a, b), activation()]
        layers.append(nn.Linear(sizes[-1], self.dim))
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        h = z if context is None else torch.cat([z, context], dim=-1)
        return self.net(h)


class LearnedScoreEstimator:
    """A score network ``s_psi`` fitted online to samples of a moving ``q`` by score matching.

    ``update(samples, context)`` takes ``n_steps`` optimizer steps (default 10) of::

        min_psi  score_matching_loss(s_psi, samples.detach(), method, kind="score", **options)

    (for ``ssm_vr``: ``E[ v^T grad_z s_psi(z) v + ||s_psi(z)||^2 / 2 ]``, minimized by
    ``s_psi = grad_z log q``) and returns the last loss; ``estimator(z, context)`` evaluates
    ``s_psi``. With ``context_dim > 0`` the network models ``grad_z log q(z | c)`` (amortized
    guides: ``c`` is, e.g., the data point the encoder was given). ``ImplicitELBO`` and
    ``WAE`` call ``update`` on the fresh samples of every loss evaluation, so the network
    tracks a ``q`` that moves with the guide (Song et al. 2019, section 4.2).

    Tuning (the defaults, 10 Adam steps at lr 3e-3 per SVI step and two hidden layers of
    128, track the guide on standard models: a fitted posterior sd within about 10% of the
    reference for Bayesian logistic regressions and a conjugate Gaussian, where one step at
    1e-3 shrinks it to as little as 0.09-0.39 of it, and 5 steps at 3e-3 to 0.63 on the
    narrowest posterior; docs page *Score estimators*, "Tuning a learned estimator"):

    * Signs of collapse: the guide's spread shrinks steadily below the posterior's (compare
      with a short NUTS run or a Gaussian guide's ``Trace_ELBO`` fit), the ELBO keeps
      improving while the spread shrinks, or ``update``'s loss drifts instead of settling.
      The network then lags behind the guide and underestimates the entropy gradient.
    * Remedies, in order: more steps per SVI step (``n_steps``; the cost grows linearly),
      a higher ``lr`` (up to about 1e-2; beyond, the network itself becomes noisy), more
      particles in the loss (``num_particles``: more samples per update), a lower SVI
      learning rate (the guide moves less per step). A smaller network (``hidden=(32,
      32)``) adapts faster in low dimension; wider ones help for many latent dimensions
      or a context.

    Args:
        dim: ``D`` of the samples ``[N, D]``.
        context_dim: ``C`` of the context ``[N, C]`` (0: unconditional).
        hidden, activation: the MLP (``ScoreMLP``), or pass ``net`` (an ``nn.Module``
            ``(z, context) -> [N, D]``) instead.
        method: ``"ssm_vr"`` (default), ``"fd_ssm"`` or ``"dsm"``.
        optimizer: a ``torch.optim`` class (default ``Adam``), built on the net's
            parameters with ``lr``.
        lr: the optimizer's learning rate (default 3e-3).
        n_steps: optimizer steps per ``update`` (default 10).
        generator: ``torch.Generator`` for the objective's random draws (on the estimator's
            device).
        dtype: the network's dtype (default: the net's own, float32 for ``ScoreMLP``).
        **options: the method's options (``n_projections``, ``projection``, ``sigma``, ``eps``).

    Raises:
        TypeError, ValueError: a bad argument, named.

    The state (network, optimizer moments and step counts, generator) is saved and restored
    with ``state_dict`` / ``load_state_dict``; ``to(device)`` moves it, keeping the dtype.

    References:
        Song, Garg, Shi, Ermon. Sliced score matching: a scalable approach to density and
        score estimation. UAI 2019 (section 4.2: implicit VI and WAE with a learned score).
        Li, Turner. Gradient estimators for implicit models. ICLR 2018.
    """

    def __init__(
        self,
        dim: int,
        context_dim: int = 0,
        *,
        hidden: Sequence[int] = (128, 128),
        activation: Callable[[], nn.Module] = nn.Softplus,
        net: nn.Module | None = None,
        method: str = "ssm_vr",
        optimizer: Callable[..., torch.optim.Optimizer] = torch.optim.Adam,
        lr: float = common.LEARNED_LR,
        n_steps: int = common.LEARNED_N_STEPS,
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
        **options: Any,
    ):
        from ..common.objectives import resolve

        self.dim = common.check_int("dim", dim)
        self.context_dim = common.check_int("context_dim", context_dim, 0)
        self.method = common.check_learned_method(method)
        resolve(self.method, "score", options)  # unknown / bad options fail here, not at the first step
        self.options = dict(options)
        self.n_steps = common.check_int("n_steps", n_steps)
        lr = common.check_positive("lr", lr)
        if net is None:
            net = ScoreMLP(self.dim, self.context_dim, hidden, activation)
        elif not isinstance(net, nn.Module):
            raise TypeError(f"argument 'net' must be a torch.nn.Module, got {type(net).__name__}")
        self.net = net if dtype is None else net.to(dtype)
        self.optimizer = optimizer(self.net.parameters(), lr=lr)
        self.generator = generator

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the network's parameters (samples are cast to it)."""
        return next(self.net.parameters()).dtype

    @property
    def device(self) -> torch.device:
        """The device of the network's parameters (samples and contexts are moved to it)."""
        return next(self.net.parameters()).device

    def to(self, device: torch.device | str) -> LearnedScoreEstimator:
        """Move the network and the optimizer's state to ``device``, keeping their dtype
        (a float64 estimator stays float64); returns ``self``.

        Scores come back on the device of the ``z`` they are asked for. A ``generator``
        given at construction must be one of ``device`` (``torch.Generator(device)``).

        Args:
            device: a ``torch.device`` or a string such as ``"cuda"`` or ``"cpu"``.

        Returns:
            This estimator.

        Raises:
            TypeError: ``device`` is not a device or a string.
        """
        if not isinstance(device, (torch.device, str)):
            raise TypeError(f"argument 'device' must be a torch.device or a string, got {type(device).__name__}")
        device = torch.device(device)
        self.net.to(device=device)  # in place: the optimizer keeps the same parameter objects
        # the optimizer's moments follow their parameters (load_state_dict casts them there)
        self.optimizer.load_state_dict(self.optimizer.state_dict())
        return self

    def state_dict(self) -> dict[str, Any]:
        """A snapshot of everything ``update`` changes: ``{"net", "optimizer", "generator"}``
        (the network's and the optimizer's ``state_dict``, with Adam's step counts and
        moments, and the generator's state or None), deep-copied so that later updates do not
        change it. Storable with ``torch.save``.

        Returns:
            The state, a dict of tensors and plain values.
        """
        import copy

        return copy.deepcopy(
            {
                "net": self.net.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "generator": None if self.generator is None else self.generator.get_state(),
            }
        )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a ``state_dict()``: the estimator then gives the same scores and takes the
        same next ``update`` step as the one it was taken from (given the same samples). The
        network and optimizer must be built alike (``dim``, ``context_dim``, ``hidden``,
        ``optimizer``); tensors are copied to this estimator's device and dtype and
        ``state_dict`` itself is not modified.

        Args:
            state_dict: a dict from ``state_dict()`` (e.g. after ``torch.save`` / ``torch.load``).

        Raises:
            TypeError: ``state_dict`` is not a dict.
            ValueError: its keys are not ``{"net", "optimizer", "generator"}``, it does not fit
                this network (a missing or mis-shaped weight), or it carries a generator state
                while this estimator has no ``generator``.
        """
        import copy

        if not isinstance(state_dict, dict):
            raise TypeError(f"argument 'state_dict' must be a dict from state_dict(), got {type(state_dict).__name__}")
        if set(state_dict) != {"net", "optimizer", "generator"}:
            raise ValueError(
                "argument 'state_dict' must have the keys 'net', 'optimizer' and 'generator' "
                f"(from LearnedScoreEstimator.state_dict()), got {sorted(state_dict)}"
            )
        if state_dict["generator"] is not None and self.generator is None:
            raise ValueError(
                "argument 'state_dict' holds a generator state but this estimator has no 'generator'; "
                "build it with generator=torch.Generator()"
            )
        state_dict = copy.deepcopy(state_dict)  # the optimizer may alias the tensors it is given
        try:
            self.net.load_state_dict(state_dict["net"])
        except RuntimeError as err:
            raise ValueError(f"argument 'state_dict' does not fit this estimator's network: {err}") from None
        self.optimizer.load_state_dict(state_dict["optimizer"])
        if state_dict["generator"] is not None:
            self.generator.set_state(state_dict["generator"])

    def _check(self, z, context, name="samples"):
        if not isinstance(z, torch.Tensor):
            raise TypeError(f"argument {name!r} must be a torch.Tensor, got {type(z).__name__}")
        if z.dim() != 2 or z.shape[1] != self.dim:
            raise ValueError(f"argument {name!r} must have shape [N, {self.dim}], got {tuple(z.shape)}")
        if self.context_dim == 0:
            if context is not None:
                raise ValueError("argument 'context' given to an unconditional estimator (context_dim=0)")
            return z.to(device=self.device, dtype=self.dtype), None
        if context is None:
            raise ValueError(f"argument 'context' of shape [N, {self.context_dim}] is required (context_dim > 0)")
        if not isinstance(context, torch.Tensor):
            raise TypeError(f"argument 'context' must be a torch.Tensor, got {type(context).__name__}")
        if tuple(context.shape) != (z.shape[0], self.context_dim):
            raise ValueError(
                f"argument 'context' must have shape [{z.shape[0]}, {self.context_dim}], got {tuple(context.shape)}"
            )
        return z.to(device=self.device, dtype=self.dtype), context.detach().to(device=self.device, dtype=self.dtype)

    def loss(self, samples: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """The score-matching loss of the current network on ``samples`` (differentiable in psi)."""
        return self._loss(samples, context, self.generator)

    def _loss(self, samples, context, generator):
        z, c = self._check(samples, context)
        if not bool(torch.isfinite(z).all()):
            raise ValueError("argument 'samples' contains non-finite values (nan or inf)")
        with torch.enable_grad():
            return score_matching_loss(
                lambda x: self.net(x, c),
                z.detach(),
                self.method,
                kind="score",
                generator=generator,
                **self.options,
            )

    def _step(self, samples, context, generator=None) -> float:
        """One optimizer step, refused when the loss or a gradient is not finite."""
        with torch.enable_grad():
            loss = self._loss(samples, context, generator if generator is not None else self.generator)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        flags = [torch.isfinite(loss.detach())]
        flags += [torch.isfinite(p.grad).all() for p in self.net.parameters() if p.grad is not None]
        value = loss.detach().to(torch.float64)
        # one host sync for the value (returned as a float anyway) and the finiteness flag
        value, ok = torch.stack([value, torch.stack(flags).all().to(torch.float64)]).tolist()
        if not ok:
            self.optimizer.zero_grad(set_to_none=True)  # the step is refused: weights, moments untouched
            if is_validation_enabled():
                raise ValueError(common.refused_step_message(value))
            return value
        self.optimizer.step()
        return value

    def update(
        self,
        samples: torch.Tensor,
        context: torch.Tensor | None = None,
        *,
        process_group: Any = None,
    ) -> float:
        """``n_steps`` optimizer steps on the (detached) ``samples``; returns the last loss.

        A step whose loss or gradient is not finite (samples so large that the network
        overflows, a diverged network) is refused: the network and the optimizer keep the
        state from before it and no further step is taken.

        With ``process_group`` (a ``torch.distributed`` group; a collective: every rank of it
        calls ``update``) the replicas of the estimator on the ranks take the same steps and
        stay identical: the rows of ``samples`` and ``context`` of every rank are gathered (in
        rank order), the network's parameters and buffers are broadcast from the group's rank
        0, and so are the random draws' stream (``generator``'s state, or without one rank 0's
        global generator of the estimator's device, which alone advances). The steps are then
        those of one estimator updated on the concatenated samples: the same numbers as one
        process with the same generator state. The optimizer's state is not broadcast: it
        evolves alike on every rank from the same start (a fresh estimator, or the same
        ``load_state_dict`` on every rank). Each rank does the whole batch's work.

        Args:
            samples: ``[N, D]`` samples of ``q`` (finite); with ``process_group`` this rank's.
            context: ``[N, C]`` when ``context_dim > 0``, else None.
            process_group: None (this process alone) or the group to gather over.

        Returns:
            The loss of the last step taken (a float; NaN/inf for a refused step when
            validation is off).

        Raises:
            ValueError: ``samples`` non-finite or of the wrong shape, or a refused step
                (naming ``samples``); with ``ppl_score.set_validation(False)`` a refused step
                returns its non-finite loss instead, the state still unchanged.
        """
        if process_group is not None:
            check_process_group(process_group)
            if world(process_group)[1] > 1:
                self._check(samples, context)
                samples, _ = gather_rows_detached(samples, process_group)
                if context is not None:
                    context, _ = gather_rows_detached(context, process_group)
            return self._synced_update(samples, context, process_group)
        for _ in range(self.n_steps):
            value = self._step(samples, context)
            if not math.isfinite(value):
                break
        return value

    def _synced_update(self, samples, context, process_group) -> float:
        """``update`` on the rows of every rank (already gathered, the same on every rank),
        from rank 0's network and random stream (see ``update``)."""
        rank, size = world(process_group)
        if process_group is None or size == 1:
            return self.update(samples, context)
        broadcast_tensors_([*self.net.parameters(), *self.net.buffers()], process_group)
        generator = self.generator
        if generator is not None:
            broadcast_generator_(generator, process_group)
        else:  # rank 0's global stream, advanced on rank 0 only (as in one process)
            generator = torch.Generator(self.device)
            generator.set_state(_default_state(self.device))
            broadcast_generator_(generator, process_group)
        try:
            for _ in range(self.n_steps):
                value = self._step(samples, context, generator)
                if not math.isfinite(value):
                    break
        finally:
            if self.generator is None and rank == 0:
                _set_default_state(self.device, generator.get_state())
        return value

    def fit(
        self,
        samples: torch.Tensor,
        context: torch.Tensor | None = None,
        *,
        n_steps: int,
        batch_size: int | None = None,
        generator: torch.Generator | None = None,
    ) -> list[float]:
        """``n_steps`` steps on minibatches of ``batch_size`` rows drawn from ``samples``."""
        n_steps = common.check_int("n_steps", n_steps)
        self._check(samples, context)
        n = samples.shape[0]
        batch_size = n if batch_size is None else common.check_int("batch_size", batch_size, 1, n)
        losses = []
        for _ in range(n_steps):
            idx = torch.randperm(n, generator=generator)[:batch_size]
            losses.append(self._step(samples[idx], None if context is None else context[idx]))
            if not math.isfinite(losses[-1]):
                break
        return losses

    def __call__(self, z: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """``s_psi(z[, context])`` for ``z [N, D]`` (differentiable in psi and ``z``)."""
        z_, c = self._check(z, context, "z")
        return self.net(z_, c).to(device=z.device, dtype=z.dtype)


# ---------------------------------------------------------------------------------------
# the scores of one implicit site's particles (ImplicitELBO, WAE)


def site_scores(
    name: str,
    estimator: LearnedScoreEstimator | str | Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor],
    z: torch.Tensor,
    batch_ndim: int,
    context: torch.Tensor | None = None,
    *,
    options: Mapping[str, Any] | None = None,
    train: bool = False,
    process_group: Any = None,
) -> torch.Tensor:
    """Estimated ``grad_z log q`` at the particles ``z [P, *batch, *event]`` of site ``name``.

    Each batch element is its own distribution: a kernel estimator works across its ``P``
    particles; a learned one sees the ``P * B`` rows ``[P * B, D]`` (with the element's row of
    ``context``) and, with ``train``, first takes its ``update`` on them; a callable gets
    ``(z, context)`` as they are.

    With ``process_group`` (a ``torch.distributed`` group; then a collective: every rank of
    it calls ``site_scores`` for the same sites in the same order) the estimate is that of
    one process holding every rank's samples:

    * ``batch_ndim == 0``: the ranks hold particles of the same distribution (a global
      latent's, ``WAE``'s codes). They are pooled (gathered along dim 0, in rank order): a
      kernel estimator works across all of them, and this rank gets its own rows;
    * ``batch_ndim > 0``: the ranks hold different batch elements (per-datum
      distributions, the data sharded along the first batch dim): a kernel estimator works
      per element as without a group, nothing is gathered;
    * a learned estimator with ``train`` is updated on the pooled rows (every rank's
      particles, or every rank's batch elements, laid out as one process holding them
      would), its replicas kept identical (``LearnedScoreEstimator.update``), then
      evaluated at this rank's rows. Without ``train``, and for a callable, nothing is
      gathered.

    Args:
        name: the site (for messages).
        estimator: a ``LearnedScoreEstimator``, ``"stein"``, ``"spectral"`` or a callable
            ``score(z, context)``.
        z: the particles, without gradient.
        batch_ndim: how many dims after the particle dim are batch dims.
        context: ``[*batch, C]`` (or ``[C]``, shared) for a conditional learned estimator.
        options: a kernel estimator's options.
        train: update a learned estimator first.
        process_group: None (this process alone), or the group whose samples are pooled.

    Returns:
        The scores, ``z``'s shape, without gradient.

    Raises:
        TypeError, ValueError: naming the site: a bad estimator, too few particles for a
            kernel estimator, an event size other than the learned estimator's ``dim``, a
            context of the wrong number of rows, a callable's output of the wrong shape.
    """
    kind = common.estimator_kind(estimator, LearnedScoreEstimator)
    p, batch = z.shape[0], tuple(z.shape[1 : 1 + batch_ndim])
    n_batch = math.prod(batch)
    flat = z.reshape(p, n_batch, -1)
    if kind == "callable":
        out = estimator(z, context)
        common.check_callable_scores(name, out, tuple(z.shape), torch.Tensor)
        return out.detach()
    pooled = process_group is not None and world(check_process_group(process_group))[1] > 1
    if kind != "learned":
        if pooled and batch_ndim == 0:
            all_z, rows = gather_rows_detached(flat, process_group)
            common.check_kernel_particles(name, kind, all_z.shape[0])
            g = kernel_scores_batched(kind, all_z.transpose(0, 1), **(options or {})).transpose(0, 1)
            start = sum(rows[: world(process_group)[0]])
            return g[start : start + p].reshape(z.shape)
        common.check_kernel_particles(name, kind, p)
        g = kernel_scores_batched(kind, flat.transpose(0, 1), **(options or {}))
        return g.transpose(0, 1).reshape(z.shape)
    d = flat.shape[-1]
    common.check_learned_dim(name, estimator.dim, d)
    ctx = None
    if context is not None:
        ctx = context.reshape(-1, context.shape[-1]) if context.dim() > 1 else context[None]
        if ctx.shape[0] == 1 and n_batch > 1:
            ctx = ctx.expand(n_batch, -1)
        common.check_context_rows(name, ctx.shape[0], n_batch, batch)
        ctx = ctx.unsqueeze(0).expand(p, -1, -1)  # [P, B, C]
    samples = flat.reshape(p * n_batch, d)
    flat_ctx = None if ctx is None else ctx.reshape(p * n_batch, -1)
    if train and pooled:
        # the pooled rows in the layout of one process holding them all: particles of a
        # single distribution along dim 0, else the batch (sharded along its first dim)
        if batch_ndim == 0:
            all_z, _ = gather_rows_detached(flat, process_group)  # [P_all, 1, D]
            all_c = None if ctx is None else gather_rows_detached(ctx, process_group)[0]
        else:
            all_z = gather_rows_detached(flat.transpose(0, 1), process_group)[0].transpose(0, 1)
            all_c = None if ctx is None else gather_rows_detached(ctx.transpose(0, 1), process_group)[0].transpose(0, 1)
        all_c = None if all_c is None else all_c.reshape(-1, all_c.shape[-1])
        estimator._synced_update(all_z.reshape(-1, d), all_c, process_group)
    elif train:
        estimator.update(samples, flat_ctx)
    with torch.no_grad():
        return estimator(samples, flat_ctx).reshape(z.shape)


def check_scores_finite(name: str, scores: torch.Tensor) -> None:
    """With validation on (``ppl_score.set_validation``, the default), non-finite estimated scores of site
    ``name`` raise ``ValueError`` naming it (one host sync)."""
    if is_validation_enabled() and not bool(torch.isfinite(scores).all()):
        raise ValueError(common.nonfinite_scores_message(name))
