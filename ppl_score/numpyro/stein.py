r"""Goodness of fit of a fitted NumPyro model by the kernel Stein discrepancy.

``goodness_of_fit(model, site, *args, rng_key=..., params=..., **kwargs)`` tests whether the
data observed at ``site`` are i.i.d. draws of the model, using only the model's score at
them (so an ``Unnormalized`` site, whose normalizer is unknown, can be tested)::

    svi = SVI(model, lambda x: None, optax.adam(1e-2), loss=ScoreMatching("esm"))
    result = svi.run(jax.random.key(0), 1000, data)
    test = goodness_of_fit(model, "x", data, rng_key=jax.random.key(1), params=result.params)

The score is the one ``ScoreMatching`` matches (``ScoreMatching.datum_scores``), as in
``ppl_score.pyro.stein``: the model's joint log density in the site's values, a constrained
site in unconstrained coordinates; masked points are left out. The statistic and the
wild-bootstrap p-value are ``ppl_score.jax.stein.ksd_test``'s. It runs eagerly (the number
of unmasked points sets the shapes); ``ppl_score.jax.stein.ksd_test`` itself is jit-friendly.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np
from jax import random

from ..common import stein as common
from ..common.validate import is_validation_enabled
from ..jax.stein import KSDTest, ksd_test
from ..jax.validate import check_key
from .score_matching import ScoreMatching

__all__ = ["KSDTest", "goodness_of_fit"]


def _no_guide(*args: Any, **kwargs: Any) -> None:
    return None


def _is_array(a: Any) -> bool:
    return isinstance(a, (jax.Array, np.ndarray))


def _datum_scores(loss, key, params, model, guide, args, kwargs):
    """``loss.datum_scores`` compiled as one program (the model's array arguments traced, the
    others fixed), far cheaper than running its many small operations one by one; eagerly
    for a model that needs concrete values, and eagerly again when the data turn out
    non-finite, so that the site's own check names the cause."""
    guide = guide or _no_guide
    leaves, treedef = jax.tree_util.tree_flatten((args, kwargs))

    def run(key, params, arrays):
        it = iter(arrays)
        a, kw = jax.tree_util.tree_unflatten(treedef, [next(it) if _is_array(v) else v for v in leaves])
        return loss.datum_scores(key, params, model, guide, *a, **kw)

    try:
        x, scores, w = jax.jit(run)(key, params, [v for v in leaves if _is_array(v)])
    # the model needs values (Python control flow on them, numpy conversions, int(...))
    except (
        jax.errors.ConcretizationTypeError,
        jax.errors.TracerArrayConversionError,
        jax.errors.TracerIntegerConversionError,
    ):
        return loss.datum_scores(key, params, model, guide, *args, **kwargs)
    if is_validation_enabled() and not np.isfinite(np.asarray(x)).all():
        return loss.datum_scores(key, params, model, guide, *args, **kwargs)  # raises, naming the site
    return x, scores, w


def goodness_of_fit(
    model: Callable,
    site: str,
    *args: Any,
    rng_key: jax.Array,
    params: dict | None = None,
    guide: Callable | None = None,
    n_bootstrap: int = 1000,
    kernel: str = "imq",
    c: float = 1.0,
    beta: float = -0.5,
    bandwidth: float | jax.Array | None = None,
    statistic: str = "u",
    chunk_size: int | None = None,
    weights: jax.Array | np.ndarray | None = None,
    **kwargs: Any,
) -> KSDTest:
    r"""Kernel Stein discrepancy test of the data observed at ``site`` of
    ``model(*args, **kwargs)`` against the model [1, 2, 3]; see
    ``ppl_score.pyro.stein.goodness_of_fit``.

    Args:
        model, site, \*args, \*\*kwargs: the model, its observed site, and the model's
            arguments (keyword arguments of the model must not be named like the options).
        rng_key: a ``jax.random`` key: split into the model's and guide's seed and the
            bootstrap's multipliers.
        params: the fitted parameters (``svi_result.params``), substituted into model and guide.
        guide: for a model with latent sites, a guide that draws them once (e.g. the fitted
            ``AutoDelta``); default: none.
        n_bootstrap, kernel, c, beta, bandwidth, statistic, chunk_size, weights: as in
            ``ppl_score.jax.stein.ksd_test``.

    Returns:
        ``KSDTest(statistic, p_value)``, 0-d arrays.

    Raises:
        TypeError, ValueError: a bad option or key (checked before the model runs), a site
            that is not observed, discrete or whose data are not finite, or fewer than 2
            unmasked data points (also when another site couples the data points).

    References:
        [1] Q. Liu, J. D. Lee, M. I. Jordan, "A kernelized Stein discrepancy for
        goodness-of-fit tests", ICML, 2016.

        [2] K. Chwialkowski, H. Strathmann, A. Gretton, "A kernel test of goodness of fit",
        ICML, 2016.

        [3] J. Gorham, L. Mackey, "Measuring sample quality with kernels", ICML, 2017.
    """
    common.check_goodness_of_fit_args(site, guide, n_bootstrap, kernel, c, beta, bandwidth, statistic, chunk_size)
    rng_key = check_key(rng_key, "rng_key")
    if params is not None and not isinstance(params, dict):
        raise TypeError(f"argument 'params' must be a dict, got {type(params).__name__}")
    model_key, boot_key = random.split(rng_key)
    x, scores, w = _datum_scores(ScoreMatching(sites=[site]), model_key, dict(params or {}), model, guide, args, kwargs)
    if w is not None:
        keep = np.asarray(w) > 0
        x, scores = x[keep], scores[keep]
    if x.shape[0] < 2:
        raise common.too_few_points_error(site, int(x.shape[0]))
    if is_validation_enabled():
        common.check_site_scores(site, np.isfinite(np.asarray(scores)).all(-1))
    return ksd_test(
        x,
        scores,
        key=boot_key,
        n_bootstrap=n_bootstrap,
        kernel=kernel,
        c=c,
        beta=beta,
        bandwidth=bandwidth,
        statistic=statistic,
        chunk_size=chunk_size,
        weights=weights,
    )
