"""The flows tests' torch flow with non-trivial weights, its JAX twin (same weights), data
and Gaussian targets, shared by ``tests/{torch,jax,parity,pyro,numpyro}/test_flows.py``."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from ppl_score.jax.flows import InvertibleMLP as JaxFlow  # noqa: E402
from ppl_score.torch.flows import InvertibleMLP as TorchFlow  # noqa: E402

D, L, ALPHA = 4, 3, 0.2
F64 = torch.float64


def make_torch_flow(dim=D, n_layers=L, alpha=ALPHA, bias=True, seed=0):
    """A flow with orthogonal-times-random-scale weights and random biases (not the identity-
    like init, so every term of the gradient is exercised)."""
    gen = torch.Generator().manual_seed(seed)
    flow = TorchFlow(dim, n_layers, alpha, bias, dtype=F64, generator=gen)
    with torch.no_grad():
        for w in flow.weights:
            w.mul_(1.0 + 0.3 * torch.rand(dim, 1, generator=gen, dtype=F64))
        if bias:
            for b in flow.biases:
                b.copy_(0.5 * torch.randn(dim, generator=gen, dtype=F64))
    return flow


def jax_twin(tflow):
    flow = JaxFlow(tflow.dim, tflow.n_layers, tflow.alpha, tflow.biases is not None)
    return flow, flow.params_from(tflow.flow_params())


def flow_params_of(params):
    return [(np.asarray(w), None if b is None else np.asarray(b)) for w, b in params]


def data(n=7, dim=D, seed=1):
    return np.random.default_rng(seed).normal(size=(n, dim)) * 1.5


def log_normal(z):
    return -0.5 * (z * z).sum(-1) - 0.5 * z.shape[-1] * math.log(2 * math.pi)


def extreme_latents():
    z = data(6)
    z[0] = [-40.0, -1e3, 0.0, 1e3]  # deep in both linear regimes of the activation
    z[1] = 0.0
    return z


# ----------------------------------------------------------------------------------------
# Gaussian data of the training tests
# ----------------------------------------------------------------------------------------


def gaussian_data(n, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.tensor([[1.0, 0.0], [0.8, 0.5]], dtype=F64)
    return torch.randn(n, 2, generator=g, dtype=F64) @ a.T + torch.tensor([1.0, -2.0], dtype=F64)
