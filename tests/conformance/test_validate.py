"""One validation path, its backend halves (``ppl_score.{torch,jax}.validate``) and the
training loops' checks (``ppl_score.common.training``): the same rule and message in both
backends; wrong types raise ``TypeError``, wrong values ``ValueError``."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_fit_energy_type_errors_are_type_errors(backend):
    pytest.importorskip(backend)
    if backend == "torch":
        import torch

        from ppl_score.torch.training import fit_energy

        model = torch.nn.Sequential(torch.nn.Linear(2, 1), torch.nn.Flatten(0))

        def call(data=np.zeros((4, 2)), **kw):
            return fit_energy(model, data, "esm", **kw)
    else:
        import jax.numpy as jnp

        from ppl_score.jax.training import fit_energy

        def call(data=np.zeros((4, 2)), **kw):
            return fit_energy(lambda p, x: (x * p).sum(-1), jnp.ones(2), data, "esm", **kw)

    with pytest.raises(TypeError, match="argument 'steps' must be an int"):
        call(steps=1.5)
    with pytest.raises(TypeError, match="argument 'batch_size' must be an int"):
        call(steps=1, batch_size="4")
    with pytest.raises(TypeError, match="argument 'lr'"):
        call(steps=1, lr="0.1")
    with pytest.raises(ValueError, match="argument 'steps' must be an int >= 0"):
        call(steps=-1)
    with pytest.raises(ValueError, match="argument 'lr' must be a finite number > 0"):
        call(steps=1, lr=0.0)
    with pytest.raises(ValueError, match="argument 'data' contains non-finite"):
        call(np.full((4, 2), np.nan), steps=1)


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_check_array_mirrors(backend):
    pytest.importorskip(backend)
    if backend == "torch":
        import torch

        from ppl_score.torch.validate import check_array

        ok, ints, bad = torch.zeros(2), torch.zeros(2, dtype=torch.int64), torch.tensor([0.0, float("nan")])
    else:
        import jax.numpy as jnp

        from ppl_score.jax.validate import check_array

        ok, ints, bad = jnp.zeros(2), np.zeros(2, dtype=np.int32), np.array([0.0, np.nan])
    check_array("x", ok)
    check_array("x", ints, dtype="real")
    with pytest.raises(TypeError, match="argument 'x' must be a"):
        check_array("x", [0.0, 1.0])
    with pytest.raises(TypeError, match="argument 'x' must have a floating dtype"):
        check_array("x", ints)
    with pytest.raises(ValueError, match="argument 'x' contains non-finite values"):
        check_array("x", bad)
    from ppl_score import validation_enabled

    with validation_enabled(False):
        check_array("x", bad)
