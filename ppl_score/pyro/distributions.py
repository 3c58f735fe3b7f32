"""``Unnormalized``: a Pyro distribution given by an unnormalized log density (an energy
model), to be fitted by :class:`~ppl_score.pyro.ScoreMatching`."""

from __future__ import annotations

import math
from typing import Callable, NoReturn, Sequence

import torch
from pyro.distributions import TorchDistribution, constraints

from ..common import frontend
from ..common import langevin as shared

__all__ = ["Unnormalized", "NoiseConditional", "noise_level"]


class Unnormalized(TorchDistribution):
    r"""A distribution known up to its normalizing constant,
    :math:`p(x) \propto \exp(f(x))`, with ``log_prob(x) = f(x)``.

    Observe it in a model and fit ``f``'s parameters by score matching, whose objectives
    need only :math:`\nabla_x f` and its derivatives, never the normalizer::

        energy = PyroModule[MLPEnergy](2, hidden=(64, 64))
        def model(x):
            with pyro.plate("data", len(x)):
                pyro.sample("x", Unnormalized(energy, event_shape=(2,)), obs=x)
        svi = SVI(model, lambda x: None, Adam({"lr": 1e-3}), loss=ScoreMatching())

    Two forms of ``log_density_fn``:

    - rows (``batched=False``, the default): ``f(x[n, *event_shape]) -> [n]``. ``log_prob``
      flattens the value's batch dims into ``n`` rows, so ``f`` is one function applied to
      every point, the same for all of them (an energy network, a density with shared
      parameters); its result is broadcast to ``batch_shape``.
    - batched (``batched=True``): ``f(x[*batch, *event_shape]) -> [*batch]``: ``f`` gets the
      value unflattened and returns one log density per point, broadcasting with parameters
      that carry batch dims. A hierarchical energy, ``mu`` in a plate ``groups`` and ``x``
      in a nested plate ``data``::

          mu = pyro.sample("mu", ...)                         # [G, 1, D] inside "groups"
          with groups, data:                                  # dims -2, -1
              pyro.sample("x", Unnormalized(lambda x: -0.5 * ((x - mu) ** 2).sum(-1), (D,),
                                            batched=True), obs=x)   # x [G, N, D] -> [G, N]

      The output must keep every batch dim of ``x`` and broadcast to ``log_prob``'s shape.

    ``batch_shape`` is a real batch shape: plates ``expand`` it like any distribution's, and
    ``log_prob(value [*sample, *batch, *event])`` has shape ``value``'s leading dims broadcast
    with ``batch_shape``.

    ``log_prob`` is *not* normalized, so ``Trace_ELBO`` and likelihood comparisons across
    parameter values are meaningless with it. ``sample`` raises: draw from a fitted model
    with ``ppl_score.pyro.langevin`` (``num_draws`` gives new i.i.d. points) or NUTS on the
    potential ``-f``.

    Args:
        log_density_fn: the log density up to a constant (a ``torch.nn.Module`` or any
            function of tensors), of the form chosen by ``batched``.
        event_shape: the shape of one draw (an int or a tuple).
        support: the support of one coordinate (or of the event when its ``event_dim`` is
            positive, e.g. ``constraints.simplex``); ``ScoreMatching`` matches a constrained
            support in the unconstrained space of ``biject_to(support)``. Default: real.
        batch_shape: the distribution's batch shape (default ``()``; plates expand it).
        batched: the form of ``log_density_fn`` (see above).

    Raises:
        TypeError: ``log_density_fn`` not callable, ``support`` not a constraint, ``batched``
            not a bool.
        ValueError: a discrete support, a bad ``event_shape`` / ``batch_shape``.
    """

    arg_constraints = {}
    has_rsample = False

    def __init__(
        self,
        log_density_fn: Callable[[torch.Tensor], torch.Tensor],
        event_shape: int | Sequence[int],
        support: constraints.Constraint = constraints.real,
        *,
        batch_shape: int | Sequence[int] = (),
        batched: bool = False,
        validate_args: bool | None = None,
    ) -> None:
        event_shape, batch_shape, extra = frontend.check_unnormalized_args(
            log_density_fn, event_shape, support, batched, batch_shape, constraints.Constraint
        )
        event_shape, batch_shape = torch.Size(event_shape), torch.Size(batch_shape)
        self.log_density_fn = log_density_fn
        self.batched = batched
        self._support = constraints.independent(support, extra) if extra else support
        super().__init__(batch_shape, event_shape, validate_args=validate_args)

    @property
    def support(self) -> constraints.Constraint:
        return self._support

    def expand(self, batch_shape: Sequence[int], _instance: Unnormalized | None = None) -> Unnormalized:
        """The same density with batch shape ``batch_shape`` (what plates call).

        Raises:
            ValueError: ``batch_shape`` does not broadcast from this ``batch_shape``.
        """
        batch_shape = torch.Size(shared.check_expand(self.batch_shape, batch_shape))
        new = self._get_checked_instance(Unnormalized, _instance)
        new.log_density_fn = self.log_density_fn
        new.batched = self.batched
        new._support = self._support
        super(Unnormalized, new).__init__(batch_shape, self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """``log_density_fn`` at ``value [*lead, *event_shape]``: shape ``lead`` broadcast with
        ``batch_shape``.

        Raises:
            ValueError: ``value`` does not end with ``event_shape`` or does not broadcast with
                ``batch_shape``, or ``log_density_fn`` returns the wrong shape for its form.
        """
        lead = frontend.unnormalized_lead(value.shape, self.event_shape)
        if self._validate_args:
            self._validate_sample(value)
        expected = shared.unnormalized_log_prob_shape(lead, self.batch_shape, self.event_shape)
        return self._evaluate(value, lead, expected)

    def log_density(self, value: torch.Tensor) -> torch.Tensor:
        """``log_density_fn`` at points ``value [*lead, *event_shape]``, ignoring ``batch_shape``
        (the plates' expansion): shape ``lead`` (row form), or ``lead`` broadcast with the
        parameters' batch dims (batched form). The density of new points, used to draw them.

        Raises:
            ValueError: as ``log_prob``.
        """
        return self._evaluate(value, frontend.unnormalized_lead(value.shape, self.event_shape), None)

    def _evaluate(self, value, lead, expected):
        return _OPS.evaluate(self.log_density_fn, self.batched, self.event_shape, value, lead, expected)

    def sample(self, sample_shape: torch.Size = torch.Size()) -> NoReturn:
        """Raises ``NotImplementedError``: an unnormalized density has no sampler (see the
        class docstring for how to draw from a fitted model)."""
        raise frontend.sampling_error("pyro")

    def rsample(self, sample_shape: torch.Size = torch.Size()) -> NoReturn:
        """Raises ``NotImplementedError``, as :meth:`sample`."""
        raise frontend.sampling_error("pyro")

    def __repr__(self) -> str:
        return frontend.unnormalized_repr(self.log_density_fn, self.event_shape, self.batch_shape, self.batched)


noise_level = frontend.noise_level


class NoiseConditional(Unnormalized):
    r"""A noise-conditional unnormalized density :math:`p_\sigma(x) \propto \exp(f(x, \sigma))`,
    the model of multi-scale denoising score matching (``ScoreMatching("ms_dsm")``, Song &
    Ermon 2019): ``log_prob(x) = f(x, sigma)`` at the noise level in force.

    The level comes from the innermost ``noise_level(sigma)`` block (``ScoreMatching("ms_dsm")``
    sets one level per datum; ``langevin(..., sigmas=...)`` one per chain and level), else
    from ``sigma=`` given here; with neither, ``log_prob`` raises. An array of ``m`` levels
    covers the site's points in ``m`` equal consecutive blocks::

        score_net = PyroModule[NoiseConditionalEnergy](2, hidden=(64, 64))
        def model(x):
            with pyro.plate("data", len(x)):
                pyro.sample("x", NoiseConditional(score_net, event_shape=(2,)), obs=x)
        svi = SVI(model, lambda x: None, Adam({"lr": 1e-3}), loss=ScoreMatching("ms_dsm"))

    Args:
        log_density_fn: ``f(x, sigma)``: rows form ``f(x[n, *event_shape], sigma[n]) -> [n]``;
            batched form ``f(x[*batch, *event_shape], sigma[*batch]) -> [*batch]``.
        event_shape, support, batch_shape, batched: as for :class:`Unnormalized`.
        sigma: the level used outside any ``noise_level`` block (default: none).

    References:
        1. Y. Song, S. Ermon. Generative modeling by estimating gradients of the data
           distribution. NeurIPS, 2019.
    """

    def __init__(
        self,
        log_density_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        event_shape: int | Sequence[int],
        support: constraints.Constraint = constraints.real,
        *,
        sigma: float | None = None,
        batch_shape: int | Sequence[int] = (),
        batched: bool = False,
        validate_args: bool | None = None,
    ) -> None:
        super().__init__(
            log_density_fn, event_shape, support, batch_shape=batch_shape, batched=batched, validate_args=validate_args
        )
        self.sigma = frontend.check_default_sigma(sigma)

    def expand(self, batch_shape: Sequence[int], _instance: NoiseConditional | None = None) -> NoiseConditional:
        new = self._get_checked_instance(NoiseConditional, _instance)
        super().expand(batch_shape, _instance=new)
        new.sigma = self.sigma
        return new

    def _levels(self, value: torch.Tensor, lead: tuple) -> torch.Tensor:
        """One level per point ``[*lead]``, from the level in force (or ``sigma``)."""
        sigma = frontend.noise_level_for_site(self.sigma)
        sigma = torch.as_tensor(sigma, dtype=value.dtype, device=value.device).reshape(-1)
        n = math.prod(lead)
        if sigma.numel() == 1:
            return sigma.expand(n).reshape(lead)
        return sigma.repeat_interleave(frontend.noise_level_repeats(sigma.numel(), n)).reshape(lead)

    def _evaluate(self, value, lead, expected):
        levels = self._levels(value, tuple(lead))
        if self.batched:
            fn = lambda x: self.log_density_fn(x, levels)  # noqa: E731
        else:
            fn = lambda x: self.log_density_fn(x, levels.reshape(-1))  # noqa: E731
        return _OPS.evaluate(fn, self.batched, self.event_shape, value, lead, expected)

    def __repr__(self) -> str:
        base = super().__repr__()
        return "NoiseConditional" + base[len("Unnormalized") :]


class _TorchOps(shared.UnnormalizedOps):
    """``ppl_score.common.langevin.UnnormalizedOps`` for torch tensors."""

    xp = torch
    call_errors = (RuntimeError,)

    def check_output(self, out) -> None:
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"argument 'log_density_fn' must return a torch.Tensor, got {type(out).__name__}")


_OPS = _TorchOps()
