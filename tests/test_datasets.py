"""``ppl_score.datasets``: the idx reader, where Fashion-MNIST / MNIST are looked for, and the
real files when they are installed (``make data``); skipped with a reason otherwise."""

from __future__ import annotations

import gzip
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

import ppl_score.datasets as ds
from tests.helpers.idx import FILES, fake_images, write_fake_fashion_mnist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def no_system_data(monkeypatch, tmp_path):
    """As on a machine without the data: no $PPL_SCORE_DATA, no Debian package."""
    monkeypatch.delenv("PPL_SCORE_DATA", raising=False)
    monkeypatch.setattr(ds, "DEBIAN_FASHION_MNIST", str(tmp_path / "no-debian-package"))


def _real_dir():
    try:
        return ds.find_idx_dir(split="train") if ds.find_idx_dir(split="test") else None
    except FileNotFoundError:
        return None


real_data = pytest.mark.skipif(
    _real_dir() is None, reason="Fashion-MNIST is not installed (`make data`, or set PPL_SCORE_DATA)"
)


# --------------------------------------------------------------------------------------
# The idx format


def test_read_idx_of_hand_written_bytes(tmp_path):
    # written here byte by byte, independently of write_idx: magic 0x00000803, dims big-endian
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    raw = b"\x00\x00\x08\x03" + struct.pack(">III", 2, 3, 4) + images.tobytes()
    (tmp_path / "plain").write_bytes(raw)
    with gzip.open(tmp_path / "zipped", "wb") as f:  # gzip is detected by content, not by name
        f.write(raw)
    for name in ("plain", "zipped"):
        out = ds.read_idx(tmp_path / name)
        assert out.dtype == np.uint8 and out.shape == (2, 3, 4)
        np.testing.assert_array_equal(out, images)
    labels = b"\x00\x00\x08\x01" + struct.pack(">I", 3) + bytes([7, 0, 9])
    (tmp_path / "labels").write_bytes(labels)
    np.testing.assert_array_equal(ds.read_idx(tmp_path / "labels"), [7, 0, 9])
    floats = b"\x00\x00\x0d\x01" + struct.pack(">I", 2) + struct.pack(">ff", 1.5, -2.0)
    (tmp_path / "floats").write_bytes(floats)
    out = ds.read_idx(tmp_path / "floats")
    assert out.dtype == np.float32 and out.dtype.isnative
    np.testing.assert_array_equal(out, [1.5, -2.0])


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_write_then_read_idx_round_trips(tmp_path, dtype, suffix):
    a = (np.arange(24).reshape(2, 3, 4) - 5).astype(dtype)
    path = tmp_path / ("a" + suffix)
    ds.write_idx(path, a)
    assert (path.read_bytes()[:2] == b"\x1f\x8b") == (suffix == ".gz")
    out = ds.read_idx(path)
    assert out.dtype == np.dtype(dtype) and out.dtype.isnative
    np.testing.assert_array_equal(out, a)


def test_bad_idx_files_raise_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such idx file"):
        ds.read_idx(tmp_path / "missing")
    (tmp_path / "png").write_bytes(b"\x89PNG\r\n\x1a\n")
    with pytest.raises(ValueError, match="not an idx file"):
        ds.read_idx(tmp_path / "png")
    (tmp_path / "short").write_bytes(b"\x00\x00\x08\x03" + struct.pack(">III", 2, 3, 4) + bytes(5))
    with pytest.raises(ValueError, match="truncated download"):
        ds.read_idx(tmp_path / "short")
    (tmp_path / "head").write_bytes(b"\x00\x00\x08\x03\x00")
    with pytest.raises(ValueError, match="truncated inside its header"):
        ds.read_idx(tmp_path / "head")
    (tmp_path / "bad.gz").write_bytes(b"\x1f\x8b" + bytes(10))
    with pytest.raises(ValueError, match="cannot read idx file"):
        ds.read_idx(tmp_path / "bad.gz")
    with pytest.raises(TypeError, match="argument 'array'"):
        ds.write_idx(tmp_path / "x", np.zeros(2, dtype=np.complex64))


# --------------------------------------------------------------------------------------
# Where the files are looked for


@pytest.mark.parametrize("gz", [True, False])
def test_load_fashion_mnist_from_path(tmp_path, gz, no_system_data):
    write_fake_fashion_mnist(tmp_path, n_train=20, n_test=10, gz=gz)
    images, labels = ds.load_fashion_mnist("train", tmp_path)
    expected, expected_labels = fake_images(20, 0)
    assert images.shape == (20, 28, 28) and images.dtype == np.float32
    np.testing.assert_allclose(images, expected / 255.0, rtol=1e-6)
    assert labels.dtype == np.int64
    np.testing.assert_array_equal(labels, expected_labels)
    test = ds.load_fashion_mnist("test", str(tmp_path), flatten=True, dtype=np.float64)
    assert test.images.shape == (10, 784) and test.images.dtype == np.float64
    assert 0.0 <= test.images.min() and test.images.max() <= 1.0


def test_search_order_env_then_debian(tmp_path, monkeypatch, no_system_data):
    env, sub, debian = tmp_path / "env", tmp_path / "env" / "fashion-mnist", tmp_path / "debian"
    write_fake_fashion_mnist(debian, n_train=12, n_test=4)
    monkeypatch.setattr(ds, "DEBIAN_FASHION_MNIST", str(debian))
    assert ds.find_idx_dir() == str(debian)  # nothing else: the Debian package
    assert len(ds.load_fashion_mnist("test").labels) == 4
    monkeypatch.setenv("PPL_SCORE_DATA", str(env))
    write_fake_fashion_mnist(env, n_train=11, n_test=5)
    assert ds.find_idx_dir() == str(env)  # $PPL_SCORE_DATA before the package
    write_fake_fashion_mnist(sub, n_train=10, n_test=6)
    assert ds.find_idx_dir() == str(sub)  # its fashion-mnist subdirectory first
    assert len(ds.load_fashion_mnist("train").labels) == 10
    # an explicit path is the only place looked at
    with pytest.raises(FileNotFoundError):
        ds.load_fashion_mnist("train", tmp_path / "elsewhere")
    # MNIST: $PPL_SCORE_DATA/mnist, never the Fashion-MNIST package
    write_fake_fashion_mnist(env / "mnist", n_train=9, n_test=3)
    assert len(ds.load_mnist("train").labels) == 9
    monkeypatch.delenv("PPL_SCORE_DATA")
    with pytest.raises(FileNotFoundError, match="Download MNIST"):
        ds.load_mnist("train")


def test_missing_data_says_how_to_get_it(tmp_path, monkeypatch, no_system_data):
    with pytest.raises(FileNotFoundError) as err:
        ds.load_fashion_mnist()
    message = str(err.value)
    for needed in ("make data", "apt-get install dataset-fashion-mnist", ds.FASHION_MNIST_URL, "PPL_SCORE_DATA"):
        assert needed in message
    # one split present, the other not: named
    write_fake_fashion_mnist(tmp_path / "d")
    for name in FILES["test"]:
        os.remove(tmp_path / "d" / (name + ".gz"))
    assert len(ds.load_fashion_mnist("train", tmp_path / "d").labels) == 64
    with pytest.raises(FileNotFoundError, match="'test' split not found.*t10k-images-idx3-ubyte"):
        ds.load_fashion_mnist("test", tmp_path / "d")


def test_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="argument 'split'"):
        ds.load_fashion_mnist("validation")
    with pytest.raises(TypeError, match="argument 'path'"):
        ds.load_fashion_mnist("train", 3)
    with pytest.raises(TypeError, match="argument 'dtype'"):
        ds.load_fashion_mnist("train", tmp_path, dtype=np.int32)
    with pytest.raises(TypeError, match="argument 'flatten'"):
        ds.load_fashion_mnist("train", tmp_path, flatten="yes")
    with pytest.raises(ValueError, match="argument 'dataset'"):
        ds.find_idx_dir(dataset="cifar")
    with pytest.raises(TypeError, match="argument 'split'.*got list"):
        ds.load_fashion_mnist(["train"])
    for bad in (None, "foo"):
        with pytest.raises(TypeError, match="argument 'dtype' must be a numpy floating dtype"):
            ds.load_fashion_mnist("train", tmp_path, dtype=bad)
    (tmp_path / "a-file").write_text("")
    with pytest.raises(ValueError, match="argument 'path' must be the directory.*a-file"):
        ds.load_fashion_mnist("train", tmp_path / "a-file")


def test_home_paths_numpy_bools_and_empty_splits(tmp_path, monkeypatch, no_system_data):
    """``~`` in ``path`` and in ``$PPL_SCORE_DATA`` is the home directory; ``flatten`` may be a
    numpy bool; a split of zero images flattens to ``[0, 784]``."""
    monkeypatch.setenv("HOME", str(tmp_path))
    write_fake_fashion_mnist(tmp_path / "data", n_train=5, n_test=3)
    assert len(ds.load_mnist("test", path="~/data").labels) == 3
    monkeypatch.setenv("PPL_SCORE_DATA", "~/data")
    assert ds.load_fashion_mnist("train", flatten=np.True_).images.shape == (5, 784)
    (tmp_path / "e").mkdir()
    ds.write_idx(tmp_path / "e" / "t10k-images-idx3-ubyte", np.zeros((0, 28, 28), np.uint8))
    ds.write_idx(tmp_path / "e" / "t10k-labels-idx1-ubyte", np.zeros(0, np.uint8))
    empty = ds.load_fashion_mnist("test", tmp_path / "e", flatten=True)
    assert empty.images.shape == (0, 784) and empty.labels.shape == (0,)


def test_a_ppl_score_data_without_the_files_warns_and_falls_back(tmp_path, monkeypatch):
    """A mistyped ``$PPL_SCORE_DATA`` is not silently replaced by the Debian package's data."""
    debian = tmp_path / "debian"
    write_fake_fashion_mnist(debian, n_train=7, n_test=2)
    monkeypatch.setattr(ds, "DEBIAN_FASHION_MNIST", str(debian))
    monkeypatch.setenv("PPL_SCORE_DATA", str(tmp_path / "nowhere"))
    with pytest.warns(UserWarning, match="PPL_SCORE_DATA=.*nowhere.*holds no fashion-mnist 'test' split; using"):
        assert len(ds.load_fashion_mnist("test").labels) == 2


def test_mismatched_files_are_rejected(tmp_path, no_system_data):
    write_fake_fashion_mnist(tmp_path)
    ds.write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(3, np.uint8))
    with pytest.raises(ValueError, match="one label per image"):
        ds.load_fashion_mnist("train", tmp_path)
    ds.write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((3, 28, 28), np.float32))
    with pytest.raises(ValueError, match="uint8 images"):
        ds.load_fashion_mnist("train", tmp_path)
    write_fake_fashion_mnist(tmp_path, n_train=4, n_test=2)
    ds.write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([0, 200], np.uint8))
    with pytest.raises(ValueError, match="class labels 0..9, got values in \\[0, 200\\]"):
        ds.load_fashion_mnist("test", tmp_path)


def test_old_demo_names_still_work_and_warn():
    code = (
        "import warnings\n"
        "import ppl_score.datasets as d, ppl_score.demo.datasets as new\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    f = d.mixture_dataset\n"
        "    d.load_fashion_mnist\n"
        "assert f is new.mixture_dataset\n"
        "assert len(w) == 1 and issubclass(w[0].category, DeprecationWarning), w\n"
        "assert 'deprecated alias' in str(w[0].message)\n"
        "try:\n"
        "    d.nope\n"
        "except AttributeError as e:\n"
        "    assert 'nope' in str(e)\n"
        "else:\n"
        "    raise SystemExit('no AttributeError')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env={**os.environ, "PYTHONWARNINGS": ""})


# --------------------------------------------------------------------------------------
# The real files


@real_data
def test_real_fashion_mnist():
    train, test = ds.load_fashion_mnist("train"), ds.load_fashion_mnist("test", flatten=True)
    assert train.images.shape == (60000, 28, 28) and test.images.shape == (10000, 784)
    for split in (train, test):
        assert split.images.dtype == np.float32
        assert split.images.min() == 0.0 and split.images.max() == 1.0
        # Fashion-MNIST is balanced: 6000 / 1000 images per class
        np.testing.assert_array_equal(np.bincount(split.labels), np.full(10, len(split.labels) // 10))
    # the first training labels of the official files (Ankle boot, T-shirt, T-shirt, Dress, ...)
    np.testing.assert_array_equal(train.labels[:6], [9, 0, 0, 3, 0, 2])
    assert ds.FASHION_MNIST_CLASSES[train.labels[0]] == "Ankle boot"
