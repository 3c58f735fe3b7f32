"""DEQ energies and score networks as ``PyroModule`` instances, for use inside Pyro models.

The math, options and backward modes are those of ``ppl_score.torch.deq``. Submodules are
converted to ``PyroModule`` too, so every weight is a Pyro param (named after the module's
attribute path, e.g. ``energy.deq.weight``) that ``SVI`` optimizes::

    energy = DEQEnergy(dim, width=64, quadratic=1.0)

    def model(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", Unnormalized(energy, event_shape=(dim,)), obs=x)

``energy`` is also a plain ``fn`` for ``ppl_score.torch.score_matching_loss``.
"""

from __future__ import annotations

import copyreg
from typing import Any

from pyro.nn.module import PyroModule, to_pyro_module_

from ..torch import deq as backend

__all__ = ["DEQEnergy", "DEQScore"]


def _convert_children(module: PyroModule) -> None:
    for name, child in list(module.named_children()):
        to_pyro_module_(child)
        setattr(module, name, child)


class _Picklable:
    """``PyroModule[M]`` pickles (and deep-copies) an instance as a plain ``PyroModule[M]``;
    rebuild the subclass itself, so a copy is a ``DEQEnergy`` / ``DEQScore`` again."""

    def __reduce__(self):
        state = getattr(self, "__getstate__", self.__dict__.copy)()
        return copyreg.__newobj__, (type(self),), state


class DEQEnergy(_Picklable, PyroModule[backend.DEQEnergy]):
    """``PyroModule`` version of ``ppl_score.torch.deq.DEQEnergy``: ``x [B, *event] -> [B]``,
    ``log p(x) = w^T z*(x) - quadratic/2 ||x||^2 + const``, where ``z*(x)`` is the fixed
    point of a weight-tied layer (a deep equilibrium model [1]) used as a score model as in
    [2]. The readout has no bias (a constant offset, unidentifiable under score matching and
    without gradient; see the backend's class).

    Args:
        dim, width, quadratic: as there.
        **options: see ``ppl_score.torch.deq.deq_config``; defaults ``solver="iteration"``,
            ``tol=1e-4``, ``gamma=0.9`` (their trade-off: ``ppl_score.torch.deq.DEQLayer``).

    References:
        [1] S. Bai, J. Z. Kolter, V. Koltun, "Deep equilibrium models", NeurIPS, 2019.

        [2] Y. Huang, Q. Wang, A. Onwunta, B. Wang, "Efficient score matching with deep equilibrium
        layers", ICLR, 2024.
    """

    def __init__(self, dim: int, width: int = 512, quadratic: float = 0.0, **options: Any) -> None:
        super().__init__(dim, width, quadratic, **options)
        _convert_children(self)


class DEQScore(_Picklable, PyroModule[backend.DEQScore]):
    """``PyroModule`` version of ``ppl_score.torch.deq.DEQScore``: ``x [B, *event] ->
    [B, *event]``, a score network read off the fixed point ``z*(x)`` of a weight-tied layer
    (a deep equilibrium model [1], as a score model [2]).

    Args:
        dim, width: as there.
        **options: see ``ppl_score.torch.deq.deq_config``; defaults ``solver="iteration"``,
            ``tol=1e-4``, ``gamma=0.9`` (their trade-off: ``ppl_score.torch.deq.DEQLayer``).

    References:
        [1] S. Bai, J. Z. Kolter, V. Koltun, "Deep equilibrium models", NeurIPS, 2019.

        [2] Y. Huang, Q. Wang, A. Onwunta, B. Wang, "Efficient score matching with deep equilibrium
        layers", ICLR, 2024.
    """

    def __init__(self, dim: int, width: int = 256, **options: Any) -> None:
        super().__init__(dim, width, **options)
        _convert_children(self)
