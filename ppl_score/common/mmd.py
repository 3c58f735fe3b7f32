"""The framework-free half of ``ppl_score.{torch,jax}.mmd``: the IMQ kernel's scales."""

from __future__ import annotations

__all__ = [
    "MMD_SCALES",
]

# scales s of WAE-MMD's inverse multiquadratic kernel sum_s C s / (C s + ||x - y||^2)
MMD_SCALES = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
