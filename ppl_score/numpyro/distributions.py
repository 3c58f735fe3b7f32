"""``Unnormalized``: a NumPyro distribution given by an unnormalized log density (an energy
model), to be fitted by :class:`~ppl_score.numpyro.ScoreMatching`."""

from __future__ import annotations

import math
from typing import Callable, NoReturn, Sequence

import jax
import jax.numpy as jnp
from numpyro.distributions import Distribution, constraints

from ..common import frontend
from ..common import langevin as shared

__all__ = ["Unnormalized", "NoiseConditional", "noise_level"]


class Unnormalized(Distribution):
    r"""A distribution known up to its normalizing constant,
    :math:`p(x) \propto \exp(f(x))`, with ``log_prob(x) = f(x)``.

    Observe it in a model and fit ``f``'s parameters by score matching, whose objectives
    need only :math:`\nabla_x f` and its derivatives, never the normalizer::

        def model(x):
            params = numpyro.param("energy", energy_init(key, 2, hidden=(64, 64)))
            with numpyro.plate("data", len(x)):
                numpyro.sample("x", Unnormalized(partial(energy_apply, params), (2,)), obs=x)
        svi = SVI(model, lambda x: None, optax.adam(1e-3), loss=ScoreMatching())

    Two forms of ``log_density_fn``:

    - rows (``batched=False``, the default): ``f(x[n, *event_shape]) -> [n]``. ``log_prob``
      flattens the value's batch dims into ``n`` rows, so ``f`` is one function applied to
      every point, the same for all of them (an energy network, a density with shared
      parameters); its result is broadcast to ``batch_shape``.
    - batched (``batched=True``): ``f(x[*batch, *event_shape]) -> [*batch]``: ``f`` gets the
      value unflattened and returns one log density per point, broadcasting with parameters
      that carry batch dims. A hierarchical energy, ``mu`` in a plate ``groups`` and ``x``
      in a nested plate ``data``::

          mu = numpyro.sample("mu", ...)                      # [G, 1, D] inside "groups"
          with groups, data:                                  # dims -2, -1
              numpyro.sample("x", Unnormalized(lambda x: -0.5 * ((x - mu) ** 2).sum(-1), (D,),
                                               batched=True), obs=x)   # x [G, N, D] -> [G, N]

      The output must keep every batch dim of ``x`` and broadcast to ``log_prob``'s shape.

    ``batch_shape`` is a real batch shape: plates ``expand`` it like any distribution's, and
    ``log_prob(value [*sample, *batch, *event])`` has shape ``value``'s leading dims broadcast
    with ``batch_shape``. The distribution is a pytree whose ``log_density_fn`` is static
    (jit-friendly: close over parameters, or use a ``jax.tree_util.Partial``).

    ``log_prob`` is *not* normalized, so ``Trace_ELBO`` and likelihood comparisons across
    parameter values are meaningless with it. ``sample`` raises: draw from a fitted model
    with ``ppl_score.numpyro.langevin`` (``num_draws`` gives new i.i.d. points) or NUTS on
    the potential ``-f``.

    Args:
        log_density_fn: the log density up to a constant (a pure JAX function; close over
            parameters), of the form chosen by ``batched``.
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
    pytree_aux_fields = ("log_density_fn", "_support", "batched")

    def __init__(
        self,
        log_density_fn: Callable[[jax.Array], jax.Array],
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
        self.log_density_fn = log_density_fn
        self.batched = batched
        self._support = constraints.independent(support, extra) if extra else support
        super().__init__(batch_shape=batch_shape, event_shape=event_shape, validate_args=validate_args)

    @property
    def support(self) -> constraints.Constraint:
        return self._support

    def expand(self, batch_shape: Sequence[int]) -> Unnormalized:
        """The same density with batch shape ``batch_shape`` (what plates call).

        Raises:
            ValueError: ``batch_shape`` does not broadcast from this ``batch_shape``.
        """
        batch_shape = shared.check_expand(self.batch_shape, batch_shape)
        if batch_shape == tuple(self.batch_shape):
            return self
        return Unnormalized(
            self.log_density_fn,
            self.event_shape,
            batch_shape=batch_shape,
            batched=self.batched,
            validate_args=self._validate_args,
        )._with_support(self._support)

    def _with_support(self, support):
        self._support = support
        return self

    def log_prob(self, value: jax.Array) -> jax.Array:
        """``log_density_fn`` at ``value [*lead, *event_shape]``: shape ``lead`` broadcast with
        ``batch_shape``.

        Raises:
            ValueError: ``value`` does not end with ``event_shape`` or does not broadcast with
                ``batch_shape``, or ``log_density_fn`` returns the wrong shape for its form.
        """
        lead = frontend.unnormalized_lead(jnp.shape(value), self.event_shape)
        if self._validate_args:
            self._validate_sample(value)
        expected = shared.unnormalized_log_prob_shape(lead, self.batch_shape, self.event_shape)
        return self._evaluate(value, lead, expected)

    def log_density(self, value: jax.Array) -> jax.Array:
        """``log_density_fn`` at points ``value [*lead, *event_shape]``, ignoring ``batch_shape``
        (the plates' expansion): shape ``lead`` (row form), or ``lead`` broadcast with the
        parameters' batch dims (batched form). The density of new points, used to draw them.

        Raises:
            ValueError: as ``log_prob``.
        """
        return self._evaluate(value, frontend.unnormalized_lead(jnp.shape(value), self.event_shape), None)

    def _evaluate(self, value, lead, expected):
        return _OPS.evaluate(self.log_density_fn, self.batched, self.event_shape, value, lead, expected)

    def sample(self, key: jax.Array, sample_shape: tuple[int, ...] = ()) -> NoReturn:
        """Raises ``NotImplementedError``: an unnormalized density has no sampler (see the
        class docstring for how to draw from a fitted model)."""
        raise frontend.sampling_error("numpyro")

    def rsample(self, key: jax.Array, sample_shape: tuple[int, ...] = ()) -> NoReturn:
        """Raises ``NotImplementedError``, as :meth:`sample`."""
        raise frontend.sampling_error("numpyro")

    def __repr__(self) -> str:
        return frontend.unnormalized_repr(self.log_density_fn, self.event_shape, self.batch_shape, self.batched)


noise_level = frontend.noise_level


class NoiseConditional(Unnormalized):
    r"""A noise-conditional unnormalized density :math:`p_\sigma(x) \propto \exp(f(x, \sigma))`,
    the model of multi-scale denoising score matching (``ScoreMatching("ms_dsm")``, Song &
    Ermon 2019): ``log_prob(x) = f(x, sigma)`` at the noise level in force; mirrors
    ``ppl_score.pyro.NoiseConditional``.

    The level comes from the innermost ``noise_level(sigma)`` block (``ScoreMatching("ms_dsm")``
    sets one level per datum; ``langevin(..., sigmas=...)`` one per chain and level), else
    from ``sigma=`` given here; with neither, ``log_prob`` raises. An array of ``m`` levels
    covers the site's points in ``m`` equal consecutive blocks::

        def model(x):
            params = numpyro.param("energy", noise_conditional_energy_init(key, 2, (64, 64)))
            with numpyro.plate("data", len(x)):
                numpyro.sample("x", NoiseConditional(partial(noise_conditional_energy_apply, params), (2,)), obs=x)
        svi = SVI(model, lambda x: None, optax.adam(1e-3), loss=ScoreMatching("ms_dsm"))

    Args:
        log_density_fn: ``f(x, sigma)``: rows form ``f(x[n, *event_shape], sigma[n]) -> [n]``;
            batched form ``f(x[*batch, *event_shape], sigma[*batch]) -> [*batch]``.
        event_shape, support, batch_shape, batched: as for :class:`Unnormalized`.
        sigma: the level used outside any ``noise_level`` block (default: none).

    References:
        1. Y. Song, S. Ermon. Generative modeling by estimating gradients of the data
           distribution. NeurIPS, 2019.
    """

    pytree_aux_fields = ("log_density_fn", "_support", "batched", "sigma")

    def __init__(
        self,
        log_density_fn: Callable[[jax.Array, jax.Array], jax.Array],
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

    def expand(self, batch_shape: Sequence[int]) -> NoiseConditional:
        batch_shape = shared.check_expand(self.batch_shape, batch_shape)
        if batch_shape == tuple(self.batch_shape):
            return self
        return NoiseConditional(
            self.log_density_fn,
            self.event_shape,
            sigma=self.sigma,
            batch_shape=batch_shape,
            batched=self.batched,
            validate_args=self._validate_args,
        )._with_support(self._support)

    def _levels(self, value: jax.Array, lead: tuple) -> jax.Array:
        """One level per point ``[*lead]``, from the level in force (or ``sigma``)."""
        sigma = jnp.asarray(frontend.noise_level_for_site(self.sigma), jnp.result_type(value)).reshape(-1)
        n = math.prod(lead)
        if sigma.size == 1:
            return jnp.broadcast_to(sigma, (n,)).reshape(lead)
        return jnp.repeat(sigma, frontend.noise_level_repeats(sigma.size, n)).reshape(lead)

    def _evaluate(self, value, lead, expected):
        levels = self._levels(value, tuple(lead))
        if self.batched:
            fn = lambda x: self.log_density_fn(x, levels)  # noqa: E731
        else:
            fn = lambda x: self.log_density_fn(x, levels.reshape(-1))  # noqa: E731
        return _OPS.evaluate(fn, self.batched, self.event_shape, value, lead, expected)

    def __repr__(self) -> str:
        return "NoiseConditional" + super().__repr__()[len("Unnormalized") :]


class _JaxOps(shared.UnnormalizedOps):
    """``ppl_score.common.langevin.UnnormalizedOps`` for JAX arrays."""

    xp = jnp
    call_errors = (TypeError, ValueError)


_OPS = _JaxOps()
