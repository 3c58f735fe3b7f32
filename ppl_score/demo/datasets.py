"""Data sets for the demo and the examples (numpy only; no torch, no JAX).

- ``mixture``: a built-in 2-D Gaussian mixture whose log density, score and Hessian trace
  are known exactly, so a fitted model can be scored by its Fisher divergence.
- ``load_digits``: scikit-learn's bundled 8x8 digits (no download), dequantized.
- ``fashion_mnist_dataset``: Fashion-MNIST's idx files (see :mod:`ppl_score.datasets`), dequantized.
- ``load_array``: a user's ``.npy`` / ``.npz`` file (e.g. MNIST or CelebA as arrays).

Every loader returns a :class:`Dataset` with float64 ``train`` / ``test`` arrays of shape
``[N, *event]``.
"""

from __future__ import annotations

import math
import os
from typing import Callable, NamedTuple, Optional

import numpy as np

__all__ = [
    "Dataset",
    "GaussianMixture",
    "DEFAULT_MIXTURE",
    "mixture_log_prob",
    "mixture_score",
    "mixture_hessian_trace",
    "mixture_sample",
    "mixture_dataset",
    "make_mixture",
    "load_digits",
    "fashion_mnist_dataset",
    "load_array",
    "get_dataset",
    "data_scale",
]


class Dataset(NamedTuple):
    """A train / test split. ``log_prob`` / ``score`` / ``hessian_trace`` are the true
    density's (numpy ``[N, *event] -> [N]`` / ``[N, *event]`` / ``[N]``) when known, else
    ``None``. ``image_shape`` is how one example is drawn as an image (``None``: not an
    image)."""

    name: str
    train: np.ndarray
    test: np.ndarray
    log_prob: Optional[Callable[[np.ndarray], np.ndarray]] = None
    score: Optional[Callable[[np.ndarray], np.ndarray]] = None
    hessian_trace: Optional[Callable[[np.ndarray], np.ndarray]] = None
    image_shape: Optional[tuple] = None

    @property
    def event_shape(self) -> tuple:
        return tuple(self.train.shape[1:])

    @property
    def dim(self) -> int:
        return int(math.prod(self.event_shape))


def data_scale(x: np.ndarray) -> float:
    """Root-mean-square per-coordinate standard deviation of ``x[N, *event]``: the length
    scale used to set DSM's ``sigma``, the finite-difference ``eps`` and the energy's
    quadratic term."""
    flat = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    scale = float(np.sqrt(flat.var(axis=0).mean()))
    if not math.isfinite(scale) or scale <= 0.0:
        raise ValueError("the data has no spread (every example is the same); cannot set a length scale")
    return scale


# --------------------------------------------------------------------------------------
# The 2-D Gaussian mixture


class GaussianMixture(NamedTuple):
    """``p(x) = sum_k w_k N(x; mu_k, Sigma_k)``; ``weights [K]``, ``means [K, D]``,
    ``covariances [K, D, D]``."""

    weights: np.ndarray
    means: np.ndarray
    covariances: np.ndarray


def make_mixture(weights, means, covariances) -> GaussianMixture:
    """Validated, float64, read-only copy of the mixture's parameters."""
    w = np.array(weights, dtype=np.float64)
    mu = np.array(means, dtype=np.float64)
    cov = np.array(covariances, dtype=np.float64)
    if w.ndim != 1 or mu.ndim != 2 or cov.ndim != 3:
        raise ValueError("argument 'weights', 'means', 'covariances' must have shapes [K], [K, D], [K, D, D]")
    k, d = mu.shape
    if w.shape != (k,) or cov.shape != (k, d, d):
        raise ValueError(
            f"argument 'covariances' / 'weights' disagree with 'means' {mu.shape}: got {cov.shape} / {w.shape}"
        )
    if not (np.all(w > 0) and abs(w.sum() - 1.0) < 1e-12):
        raise ValueError(f"argument 'weights' must be positive and sum to 1, got {w}")
    if not np.allclose(cov, np.swapaxes(cov, -1, -2)) or np.any(np.linalg.eigvalsh(cov) <= 0):
        raise ValueError("argument 'covariances' must be symmetric positive definite")
    for a in (w, mu, cov):
        a.setflags(write=False)
    return GaussianMixture(w, mu, cov)


# Three tilted, overlapping components: multimodal but with enough mass between the modes
# that score matching can recover the mixing weights (for well separated modes it cannot,
# since the score is blind to their relative weights).
DEFAULT_MIXTURE = make_mixture(
    weights=[0.4, 0.35, 0.25],
    means=[[-1.2, -0.7], [1.3, -0.5], [0.0, 1.3]],
    covariances=[
        [[0.40, 0.18], [0.18, 0.25]],
        [[0.30, -0.12], [-0.12, 0.30]],
        [[0.50, 0.0], [0.0, 0.12]],
    ],
)


def _components(x: np.ndarray, mixture: GaussianMixture):
    """Responsibilities ``r [N, K]``, component scores ``g_k = -P_k (x - mu_k)`` ``[N, K, D]``,
    ``tr P_k`` ``[K]`` and ``log p(x)`` ``[N]``."""
    x = np.asarray(x, dtype=np.float64)
    d = mixture.means.shape[1]
    if x.ndim != 2 or x.shape[1] != d:
        raise ValueError(f"argument 'x' must have shape [N, {d}], got {x.shape}")
    prec = np.linalg.inv(mixture.covariances)  # [K, D, D]
    _, logdet = np.linalg.slogdet(mixture.covariances)
    diff = x[:, None, :] - mixture.means[None]  # [N, K, D]
    g = -np.einsum("kij,nkj->nki", prec, diff)
    log_comp = (
        np.log(mixture.weights) - 0.5 * (logdet + d * math.log(2 * math.pi)) + 0.5 * np.einsum("nki,nki->nk", diff, g)
    )
    top = log_comp.max(axis=1, keepdims=True)
    log_p = top[:, 0] + np.log(np.exp(log_comp - top).sum(axis=1))
    r = np.exp(log_comp - log_p[:, None])
    return r, g, np.trace(prec, axis1=1, axis2=2), log_p


def mixture_log_prob(x: np.ndarray, mixture: GaussianMixture = DEFAULT_MIXTURE) -> np.ndarray:
    """``log p(x)`` (normalized), ``[N, D] -> [N]``."""
    return _components(x, mixture)[3]


def mixture_score(x: np.ndarray, mixture: GaussianMixture = DEFAULT_MIXTURE) -> np.ndarray:
    """``s(x) = sum_k r_k(x) g_k(x)`` with ``g_k = -P_k (x - mu_k)``, ``[N, D] -> [N, D]``."""
    r, g, _, _ = _components(x, mixture)
    return np.einsum("nk,nki->ni", r, g)


def mixture_hessian_trace(x: np.ndarray, mixture: GaussianMixture = DEFAULT_MIXTURE) -> np.ndarray:
    """``tr H(x) = sum_k r_k (||g_k||^2 - tr P_k) - ||s||^2`` (from ``grad r_k = r_k (g_k - s)``),
    ``[N, D] -> [N]``."""
    r, g, tr_prec, _ = _components(x, mixture)
    s = np.einsum("nk,nki->ni", r, g)
    return np.einsum("nk,nk->n", r, (g * g).sum(-1) - tr_prec[None]) - (s * s).sum(-1)


def mixture_sample(rng: np.random.Generator, n: int, mixture: GaussianMixture = DEFAULT_MIXTURE) -> np.ndarray:
    """``n`` draws ``[n, D]``."""
    k = rng.choice(len(mixture.weights), size=n, p=mixture.weights)
    chol = np.linalg.cholesky(mixture.covariances)
    z = rng.standard_normal((n, mixture.means.shape[1]))
    return mixture.means[k] + np.einsum("nij,nj->ni", chol[k], z)


def mixture_dataset(
    n_train: int = 10_000, n_test: int = 5_000, seed: int = 0, mixture: GaussianMixture = DEFAULT_MIXTURE
) -> Dataset:
    """Train and held-out draws from ``mixture`` with its exact log density and score."""
    rng = np.random.default_rng([seed, 1])
    return Dataset(
        name="mixture",
        train=mixture_sample(rng, n_train, mixture),
        test=mixture_sample(rng, n_test, mixture),
        log_prob=lambda x: mixture_log_prob(x, mixture),
        score=lambda x: mixture_score(x, mixture),
        hessian_trace=lambda x: mixture_hessian_trace(x, mixture),
    )


# --------------------------------------------------------------------------------------
# Array data sets


_SCALINGS = ("unit", "standardize")


def _split(x: np.ndarray, test_fraction: float, rng: np.random.Generator):
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"argument 'test_fraction' must be in (0, 1), got {test_fraction!r}")
    n_test = int(round(test_fraction * len(x)))
    if n_test < 1 or n_test >= len(x):
        raise ValueError(f"cannot split {len(x)} examples with test_fraction={test_fraction}")
    perm = rng.permutation(len(x))
    return x[perm[n_test:]], x[perm[:n_test]]


def _finish(name, x, *, levels, scaling, test_fraction, seed, image_shape, x_test=None) -> Dataset:
    """Dequantize (when the data are integer ``levels``), split, and scale.

    Integer pixel values ``k`` become ``(k + 1/2 + z) / levels``, ``z ~ N(0, 1)``: a smooth
    density on about ``[0, 1]``. Score matching is ill-posed on a lattice, and with the usual
    uniform dequantization too (that density jumps at the cell edges, so a model sharpening
    onto pixels that never vary drives the objective to minus infinity); Gaussian noise of
    one level keeps it finite.
    """
    if scaling not in _SCALINGS:
        raise ValueError(f"argument 'scaling' must be one of {_SCALINGS}, got {scaling!r}")
    rng = np.random.default_rng([seed, 2])
    parts = [a.astype(np.float64) for a in ((x,) if x_test is None else (x, x_test))]
    if levels is not None:
        parts = [(a + 0.5 + rng.standard_normal(a.shape)) / levels for a in parts]
    if not all(np.isfinite(a).all() for a in parts):
        raise ValueError(f"data set {name!r} contains non-finite values (nan or inf)")
    train, test = _split(parts[0], test_fraction, rng) if x_test is None else parts
    if scaling == "standardize":
        mean, std = train.mean(axis=0), train.std(axis=0)
        std = np.where(std > 0, std, 1.0)
        train, test = (train - mean) / std, (test - mean) / std
    return Dataset(name=name, train=train, test=test, image_shape=image_shape)


def load_digits(scaling: str = "unit", test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """scikit-learn's bundled 8x8 digits (1797 images, pixel values 0..16), flattened to
    ``[N, 64]``, dequantized to about ``[0, 1]`` (``scaling="unit"``) or then standardized per
    pixel with the training statistics (``scaling="standardize"``)."""
    try:
        from sklearn.datasets import load_digits as _sk_load_digits
    except ImportError as err:  # pragma: no cover - dev extra
        raise ImportError("--data digits needs scikit-learn (pip install scikit-learn)") from err
    images = _sk_load_digits().data  # [1797, 64], integers 0..16
    return _finish(
        "digits", images, levels=17, scaling=scaling, test_fraction=test_fraction, seed=seed, image_shape=(8, 8)
    )


def fashion_mnist_dataset(
    scaling: str = "unit", seed: int = 0, max_examples: Optional[int] = None, path=None
) -> Dataset:
    """Fashion-MNIST's official train / test split (60000 / 10000 images of 28x28), flattened
    to ``[N, 784]`` and dequantized to about ``[0, 1]`` like the digits (pixel ``k`` becomes
    ``(k + 1/2 + z) / 256``, ``z ~ N(0, 1)``), or then standardized (``scaling="standardize"``).
    ``max_examples`` keeps a random subset of the training images (the test split is whole).
    The files are found as :func:`ppl_score.datasets.load_fashion_mnist` finds them."""
    from ..datasets import load_fashion_mnist as _load

    train = _load("train", path, flatten=True).images
    test = _load("test", path, flatten=True).images
    if max_examples is not None:
        if max_examples < 2:
            raise ValueError(f"argument 'max_examples' must be >= 2, got {max_examples}")
        if len(train) > max_examples:
            train = train[np.sort(np.random.default_rng([seed, 3]).choice(len(train), max_examples, replace=False))]
    # back to the integer pixels, so the dequantization noise is one grey level as for the digits
    pixels = [np.rint(a * 255.0) for a in (train, test)]
    return _finish(
        "fashion-mnist",
        pixels[0],
        x_test=pixels[1],
        levels=256.0,
        scaling=scaling,
        test_fraction=0.5,
        seed=seed,
        image_shape=(28, 28),
    )


def _image_shape(event_shape: tuple) -> Optional[tuple]:
    """How to draw one example: ``[H, W]`` / ``[H, W, C]`` events as they are, a flat event
    of square size as a square, anything else not as an image."""
    if len(event_shape) == 2 and min(event_shape) > 1:
        return event_shape
    if len(event_shape) == 3 and event_shape[-1] in (1, 3):
        return event_shape if event_shape[-1] == 3 else event_shape[:2]
    if len(event_shape) == 3 and event_shape[0] in (1, 3):  # channels first
        return None
    if len(event_shape) == 1:
        side = math.isqrt(event_shape[0])
        if side > 1 and side * side == event_shape[0]:
            return (side, side)
    return None


def load_array(
    path,
    key: Optional[str] = None,
    *,
    scaling: str = "unit",
    test_fraction: float = 0.2,
    seed: int = 0,
    max_examples: Optional[int] = None,
) -> Dataset:
    """A user's data set from ``path``: a ``.npy`` array or a ``.npz`` archive.

    The array has shape ``[N, *event]`` (e.g. MNIST ``[70000, 28, 28]`` or ``[N, 784]``,
    CelebA ``[N, 64, 64, 3]``). In a ``.npz``, ``key`` names the array; without it the
    archive must hold one array or one named ``x``, ``X``, ``data``, ``images`` or ``train``.
    Unsigned-integer data (``uint8`` images) are dequantized to about ``[0, 1]`` like the digits;
    float data are used as they are (``scaling="standardize"`` standardizes either).
    ``max_examples`` keeps a random subset. Nothing is unpickled.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"argument 'path': no such file {path!r}")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".npy":
        if key is not None:
            raise ValueError("argument 'key' only applies to .npz archives")
        x = np.load(path, allow_pickle=False)
    elif ext == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            names = list(archive.keys())
            if key is None:
                preferred = [n for n in ("x", "X", "data", "images", "train") if n in names]
                if len(names) == 1:
                    key = names[0]
                elif preferred:
                    key = preferred[0]
                else:
                    raise ValueError(f"argument 'key' is required: {path!r} holds several arrays {names}")
            if key not in names:
                raise ValueError(f"argument 'key': {path!r} holds no array {key!r} (it holds {names})")
            x = archive[key]
    else:
        raise ValueError(f"argument 'path' must be a .npy or .npz file, got {path!r}")
    if x.dtype.kind not in "uif":
        raise TypeError(f"the array in {path!r} must be numeric, got dtype {x.dtype}")
    if x.ndim < 2:
        raise ValueError(
            f"the array in {path!r} must have shape [N, *event], got {x.shape} (reshape 1-D data to [N, 1])"
        )
    if max_examples is not None:
        if max_examples < 2:
            raise ValueError(f"argument 'max_examples' must be >= 2, got {max_examples}")
        if len(x) > max_examples:
            x = x[np.sort(np.random.default_rng([seed, 3]).choice(len(x), max_examples, replace=False))]
    levels = None
    if x.dtype.kind == "u":
        levels = float(np.iinfo(x.dtype).max) + 1.0 if x.dtype.itemsize == 1 else float(x.max()) + 1.0
    name = os.path.splitext(os.path.basename(path))[0]
    return _finish(
        name,
        x,
        levels=levels,
        scaling=scaling,
        test_fraction=test_fraction,
        seed=seed,
        image_shape=_image_shape(tuple(x.shape[1:])),
    )


def get_dataset(
    data: str, *, seed: int = 0, scaling: str = "unit", key: Optional[str] = None, max_examples: Optional[int] = None
) -> Dataset:
    """``"mixture"``, ``"digits"``, ``"fashion-mnist"``, or a path to a ``.npy`` / ``.npz`` file."""
    if data == "mixture":
        return mixture_dataset(seed=seed)
    if data == "digits":
        return load_digits(scaling=scaling, seed=seed)
    if data == "fashion-mnist":
        return fashion_mnist_dataset(scaling=scaling, seed=seed, max_examples=max_examples)
    return load_array(data, key, scaling=scaling, seed=seed, max_examples=max_examples)
