"""Wasserstein auto-encoders as an SVI loss (Pyro).

A (decoder model, encoder guide) pair: the model draws codes from a prior and decodes them
(``pyro.sample("z", prior)``, ``pyro.sample("x", likelihood(decoder(z)), obs=x)`` in a data
plate); the guide encodes, deterministically ``pyro.sample("z", Delta(encoder(x),
event_dim=1))`` or implicitly ``Delta(encoder(x, eps), ...)``. With ``B`` codes ``z_i`` in
the minibatch (Tolstikhin et al. 2018; Song et al. 2019, section 4.2; references in ``WAE``)::

    loss = mean_i c(x_i, z_i) + lam * D(q_Z, p_Z)

``c`` is ``-log p(x_i | z_i)`` over the observed sites (``reconstruction="likelihood"``) or
``||x_i - E[x_i | z_i]||^2`` (``"squared_error"``). ``q_Z`` is the aggregate posterior,
represented by the minibatch codes:

* ``regularizer="score"``: ``D = KL(q_Z || p_Z)``, minimized through its reparameterized
  gradient ``E[(grad_z log q_Z(z) - grad_z log p_Z(z))^T dz/dphi]``; the surrogate is
  ``mean_i [ -log p_Z(z_i) + stop_grad(s_hat(z_i))^T z_i ]`` with ``s_hat`` from a score
  estimator fitted to the codes (a learned network updated on them every step, or Stein /
  SSGE across the ``B`` codes). With ``p_Z = N(0, I)`` this is ``lam [||z||^2/2 +
  stop_grad(s_psi(z))^T z]`` of Song et al.; any prior with a ``log_prob`` works.
* ``regularizer="mmd"``: ``D = MMD^2`` (unbiased) between the codes and as many prior draws,
  with the inverse multiquadratic kernel ``sum_s C_s / (C_s + ||x - y||^2)``,
  ``C_s = 2 D var(p_Z) s`` over ``s`` in ``mmd_scales`` (WAE-MMD; ``var(p_Z)`` is the
  prior's own where it has one, else that of the prior draws the MMD uses).

The reported value is the reconstruction plus ``lam`` times MMD^2 or, for ``"score"``, the
cross-entropy ``mean_i -log p_Z(z_i)`` (the entropy of ``q_Z`` is unknown; its surrogate has
value zero). Scales and masks of plates are not used: both terms are minibatch means.

Data parallelism (``torch.nn.parallel.DistributedDataParallel``, a shard of the minibatch per
rank): with ``process_group=`` the divergence is that of the whole minibatch (the codes and
prior draws of every rank for the MMD, every rank's codes for the aggregate posterior's
score), so that with DDP's gradient average the loss and its gradients are those of one
process on the whole minibatch; ``generator=`` gives each rank its own draws. Docs page
*Batch-global terms under DDP (torch)*.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from pyro import poutine
from pyro.infer import ELBO
from pyro.infer.util import torch_item
from pyro.poutine.util import prune_subsample_sites

from ..common import validate
from ..common import wae as common
from ..common.mmd import MMD_SCALES
from ..torch import distributed as tdist
from ..torch import mmd as backend
from ..torch.estimators import LearnedScoreEstimator, check_scores_finite, site_scores
from ..torch.mmd import imq_mmd2
from .distributed import RankState

__all__ = ["WAE", "imq_mmd2", "MMD_SCALES"]


class WAE(RankState, common.WAEOptions, ELBO):
    """Wasserstein auto-encoder loss [1] for a (decoder model, encoder guide) pair:
    ``mean_i c(x_i, z_i) + lam * D(q_Z, p_Z)``, with ``D`` the KL divergence through an
    estimated score of the aggregate posterior [2] or the MMD [1] (see the module docstring).

    Args:
        regularizer: ``"score"`` (KL through an estimated score of the aggregate posterior)
            or ``"mmd"`` (IMQ-kernel MMD).
        lam: weight of the divergence (default 10, as in [1] and [2]).
        estimator: for ``"score"``: a ``LearnedScoreEstimator`` (unconditional), ``"stein"``,
            ``"spectral"``, a callable ``score(z, None)``, or a dict per site.
        estimator_options: kernel options (``eta``, ``bandwidth``, ``n_eigen``, ``threshold``).
        reconstruction: ``"likelihood"`` or ``"squared_error"``.
        sites: the code sites (default: every unobserved sample site of the guide).
        mmd_scales: the IMQ scales ``s``.
        update_estimator: update a learned estimator in ``loss_and_grads`` /
            ``differentiable_loss``.
        generator: a ``torch.Generator`` (CPU or CUDA) for every draw the loss makes on its
            device: the prior draws of the MMD, the guide's and model's draws (an implicit
            encoder's noise), a learned estimator's projections and noise unless it has a
            ``generator`` of its own. Its stream stands in for the global RNG of that device
            during each evaluation; the global RNG is left as it was. None (default): the
            global RNG. Pickled as its state.
        process_group: None (default: no collective; under DDP each rank's divergence is
            then that of its shard alone, a different, biased objective), or a
            ``torch.distributed`` group (``torch.distributed.group.WORLD``): the divergence
            is computed on the whole minibatch, the same on every rank: ``"mmd"`` between the
            codes of every rank (gathered with their gradient,
            ``ppl_score.torch.distributed.gather_rows``) and the prior draws of every rank;
            ``"score"`` with the aggregate posterior's score estimated from every rank's
            codes (kernel estimators across all of them; a learned estimator updated on all
            of them, its replicas identical). The per-datum terms are this rank's sums
            divided by ``B / world_size`` (``B`` the whole minibatch's size), so that DDP's
            average is the whole minibatch's mean, for unequal shards too; the value on a
            rank is then its share, and the mean over ranks is the whole minibatch's loss.
            Every evaluation (``loss``, ``terms``, ...) is a collective.

    Raises:
        TypeError, ValueError: a bad argument, named (checked once for both PPLs by
            ``ppl_score.common.wae.WAEOptions``; ``generator`` and ``process_group`` here);
            at a step, a code site that is not reparameterizable, has no prior, or holds
            fewer than 2 codes (with ``process_group``: a rank without a code, or fewer than 2
            in all), or code sites with different numbers of codes.

    Pickling, ``copy.deepcopy`` and ``torch.save`` keep the generator as its device and
    state, and ``process_group`` as None or the default group (``WORLD``, resolved again
    when the loss is used); a loss holding another group raises ``TypeError``.

    References:
        [1] I. Tolstikhin, O. Bousquet, S. Gelly, B. Schoelkopf, "Wasserstein auto-encoders", ICLR,
        2018.

        [2] Y. Song, S. Garg, J. Shi, S. Ermon, "Sliced score matching: a scalable approach to
        density and score estimation", UAI, 2019.
    """

    mmd_backend = backend
    learned_type = LearnedScoreEstimator
    check_scores = staticmethod(check_scores_finite)
    generator: torch.Generator | None = None  # defaults for losses pickled before these options
    _process_group: Any = None

    def __init__(
        self,
        regularizer: str = "score",
        *,
        lam: float = 10.0,
        estimator: Any = "stein",
        estimator_options: Mapping | None = None,
        reconstruction: str = "likelihood",
        sites: str | Iterable[str] | None = None,
        mmd_scales: Sequence[float] = MMD_SCALES,
        update_estimator: bool = True,
        generator: torch.Generator | None = None,
        process_group: Any = None,
    ) -> None:
        super().__init__(num_particles=1)
        self.set_options(
            regularizer, lam, estimator, estimator_options, reconstruction, sites, mmd_scales, update_estimator
        )
        self.generator = tdist.check_generator(generator)
        self.process_group = tdist.check_process_group(process_group)

    def _get_trace(self, model, guide, args, kwargs):
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
        return prune_subsample_sites(model_trace), prune_subsample_sites(guide_trace)

    def _terms(self, model, guide, args, kwargs, train):
        with tdist.use_generator(self.generator):
            return self._terms_now(model, guide, args, kwargs, train)

    def _terms_now(self, model, guide, args, kwargs, train):
        model_trace, guide_trace = self._get_trace(model, guide, args, kwargs)
        if train and self.regularizer == "score" and torch.is_inference_mode_enabled():
            # a learned estimator's update is score matching on the codes: derivatives in z
            names = common.code_site_names(guide_trace.nodes, model_trace.nodes, self.sites)
            if any(isinstance(self.code_estimator(n)[0], LearnedScoreEstimator) for n in names):
                raise validate.inference_mode_error(
                    "WAE(regularizer='score') with a learned estimator",
                    "the score matching that updates the estimator (derivatives in the codes z)",
                )

        def draw(prior, i, codes):
            with torch.no_grad():
                return prior.sample().reshape(codes.shape[0], -1).to(codes.dtype)

        group = self.process_group
        size = tdist.world(group)[1] if group is not None else 1
        gather = None if size == 1 else (lambda x: tdist.gather_rows(x, group))

        def scores(name, i, codes):
            est, options = self.code_estimator(name)
            return site_scores(name, est, codes, 0, None, options=options, train=train, process_group=group)

        t = self.wae_terms(model_trace.nodes, guide_trace.nodes, draw, scores, gather, size)
        loss = t["reconstruction"] + self.lam * t["divergence"]  # the entropy surrogate has value 0
        value = torch_item(t["reconstruction"]) + self.lam * torch_item(t["reported"])
        terms = {
            k: torch_item(t[v])
            for k, v in (("reconstruction", "reconstruction"), ("divergence", "reported"), ("mmd", "mmd"))
        }
        return loss, value, terms, (model_trace, guide_trace), t["names"]

    def _warn_if_nonfinite(self, value, names) -> None:
        if validate.is_validation_enabled() and not math.isfinite(value):
            what, cause = self.nonfinite_warning(names)
            validate.warn_nonfinite(what, cause, stacklevel=4)

    def terms(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> dict[str, float]:
        """``{"reconstruction", "divergence", "mmd"}`` at one draw (no estimator update):
        the two terms of the loss (divergence as reported, see the module docstring) and the
        MMD^2 of the codes to prior draws (a monitor for either regularizer)."""
        with torch.no_grad():
            return self._terms(model, guide, args, kwargs, False)[2]

    def loss(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> float:
        """The loss as a float, at one draw (no estimator update): the reconstruction plus
        ``lam`` times the reported divergence (see the module docstring)."""
        with torch.no_grad():
            _, value, _, _, names = self._terms(model, guide, args, kwargs, False)
        self._warn_if_nonfinite(value, names)
        return value

    def differentiable_loss(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The loss as a differentiable tensor (updates a learned estimator first).

        Raises:
            RuntimeError: under ``torch.inference_mode()`` when a learned estimator is to be
                updated (its score matching needs autograd; use ``torch.no_grad()``).
        """
        loss, value, _, _, names = self._terms(model, guide, args, kwargs, self.update_estimator)
        self._warn_if_nonfinite(value, names)
        return loss

    def loss_and_grads(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> float:
        """The loss as a float; backpropagates it into the parameters.

        Raises:
            RuntimeError: under ``torch.inference_mode()`` (see :meth:`differentiable_loss`).
        """
        loss, value, _, traces, names = self._terms(model, guide, args, kwargs, self.update_estimator)
        trainable = any(site["type"] == "param" for trace in traces for site in trace.nodes.values())
        if trainable and getattr(loss, "requires_grad", False):
            loss.backward(retain_graph=self.retain_graph)
        self._warn_if_nonfinite(value, names)
        return value
