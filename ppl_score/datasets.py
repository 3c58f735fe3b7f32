"""Real image data reachable offline: Fashion-MNIST (and MNIST) from their idx files.

numpy only (no torch, no JAX). Where the files are looked for, in order:

1. ``path=`` when given (only there);
2. ``$PPL_SCORE_DATA`` when set: the directory itself and its ``fashion-mnist`` (``mnist``)
   subdirectory;
3. the Debian / Ubuntu package ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``;
   ``make data`` installs it when apt is available and you are root).

Each split is two idx files, ``{train,t10k}-{images-idx3,labels-idx1}-ubyte``, plain or gzipped
(``.gz``), the format of LeCun et al.'s MNIST distribution, which Fashion-MNIST (Xiao, Rasul &
Vollgraf 2017, MIT licence) copies; so :func:`load_mnist` is the same reader pointed at MNIST's
files, which you download yourself (no PyPI or Debian package ships MNIST).

The demo's built-in data sets (the 2-D mixture, scikit-learn's digits, ``.npy`` arrays) live in
:mod:`ppl_score.demo.datasets`; their old names here (``mixture_dataset`` & co.) still work as
deprecated aliases that warn once.

References:
    1. H. Xiao, K. Rasul, R. Vollgraf. Fashion-MNIST: a Novel Image Dataset for Benchmarking
       Machine Learning Algorithms. arXiv:1708.07747, 2017.
    2. Y. LeCun, L. Bottou, Y. Bengio, P. Haffner. Gradient-based learning applied to document
       recognition. Proceedings of the IEEE 86(11), 1998 (the idx format: yann.lecun.com/exdb/mnist).
"""

from __future__ import annotations

import gzip
import os
import warnings
from typing import NamedTuple, Optional, Sequence

import numpy as np

__all__ = [
    "ImageData",
    "DEBIAN_FASHION_MNIST",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_URL",
    "read_idx",
    "write_idx",
    "find_idx_dir",
    "load_fashion_mnist",
    "load_mnist",
]

DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_URL = "https://github.com/zalandoresearch/fashion-mnist"
MNIST_URL = "https://yann.lecun.com/exdb/mnist/"
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

_SPLITS = {"train": "train", "test": "t10k"}

# idx type codes (the third byte of the magic number) and their big-endian numpy dtypes
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_IDX_CODES = {np.dtype(v).newbyteorder("="): k for k, v in _IDX_DTYPES.items()}


class ImageData(NamedTuple):
    """One split: ``images`` float ``[N, 28, 28]`` (or ``[N, 784]`` with ``flatten=True``) in
    ``[0, 1]`` (pixel / 255), ``labels`` int64 ``[N]`` (class names in
    :data:`FASHION_MNIST_CLASSES`). Unpacks as ``images, labels = load_fashion_mnist()``."""

    images: np.ndarray
    labels: np.ndarray


def _open(path: str):
    with open(path, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gzipped else open(path, "rb")


def read_idx(path) -> np.ndarray:
    """The array in one idx file (plain or gzipped), in its stored dtype (``uint8`` for MNIST's).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not idx (bad magic number, unknown type code) or is truncated
            or longer than its header says.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such idx file {path!r}")
    try:
        with _open(path) as f:
            raw = f.read()
    except (OSError, EOFError) as err:  # a corrupt .gz
        raise ValueError(f"cannot read idx file {path!r}: {err}") from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        raise ValueError(f"{path!r} is not an idx file (its magic number is {raw[:4].hex() or 'missing'})")
    dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"idx file {path!r} is truncated inside its header")
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(
            f"idx file {path!r} holds {len(raw) - header} data bytes but its header {shape} of {dtype.name} "
            f"needs {expected - header} (a truncated download?)"
        )
    return np.frombuffer(raw, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def write_idx(path, array, *, compress: Optional[bool] = None) -> None:
    """Write ``array`` as an idx file (gzipped when ``compress`` or the name ends in ``.gz``),
    e.g. to make small stand-in files with the real files' names for tests."""
    a = np.asarray(array)
    code = _IDX_CODES.get(a.dtype.newbyteorder("="))
    if code is None:
        raise TypeError(f"argument 'array': idx stores uint8/int8/int16/int32/float32/float64, got {a.dtype}")
    if not 1 <= a.ndim <= 255:
        raise ValueError(f"argument 'array' must have 1 to 255 dimensions, got shape {a.shape}")
    path = os.fspath(path)
    header = bytes([0, 0, code, a.ndim]) + np.asarray(a.shape, ">u4").tobytes()
    payload = header + a.astype(_IDX_DTYPES[code]).tobytes()
    compress = path.endswith(".gz") if compress is None else compress
    with gzip.open(path, "wb") if compress else open(path, "wb") as f:
        f.write(payload)


def _candidates(path, subdir: str, system: Sequence[str]) -> tuple[list[str], list[str]]:
    """The directories to search, in order, and those of them that ``$PPL_SCORE_DATA`` names."""
    if path is not None:
        return [os.path.expanduser(os.fsdecode(path))], []
    env = os.environ.get("PPL_SCORE_DATA")
    dirs = [os.path.join(os.path.expanduser(env), subdir), os.path.expanduser(env)] if env else []
    return dirs + list(system), dirs


def _split_files(directory: str, split: str) -> Optional[tuple[str, str]]:
    prefix = _SPLITS[split]
    found = []
    for kind in ("images-idx3", "labels-idx1"):
        name = os.path.join(directory, f"{prefix}-{kind}-ubyte")
        for candidate in (name, name + ".gz"):
            if os.path.isfile(candidate):
                found.append(candidate)
                break
        else:
            return None
    return found[0], found[1]


def find_idx_dir(path=None, *, split: str = "train", dataset: str = "fashion-mnist") -> str:
    """The first directory, in the search order of this module, that holds ``split``'s two
    idx files of ``dataset`` (``"fashion-mnist"`` or ``"mnist"``).

    ``path`` and ``$PPL_SCORE_DATA`` may start with ``~``. When ``$PPL_SCORE_DATA`` is set but
    holds no such files, the search goes on (to the Debian package) with a ``UserWarning``.

    Raises:
        FileNotFoundError: with where it looked and how to get the data.
        TypeError, ValueError: a bad ``split``, ``dataset`` or ``path`` (a file, not a directory).
    """
    if dataset not in ("fashion-mnist", "mnist"):
        raise ValueError(f"argument 'dataset' must be 'fashion-mnist' or 'mnist', got {dataset!r}")
    if not isinstance(split, str):
        raise TypeError(f"argument 'split' must be 'train' or 'test' (a str), got {type(split).__name__}")
    if split not in _SPLITS:
        raise ValueError(f"argument 'split' must be 'train' or 'test', got {split!r}")
    if path is not None and not isinstance(path, (str, bytes, os.PathLike)):
        raise TypeError(f"argument 'path' must be a directory name (str or os.PathLike), got {type(path).__name__}")
    system = [DEBIAN_FASHION_MNIST] if dataset == "fashion-mnist" else []
    looked, from_env = _candidates(path, dataset, system)
    if path is not None and os.path.exists(looked[0]) and not os.path.isdir(looked[0]):
        raise ValueError(f"argument 'path' must be the directory holding the idx files, got the file {looked[0]!r}")
    for directory in looked:
        if _split_files(directory, split) is not None:
            if from_env and directory not in from_env:
                warnings.warn(
                    f"PPL_SCORE_DATA={os.environ['PPL_SCORE_DATA']!r} holds no {dataset} {split!r} split; "
                    f"using {directory!r} instead",
                    UserWarning,
                    stacklevel=3,
                )
            return directory
    prefix = _SPLITS[split]
    files = f"{prefix}-images-idx3-ubyte[.gz] and {prefix}-labels-idx1-ubyte[.gz]"
    if dataset == "fashion-mnist":
        how = (
            "Get it with `make data`, or `sudo apt-get install dataset-fashion-mnist` on Debian/Ubuntu; "
            f"elsewhere download the four idx files from {FASHION_MNIST_URL} and pass path=DIR or set "
            "PPL_SCORE_DATA=DIR."
        )
    else:
        how = f"Download MNIST's four idx files (e.g. from {MNIST_URL}) and pass path=DIR or set PPL_SCORE_DATA=DIR."
    where = ", ".join(repr(d) for d in looked) or "nowhere (pass path= or set PPL_SCORE_DATA)"
    raise FileNotFoundError(f"{dataset} {split!r} split not found: looked for {files} in {where}. {how}")


def _load(dataset: str, split: str, path, flatten: bool, dtype) -> ImageData:
    if not isinstance(flatten, (bool, np.bool_)):
        raise TypeError(f"argument 'flatten' must be a bool, got {type(flatten).__name__}")
    if dtype is None:
        raise TypeError("argument 'dtype' must be a numpy floating dtype (e.g. np.float32), got None")
    try:
        dtype = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"argument 'dtype' must be a numpy floating dtype (e.g. np.float32), got {dtype!r}") from None
    if dtype.kind != "f":
        raise TypeError(f"argument 'dtype' must be a floating dtype, got {dtype}")
    directory = find_idx_dir(path, split=split, dataset=dataset)
    images_file, labels_file = _split_files(directory, split)
    images, labels = read_idx(images_file), read_idx(labels_file)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"{images_file!r} must hold uint8 images [N, H, W], got {images.dtype} {images.shape}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise ValueError(
            f"{labels_file!r} must hold one label per image ({len(images)}), got {labels.dtype} {labels.shape}"
        )
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"{labels_file!r} must hold class labels 0..9, got values in [{labels.min()}, {labels.max()}]")
    x = images.astype(dtype) / dtype.type(255)
    if flatten:
        x = x.reshape(len(x), images.shape[1] * images.shape[2])
    return ImageData(images=x, labels=labels.astype(np.int64))


def load_fashion_mnist(split: str = "train", path=None, *, flatten: bool = False, dtype=np.float32) -> ImageData:
    """Fashion-MNIST's ``split`` (``"train"``: 60000 images, ``"test"``: 10000), 28x28 grey
    images as floats in ``[0, 1]`` with their labels 0..9.

    Args:
        split: ``"train"`` or ``"test"``.
        path: the directory holding the idx files; default: ``$PPL_SCORE_DATA`` (or its
            ``fashion-mnist`` subdirectory), else the Debian package's
            ``/usr/share/datasets/fashion-mnist``.
        flatten: ``[N, 784]`` instead of ``[N, 28, 28]``.
        dtype: a numpy floating dtype (default float32).

    Returns:
        :class:`ImageData` ``(images, labels)``. The pixels are ``k / 255``, not dequantized:
        score matching needs a density, so dequantize (e.g. ``(k + 1/2 + N(0, 1)) / 256`` as the
        demo does) before fitting.

    Raises:
        FileNotFoundError: the files are nowhere; the message says how to get them.
        TypeError: a bad ``split``, ``path``, ``flatten`` or ``dtype``.
        ValueError: an unknown ``split``, a ``path`` that is a file, or a file that is not idx,
            is truncated, or does not hold ``uint8`` images and labels 0..9.
    """
    return _load("fashion-mnist", split, path, flatten, dtype)


def load_mnist(split: str = "train", path=None, *, flatten: bool = False, dtype=np.float32) -> ImageData:
    """MNIST from its idx files (same reader and arguments as :func:`load_fashion_mnist`);
    looked for in ``path``, else ``$PPL_SCORE_DATA/mnist`` and ``$PPL_SCORE_DATA``."""
    return _load("mnist", split, path, flatten, dtype)


def __getattr__(name: str):
    # The demo's data sets lived here before 0.3; their old names keep working and warn.
    from .demo import datasets as _demo_datasets

    if name in _demo_datasets.__all__:
        warnings.warn(
            f"ppl_score.datasets.{name} moved to ppl_score.demo.datasets.{name}; the old name is a deprecated alias",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(_demo_datasets, name)
    raise AttributeError(f"module 'ppl_score.datasets' has no attribute {name!r}")
