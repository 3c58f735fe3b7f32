"""``Unnormalized``: a NumPyro distribution given by an unnormalized log density (an energy
model), to be fitted by :class:`~ppl_score.numpyro.ScoreMatching`."""

from __future__ import annotations

import math

import jax.numpy as jnp
from numpyro.distributions import Distribution, constraints

from .. import frontend

__all__ = ["Unnormalized"]


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

    ``log_prob`` is *not* normalized, so ``Trace_ELBO`` and likelihood comparisons across
    parameter values are meaningless with it. ``sample`` raises: draw from a fitted model
    with ``ppl_score.numpyro.langevin`` or NUTS on the potential ``-f``.

    :param callable log_density_fn: ``x[n, *event_shape] -> [n]``, the log density up to a
        constant (a pure JAX function; close over parameters).
    :param event_shape: the shape of one draw (an int or a tuple).
    :param support: the support of one coordinate (or of the event when its ``event_dim`` is
        positive, e.g. ``constraints.simplex``); ``ScoreMatching`` matches a constrained
        support in the unconstrained space of ``biject_to(support)``. Default: real.
    """

    arg_constraints = {}
    has_rsample = False
    pytree_aux_fields = ("log_density_fn", "_support")

    def __init__(self, log_density_fn, event_shape, support=constraints.real, *, validate_args=None):
        if not callable(log_density_fn):
            raise TypeError(f"argument 'log_density_fn' must be callable, got {type(log_density_fn).__name__}")
        if not isinstance(support, constraints.Constraint):
            raise TypeError(f"argument 'support' must be a constraint, got {type(support).__name__}")
        if support.is_discrete:
            raise ValueError(f"argument 'support' must be a continuous constraint, got {support}")
        event_shape = frontend.check_event_shape(event_shape)
        extra = len(event_shape) - support.event_dim
        if extra < 0:
            raise ValueError(
                f"argument 'support' has event_dim {support.event_dim} > len(event_shape) = {len(event_shape)}"
            )
        self.log_density_fn = log_density_fn
        self._support = constraints.independent(support, extra) if extra else support
        super().__init__(batch_shape=(), event_shape=event_shape, validate_args=validate_args)

    @property
    def support(self):
        return self._support

    def log_prob(self, value):
        """``log_density_fn`` of the rows of ``value [*batch, *event_shape]``, shape ``[*batch]``.

        Raises:
            ValueError: ``value`` does not end with ``event_shape``, or ``log_density_fn`` does
                not return one value per row.
        """
        k = len(self.event_shape)
        if jnp.ndim(value) < k or tuple(jnp.shape(value)[jnp.ndim(value) - k :]) != tuple(self.event_shape):
            raise frontend.unnormalized_shape_error(jnp.shape(value), self.event_shape)
        if self._validate_args:
            self._validate_sample(value)
        lead = jnp.shape(value)[: jnp.ndim(value) - k]
        n = math.prod(lead)
        out = self.log_density_fn(jnp.reshape(value, (n, *self.event_shape)))
        if tuple(getattr(out, "shape", ())) != (n,):
            raise frontend.log_density_output_error(getattr(out, "shape", ()), (n,))
        return out.reshape(lead)

    def sample(self, key, sample_shape=()):
        raise frontend.sampling_error("numpyro")

    def rsample(self, key, sample_shape=()):
        raise frontend.sampling_error("numpyro")

    def __repr__(self) -> str:
        return f"Unnormalized(log_density_fn={self.log_density_fn!r}, event_shape={tuple(self.event_shape)})"
