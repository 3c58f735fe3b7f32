"""Small networks used as energies and score models (torch)."""

from __future__ import annotations

import functools
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

    The last layer has no bias: a constant offset of a log density is not identifiable
    under score matching (it is part of the normalizer), never reaches the score, and so
    never receives a gradient, which ``DistributedDataParallel`` reports as an unused
    parameter. A ``state_dict`` saved with that bias (before it was removed) still loads:
    the key is dropped, which leaves the score unchanged.
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
        layers.append(nn.Linear(sizes[-1], 1, bias=False))
        self.net = nn.Sequential(*layers)
        self.quadratic = float(quadratic)
        # a checkpoint of the earlier layout carries the last bias: drop it on load
        self._register_load_state_dict_pre_hook(functools.partial(_drop_state_key, f"net.{len(layers) - 1}.bias"))

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


def _drop_state_key(name: str, state_dict: dict, prefix: str, *args: object) -> None:
    """Load-state-dict pre-hook (bound to ``name`` with ``functools.partial``): drops the entry
    ``name`` of the loading module from ``state_dict`` when present. The energies whose last
    layer lost its bias (``MLPEnergy``, ``ppl_score.torch.deq.DEQEnergy``) use it so that a
    checkpoint with that bias still loads: a constant offset of the log density, with no
    effect on the score or on anything fitted by score matching."""
    state_dict.pop(prefix + name, None)


def mlp_params(module: nn.Module) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """``[(W [in, out], b [out] or None), ...]`` of the linear layers, as float64 numpy arrays, in
    the layout of ``ppl_score.jax.nets`` (for cross-backend parity); ``None`` for a layer
    without bias (the last layer of ``MLPEnergy``, as in ``ppl_score.jax.nets.energy_init``)."""
    as_numpy = lambda t: None if t is None else t.detach().double().numpy().copy()  # noqa: E731
    return [(as_numpy(m.weight.T), as_numpy(m.bias)) for m in module.modules() if isinstance(m, nn.Linear)]
