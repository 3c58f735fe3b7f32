"""``WAE``, ``ImplicitELBO`` and ``RelativeGradientMLE`` through Pyro's ``SVI`` with
``DistributedOptimizer`` (the optimizer-wrapper route, no DDP) on two gloo ranks: the
parameters after a few SGD steps equal one process on the whole batch (float64; for the
batch-global losses with ``process_group`` and the randomness fixed as in
``tests/helpers/torch_distributed_implicit.py``, whose problems this reuses; the flow with
each rank's shard in a subsampled plate)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("pyro")

from tests.helpers import torch_distributed_implicit as h  # noqa: E402
from tests.helpers.torch_distributed import run_ranks  # noqa: E402

STEPS, LR = 3, 0.05


def _fit(kind: str, rank: int | None, group) -> list[np.ndarray]:
    """Parameters after ``STEPS`` SVI steps: one process on the whole batch (``rank`` None)
    or this rank's shard with ``DistributedOptimizer``."""
    import pyro
    import pyro.optim

    from ppl_score.pyro import WAE, DistributedOptimizer, ImplicitELBO

    pyro.clear_param_store()
    optim = pyro.optim.SGD({"lr": LR})
    if rank is not None:
        optim = DistributedOptimizer(optim)
    if kind == "flow":
        return _fit_flow(optim, rank)
    if kind == "wae":
        shard = slice(0, h.X_WAE.shape[0]) if rank is None else h.WAE_SHARDS[rank]
        enc, dec = h._nets(0)
        inner_model, inner_guide = h._wae_pair(enc, dec, torch.as_tensor(h.DRAWS[shard]))

        def model(x):
            pyro.module("dec", dec)
            inner_model(x)

        def guide(x):
            pyro.module("enc", enc)
            inner_guide(x)

        loss = WAE("mmd", lam=3.0, process_group=group)
        args, modules = (torch.as_tensor(h.X_WAE[shard]),), (enc, dec)
    else:
        rows = slice(0, h.EPS_GLOBAL.shape[0]) if rank is None else slice(rank * h.P_RANK, (rank + 1) * h.P_RANK)
        affine = h._Affine.make()
        inner_model, inner_guide = h._global_pair(affine, torch.as_tensor(h.EPS_GLOBAL[rows]), True)

        def model(x):
            inner_model(x)

        def guide(x):
            pyro.module("affine", affine)
            inner_guide(x)

        loss = ImplicitELBO(
            "stein",
            num_particles=rows.stop - rows.start,
            vectorize_particles=True,
            max_plate_nesting=1,
            process_group=group,
        )
        args, modules = (torch.as_tensor(h.X_GLOBAL),), (affine,)
    svi = pyro.infer.SVI(model, guide, optim, loss=loss)
    for _ in range(STEPS):
        svi.step(*args)
    return [p.detach().numpy().copy() for m in modules for p in m.parameters()]


def _fit_flow(optim, rank: int | None) -> list[np.ndarray]:
    """``RelativeGradientMLE`` of a full-Jacobian flow, the data points ``idx`` of ``N`` in a
    subsampled plate: all of them in one process, rank ``r``'s interleaved shard on a rank."""
    import pyro
    import pyro.distributions as pdist

    from ppl_score.pyro import InvertibleMLPTransform, RelativeGradientMLE

    n, d = 8, 2
    data = torch.randn(n, d, dtype=torch.float64, generator=torch.Generator().manual_seed(11))
    idx = torch.arange(n) if rank is None else torch.arange(rank, n, h.WORLD_SIZE)
    flow = InvertibleMLPTransform(d, n_layers=2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def model(idx):
        pyro.module("flow", flow)
        base = pdist.Normal(torch.zeros(d, dtype=torch.float64), 1.0).to_event(1)
        with pyro.plate("data", n, subsample=idx):
            pyro.sample("x", pdist.TransformedDistribution(base, [flow]), obs=data[idx])

    def guide(idx):
        pass

    svi = pyro.infer.SVI(model, guide, optim, loss=RelativeGradientMLE())
    for _ in range(STEPS):
        svi.step(idx)
    return [p.detach().numpy().copy() for p in flow.parameters()]


def _worker(rank: int, world_size: int) -> dict:
    import torch.distributed as dist

    return {kind: _fit(kind, rank, dist.group.WORLD) for kind in ("wae", "implicit", "flow")}


@pytest.fixture(scope="module")
def ranks():
    return run_ranks(_worker, world_size=h.WORLD_SIZE)


@pytest.mark.distributed
@pytest.mark.parametrize("kind", ["wae", "implicit", "flow"])
def test_svi_with_distributed_optimizer_equals_one_process(ranks, kind):
    reference = _fit(kind, None, None)
    for out in ranks:
        assert len(out[kind]) == len(reference)
        for got, want in zip(out[kind], reference):
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-9)
    # the fit moved the parameters: the comparison is not between two untouched copies
    assert any(not np.allclose(a, b) for a, b in zip(reference, _initial(kind)))


def _initial(kind: str) -> list[np.ndarray]:
    if kind == "flow":
        from ppl_score.pyro import InvertibleMLPTransform

        flow = InvertibleMLPTransform(2, n_layers=2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        return [p.detach().numpy().copy() for p in flow.parameters()]
    if kind == "wae":
        enc, dec = h._nets(0)
        return [p.detach().numpy().copy() for m in (enc, dec) for p in m.parameters()]
    return [p.detach().numpy().copy() for p in h._Affine.make().parameters()]
