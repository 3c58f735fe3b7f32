"""Small networks used as energies and score models (torch)."""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from ..common.objectives import check_noise_conditioning, check_sigma_shape


def _mlp(sizes: Sequence[int], out: int, activation: Callable[[], nn.Module], bias: bool = True) -> nn.Sequential:
    """``Linear, activation`` through ``sizes``, then a ``Linear`` to ``out`` (``bias`` on it or
    not): the body of every network here (parameter names ``net.<i>.weight``)."""
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), activation()]
    layers.append(nn.Linear(sizes[-1], out, bias=bias))
    return nn.Sequential(*layers)


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
        self.net = _mlp((dim, *hidden), 1, activation, bias=False)
        self.quadratic = float(quadratic)
        # a checkpoint of the earlier layout carries the last bias: drop it on load
        self._register_load_state_dict_pre_hook(functools.partial(_drop_state_key, f"net.{len(self.net) - 1}.bias"))

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
        self.net = _mlp((dim, *hidden), dim, activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.reshape(x.shape[0], -1)).reshape(x.shape)


class NoiseConditionalScore(nn.Module):
    """Noise-conditional score network ``s(x, sigma)``, ``x[B, *event], sigma[B] ->
    [B, *event]`` (an MLP on the flattened event), for ``ms_dsm`` and annealed Langevin.

    ``condition_on_sigma``: the MLP sees ``log sigma`` as one more input (NCSN's
    conditioning, here by concatenation). ``divide_by_sigma``: the output is divided by
    ``sigma``, ``s(x, sigma) = s_theta(x) / sigma`` (NCSNv2's parametrization, Song & Ermon
    2020, which matches the ``1/sigma`` scale of the noisy scores; with
    ``condition_on_sigma=False`` the network itself is unconditional). At least one of them.
    """

    def __init__(
        self,
        dim: int,
        hidden: Sequence[int] = (256, 256),
        activation: Callable[[], nn.Module] = nn.Softplus,
        *,
        condition_on_sigma: bool = True,
        divide_by_sigma: bool = False,
    ):
        super().__init__()
        check_noise_conditioning(condition_on_sigma, divide_by_sigma)
        self.condition_on_sigma, self.divide_by_sigma = bool(condition_on_sigma), bool(divide_by_sigma)
        self.net = _mlp((dim + int(self.condition_on_sigma), *hidden), dim, activation)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(x.shape[0], -1)
        sigma = torch.as_tensor(sigma, dtype=flat.dtype, device=flat.device)
        check_sigma_shape(tuple(sigma.shape), x.shape[0])
        sigma = sigma.expand(x.shape[0])
        h = torch.cat([flat, sigma.log().unsqueeze(-1)], -1) if self.condition_on_sigma else flat
        out = self.net(h)
        if self.divide_by_sigma:
            out = out / sigma.unsqueeze(-1)
        return out.reshape(x.shape)


class NoiseConditionalEnergy(nn.Module):
    """Noise-conditional energy ``log p_sigma(x) = -E(x, log sigma) + const``,
    ``x[B, *event], sigma[B] -> [B]``: an ``MLPEnergy`` whose MLP also sees ``log sigma``
    (kind ``"log_prob"`` for ``ms_dsm``); ``quadratic`` adds ``-quadratic/2 ||x||^2``."""

    def __init__(
        self,
        dim: int,
        hidden: Sequence[int] = (256, 256),
        activation: Callable[[], nn.Module] = nn.Softplus,
        quadratic: float = 0.0,
    ):
        super().__init__()
        self.net = _mlp((dim + 1, *hidden), 1, activation, bias=False)
        self.quadratic = float(quadratic)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(x.shape[0], -1)
        sigma = torch.as_tensor(sigma, dtype=flat.dtype, device=flat.device)
        check_sigma_shape(tuple(sigma.shape), x.shape[0])
        sigma = sigma.expand(x.shape[0])
        out = self.net(torch.cat([flat, sigma.log().unsqueeze(-1)], -1)).squeeze(-1)
        if self.quadratic:
            out = out - 0.5 * self.quadratic * (flat * flat).sum(-1)
        return out


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
