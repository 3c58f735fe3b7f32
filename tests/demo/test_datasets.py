"""The demo's data sets (``ppl_score.demo.datasets``): the mixture's exact density, score and Hessian trace, and array loading."""

from __future__ import annotations

import numpy as np
import pytest

from ppl_score.demo import datasets

# --------------------------------------------------------------------------------------
# The mixture's exact log density, score and Hessian trace


def test_mixture_score_is_gradient_of_log_density():
    x = np.random.default_rng(0).normal(scale=1.5, size=(50, 2))
    h = 1e-5
    eye = np.eye(2)
    fd = np.stack(
        [(datasets.mixture_log_prob(x + h * e) - datasets.mixture_log_prob(x - h * e)) / (2 * h) for e in eye], -1
    )
    # central differences: error ~ h^2 |f'''| + roundoff |f| eps / h, both below 1e-8 here
    np.testing.assert_allclose(datasets.mixture_score(x), fd, rtol=0, atol=1e-7)


def test_mixture_hessian_trace_is_divergence_of_score():
    x = np.random.default_rng(1).normal(scale=1.5, size=(50, 2))
    h = 1e-5
    fd = sum(
        (datasets.mixture_score(x + h * e)[:, i] - datasets.mixture_score(x - h * e)[:, i]) / (2 * h)
        for i, e in enumerate(np.eye(2))
    )
    np.testing.assert_allclose(datasets.mixture_hessian_trace(x), fd, rtol=0, atol=1e-6)


def test_mixture_density_is_normalized_and_samples_match_it():
    m = datasets.DEFAULT_MIXTURE
    g = np.linspace(-7, 7, 701)
    xx, yy = np.meshgrid(g, g)
    p = np.exp(datasets.mixture_log_prob(np.stack([xx.ravel(), yy.ravel()], -1)))
    assert abs(p.sum() * (g[1] - g[0]) ** 2 - 1.0) < 1e-6

    n = 40_000
    x = datasets.mixture_sample(np.random.default_rng(2), n)
    mean = m.weights @ m.means
    second = np.einsum("k,kij->ij", m.weights, m.covariances + np.einsum("ki,kj->kij", m.means, m.means))
    cov = second - np.outer(mean, mean)
    # 5 standard errors of the sample mean
    assert np.all(np.abs(x.mean(0) - mean) < 5 * np.sqrt(np.diag(cov) / n))
    np.testing.assert_allclose(np.cov(x.T), cov, atol=0.05)


def test_make_mixture_rejects_bad_parameters():
    with pytest.raises(ValueError, match="weights"):
        datasets.make_mixture([0.5, 0.6], [[0, 0], [1, 1]], [np.eye(2)] * 2)
    with pytest.raises(ValueError, match="positive definite"):
        datasets.make_mixture([1.0], [[0, 0]], [[[1, 2], [2, 1]]])
    with pytest.raises(ValueError, match="x"):
        datasets.mixture_score(np.zeros((3, 3)))


# --------------------------------------------------------------------------------------
# Array data sets


def test_load_digits():
    pytest.importorskip("sklearn")
    d = datasets.load_digits()
    assert d.train.shape[1:] == (64,) and d.image_shape == (8, 8)
    assert len(d.train) + len(d.test) == 1797
    # Gaussian dequantization of one level (std 1/17) around (k + 1/2) / 17
    assert -0.35 < d.train.min() and d.train.max() < 1.35
    z = datasets.load_digits(scaling="standardize")
    np.testing.assert_allclose(z.train.mean(0), 0, atol=1e-10)
    np.testing.assert_allclose(z.train.std(0), 1, atol=1e-10)


def test_load_array_npy_and_npz(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(50, 6, 6), dtype=np.uint8)
    np.save(tmp_path / "imgs.npy", images)
    d = datasets.load_array(tmp_path / "imgs.npy", test_fraction=0.2)
    assert d.train.shape == (40, 6, 6) and d.test.shape == (10, 6, 6) and d.image_shape == (6, 6)
    assert d.train.dtype == np.float64
    # uint8 values k become (k + 1/2 + z) / 256 with z ~ N(0, 1)
    assert abs(np.concatenate([d.train, d.test]).mean() - (images.mean() + 0.5) / 256) < 0.01

    points = rng.normal(size=(30, 2)).astype(np.float32)
    np.savez(tmp_path / "pts.npz", x=points, labels=np.arange(30))
    d = datasets.load_array(tmp_path / "pts.npz")  # picks "x"
    np.testing.assert_allclose(np.sort(np.concatenate([d.train, d.test]), 0), np.sort(points, 0), rtol=1e-7)
    assert d.image_shape is None
    with pytest.raises(ValueError, match=r"\[N, \*event\]"):
        datasets.load_array(tmp_path / "pts.npz", "labels")  # 1-D

    np.savez(tmp_path / "two.npz", a=points, b=points)
    with pytest.raises(ValueError, match="key"):
        datasets.load_array(tmp_path / "two.npz")
    with pytest.raises(ValueError, match="key"):
        datasets.load_array(tmp_path / "two.npz", key="c")
    np.save(tmp_path / "flat.npy", np.arange(10.0))
    with pytest.raises(ValueError, match=r"\[N, \*event\]"):
        datasets.load_array(tmp_path / "flat.npy")
    np.save(tmp_path / "bad.npy", np.array([[0.0, np.nan], [1.0, 2.0], [3.0, 4.0]]))
    with pytest.raises(ValueError, match="non-finite"):
        datasets.load_array(tmp_path / "bad.npy", test_fraction=0.34)
    with pytest.raises(ValueError, match="path"):
        datasets.load_array(tmp_path / "missing.npy")
    (tmp_path / "x.csv").write_text("1,2\n")
    with pytest.raises(ValueError, match=".npy or .npz"):
        datasets.load_array(tmp_path / "x.csv")


def test_fashion_mnist_dataset_on_stand_in_files(tmp_path, monkeypatch):
    from tests.helpers.idx import fake_images, write_fake_fashion_mnist

    monkeypatch.setenv("PPL_SCORE_DATA", write_fake_fashion_mnist(tmp_path, n_train=50, n_test=20))
    d = datasets.get_dataset("fashion-mnist")
    assert d.name == "fashion-mnist" and d.image_shape == (28, 28)
    assert d.train.shape == (50, 784) and d.test.shape == (20, 784)  # the official split, whole
    # dequantized by one grey level of Gaussian noise around the pixel centres
    pixels = fake_images(50, 0)[0].reshape(50, 784)
    noise = d.train * 256.0 - (pixels + 0.5)
    assert abs(noise.mean()) < 0.02 and abs(noise.std() - 1.0) < 0.02
    sub = datasets.get_dataset("fashion-mnist", max_examples=10)
    assert sub.train.shape == (10, 784) and sub.test.shape == (20, 784)
    z = datasets.get_dataset("fashion-mnist", scaling="standardize")
    np.testing.assert_allclose(z.train.mean(axis=0), 0.0, atol=1e-9)
    with pytest.raises(ValueError, match="max_examples"):
        datasets.get_dataset("fashion-mnist", max_examples=1)
