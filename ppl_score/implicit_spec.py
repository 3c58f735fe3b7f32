"""Backend-neutral logic of the score estimators, ``ImplicitELBO`` and ``WAE``.

Shared by ``ppl_score.{torch,jax}.{estimators,mmd}`` and
``ppl_score.{pyro,numpyro}.{implicit,wae}``; imports neither torch nor JAX. It holds, once
for both PPLs: the option checks and error messages, the choice of an implicit guide's
sites and of a WAE's code sites from a trace (a mapping ``name -> site dict``, the shape
both Pyro's ``trace.nodes`` and NumPyro's trace have), the resolution of per-site options,
and the WAE loss itself (``wae_terms``), written once over duck-typed arrays and
distributions with the backend's array maths (``ppl_score.{torch,jax}.mmd``) passed in. The
front ends only run the model and guide and translate their traces. Every check raises
``ValueError`` (``TypeError`` for a wrong type) whose message names the offending argument.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Mapping

from ._validate import check_int, check_positive_float

__all__ = [
    "KERNEL_ESTIMATORS",
    "LEARNED_METHODS",
    "REGULARIZERS",
    "RECONSTRUCTIONS",
    "check_samples_shape",
    "check_at_shape",
    "check_eta",
    "check_threshold",
    "check_n_eigen",
    "check_bandwidth",
    "check_positive",
    "check_int",
    "check_learned_method",
    "check_kernel_name",
    "check_kernel_estimator",
    "check_regularizer",
    "check_reconstruction",
    "check_sites",
    "median_positions",
    "for_site",
    "singular_tolerance",
    "singular_message",
    "bandwidth_underflow_message",
    "refused_step_message",
    "MMD_SCALES",
    "LEARNED_N_STEPS",
    "LEARNED_LR",
    "base_distribution",
    "implicit_site_names",
    "estimator_kind",
    "check_estimators",
    "check_context",
    "site_options",
    "check_kernel_particles",
    "check_learned_dim",
    "check_context_rows",
    "check_callable_scores",
    "nonfinite_scores_message",
    "score_state_name",
    "learned_state",
    "code_site_names",
    "code_count",
    "reconstruction_cost",
    "wae_terms",
    "WAEOptions",
]

KERNEL_ESTIMATORS = ("stein", "spectral")
# Objectives of section 1 a score network is trained by (kind="score"): the others need
# second derivatives of a network that is itself a derivative (esm, ssm) or add nothing.
LEARNED_METHODS = ("ssm_vr", "fd_ssm", "dsm")
# Defaults of the learned estimators (both backends): Adam steps per ``update`` (one
# ImplicitELBO / WAE loss evaluation) and their learning rate. One step at 1e-3 lets the
# guide outrun the score network, which then underestimates the entropy gradient and the
# guide collapses (posterior sd 0.26-0.39 of the exact one on a conjugate Gaussian, 0.09-1.15
# on Bayesian logistic regressions); 5 steps at 3e-3 are enough for the wider posteriors but
# not the narrow one (0.63-0.97); 10 steps at 3e-3 track all of them (README, "Tuning a
# learned estimator").
LEARNED_N_STEPS = 10
LEARNED_LR = 3e-3
REGULARIZERS = ("score", "mmd")
# scales s of WAE-MMD's inverse multiquadratic kernel sum_s C s / (C s + ||x - y||^2)
MMD_SCALES = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
RECONSTRUCTIONS = ("likelihood", "squared_error")


# ``check_positive(name, value)`` and ``check_int(name, value, low, high)``
check_positive = check_positive_float


def _is_real(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, numbers.Real)


def check_samples_shape(shape: tuple, name: str = "samples") -> tuple[int, int]:
    """``samples`` is ``[N, D]`` with ``N >= 2`` (the median heuristic needs a pair)."""
    shape = tuple(shape)
    if len(shape) != 2:
        raise ValueError(f"argument {name!r} must have shape [N, D], got {shape}")
    n, d = shape
    if n < 2:
        raise ValueError(f"argument {name!r} must hold at least 2 samples (N >= 2), got N = {n}")
    if d < 1:
        raise ValueError(f"argument {name!r} must have D >= 1 columns, got shape {shape}")
    return n, d


def check_at_shape(shape: tuple, d: int) -> int:
    """``at`` is ``[K, D]`` with the ``D`` of ``samples``."""
    shape = tuple(shape)
    if len(shape) != 2 or shape[1] != d:
        raise ValueError(f"argument 'at' must have shape [K, {d}] (D of 'samples'), got {shape}")
    return shape[0]


def check_eta(eta: Any) -> float:
    return check_positive("eta", eta)


def check_threshold(threshold: Any) -> float:
    if not _is_real(threshold):
        raise TypeError(f"argument 'threshold' must be a real number in (0, 1], got {type(threshold).__name__}")
    threshold = float(threshold)
    if not (0.0 < threshold <= 1.0):
        raise ValueError(f"argument 'threshold' must be in (0, 1], got {threshold!r}")
    return threshold


def check_n_eigen(n_eigen: Any, n: int) -> int | None:
    if n_eigen is None:
        return None
    return check_int("n_eigen", n_eigen, 1, n)


def check_bandwidth(bandwidth: Any) -> float | None:
    """``None`` (median heuristic) or a finite number ``> 0``; a 0-d array is accepted."""
    if bandwidth is None:
        return None
    if not _is_real(bandwidth):
        try:
            bandwidth = float(bandwidth)  # 0-d torch / numpy / JAX arrays
        except (TypeError, ValueError):
            raise TypeError(
                f"argument 'bandwidth' must be None or a positive real number, got {type(bandwidth).__name__}"
            ) from None
    return check_positive("bandwidth", bandwidth)


def singular_tolerance(n: int, eps: float, eta: float) -> float:
    """Squared Cholesky pivots of ``K + eta I`` (``N x N``, unit diagonal) at or below this are
    numerical zeros: the matrix's condition then exceeds ``1 / ((N + 1) eps)`` and its solve
    carries no correct digit. The usual rank tolerance (``size * eps * largest entry``)."""
    return (n + 1) * eps * (1.0 + eta)


def singular_message(eta: float, bandwidth: Any, dtype: str, where: str = "samples") -> str:
    """The error for a numerically singular Stein system, naming ``eta`` and ``bandwidth``."""
    what = "duplicate or near-duplicate samples" if where == "samples" else "a row of 'at' on (or next to) a sample"
    h = "the median heuristic" if bandwidth is None else f"{float(bandwidth):g}"
    return (
        f"stein_scores: K + eta I is numerically singular in {dtype} (argument 'eta'={eta:g}, "
        f"argument 'bandwidth'={h}): {what} make K singular and eta is below the round-off of the "
        "solve, so the estimate would be noise. Increase 'eta' (e.g. to the default 0.1), use "
        "float64, or remove the duplicates"
    )


def bandwidth_underflow_message(bandwidth: Any, dtype: str) -> str:
    return f"argument 'bandwidth'={float(bandwidth):g} is 0 in {dtype} (underflow); pass a larger bandwidth"


def refused_step_message(loss: float) -> str:
    """The error for a learned-estimator step refused because it is not finite."""
    return (
        f"argument 'samples': the score-matching loss ({loss}) or its gradient is not finite on these "
        "samples (values so large that the score network overflows, or a diverged network); the step "
        "was refused and the estimator's state is unchanged. Rescale or filter the samples, or lower the "
        "learning rate"
    )


def check_learned_method(method: Any) -> str:
    if not isinstance(method, str):
        raise TypeError(f"argument 'method' must be a string, got {type(method).__name__}")
    if method not in LEARNED_METHODS:
        raise ValueError(f"argument 'method' must be one of {LEARNED_METHODS} for a score network, got {method!r}")
    return method


def check_kernel_name(name: Any, argname: str = "estimator") -> str:
    if name not in KERNEL_ESTIMATORS:
        raise ValueError(
            f"argument {argname!r} must be a learned score estimator, a callable, or one of "
            f"{KERNEL_ESTIMATORS}, got {name!r}"
        )
    return name


def check_kernel_estimator(name: Any, num_particles: int) -> str:
    """A kernel estimator's name, and enough particles for it: it estimates the score across
    the particles of one step."""
    check_kernel_name(name)
    if num_particles < 2:
        raise ValueError(
            f"argument 'num_particles' must be >= 2 with the {name!r} kernel estimator, "
            f"which estimates the score across particles; got {num_particles}"
        )
    return name


def check_regularizer(regularizer: Any) -> str:
    if regularizer not in REGULARIZERS:
        raise ValueError(f"argument 'regularizer' must be one of {REGULARIZERS}, got {regularizer!r}")
    return regularizer


def check_reconstruction(reconstruction: Any) -> str:
    if reconstruction not in RECONSTRUCTIONS:
        raise ValueError(f"argument 'reconstruction' must be one of {RECONSTRUCTIONS}, got {reconstruction!r}")
    return reconstruction


def check_sites(sites: Any) -> tuple | None:
    """``None`` or a non-empty collection of site names."""
    if sites is None:
        return None
    if isinstance(sites, str):
        return (sites,)
    try:
        sites = tuple(sites)
    except TypeError:
        raise TypeError(
            f"argument 'sites' must be None, a site name or a list of names, got {type(sites).__name__}"
        ) from None
    if not sites or not all(isinstance(s, str) for s in sites):
        raise ValueError(f"argument 'sites' must be a non-empty list of site names, got {sites!r}")
    return sites


def median_positions(n_pairs: int) -> tuple[int, int]:
    """Positions in the sorted pairwise distances whose average is the median (the two
    middle values for an even count, the middle one twice for an odd count)."""
    return (n_pairs - 1) // 2, n_pairs // 2


def for_site(estimator: Any, options: Any, name: str, what: str = "implicit site"):
    """The estimator and kernel options of site ``name``: ``estimator`` may be a dict per
    site, ``options`` a dict of options or a dict of them per site."""
    if isinstance(estimator, Mapping):
        if name not in estimator:
            raise ValueError(f"argument 'estimator' has no entry for {what} {name!r}")
        estimator = estimator[name]
    if isinstance(options, Mapping) and name in options and isinstance(options[name], Mapping):
        options = options[name]
    return estimator, options


# ---------------------------------------------------------------------------------------
# ImplicitELBO: implicit sites, estimators, per-site options and checks


def base_distribution(fn: Any) -> Any:
    """``fn`` with its wrappers (``Independent``, masked, expanded: whatever has a
    ``base_dist``) taken off."""
    while hasattr(fn, "base_dist"):
        fn = fn.base_dist
    return fn


def implicit_site_names(nodes: Mapping, sites: tuple | None, delta_type: type, ppl: str) -> list[str]:
    """The implicit sites of a guide trace: its unobserved sample sites whose distribution is a
    ``delta_type`` (under any wrappers), or the ``sites`` given, which must be such sites.

    Args:
        nodes: the guide trace, ``{name: site}`` with Pyro's / NumPyro's site dicts.
        sites: the names the user chose (from ``check_sites``), or None for all of them.
        delta_type: the PPL's ``Delta`` distribution class.
        ppl: ``"pyro"`` or ``"numpyro"`` (for the message).

    Returns:
        The names, in trace order (or in the order of ``sites``).

    Raises:
        ValueError: a name of ``sites`` is not a sample site of the guide, or not implicit.
    """
    found = [
        name
        for name, site in nodes.items()
        if site["type"] == "sample"
        and not site["is_observed"]
        and isinstance(base_distribution(site["fn"]), delta_type)
    ]
    if sites is None:
        return found
    for name in sites:
        if name not in nodes or nodes[name]["type"] != "sample":
            raise ValueError(f"argument 'sites': site {name!r} is not a sample site of the guide")
        if name not in found:
            raise ValueError(
                f"argument 'sites': guide site {name!r} is not implicit; write it as "
                f"{ppl}.sample({name!r}, dist.Delta(g(eps, ...), event_dim=k))"
            )
    return list(sites)


def estimator_kind(estimator: Any, learned_type: type) -> str:
    """``"learned"`` (an instance of the backend's ``learned_type``), ``"stein"``,
    ``"spectral"`` or ``"callable"``.

    Raises:
        ValueError: an unknown estimator name.
        TypeError: anything else.
    """
    if isinstance(estimator, learned_type):
        return "learned"
    if isinstance(estimator, str):
        return check_kernel_name(estimator)
    if callable(estimator):
        return "callable"
    raise TypeError(
        "argument 'estimator' must be a LearnedScoreEstimator, 'stein', 'spectral', a callable "
        f"score(z, context), or a dict of these per site; got {type(estimator).__name__}"
    )


def check_estimators(
    estimator: Any, learned_type: type, num_particles: int | None = None, *, code_sites: bool = False
) -> None:
    """Check ``estimator`` (one, or a dict per site) when a loss is built.

    Args:
        estimator: the user's argument.
        learned_type: the backend's ``LearnedScoreEstimator`` class.
        num_particles: ``ImplicitELBO``'s particles, which a kernel estimator needs at least
            2 of; None (``WAE``, whose kernel estimators work across the minibatch's codes).
        code_sites: ``WAE``: a learned estimator must be unconditional.

    Raises:
        TypeError, ValueError: see ``estimator_kind``, ``check_kernel_estimator``; a
            conditional learned estimator for ``WAE``.
    """
    for est in estimator.values() if isinstance(estimator, Mapping) else [estimator]:
        kind = estimator_kind(est, learned_type)
        if kind == "learned" and code_sites and est.context_dim:
            raise ValueError("argument 'estimator': the aggregate posterior's score takes no context (context_dim=0)")
        if kind in KERNEL_ESTIMATORS and num_particles is not None:
            check_kernel_estimator(kind, num_particles)


def check_context(context: Any) -> Callable | Mapping | None:
    """``ImplicitELBO``'s ``context``: None, a callable on the guide's inputs, or a dict of them."""
    if context is not None and not (callable(context) or isinstance(context, Mapping)):
        raise TypeError(f"argument 'context' must be a callable or a dict of callables, got {type(context).__name__}")
    return context


def site_options(estimator: Any, options: Any, context: Any, name: str, what: str = "implicit site") -> tuple:
    """``(estimator, options dict, context callable or None)`` of site ``name`` (each argument
    may be a dict per site; see ``for_site``). The options are a new dict."""
    est, opts = for_site(estimator, options, name, what)
    ctx = context.get(name) if isinstance(context, Mapping) else context
    return est, dict(opts or {}), ctx


def check_kernel_particles(name: str, kind: str, p: int) -> None:
    if p < 2:
        raise ValueError(
            f"site {name!r}: the {kind!r} kernel estimator needs num_particles >= 2 "
            "(it estimates the score across the particles of each batch element)"
        )


def check_learned_dim(name: str, est_dim: int, d: int) -> None:
    if d != est_dim:
        raise ValueError(f"site {name!r}: the learned estimator has dim={est_dim}, the site's event size is {d}")


def check_context_rows(name: str, rows: int, n_batch: int, batch: tuple) -> None:
    if rows != n_batch:
        raise ValueError(
            f"site {name!r}: the context has {rows} rows, the site has {n_batch} batch elements "
            f"(batch shape {tuple(batch)})"
        )


def check_callable_scores(name: str, out: Any, z_shape: tuple, array_type: type | tuple) -> None:
    """A callable estimator's output must be an array of ``z``'s shape."""
    if not isinstance(out, array_type) or tuple(out.shape) != tuple(z_shape):
        raise ValueError(
            f"site {name!r}: argument 'estimator' must return scores of the shape of z, {tuple(z_shape)}, "
            f"got {getattr(out, 'shape', type(out).__name__)}"
        )


def nonfinite_scores_message(name: str) -> str:
    return f"site {name!r}: the score estimator returned non-finite values (nan or inf)"


def score_state_name(site: str) -> str:
    """Name of the NumPyro mutable site holding the learned estimator state of ``site``."""
    return f"{site}_score_state"


def learned_state(params: Mapping, name: str) -> Any:
    """The learned estimator state of site ``name`` in NumPyro's parameter map (its mutable state).

    Raises:
        ValueError: the guide did not declare it with ``score_state``.
    """
    state_name = score_state_name(name)
    if state_name not in params:
        raise ValueError(
            f"site {name!r}: the learned estimator's state {state_name!r} is not in NumPyro's mutable "
            f"state; declare it in the guide with ppl_score.numpyro.implicit.score_state({name!r}, estimator)"
        )
    return params[state_name]


# ---------------------------------------------------------------------------------------
# WAE: code sites and the loss, once for both PPLs


def code_site_names(guide_nodes: Mapping, model_nodes: Mapping, sites: tuple | None) -> list[str]:
    """``WAE``'s code sites: the guide's unobserved sample sites (or ``sites``), each
    reparameterizable and with a prior in the model.

    Raises:
        ValueError: a name of ``sites`` is not such a site; no code site; a code site that is
            not reparameterizable or has no prior.
    """
    names = [n for n, s in guide_nodes.items() if s["type"] == "sample" and not s["is_observed"]]
    if sites is not None:
        for n in sites:
            if n not in names:
                raise ValueError(f"argument 'sites': {n!r} is not an unobserved sample site of the guide")
        names = list(sites)
    if not names:
        raise ValueError("WAE: the guide has no code site (an unobserved sample site, e.g. a Delta)")
    for n in names:
        if not guide_nodes[n]["fn"].has_rsample:
            raise ValueError(
                f"WAE: guide site {n!r} is not reparameterizable; encode with a Delta or an rsample-able distribution"
            )
        if n not in model_nodes or model_nodes[n]["type"] != "sample":
            raise ValueError(f"WAE: code site {n!r} of the guide has no prior in the model")
    return names


def code_count(name: str, shape: tuple, event_dim: int, n_codes: int | None) -> int:
    """The number of codes ``B`` (batch size) of code site ``name`` with value ``shape``: the
    same at every code site, and at least 2."""
    b = math.prod(tuple(shape)[: len(shape) - event_dim])
    if n_codes is not None and b != n_codes:
        raise ValueError(f"WAE: code sites have different numbers of codes ({n_codes} vs {b} at {name!r})")
    if b < 2:
        raise ValueError(f"WAE: site {name!r} holds {b} code; the aggregate posterior needs a minibatch of >= 2")
    return b


def reconstruction_cost(model_nodes: Mapping, reconstruction: str) -> Any:
    """Sum over the model's observed sites of ``-log p(x | z)`` (``"likelihood"``) or
    ``||x - E[x | z]||^2`` (``"squared_error"``); arrays of either backend (duck-typed)."""
    total = 0.0
    for site in model_nodes.values():
        if site["type"] != "sample" or not site["is_observed"]:
            continue
        if reconstruction == "likelihood":
            total = total - site["fn"].log_prob(site["value"]).sum()
        else:
            total = total + ((site["value"] - site["fn"].mean) ** 2).sum()
    return total


def wae_terms(
    model_nodes: Mapping,
    guide_nodes: Mapping,
    *,
    sites: tuple | None,
    regularizer: str,
    reconstruction: str,
    mmd_scales: tuple,
    backend: Any,
    draw: Callable,
    scores: Callable,
    check_scores: Callable,
) -> dict:
    """The WAE loss from a (model, guide) trace pair, for either PPL (see
    ``ppl_score.pyro.wae`` for the formulas): ``mean_i c(x_i, z_i) + lam * D``.

    Args:
        model_nodes, guide_nodes: the traces, ``{name: site}``.
        sites, regularizer, reconstruction, mmd_scales: ``WAE``'s checked options.
        backend: ``ppl_score.torch.mmd`` or ``ppl_score.jax.mmd`` (``stop_gradient``,
            ``imq_mmd2``, ``imq_constant``).
        draw: ``draw(prior, i, codes) -> [B, D]`` draws of the prior of the ``i``-th code site,
            without gradient, in the codes' dtype.
        scores: ``scores(name, i, codes) -> [B, D]``: the estimated score of the aggregate
            posterior at the (stop-gradient) ``codes`` of site ``name``.
        check_scores: ``check_scores(name, s_hat)``, the backend's finiteness check.

    Returns:
        ``{"reconstruction", "divergence", "reported", "mmd", "names"}``: the minibatch mean
        of the reconstruction cost and the divergence (both differentiable; the loss is
        ``reconstruction + lam * divergence``), the divergence's reported value (MMD^2, or
        for ``"score"`` the cross-entropy ``mean_i -log p_Z(z_i)``, without gradient), the
        MMD^2 of the codes to prior draws (a monitor for either regularizer) and the code
        sites' names.

    Raises:
        ValueError: see ``code_site_names`` and ``code_count``.
    """
    sg = backend.stop_gradient
    names = code_site_names(guide_nodes, model_nodes, sites)
    n_codes = None
    divergence, reported, monitor = 0.0, 0.0, 0.0
    for i, name in enumerate(names):
        gsite, prior = guide_nodes[name], model_nodes[name]["fn"]
        z = gsite["value"]
        n_codes = code_count(name, tuple(z.shape), len(gsite["fn"].event_shape), n_codes)
        codes = z.reshape(n_codes, -1)
        draws = draw(prior, i, codes)
        mmd = backend.imq_mmd2(codes, draws, backend.imq_constant(prior, draws), mmd_scales)
        monitor = monitor + sg(mmd)
        if regularizer == "mmd":
            divergence = divergence + mmd
            reported = reported + sg(mmd)
            continue
        cross = -prior.log_prob(z).sum() / n_codes
        s_hat = sg(scores(name, i, sg(codes)))
        check_scores(name, s_hat)
        # reparameterized gradient of E[log q_Z(z)]; the surrogate's value is 0
        divergence = divergence + cross + (s_hat * (codes - sg(codes))).sum() / n_codes
        reported = reported + sg(cross)
    recon = reconstruction_cost(model_nodes, reconstruction) / n_codes
    return {"reconstruction": recon, "divergence": divergence, "reported": reported, "mmd": monitor, "names": names}


class WAEOptions:
    """The framework-free half of ``WAE``, mixed into ``ppl_score.pyro.wae.WAE`` and
    ``ppl_score.numpyro.wae.WAE``: their checked options and their loss over traces.

    A front end sets the class attributes ``mmd_backend`` (``ppl_score.torch.mmd`` or
    ``ppl_score.jax.mmd``), ``learned_type`` (its backend's ``LearnedScoreEstimator``) and
    ``check_scores`` (its backend's ``check_scores_finite``), calls ``set_options`` from its
    ``__init__`` and ``wae_terms`` on the traces it ran.
    """

    mmd_backend: Any = None
    learned_type: type = type(None)
    check_scores: Callable

    def set_options(
        self, regularizer, lam, estimator, estimator_options, reconstruction, sites, mmd_scales, update_estimator
    ) -> None:
        """Check ``WAE``'s arguments (see its docstring) and store them as attributes.

        Raises:
            TypeError, ValueError: naming the argument.
        """
        from .frontend import check_mmd_scales

        self.regularizer = check_regularizer(regularizer)
        self.lam = check_positive("lam", lam)
        self.reconstruction = check_reconstruction(reconstruction)
        self.sites = check_sites(sites)
        self.mmd_scales = check_mmd_scales(mmd_scales)
        self.update_estimator = bool(update_estimator)
        check_estimators(estimator, self.learned_type, code_sites=True)
        self.estimator = estimator
        self.estimator_options = estimator_options

    def code_estimator(self, name: str) -> tuple:
        """``(estimator, options)`` of code site ``name``."""
        return site_options(self.estimator, self.estimator_options, None, name, "code site")[:2]

    def wae_terms(self, model_nodes: Mapping, guide_nodes: Mapping, draw: Callable, scores: Callable) -> dict:
        """``wae_terms`` (the module function) with this loss's options and backend."""
        return wae_terms(
            model_nodes,
            guide_nodes,
            sites=self.sites,
            regularizer=self.regularizer,
            reconstruction=self.reconstruction,
            mmd_scales=self.mmd_scales,
            backend=self.mmd_backend,
            draw=draw,
            scores=scores,
            check_scores=type(self).check_scores,
        )

    def nonfinite_warning(self, names) -> tuple:
        """``(what, cause)`` for ``ppl_score.validation.warn_nonfinite`` on a non-finite loss."""
        from .frontend import nonfinite_loss_warning

        return nonfinite_loss_warning(f"WAE(regularizer={self.regularizer!r})", names)
