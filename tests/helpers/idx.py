"""Small stand-in Fashion-MNIST idx files for tests that must run without the real data."""

from __future__ import annotations

import os

import numpy as np

from ppl_score.datasets import write_idx

FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def fake_images(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` uint8 28x28 images with labels 0..9: a class-dependent bright rectangle on a dark
    noisy background, so classes differ and pixels vary."""
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % 10).astype(np.uint8)
    images = rng.integers(0, 40, size=(n, 28, 28)).astype(np.int64)
    for i, c in enumerate(labels):
        top, left = 2 + int(c) % 5 * 3, 2 + int(c) // 5 * 8
        images[i, top : top + 10, left : left + 12] += rng.integers(120, 215)
    return np.clip(images, 0, 255).astype(np.uint8), labels


def write_fake_fashion_mnist(directory, n_train: int = 64, n_test: int = 32, gz: bool = True, seed: int = 0) -> str:
    """Write the four idx files (names of the real ones, gzipped or not) to ``directory``."""
    os.makedirs(directory, exist_ok=True)
    for split, n, s in (("train", n_train, seed), ("test", n_test, seed + 1)):
        images, labels = fake_images(n, s)
        for name, array in zip(FILES[split], (images, labels)):
            write_idx(os.path.join(os.fspath(directory), name + (".gz" if gz else "")), array)
    return os.fspath(directory)
