"""A torch flow and its JAX twin for the flows fault tests (``tests/{parity,pyro,numpyro}/test_flows_faults.py``)."""

from __future__ import annotations

import copy
import pickle

import pytest

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

from ppl_score.jax.flows import InvertibleMLP as JaxFlow  # noqa: E402
from ppl_score.torch.flows import InvertibleMLP as TorchFlow  # noqa: E402

D, L, ALPHA = 3, 3, 0.2
DTYPES = ["float32", "float64"]


def _pair(dtype="float64", seed=0):
    """A torch flow and its JAX twin (same weights, random biases)."""
    gen = torch.Generator().manual_seed(seed)
    tflow = TorchFlow(D, L, ALPHA, dtype=getattr(torch, dtype), generator=gen)
    with torch.no_grad():
        for b in tflow.biases:
            b.copy_(0.3 * torch.randn(D, generator=gen, dtype=b.dtype))
    jflow = JaxFlow(D, L, ALPHA)
    if dtype == "float64" and not jax.config.jax_enable_x64:
        pytest.skip("JAX float64 needs x64")
    return tflow, jflow, jflow.params_from(tflow.flow_params(), getattr(jnp, dtype))


COPIES = {"pickle": lambda o: pickle.loads(pickle.dumps(o)), "deepcopy": copy.deepcopy}
