r"""Goodness of fit of a fitted Pyro model by the kernel Stein discrepancy.

``goodness_of_fit(model, site, *args, **kwargs)`` tests whether the data observed at
``site`` are i.i.d. draws of the model, using only the model's score at them (so an
``Unnormalized`` site, whose normalizer is unknown, can be tested)::

    svi = SVI(model, lambda x: None, Adam({"lr": 1e-2}), loss=ScoreMatching("esm"))
    for _ in range(1000):
        svi.step(data)
    result = goodness_of_fit(model, "x", data)   # KSDTest(statistic, p_value)
    if result.p_value < 0.05: ...                 # the fitted model does not describe the data

The score is the one ``ScoreMatching`` matches (``ScoreMatching.datum_scores``): that of
the model's joint log density in the site's values, with the other observed sites
conditioned on and a constrained site in the unconstrained space of ``biject_to(support)``
(log-abs-det-Jacobian added); each data point of the site's plates is one point of the
test, masked points are left out. The statistic and the wild-bootstrap p-value are
``ppl_score.torch.stein.ksd_test``'s.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from ..common import stein as common
from ..common.validate import inference_mode_error, is_validation_enabled
from ..torch.distributed import check_generator
from ..torch.stein import KSDTest, ksd_test
from .score_matching import ScoreMatching

__all__ = ["KSDTest", "goodness_of_fit"]


def _no_guide(*args: Any, **kwargs: Any) -> None:
    return None


def goodness_of_fit(
    model: Callable,
    site: str,
    *args: Any,
    guide: Callable | None = None,
    n_bootstrap: int = 1000,
    kernel: str = "imq",
    c: float = 1.0,
    beta: float = -0.5,
    bandwidth: float | torch.Tensor | None = None,
    statistic: str = "u",
    chunk_size: int | None = None,
    weights: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    **kwargs: Any,
) -> KSDTest:
    r"""Kernel Stein discrepancy test of the data observed at ``site`` of
    ``model(*args, **kwargs)`` against the model [1, 2, 3].

    The points are the site's data points :math:`u_i` in unconstrained coordinates and the
    scores :math:`\nabla_u \log p(u_i, \text{rest})`, the score of the model's joint
    density that ``ScoreMatching(sites=[site])`` matches (``ScoreMatching.datum_scores``),
    at the parameters in Pyro's param store; ``ppl_score.torch.stein.ksd_test`` computes
    the squared KSD and its wild-bootstrap p-value. A small p-value says the data are
    unlikely under the fitted model. A subsampling plate tests the minibatch it draws.

    Args:
        model, site, \*args, \*\*kwargs: the model, its observed site, and the model's
            arguments (keyword arguments of the model must not be named like the options).
        guide: for a model with latent sites, a guide that draws them once (e.g. the fitted
            ``AutoDelta``); default: none (a model without latent sites).
        n_bootstrap, kernel, c, beta, bandwidth, statistic, chunk_size, weights, generator:
            as in ``ppl_score.torch.stein.ksd_test``.

    Returns:
        ``KSDTest(statistic, p_value)``, 0-d tensors.

    Raises:
        TypeError, ValueError: a bad option (checked before the model runs), a site that is
            not observed, discrete or whose data are not finite, or fewer than 2 unmasked
            data points (also when another site couples the data points).
        RuntimeError: under ``torch.inference_mode()`` (the score needs autograd;
            ``torch.no_grad()`` is fine).

    References:
        [1] Q. Liu, J. D. Lee, M. I. Jordan, "A kernelized Stein discrepancy for
        goodness-of-fit tests", ICML, 2016.

        [2] K. Chwialkowski, H. Strathmann, A. Gretton, "A kernel test of goodness of fit",
        ICML, 2016.

        [3] J. Gorham, L. Mackey, "Measuring sample quality with kernels", ICML, 2017.
    """
    common.check_goodness_of_fit_args(site, guide, n_bootstrap, kernel, c, beta, bandwidth, statistic, chunk_size)
    check_generator(generator)
    if torch.is_inference_mode_enabled():
        raise inference_mode_error("goodness_of_fit", "the model's score at the observed values")
    x, scores, w = ScoreMatching(sites=[site]).datum_scores(model, guide or _no_guide, *args, **kwargs)
    if w is not None:
        keep = w > 0
        x, scores = x[keep], scores[keep]
    if x.shape[0] < 2:
        raise common.too_few_points_error(site, int(x.shape[0]))
    if is_validation_enabled():
        common.check_site_scores(site, torch.isfinite(scores.detach()).all(-1).cpu().numpy())
    return ksd_test(
        x,
        scores,
        n_bootstrap=n_bootstrap,
        kernel=kernel,
        c=c,
        beta=beta,
        bandwidth=bandwidth,
        statistic=statistic,
        chunk_size=chunk_size,
        weights=weights,
        generator=generator,
    )
