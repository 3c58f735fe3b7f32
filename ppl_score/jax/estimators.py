"""Score estimators for samples of an implicit distribution ``q`` (JAX).

Mirrors ``ppl_score.torch.estimators`` (same formulas, same numbers); see its docstring
for the math. Kernel estimators: ``stein_scores`` (Li & Turner 2018, with the out-of-sample
extension of their section 3.4) and ``spectral_scores`` (SSGE, Shi et al. 2018), pure and
``jax.jit``-compatible (the options are static; checks that need concrete values run only
when the inputs are concrete).

Learned estimator, Optax style: ``learned_score_estimator(dim, ...)`` returns a
``LearnedScoreEstimator`` of pure functions over a ``LearnedScoreState(params, opt_state)``:

    est = learned_score_estimator(2, method="ssm_vr")
    state = est.init(key)
    state, loss = est.update(state, key, samples)      # one optimizer step (jit-able)
    scores = est.apply(state.params, z)

Inside a jitted NumPyro SVI update the state lives in NumPyro's mutable state: the guide
declares it with ``ppl_score.numpyro.implicit.score_state(name, est)`` (a
``numpyro.mutable`` site) and ``ImplicitELBO`` / ``WAE`` read it from the parameter map,
update it once per step and return it as the new mutable state.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ..common import estimators as common
from ..common.validate import is_validation_enabled
from .nets import mlp_apply, mlp_init
from .objectives import score_matching_loss
from .validate import check_array, check_key, is_concrete

__all__ = [
    "stein_scores",
    "spectral_scores",
    "median_bandwidth",
    "LearnedScoreState",
    "LearnedScoreEstimator",
    "learned_score_estimator",
    "fit_score_estimator",
    "kernel_scores_batched",
    "site_scores",
    "check_scores_finite",
]

# a pytree of arrays (the score network's parameters)
Params = Any


# ---------------------------------------------------------------------------------------
# kernel estimators (batched internals over leading dims; public functions take [N, D])


def _t(a):
    return jnp.swapaxes(a, -1, -2)


def _sqdist(x, y):
    d2 = (x * x).sum(-1)[..., :, None] + (y * y).sum(-1)[..., None, :] - 2.0 * x @ _t(y)
    return jnp.maximum(d2, 0.0)


def _median_bandwidth(d2):
    n = d2.shape[-1]
    iu = np.triu_indices(n, k=1)
    pairs = jnp.sort(jnp.sqrt(d2[..., iu[0], iu[1]]), axis=-1)
    lo, hi = common.median_positions(pairs.shape[-1])
    return 0.5 * (pairs[..., lo] + pairs[..., hi])


def _kernel(d2, h):
    """``exp(-d2 / (2 h^2))``, dividing by ``h`` twice (``h^2`` may underflow; see the torch mirror)."""
    return jnp.exp(-0.5 * (d2 / h / h))


def _prepare(samples, at, bandwidth):
    """Centre (see the torch mirror), kernel matrix, bandwidth and ``<grad, K>``. With the
    median heuristic a degenerate set (h = 0) computes with h = 1 and is reported through the
    returned ``h`` (checked by the caller when concrete; nothing can raise under tracing)."""
    mu = samples.mean(-2, keepdims=True)
    x = samples - mu
    n = x.shape[-2]
    d2 = _sqdist(x, x) * (1.0 - jnp.eye(n, dtype=x.dtype))  # k(x, x) = 1 exactly
    if bandwidth is None:
        h_raw = _median_bandwidth(d2)
        h = jnp.where(h_raw > 0, h_raw, jnp.ones_like(h_raw))
    else:
        h_raw = h = jnp.broadcast_to(jnp.asarray(bandwidth, dtype=x.dtype), x.shape[:-2])
    hh = h[..., None, None]
    kxx = _kernel(d2, hh)
    grad_k = (x * kxx.sum(-1, keepdims=True) - kxx @ x) / hh / hh
    xa = None if at is None else at - mu
    return x, xa, kxx, hh, grad_k, h_raw


def _check_median(h_raw):
    if is_concrete(h_raw) and not bool((h_raw > 0).all()):
        raise ValueError(
            "argument 'samples': the median heuristic gives bandwidth 0 (most samples coincide); "
            "pass 'bandwidth' explicitly"
        )


def _cho_solve(chol, b):
    return jax.scipy.linalg.cho_solve((chol, True), b)


def _stein(samples, at, eta, bandwidth):
    """``(scores, h_raw, flag)``; ``flag``: 0 fine, 1 ``K + eta I`` numerically singular, 2 the
    out-of-sample Schur complement numerically zero. A flagged result is NaN (under tracing
    nothing can raise; eagerly ``_run`` raises the torch twin's ``ValueError``)."""
    x, xa, kxx, hh, grad_k, h_raw = _prepare(samples, at, bandwidth)
    n = x.shape[-2]
    chol = jnp.linalg.cholesky(kxx + eta * jnp.eye(n, dtype=x.dtype))
    if chol.ndim > 2:
        solve = jnp.vectorize(_cho_solve, signature="(n,n),(n,k)->(n,k)")
    else:
        solve = _cho_solve
    tol = common.singular_tolerance(n, float(jnp.finfo(x.dtype).eps), eta)
    pivots = jnp.diagonal(chol, axis1=-2, axis2=-1) ** 2
    singular = ~jnp.all(pivots > tol)  # also true for a failed factorization (NaN)
    g = -solve(chol, grad_k)
    if xa is None:
        flag = singular.astype(jnp.int32)
        return jnp.where(flag > 0, jnp.nan, g), h_raw, flag
    kax = _kernel(_sqdist(xa, x), hh)
    a = _t(solve(chol, _t(kax)))
    schur = 1.0 + eta - (a * kax).sum(-1, keepdims=True)
    flag = jnp.where(singular, 1, jnp.where(jnp.all(schur > tol), 0, 2)).astype(jnp.int32)
    w = (a + 1.0) * kax
    wgrad = -(xa * w.sum(-1, keepdims=True) - w @ x) / hh / hh
    return jnp.where(flag > 0, jnp.nan, -(kax @ g - wgrad) / schur), h_raw, flag


def _spectral(samples, at, n_eigen, threshold, bandwidth):
    x, xa, kxx, hh, grad_k, h_raw = _prepare(samples, at, bandwidth)
    n = x.shape[-2]
    lam, u = jnp.linalg.eigh(kxx)
    lam, u = lam[..., ::-1], u[..., ::-1]
    if n_eigen is None:
        mass = jnp.cumsum(jnp.maximum(lam, 0.0), axis=-1)
        n_keep = (mass < threshold * mass[..., -1:]).sum(-1, keepdims=True) + 1
    else:
        n_keep = jnp.full((*lam.shape[:-1], 1), n_eigen)
    # numerically null eigenpairs (round-off, possibly negative) are always dropped
    floor = n * jnp.finfo(lam.dtype).eps * lam[..., :1]
    keep = (jnp.arange(n) < n_keep) & (lam > floor)
    safe = jnp.where(keep, lam, 1.0)
    inv_lam2 = jnp.where(keep, 1.0 / (safe * safe), 0.0)
    kax = kxx if xa is None else _kernel(_sqdist(xa, x), hh)
    coef = (_t(u) @ grad_k) * inv_lam2[..., :, None]
    return -(kax @ u) @ coef, h_raw, jnp.int32(0)


# One compiled program per shape and option set: far cheaper than dispatching each op.
_stein_jit = jax.jit(_stein, static_argnames=("eta",))
_spectral_jit = jax.jit(_spectral, static_argnames=("n_eigen", "threshold"))


def _run(fn, samples, at, *options):
    bandwidth = options[-1]
    if bandwidth is not None and is_concrete(bandwidth) and float(jnp.asarray(bandwidth, samples.dtype)) == 0.0:
        raise ValueError(common.bandwidth_underflow_message(bandwidth, str(samples.dtype)))
    out, h_raw, flag = fn(samples, at, *options)
    _check_median(h_raw)
    if is_concrete(flag) and int(flag):
        eta = options[0]
        raise ValueError(
            common.singular_message(eta, bandwidth, str(samples.dtype), "samples" if int(flag) == 1 else "at")
        )
    return out


def _check_inputs(samples, at):
    samples = check_array("samples", samples)
    n, d = common.check_samples_shape(tuple(samples.shape))
    if at is not None:
        at = check_array("at", at)
        common.check_at_shape(tuple(at.shape), d)
        at = at.astype(samples.dtype)
    return samples, at, n


def _check_bandwidth(bandwidth):
    if bandwidth is not None and not is_concrete(bandwidth):
        return bandwidth  # traced: cannot be checked
    return common.check_bandwidth(bandwidth)


def median_bandwidth(samples: jax.Array | np.ndarray) -> jax.Array:
    """The median heuristic: median of ``||x_i - x_j||`` over pairs ``i < j`` of ``samples [N, D]``."""
    samples, _, _ = _check_inputs(samples, None)
    x = samples - samples.mean(0)
    return _median_bandwidth(_sqdist(x, x))


def stein_scores(
    samples: jax.Array | np.ndarray,
    at: jax.Array | np.ndarray | None = None,
    *,
    eta: float = 0.1,
    bandwidth: float | jax.Array | None = None,
) -> jax.Array:
    """Stein gradient estimate of ``grad log q`` from ``samples [N, D]`` at the samples
    (``at=None``) or, by the out-of-sample extension, at ``at [K, D]``; see
    ``ppl_score.torch.estimators.stein_scores``.

    Raises:
        ValueError: as the torch twin, also when ``K + eta I`` is numerically singular
            (duplicate samples with a tiny ``eta``), naming ``eta`` and ``bandwidth``; under
            tracing that result is NaN instead.
    """
    samples, at, _ = _check_inputs(samples, at)
    return _run(_stein_jit, samples, at, common.check_eta(eta), _check_bandwidth(bandwidth))


def spectral_scores(
    samples: jax.Array | np.ndarray,
    at: jax.Array | np.ndarray | None = None,
    *,
    n_eigen: int | None = None,
    threshold: float = 0.99,
    bandwidth: float | jax.Array | None = None,
) -> jax.Array:
    """Spectral Stein gradient estimate (SSGE) of ``grad log q`` at ``at`` (default: the
    samples) from ``samples [N, D]``; see ``ppl_score.torch.estimators.spectral_scores``."""
    samples, at, n = _check_inputs(samples, at)
    return _run(
        _spectral_jit,
        samples,
        at,
        common.check_n_eigen(n_eigen, n),
        common.check_threshold(threshold),
        _check_bandwidth(bandwidth),
    )


def kernel_scores_batched(kind: str, samples: jax.Array, **options: Any) -> jax.Array:
    """In-sample kernel estimates for independent sample sets ``samples [..., N, D]``."""
    if kind == "stein":
        return _run(
            _stein_jit,
            samples,
            None,
            common.check_eta(options.get("eta", 0.1)),
            _check_bandwidth(options.get("bandwidth")),
        )
    common.check_kernel_name(kind)
    n = samples.shape[-2]
    return _run(
        _spectral_jit,
        samples,
        None,
        common.check_n_eigen(options.get("n_eigen"), n),
        common.check_threshold(options.get("threshold", 0.99)),
        _check_bandwidth(options.get("bandwidth")),
    )


# ---------------------------------------------------------------------------------------
# learned estimator


class LearnedScoreState(NamedTuple):
    """Parameters of the score network and the optimizer state (a pytree)."""

    params: Any
    opt_state: Any


def _activation_name(activation):
    """``jax.nn`` activations are jitted wrappers that pickle cannot find by name: record the name."""
    for name in dir(jax.nn):
        if not name.startswith("_") and getattr(jax.nn, name) is activation:
            return name
    return None


class LearnedScoreEstimator:
    """A learned score estimator as pure functions (see ``learned_score_estimator``).

    ``init(key, dtype=float32) -> state``; ``update(state, key, samples, context=None) ->
    (state, loss)``; ``apply(params, z, context=None) -> scores``; ``dim``, ``context_dim``
    and ``method`` as given. The object holds only its configuration (the state lives in the
    ``LearnedScoreState`` pytree), so it pickles and deep-copies; an ``optimizer`` given as an
    optax ``GradientTransformation`` is made of closures that ``pickle`` cannot store: pass a
    picklable factory instead (``functools.partial(optax.adam, 1e-3)``) when the estimator
    must be pickled. ``state_dict(state)`` / ``load_state_dict(d)`` turn a state into a flat
    dict of numpy arrays and back (for ``np.savez`` and the like).

    Defaults and tuning as the torch mirror (``ppl_score.torch.estimators.LearnedScoreEstimator``,
    whose docstring gives the objective, the signs of a collapsing guide and the remedies):
    ``n_steps=10`` Adam steps at 3e-3 per ``update``, two hidden layers of 128.

    Args:
        dim: ``D`` of the samples.
        context_dim: ``C`` of the context (0: unconditional).
        hidden, activation: the MLP.
        method: ``"ssm_vr"`` (default), ``"fd_ssm"`` or ``"dsm"``.
        optimizer: an optax ``GradientTransformation`` or a factory returning one (default
            ``optax.adam(3e-3)``).
        n_steps: optimizer steps per ``update`` (default 10).
        **options: the method's options.

    Raises:
        TypeError, ValueError: a bad argument, named.

    References:
        Song, Garg, Shi, Ermon. Sliced score matching: a scalable approach to density and
        score estimation. UAI 2019.
    """

    def __init__(
        self,
        dim: int,
        context_dim: int = 0,
        *,
        hidden: Sequence[int] = (128, 128),
        activation: Callable[[jax.Array], jax.Array] = jax.nn.softplus,
        method: str = "ssm_vr",
        optimizer: optax.GradientTransformation | Callable[[], optax.GradientTransformation] | None = None,
        n_steps: int = common.LEARNED_N_STEPS,
        **options: Any,
    ):
        from ..common.objectives import resolve

        self.dim = common.check_int("dim", dim)
        self.context_dim = common.check_int("context_dim", context_dim, 0)
        self.method = common.check_learned_method(method)
        resolve(self.method, "score", options)
        self.options = dict(options)
        self.n_steps = common.check_int("n_steps", n_steps)
        self.hidden = tuple(hidden)
        if not callable(activation):
            raise TypeError(f"argument 'activation' must be callable, got {type(activation).__name__}")
        self.activation = activation
        self._optimizer_arg = optimizer
        self.optimizer = self._build_optimizer(optimizer)

    @staticmethod
    def _build_optimizer(optimizer):
        if optimizer is None:
            return optax.adam(common.LEARNED_LR)
        if isinstance(optimizer, optax.GradientTransformation):
            return optimizer
        if callable(optimizer):
            built = optimizer()
            if isinstance(built, optax.GradientTransformation):
                return built
        raise TypeError(
            "argument 'optimizer' must be an optax.GradientTransformation or a factory returning one "
            f"(e.g. functools.partial(optax.adam, 1e-3)), got {type(optimizer).__name__}"
        )

    # -- pickling: the configuration, with the optimizer rebuilt from its argument -------------
    def __getstate__(self):
        state = {k: v for k, v in self.__dict__.items() if k not in ("optimizer", "_update_jit")}
        name = _activation_name(self.activation)
        if name is not None:
            state["activation"] = ("jax.nn", name)
        if isinstance(self._optimizer_arg, optax.GradientTransformation):
            import pickle

            try:
                pickle.dumps(self._optimizer_arg)
            except Exception as err:
                raise TypeError(
                    "LearnedScoreEstimator: argument 'optimizer' is an optax GradientTransformation, made of "
                    "closures that pickle cannot store; pass a picklable factory instead, e.g. "
                    "optimizer=functools.partial(optax.adam, 1e-3)"
                ) from err
        return state

    def __setstate__(self, state):
        act = state.get("activation")
        if isinstance(act, tuple) and len(act) == 2 and act[0] == "jax.nn":
            state = {**state, "activation": getattr(jax.nn, act[1])}
        self.__dict__.update(state)
        self.optimizer = self._build_optimizer(self._optimizer_arg)

    def __repr__(self):
        return (
            f"LearnedScoreEstimator(dim={self.dim}, context_dim={self.context_dim}, method={self.method!r}, "
            f"hidden={self.hidden}, n_steps={self.n_steps})"
        )

    # -- pure functions --------------------------------------------------------------------------
    @property
    def _sizes(self):
        return (self.dim + self.context_dim, *self.hidden, self.dim)

    def _check(self, z, context, name):
        dim, context_dim = self.dim, self.context_dim
        if z.ndim != 2 or z.shape[1] != dim:
            raise ValueError(f"argument {name!r} must have shape [N, {dim}], got {tuple(z.shape)}")
        if context_dim == 0:
            if context is not None:
                raise ValueError("argument 'context' given to an unconditional estimator (context_dim=0)")
            return None
        if context is None:
            raise ValueError(f"argument 'context' of shape [N, {context_dim}] is required (context_dim > 0)")
        if tuple(context.shape) != (z.shape[0], context_dim):
            raise ValueError(
                f"argument 'context' must have shape [{z.shape[0]}, {context_dim}], got {tuple(context.shape)}"
            )
        return jax.lax.stop_gradient(context)

    def _net(self, params, z, context):
        h = z if context is None else jnp.concatenate([z, context.astype(z.dtype)], axis=-1)
        return mlp_apply(params, h, self.activation)

    def init(self, key: jax.Array, dtype: jnp.dtype | type = jnp.float32) -> LearnedScoreState:
        """Fresh network parameters and optimizer state."""
        params = mlp_init(key, self._sizes, dtype)
        return LearnedScoreState(params, self.optimizer.init(params))

    def state_dict(self, state: LearnedScoreState) -> dict[str, np.ndarray]:
        """``state`` as a flat dict of numpy arrays, ``{"params.0": ..., "opt_state.0": ...}``
        (the leaves of the two pytrees in ``jax.tree`` order, the optimizer's step count
        included): storable with ``np.savez(path, **d)``, ``pickle`` or ``torch.save``, and
        restored by ``load_state_dict``.

        Args:
            state: a ``LearnedScoreState`` of this estimator.

        Returns:
            The flat dict (host copies; later updates do not change it).

        Raises:
            TypeError: ``state`` is not a ``LearnedScoreState``.
        """
        if not isinstance(state, LearnedScoreState):
            raise TypeError(f"argument 'state' must be a LearnedScoreState, got {type(state).__name__}")
        out = {}
        for part in ("params", "opt_state"):
            for i, leaf in enumerate(jax.tree.leaves(getattr(state, part))):
                out[f"{part}.{i}"] = np.array(leaf)
        return out

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> LearnedScoreState:
        """The ``LearnedScoreState`` saved by ``state_dict`` (e.g. ``dict(np.load(path))``):
        same scores, same next ``update`` step. The estimator must be built alike (``dim``,
        ``context_dim``, ``hidden``, ``optimizer``); the dtype is that of the saved weights.

        Args:
            state_dict: the flat dict from ``state_dict`` (any mapping of its keys to arrays).

        Returns:
            The restored state (new arrays; ``state_dict`` is not modified).

        Raises:
            TypeError: ``state_dict`` is not a mapping.
            ValueError: its keys, or the shape of one of its arrays, do not fit this
                estimator's network and optimizer.
        """
        from collections.abc import Mapping

        if not isinstance(state_dict, Mapping):
            raise TypeError(f"argument 'state_dict' must be a dict from state_dict(), got {type(state_dict).__name__}")
        if "params.0" not in state_dict:
            raise ValueError(
                "argument 'state_dict' has no 'params.0': pass the dict from LearnedScoreEstimator.state_dict()"
            )
        dtype = np.asarray(state_dict["params.0"]).dtype
        template = jax.eval_shape(lambda: self.init(jax.random.PRNGKey(0), dtype))
        parts = {}
        expected = set()
        for part in ("params", "opt_state"):
            leaves, treedef = jax.tree.flatten(getattr(template, part))
            restored = []
            for i, like in enumerate(leaves):
                key = f"{part}.{i}"
                expected.add(key)
                if key not in state_dict:
                    raise ValueError(f"argument 'state_dict' has no {key!r}: it does not fit this estimator ({self!r})")
                arr = np.asarray(state_dict[key])
                if arr.shape != like.shape:
                    raise ValueError(
                        f"argument 'state_dict': {key!r} has shape {arr.shape}, this estimator ({self!r}) "
                        f"needs {like.shape}"
                    )
                restored.append(jnp.array(arr, dtype=like.dtype))
            parts[part] = jax.tree.unflatten(treedef, restored)
        extra = set(state_dict) - expected
        if extra:
            raise ValueError(f"argument 'state_dict' has entries this estimator does not know: {sorted(extra)}")
        return LearnedScoreState(parts["params"], parts["opt_state"])

    def apply(self, params: Params, z: jax.Array, context: jax.Array | None = None) -> jax.Array:
        """``s_psi(z[, context])`` for ``z [N, D]``."""
        context = self._check(z, context, "z")
        return self._net(params, z, context)

    def _loss(self, params, key, z, context):
        return score_matching_loss(
            lambda x: self._net(params, x, context), z, self.method, key=key, kind="score", **self.options
        )

    def update(
        self,
        state: LearnedScoreState,
        key: jax.Array,
        samples: jax.Array | np.ndarray,
        context: jax.Array | None = None,
    ) -> tuple[LearnedScoreState, jax.Array]:
        """``n_steps`` optimizer steps on ``stop_gradient(samples)``; returns ``(state, loss)``.

        Pure and jit-able. A step whose loss or gradient is not finite is refused, in the
        graph: the state stays that from before it and no later step is applied (the torch
        twin's rule). Eagerly (concrete values, validation on) a refused step then raises
        ``ValueError`` naming ``samples``, as in torch; under tracing, or with
        ``ppl_score.set_validation(False)``, the unchanged state comes back with the
        non-finite loss.

        Raises:
            ValueError: ``samples`` non-finite (when concrete) or of the wrong shape, or a
                refused step (eagerly, validation on).
        """
        return self._take_steps(state, key, samples, context, self.n_steps)

    def _take_steps(self, state, key, samples, context, n_steps: int):
        """``update`` with ``n_steps`` steps (``fit_score_estimator`` takes them one at a time)."""
        samples = jax.lax.stop_gradient(jnp.asarray(samples))
        context = self._check(samples, context, "samples")
        if is_validation_enabled() and is_concrete(samples) and not bool(jnp.isfinite(samples).all()):
            raise ValueError("argument 'samples' contains non-finite values (nan or inf)")
        if self.__dict__.get("_update_jit") is None:  # one compiled update per estimator (eager calls)
            self._update_jit = jax.jit(self._update, static_argnames="n_steps")
        key = check_key(key)
        params, opt_state, loss, ok = self._update_jit(
            state.params, state.opt_state, key, samples, context, n_steps=n_steps
        )
        if is_concrete(ok) and is_validation_enabled() and not bool(ok):
            raise ValueError(common.refused_step_message(float(loss)))
        return LearnedScoreState(params, opt_state), loss

    def _update(self, params, opt_state, key, samples, context, n_steps):
        optimizer = self.optimizer

        def step(carry, k):
            params, opt_state, ok = carry
            loss, grads = jax.value_and_grad(self._loss)(params, k, samples.astype(_dtype(params)), context)
            finite = jnp.isfinite(loss)
            for g in jax.tree.leaves(grads):
                finite = finite & jnp.isfinite(g).all()
            updates, new_opt = optimizer.update(grads, opt_state, params)
            new_params = optax.apply_updates(params, updates)
            take = ok & finite
            keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(take, a, b), new, old)  # noqa: E731
            return (keep(new_params, params), keep(new_opt, opt_state), take), (loss, take)

        keys = jax.random.split(key, n_steps)
        (params, opt_state, ok), (losses, taken) = jax.lax.scan(step, (params, opt_state, jnp.array(True)), keys)
        # the last step taken, else the first refused one
        last = jnp.where(ok, n_steps - 1, jnp.argmin(taken))
        return params, opt_state, losses[last], ok


def learned_score_estimator(*args: Any, **kwargs: Any) -> LearnedScoreEstimator:
    """A score network ``s_psi(z[, c])`` (MLP on ``[z, c]``) fitted online by score matching:
    ``LearnedScoreEstimator(*args, **kwargs)``, the Optax-style factory name.

    Mirrors ``ppl_score.torch.estimators.LearnedScoreEstimator``: ``update`` takes
    ``n_steps`` (default 10) steps of ``optimizer`` (default ``optax.adam(3e-3)``; an optax
    ``GradientTransformation`` or a factory returning one) on
    ``score_matching_loss(s_psi, stop_gradient(samples), method, kind="score", **options)``;
    a step whose loss or gradient is not finite is refused (see ``LearnedScoreEstimator.update``).
    """
    return LearnedScoreEstimator(*args, **kwargs)


def _dtype(params):
    return jax.tree.leaves(params)[0].dtype


def fit_score_estimator(
    estimator: LearnedScoreEstimator,
    state: LearnedScoreState,
    key: jax.Array,
    samples: jax.Array | np.ndarray,
    context: jax.Array | None = None,
    *,
    n_steps: int,
    batch_size: int | None = None,
) -> tuple[LearnedScoreState, jax.Array]:
    """``n_steps`` optimizer steps, each on a random minibatch of ``batch_size`` rows of
    ``samples`` (one ``lax.scan``; the estimator's own ``n_steps``, its steps per ``update``,
    does not apply); returns ``(state, losses)``, as the torch ``LearnedScoreEstimator.fit``."""
    n_steps = common.check_int("n_steps", n_steps)
    key = check_key(key)
    samples = jnp.asarray(samples)
    n = samples.shape[0]
    batch_size = n if batch_size is None else common.check_int("batch_size", batch_size, 1, n)

    def step(state, k):
        k_idx, k_upd = jax.random.split(k)
        idx = jax.random.permutation(k_idx, n)[:batch_size]
        return estimator._take_steps(state, k_upd, samples[idx], None if context is None else context[idx], 1)

    return jax.lax.scan(step, state, jax.random.split(key, n_steps))


# ---------------------------------------------------------------------------------------
# the scores of one implicit site's particles (ImplicitELBO, WAE)


def site_scores(
    name: str,
    estimator: LearnedScoreEstimator | str | Callable[[jax.Array, jax.Array | None], jax.Array],
    z: jax.Array,
    batch_ndim: int,
    context: jax.Array | None = None,
    *,
    options: Mapping[str, Any] | None = None,
    state: LearnedScoreState | None = None,
    key: jax.Array | None = None,
    train: bool = False,
) -> tuple[jax.Array, LearnedScoreState | None]:
    """Estimated ``grad_z log q`` at the particles ``z [P, *batch, *event]`` of site ``name``;
    mirrors ``ppl_score.torch.estimators.site_scores`` (see it for the arguments), with a
    learned estimator's ``state`` (a ``LearnedScoreState``) and the ``key`` of its update
    passed in and the new state returned.

    Returns:
        ``(scores, state)``: the scores (``z``'s shape and dtype) and the learned estimator's
        new state (None for the other estimators).

    Raises:
        TypeError, ValueError: as the torch mirror, naming the site.
    """
    kind = common.estimator_kind(estimator, LearnedScoreEstimator)
    p, batch = z.shape[0], tuple(z.shape[1 : 1 + batch_ndim])
    n_batch = math.prod(batch)
    flat = z.reshape(p, n_batch, -1)
    if kind == "callable":
        out = estimator(z, context)
        common.check_callable_scores(name, out, tuple(z.shape), (jax.Array, np.ndarray))
        return jax.lax.stop_gradient(jnp.asarray(out)), None
    if kind != "learned":
        common.check_kernel_particles(name, kind, p)
        g = kernel_scores_batched(kind, jnp.swapaxes(flat, 0, 1), **(options or {}))
        return jnp.swapaxes(g, 0, 1).reshape(z.shape), None
    d = flat.shape[-1]
    common.check_learned_dim(name, estimator.dim, d)
    ctx = None
    if context is not None:
        ctx = context.reshape(-1, context.shape[-1]) if context.ndim > 1 else context[None]
        if ctx.shape[0] == 1 and n_batch > 1:
            ctx = jnp.broadcast_to(ctx, (n_batch, ctx.shape[-1]))
        common.check_context_rows(name, ctx.shape[0], n_batch, batch)
        ctx = jnp.broadcast_to(ctx[None], (p, *ctx.shape)).reshape(p * n_batch, -1)
    samples = flat.reshape(p * n_batch, d)
    if train:
        state, _ = estimator.update(state, key, samples, ctx)
    out = estimator.apply(state.params, samples.astype(_dtype(state.params)), ctx)
    return out.astype(z.dtype).reshape(z.shape), state


def check_scores_finite(name: str, scores: jax.Array) -> None:
    """Eagerly (concrete values) and with validation on (``ppl_score.set_validation``), non-finite estimated
    scores of site ``name`` raise ``ValueError`` naming it; under tracing nothing can raise."""
    if is_concrete(scores) and is_validation_enabled() and not bool(jnp.isfinite(scores).all()):
        raise ValueError(common.nonfinite_scores_message(name))
