"""``ppl_score.torch.training.fit_energy`` rejects bad arguments."""

from __future__ import annotations

import numpy as np
import pytest

from tests.helpers.demo import _require

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_fit_energy_rejects_bad_arguments():
    _require("torch")
    import torch

    from ppl_score.torch.nets import MLPEnergy
    from ppl_score.torch.training import fit_energy

    model = MLPEnergy(2, (4,))
    x = np.zeros((10, 2))
    with pytest.raises(ValueError, match="method"):
        fit_energy(model, x, "nope", steps=1, progress=False)
    with pytest.raises(ValueError, match="option"):
        fit_energy(model, x, "ssm_vr", steps=1, progress=False, sigma=0.1)
    with pytest.raises(ValueError, match="steps"):
        fit_energy(model, x, steps=-1, progress=False)
    with pytest.raises(ValueError, match="lr"):
        fit_energy(model, x, steps=1, lr=0.0, progress=False)
    with pytest.raises(ValueError, match="data"):
        fit_energy(model, np.full((10, 2), np.nan), steps=1, progress=False)
    with pytest.raises(TypeError, match="model"):
        fit_energy(lambda y: y.sum(-1), x, steps=1, progress=False)

    class NaNEnergy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(2))

        def forward(self, x):
            return (x * x * self.w).sum(-1) * float("nan")

    with pytest.raises(FloatingPointError, match="non-finite by step 1"):
        fit_energy(NaNEnergy(), x, steps=2, progress=False)
