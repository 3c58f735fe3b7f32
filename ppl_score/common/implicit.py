"""The framework-free half of ``ppl_score.{pyro,numpyro}.implicit``: ``ImplicitELBO``'s site logic.

The choice of an implicit guide's sites from a trace (a mapping ``name -> site dict``, the
shape both Pyro's ``trace.nodes`` and NumPyro's trace have), the checks of the per-site
estimators and options and their resolution, and the names of learned estimators' state;
written once for both PPLs, importing neither torch nor JAX. The front ends only run the model
and guide and translate their traces.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from .estimators import KERNEL_ESTIMATORS, check_kernel_estimator, estimator_kind

__all__ = [
    "for_site",
    "base_distribution",
    "implicit_site_names",
    "outside_plates",
    "check_estimators",
    "check_context",
    "site_options",
    "score_state_name",
    "learned_state",
]


def for_site(estimator: Any, options: Any, name: str, what: str = "implicit site") -> tuple[Any, Any]:
    """The estimator and kernel options of site ``name``: ``estimator`` may be a dict per
    site, ``options`` a dict of options or a dict of them per site."""
    if isinstance(estimator, Mapping):
        if name not in estimator:
            raise ValueError(f"argument 'estimator' has no entry for {what} {name!r}")
        estimator = estimator[name]
    if isinstance(options, Mapping) and name in options and isinstance(options[name], Mapping):
        options = options[name]
    return estimator, options


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


def outside_plates(site: Mapping, ignore: tuple[str, ...] = ()) -> bool:
    """Whether sample site ``site`` (a Pyro or NumPyro site dict) sits outside every plate but
    those named in ``ignore`` (e.g. the particle plate of vectorized ELBOs): a global latent,
    one distribution whose particles the ranks of a process group may pool (the sites inside
    a plate are per-datum)."""
    return all(frame.name in ignore for frame in site.get("cond_indep_stack", ()))


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
