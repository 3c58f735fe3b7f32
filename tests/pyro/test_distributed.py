"""Data parallelism of the Pyro front end on two gloo processes (issue "Scale-out", torch/Pyro
part 1): ``ScoreMatching`` (all six methods) and ``RelativeGradientMLE`` through the
``ELBOModule`` route wrapped in ``DistributedDataParallel``, ``SVI`` with
``DistributedOptimizer``, per-rank generators, subsampling, unequal and padded shards.

One spawn runs every check (``_worker``, module-scoped fixture ``ranks``); the tests compare
its results with single-process references computed here, in float64, to 1e-9: the union of
the ranks' shards in one process for the deterministic ``esm`` and ``RelativeGradientMLE``,
and one process averaging the ranks' losses (the same per-rank generators) for the methods
that draw projections or noise.
"""

from __future__ import annotations

import copy
import io
import pickle

import pytest

torch = pytest.importorskip("torch")
pyro = pytest.importorskip("pyro")
import pyro.distributions as pdist  # noqa: E402
import torch.distributed as dist  # noqa: E402
from pyro import poutine  # noqa: E402
from pyro.infer import SVI  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402

from ppl_score.pyro import (  # noqa: E402
    DistributedOptimizer,
    InvertibleMLPTransform,
    RelativeGradientMLE,
    ScoreMatching,
    Unnormalized,
)
from ppl_score.pyro.distributed import shard_scale  # noqa: E402
from ppl_score.spec import UNCONDITIONAL_METHODS  # noqa: E402
from ppl_score.torch.distributed import rank_generator  # noqa: E402
from ppl_score.torch.nets import MLPEnergy  # noqa: E402
from tests.helpers.shared import empty_guide  # noqa: E402
from tests.helpers.torch_distributed import WORLD, assert_close, run_ranks  # noqa: E402

pytestmark = [pytest.mark.distributed, pytest.mark.usefixtures("one_torch_thread", "fresh_pyro")]

F64 = torch.float64
N, D = 8, 2
STEPS = 3
LR = 1e-3  # SGD on the DDP route
ADAM = {"lr": 1e-2}  # pyro.optim.Adam on the SVI route
METHODS = sorted(UNCONDITIONAL_METHODS)
# disjoint shards, interleaved as DistributedSampler(shuffle=False) deals them
SHARDS = [torch.arange(r, N, WORLD) for r in range(WORLD)]
UNION = torch.arange(N)
# unequal shards (4 and 3 rows of 7)
UNEQUAL = [torch.arange(0, 4), torch.arange(4, 7)]


def _data(n=N):
    return torch.randn(n, D, dtype=F64, generator=torch.Generator().manual_seed(11))


def _energy():
    torch.manual_seed(0)
    return MLPEnergy(D, hidden=(8,), quadratic=1.0).double()


class EnergyModel(torch.nn.Module):
    """``x ~ Unnormalized(MLPEnergy)`` in a plate of ``len(data)`` subsampled at ``idx``
    (``plain``: a plain plate of ``len(idx)``, a sum over the shard); ``keep`` masks rows,
    ``scale`` scales the shard's loss. ``register``: the energy's parameters go through
    ``pyro.module`` (SVI needs them in the param store; the ELBOModule route does not)."""

    def __init__(self, data, register=False):
        super().__init__()
        self.energy = _energy()
        self.data = data
        self.register = register

    def forward(self, idx, keep=None, scale=1.0, plain=False):
        if self.register:
            pyro.module("energy", self.energy)
        plate = pyro.plate("data", len(idx)) if plain else pyro.plate("data", len(self.data), subsample=idx)
        with plate, poutine.mask(mask=True if keep is None else keep), poutine.scale(scale=scale):
            pyro.sample("x", Unnormalized(self.energy, (D,)), obs=self.data[idx])


class FlowModel(torch.nn.Module):
    """``x = g^{-1}(z)``, ``z ~ N(0, I)``: a full-Jacobian flow fitted by relative gradients."""

    def __init__(self, data):
        super().__init__()
        self.flow = InvertibleMLPTransform(D, n_layers=2, dtype=F64, generator=torch.Generator().manual_seed(0))
        self.data = data

    def forward(self, idx):
        base = pdist.Normal(torch.zeros(D, dtype=F64), 1.0).to_event(1)
        with pyro.plate("data", len(self.data), subsample=idx):
            pyro.sample("x", pdist.TransformedDistribution(base, [self.flow]), obs=self.data[idx])


def _params(module):
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def _store():
    return {name: p.detach().clone() for name, p in pyro.get_param_store().named_parameters()}


# ---------------------------------------------------------------------------------------
# the runs: on each rank (DDP, DistributedOptimizer) and in one process (the references)
# ---------------------------------------------------------------------------------------


def _ddp_run(loss, model, args, kwargs=None):
    """``STEPS`` SGD steps of ``loss(model, guide)`` wrapped in DDP: (losses, parameters)."""
    ddp = DDP(loss(model, empty_guide))
    opt = torch.optim.SGD(ddp.parameters(), lr=LR)
    losses = []
    for _ in range(STEPS):
        opt.zero_grad()
        value = ddp(*args, **(kwargs or {}))
        value.backward()
        opt.step()
        losses.append(value.item())
    return losses, _params(model)


def _averaged_run(losses, model, args, kwargs=None):
    """What DDP computes, in one process: the ranks' losses averaged (``losses[r]`` and
    ``args[r]`` are rank ``r``'s), one SGD step on the average per step."""
    modules = [loss(model, empty_guide) for loss in losses]
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    values = []
    for _ in range(STEPS):
        opt.zero_grad()
        per_rank = [m(*a, **(kwargs[r] if kwargs else {})) for r, (m, a) in enumerate(zip(modules, args))]
        (sum(per_rank) / len(per_rank)).backward()
        opt.step()
        values.append([v.item() for v in per_rank])
    return values, _params(model)


def _svi_run(loss, model, optim, args, kwargs=None):
    """``STEPS`` of ``SVI.step``: (losses, param store)."""
    pyro.clear_param_store()
    svi = SVI(model, empty_guide, optim, loss=loss)
    losses = [svi.step(*args, **(kwargs or {})) for _ in range(STEPS)]
    return losses, _store()


def _padded_shard(rank, n=7):
    """What ``DistributedSampler(range(n), WORLD, rank, shuffle=False)`` gives this rank, and
    the mask of its real rows (False on the padding it repeats from the start)."""
    sampler = torch.utils.data.DistributedSampler(range(n), num_replicas=WORLD, rank=rank, shuffle=False)
    idx = torch.tensor(list(iter(sampler)))
    positions = torch.arange(rank, sampler.total_size, WORLD)  # in the padded list
    return idx, positions < n


def _worker(rank, world_size):
    out = {}
    data = _data()
    idx = SHARDS[rank]
    # ELBOModule + DDP, every method, each rank its own generator
    for method in METHODS:
        loss = ScoreMatching(method, generator=torch.Generator().manual_seed(100 + rank))
        out[("ddp", method)] = _ddp_run(loss, EnergyModel(data), (idx,))
    out["ddp_mle"] = _ddp_run(RelativeGradientMLE(), FlowModel(data), (idx,))
    # ELBOModule + DDP, unequal shards rescaled
    part = UNEQUAL[rank]
    out["ddp_unequal"] = _ddp_run(
        ScoreMatching("esm"), EnergyModel(_data(7)), (part,), {"scale": shard_scale(len(part))}
    )
    # SVI + DistributedOptimizer: subsampled shards (mean), plain plates (sum), padded shards
    model = EnergyModel(data, register=True)
    out["svi_mean"] = _svi_run(ScoreMatching("esm"), model, DistributedOptimizer(pyro.optim.Adam(ADAM)), (idx,))
    model = EnergyModel(data, register=True)
    out["svi_sum"] = _svi_run(
        ScoreMatching("esm"), model, DistributedOptimizer(pyro.optim.Adam(ADAM), op="sum"), (idx,), {"plain": True}
    )
    pidx, keep = _padded_shard(rank)
    model = EnergyModel(_data(7), register=True)
    kwargs = {"keep": keep, "scale": shard_scale(len(pidx), keep.sum())}
    out["svi_padded"] = _svi_run(
        ScoreMatching("esm"), model, DistributedOptimizer(pyro.optim.Adam(ADAM)), (pidx,), kwargs
    )
    # SVI + DistributedOptimizer with per-rank random projections: the ranks stay in sync
    model = EnergyModel(data, register=True)
    loss = ScoreMatching("ssm_vr", generator=rank_generator(0))
    out["svi_ssm"] = _svi_run(loss, model, DistributedOptimizer(pyro.optim.Adam(ADAM)), (idx,))
    # per-rank generators: the draws, and the same loss on the same data on every rank
    out["draws"] = torch.randn(4, generator=rank_generator(7))
    loss = ScoreMatching("ssm", generator=rank_generator(7))
    out["same_data_losses"] = [loss.loss(EnergyModel(data), empty_guide, UNION) for _ in range(2)]
    # a copy of an optimizer on the default group names it, and finds it again
    twin = pickle.loads(pickle.dumps(DistributedOptimizer(pyro.optim.Adam(ADAM), process_group=dist.group.WORLD)))
    out["copy_on_world"] = twin.process_group is dist.group.WORLD
    return out


@pytest.fixture(scope="module")
def ranks():
    return run_ranks(_worker)


# ---------------------------------------------------------------------------------------
# ELBOModule + DistributedDataParallel
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_ddp_elbo_module_every_method_is_the_average_of_the_ranks(ranks, method):
    """The default DDP (no ``find_unused_parameters``) steps every method (it failed on the
    second step while ``MLPEnergy`` had a last bias), and gives what one process gets by
    averaging the ranks' losses, with the same per-rank generators."""
    losses = [ScoreMatching(method, generator=torch.Generator().manual_seed(100 + r)) for r in range(WORLD)]
    values, params = _averaged_run(losses, EnergyModel(_data()), [(SHARDS[r],) for r in range(WORLD)])
    for r in range(WORLD):
        got_losses, got_params = ranks[r][("ddp", method)]
        assert_close(got_losses, [v[r] for v in values], what=f"{method} rank {r} losses")
        assert_close(got_params, params, what=f"{method} rank {r} params")


def test_ddp_esm_with_subsampled_shards_equals_one_process_on_their_union(ranks):
    """Deterministic ``esm``: two ranks with disjoint ``subsample`` index sets, averaged by
    DDP, equal one process with the union (losses averaged over ranks, parameters)."""
    model = EnergyModel(_data())
    losses, params = _ddp_single(ScoreMatching("esm"), model, (UNION,))
    got = [ranks[r][("ddp", "esm")] for r in range(WORLD)]
    assert_close([sum(g[0][s] for g in got) / WORLD for s in range(STEPS)], losses, what="losses")
    for r in range(WORLD):
        assert_close(got[r][1], params, what=f"rank {r} params")


def _ddp_single(loss, model, args, kwargs=None):
    """``_ddp_run`` without DDP: one process."""
    module = loss(model, empty_guide)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    losses = []
    for _ in range(STEPS):
        opt.zero_grad()
        value = module(*args, **(kwargs or {}))
        value.backward()
        opt.step()
        losses.append(value.item())
    return losses, _params(model)


def test_ddp_relative_gradient_mle_equals_one_process_on_the_union(ranks):
    losses, params = _ddp_single(RelativeGradientMLE(), FlowModel(_data()), (UNION,))
    got = [ranks[r]["ddp_mle"] for r in range(WORLD)]
    assert_close([sum(g[0][s] for g in got) / WORLD for s in range(STEPS)], losses, what="losses")
    for r in range(WORLD):
        assert_close(got[r][1], params, what=f"rank {r} params")


def test_ddp_unequal_shards_rescaled_by_shard_scale_equal_one_process(ranks):
    """4 and 3 rows: each rank's plate scale is 7/4 or 7/3; ``shard_scale`` makes DDP's
    average weigh every row 7/7, as one process on all 7."""
    losses, params = _ddp_single(ScoreMatching("esm"), EnergyModel(_data(7)), (torch.arange(7),))
    got = [ranks[r]["ddp_unequal"] for r in range(WORLD)]
    assert_close([sum(g[0][s] for g in got) / WORLD for s in range(STEPS)], losses, what="losses")
    for r in range(WORLD):
        assert_close(got[r][1], params, what=f"rank {r} params")


# ---------------------------------------------------------------------------------------
# SVI + DistributedOptimizer
# ---------------------------------------------------------------------------------------


def test_svi_distributed_optimizer_mean_equals_one_process_on_the_union(ranks):
    losses, params = _svi_run(
        ScoreMatching("esm"), EnergyModel(_data(), register=True), pyro.optim.Adam(ADAM), (UNION,)
    )
    got = [ranks[r]["svi_mean"] for r in range(WORLD)]
    assert_close([sum(g[0][s] for g in got) / WORLD for s in range(STEPS)], losses, what="losses")
    for r in range(WORLD):
        assert_close(got[r][1], params, what=f"rank {r} params")


def test_svi_distributed_optimizer_sum_of_plain_plates_equals_the_whole_batch(ranks):
    """``op="sum"``: each rank's loss is the sum over its shard (a plain plate), the summed
    gradients are the whole batch's, and so is the sum of the ranks' losses."""
    model = EnergyModel(_data(), register=True)
    losses, params = _svi_run(ScoreMatching("esm"), model, pyro.optim.Adam(ADAM), (UNION,), {"plain": True})
    got = [ranks[r]["svi_sum"] for r in range(WORLD)]
    assert_close([sum(g[0][s] for g in got) for s in range(STEPS)], losses, what="losses")
    for r in range(WORLD):
        assert_close(got[r][1], params, what=f"rank {r} params")


def test_svi_distributed_sampler_padding_masked_and_rescaled_equals_one_process(ranks):
    """7 rows on 2 ranks: ``DistributedSampler`` pads rank 1 with row 0 again; masking it
    and ``shard_scale(len(idx), keep.sum())`` give one process on the 7 rows."""
    idx, keep = _padded_shard(1)
    assert idx.tolist() == [1, 3, 5, 0] and keep.tolist() == [True, True, True, False]
    model = EnergyModel(_data(7), register=True)
    losses, params = _svi_run(ScoreMatching("esm"), model, pyro.optim.Adam(ADAM), (torch.arange(7),))
    got = [ranks[r]["svi_padded"] for r in range(WORLD)]
    assert_close([sum(g[0][s] for g in got) / WORLD for s in range(STEPS)], losses, what="losses")
    for r in range(WORLD):
        assert_close(got[r][1], params, what=f"rank {r} params")


def test_svi_distributed_optimizer_keeps_the_ranks_in_sync_with_their_own_draws(ranks):
    (l0, p0), (l1, p1) = ranks[0]["svi_ssm"], ranks[1]["svi_ssm"]
    assert l0 != l1
    assert set(p0) == {f"energy$$${name}" for name in _params(_energy())}
    for name in p0:
        assert torch.equal(p0[name], p1[name]), name
    assert not torch.equal(p0["energy$$$net.0.weight"], _energy().net[0].weight.detach())


# ---------------------------------------------------------------------------------------
# Randomness per rank
# ---------------------------------------------------------------------------------------


def test_rank_generators_draw_differently_on_each_rank(ranks):
    d0, d1 = ranks[0]["draws"], ranks[1]["draws"]
    assert not torch.equal(d0, d1)
    assert torch.equal(d0, torch.randn(4, generator=rank_generator(7)))  # rank 0 = one process
    a, b = ranks[0]["same_data_losses"], ranks[1]["same_data_losses"]
    assert a[0] != b[0] and a[1] != b[1]  # the same data and weights, other projections
    assert a[0] != a[1]  # the generator advances


def test_a_fixed_generator_makes_the_loss_reproducible_and_leaves_the_global_rng():
    model, data = EnergyModel(_data()), UNION
    for method in ("ssm", "dsm", "fd_dsm"):
        runs = []
        for _ in range(2):
            loss = ScoreMatching(method, generator=torch.Generator().manual_seed(5))
            state = torch.get_rng_state()
            runs.append([loss.loss(model, empty_guide, data) for _ in range(2)])
            assert torch.equal(torch.get_rng_state(), state), method
        assert runs[0] == runs[1] and runs[0][0] != runs[0][1], method
        other = ScoreMatching(method, generator=torch.Generator().manual_seed(6)).loss(model, empty_guide, data)
        assert other != runs[0][0], method


@pytest.mark.parametrize("how", ["pickle", "deepcopy", "torch.save"])
def test_score_matching_with_a_generator_survives_copies(how):
    def torch_save(obj):
        buf = io.BytesIO()
        torch.save(obj, buf)
        buf.seek(0)
        return torch.load(buf, weights_only=False)

    copy_of = {"pickle": lambda o: pickle.loads(pickle.dumps(o)), "deepcopy": copy.deepcopy, "torch.save": torch_save}
    model = EnergyModel(_data())
    loss = ScoreMatching("ssm_vr", generator=torch.Generator().manual_seed(3), n_projections=2)
    twin = copy_of[how](loss)
    assert twin.generator is not loss.generator and repr(twin) == repr(loss)
    assert twin.loss(model, empty_guide, UNION) == loss.loss(model, empty_guide, UNION)  # the same state
    assert copy_of[how](ScoreMatching("esm")).generator is None


def test_generator_and_optimizer_arguments_are_checked():
    with pytest.raises(TypeError, match="generator"):
        ScoreMatching("ssm", generator=3)
    with pytest.raises(TypeError, match="generator"):
        ScoreMatching("ssm", generator=torch.manual_seed)
    with pytest.raises(TypeError, match="PyroOptim"):
        DistributedOptimizer(torch.optim.SGD)
    with pytest.raises(ValueError, match="op"):
        DistributedOptimizer(pyro.optim.Adam(ADAM), op="max")
    with pytest.raises(TypeError, match="process_group"):
        DistributedOptimizer(pyro.optim.Adam(ADAM), process_group="world")
    with pytest.raises(ValueError, match="already"):
        DistributedOptimizer(DistributedOptimizer(pyro.optim.Adam(ADAM)))
    with pytest.raises(ValueError, match="valid"):
        shard_scale(3, 4)


def test_distributed_optimizer_in_one_process_is_its_optimizer():
    """Outside a process group: the same steps as the wrapped optimizer, its state shared."""
    assert not dist.is_initialized()
    runs = []
    for wrap in (lambda o: o, DistributedOptimizer):
        optim = wrap(pyro.optim.Adam(ADAM))
        runs.append(_svi_run(ScoreMatching("esm"), EnergyModel(_data(), register=True), optim, (UNION,)))
        assert set(optim.get_state()) == set(runs[-1][1])
    assert runs[0][0] == runs[1][0]
    assert_close(runs[1][1], runs[0][1], tol=0.0)
    assert shard_scale(4) == 1.0 and shard_scale(4, 3) == 4 / 3
    # copies, and a scheduler's own methods through the wrapper
    twin = copy.deepcopy(optim)
    assert isinstance(twin, DistributedOptimizer) and len(twin.optim_objs) == len(optim.optim_objs) == 3
    sched = DistributedOptimizer(
        pyro.optim.ExponentialLR({"optimizer": torch.optim.SGD, "optim_args": {"lr": 0.1}, "gamma": 0.5})
    )
    _svi_run(ScoreMatching("esm"), EnergyModel(_data(), register=True), sched, (UNION,))
    sched.step()
    assert {o.get_last_lr()[0] for o in sched.optim_objs.values()} == {0.05}


def test_a_copied_distributed_optimizer_keeps_the_default_group(ranks):
    assert ranks[0]["copy_on_world"] and ranks[1]["copy_on_world"]
