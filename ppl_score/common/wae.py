"""The framework-free half of ``ppl_score.{pyro,numpyro}.wae``: the Wasserstein auto-encoder loss.

The choice of a WAE's code sites from the guide and model traces, the option checks, and the
loss itself (``wae_terms``), written once over duck-typed arrays and distributions with the
backend's array maths (``ppl_score.{torch,jax}.mmd``) passed in; imports neither torch nor JAX.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

from .estimators import check_positive
from .implicit import check_estimators, site_options
from .validate import check_sites

__all__ = [
    "REGULARIZERS",
    "RECONSTRUCTIONS",
    "check_regularizer",
    "check_reconstruction",
    "code_site_names",
    "code_count",
    "reconstruction_cost",
    "wae_terms",
    "WAEOptions",
]

REGULARIZERS = ("score", "mmd")


RECONSTRUCTIONS = ("likelihood", "squared_error")


def check_regularizer(regularizer: Any) -> str:
    """One of ``REGULARIZERS``.

    Raises:
        ValueError: naming ``regularizer``.
    """
    if regularizer not in REGULARIZERS:
        raise ValueError(f"argument 'regularizer' must be one of {REGULARIZERS}, got {regularizer!r}")
    return regularizer


def check_reconstruction(reconstruction: Any) -> str:
    """One of ``RECONSTRUCTIONS``.

    Raises:
        ValueError: naming ``reconstruction``.
    """
    if reconstruction not in RECONSTRUCTIONS:
        raise ValueError(f"argument 'reconstruction' must be one of {RECONSTRUCTIONS}, got {reconstruction!r}")
    return reconstruction


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


def code_count(name: str, shape: tuple, event_dim: int, n_codes: int | None, minimum: int = 2) -> int:
    """The number of codes ``B`` (batch size) of code site ``name`` with value ``shape``: the
    same at every code site, and at least ``minimum`` (2; 1 for a rank's shard of a
    gathered minibatch, which itself must hold 2)."""
    b = math.prod(tuple(shape)[: len(shape) - event_dim])
    if n_codes is not None and b != n_codes:
        raise ValueError(f"WAE: code sites have different numbers of codes ({n_codes} vs {b} at {name!r})")
    if b < minimum:
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
    gather: Callable | None = None,
    world_size: int = 1,
) -> dict:
    """The WAE loss [1] from a (model, guide) trace pair, for either PPL (see
    ``ppl_score.pyro.wae`` for the formulas): ``mean_i c(x_i, z_i) + lam * D``, with ``D`` the
    MMD [1] or the KL divergence through an estimated score of the aggregate posterior [2].

    With ``gather`` (data parallelism: each of ``world_size`` ranks holds a shard of the
    minibatch) the MMD is that of the whole minibatch: its codes (through ``gather``, which
    must carry their gradient back to every rank) against every rank's prior draws; and the
    per-datum terms (reconstruction, cross-entropy, the score surrogate, whose scores
    ``scores`` must estimate from the whole minibatch) are this rank's sums divided by
    ``B / world_size``, ``B`` the whole minibatch's size, so that their average over ranks,
    and that of their gradients, is the whole minibatch's mean also for unequal shards.

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
        gather: None (one process), or ``gather(x) -> x_all``: ``x [B_r, D]`` of every rank
            concatenated in rank order, differentiable (e.g. ``ppl_score.torch.distributed.
            gather_rows``); a collective, called once per code site for the codes and once
            for the prior draws.
        world_size: the number of ranks ``gather`` spans.

    Returns:
        ``{"reconstruction", "divergence", "reported", "mmd", "names"}``: the minibatch mean
        of the reconstruction cost and the divergence (both differentiable; the loss is
        ``reconstruction + lam * divergence``), the divergence's reported value (MMD^2, or
        for ``"score"`` the cross-entropy ``mean_i -log p_Z(z_i)``, without gradient), the
        MMD^2 of the codes to prior draws (a monitor for either regularizer) and the code
        sites' names.

    Raises:
        ValueError: see ``code_site_names`` and ``code_count``.

    References:
        [1] I. Tolstikhin, O. Bousquet, S. Gelly, B. Schoelkopf, "Wasserstein auto-encoders", ICLR,
        2018.

        [2] Y. Song, S. Garg, J. Shi, S. Ermon, "Sliced score matching: a scalable approach to
        density and score estimation", UAI, 2019.
    """
    sg = backend.stop_gradient
    names = code_site_names(guide_nodes, model_nodes, sites)
    n_codes = None
    divergence, reported, monitor = 0.0, 0.0, 0.0
    for i, name in enumerate(names):
        gsite, prior = guide_nodes[name], model_nodes[name]["fn"]
        z = gsite["value"]
        n_codes = code_count(name, tuple(z.shape), len(gsite["fn"].event_shape), n_codes, 2 if gather is None else 1)
        codes = z.reshape(n_codes, -1)
        draws = draw(prior, i, codes)
        per_rank = n_codes  # the per-datum terms' divisor: this rank's share of the minibatch
        if gather is not None:
            # the whole minibatch, the same on every rank; the codes' gradient is needed only
            # by the MMD regularizer (the score regularizer's estimate is stop-gradient)
            codes_all = gather(codes if regularizer == "mmd" else sg(codes))
            draws = sg(gather(draws))
            code_count(name, (codes_all.shape[0], 1), 1, None)
            per_rank = codes_all.shape[0] / world_size
        else:
            codes_all = codes
        mmd = backend.imq_mmd2(codes_all, draws, backend.imq_constant(prior, draws), mmd_scales)
        monitor = monitor + sg(mmd)
        if regularizer == "mmd":
            divergence = divergence + mmd
            reported = reported + sg(mmd)
            continue
        cross = -prior.log_prob(z).sum() / per_rank
        s_hat = sg(scores(name, i, sg(codes)))
        check_scores(name, s_hat)
        # reparameterized gradient of E[log q_Z(z)]; the surrogate's value is 0
        divergence = divergence + cross + (s_hat * (codes - sg(codes))).sum() / per_rank
        reported = reported + sg(cross)
    recon = reconstruction_cost(model_nodes, reconstruction) / per_rank
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
        self,
        regularizer: Any,
        lam: Any,
        estimator: Any,
        estimator_options: Mapping | None,
        reconstruction: Any,
        sites: Any,
        mmd_scales: Any,
        update_estimator: Any,
    ) -> None:
        """Check ``WAE``'s arguments (see its docstring) and store them as attributes.

        Raises:
            TypeError, ValueError: naming the argument.
        """
        from .frontend import check_mmd_scales

        self.regularizer = check_regularizer(regularizer)
        self.lam = check_positive("lam", lam)
        self.reconstruction = check_reconstruction(reconstruction)
        self.sites = check_sites(sites, "code")
        self.mmd_scales = check_mmd_scales(mmd_scales)
        self.update_estimator = bool(update_estimator)
        check_estimators(estimator, self.learned_type, code_sites=True)
        self.estimator = estimator
        self.estimator_options = estimator_options

    def code_estimator(self, name: str) -> tuple:
        """``(estimator, options)`` of code site ``name``."""
        return site_options(self.estimator, self.estimator_options, None, name, "code site")[:2]

    def wae_terms(
        self,
        model_nodes: Mapping,
        guide_nodes: Mapping,
        draw: Callable,
        scores: Callable,
        gather: Callable | None = None,
        world_size: int = 1,
    ) -> dict:
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
            gather=gather,
            world_size=world_size,
        )

    def nonfinite_warning(self, names: Sequence[str]) -> tuple[str, str]:
        """``(what, cause)`` for ``ppl_score.common.validate.warn_nonfinite`` on a non-finite loss."""
        from .frontend import nonfinite_loss_warning

        return nonfinite_loss_warning(f"WAE(regularizer={self.regularizer!r})", names)
