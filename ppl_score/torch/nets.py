"""Small networks used as energies and score models (torch)."""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn


class MLPEnergy(nn.Module):
    """Deep energy model: ``log p(x) = -E(x) + const`` with ``E`` an MLP on the flattened
    event, ``x[B, *event] -> [B]``.

    ``hidden``: widths of the hidden layers; ``activation``: a smooth activation (score
    matching needs second derivatives, so not ReLU); ``quadratic``: adds
    ``-quadratic/2 ||x||^2`` so the density is normalizable whatever the weights.
    """

    def __init__(
        self,
        dim: int,
        hidden: Sequence[int] = (512, 512, 512),
        activation: Callable[[], nn.Module] = nn.Softplus,
        quadratic: float = 0.0,
    ):
        super().__init__()
        sizes = (dim, *hidden)
        layers = []
        for a, b in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(a, b), activation()]
        layers.append(nn.Linear(sizes[-1], 1))
        self.net = nn.Sequential(*layers)
        self.quadratic = float(quadratic)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(x.shape[0], -1)
        out = self.net(flat).squeeze(-1)
        if self.quadratic:
            out = out - 0.5 * self.quadratic * (flat * flat).sum(-1)
        return out


class MLPScore(nn.Module):
    """Score network ``x[B, *event] -> [B, *event]`` (an MLP on the flattened event)."""

    def __init__(self, dim: int, hidden: Sequence[int] = (256, 256), activation: Callable[[], nn.Module] = nn.Softplus):
        super().__init__()
        sizes = (dim, *hidden)
        layers = []
        for a, b in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(a, b), activation()]
        layers.append(nn.Linear(sizes[-1], dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.reshape(x.shape[0], -1)).reshape(x.shape)


def mlp_params(module: nn.Module) -> list[tuple[np.ndarray, np.ndarray]]:
    """``[(W [in, out], b [out]), ...]`` of the linear layers, as float64 numpy arrays, in the
    layout of ``ppl_score.jax.nets`` (for cross-backend parity)."""
    return [
        (m.weight.detach().double().T.numpy().copy(), m.bias.detach().double().numpy().copy())
        for m in module.modules()
        if isinstance(m, nn.Linear)
    ]
