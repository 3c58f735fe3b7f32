"""Data parallelism of the torch backend on two gloo processes (issue "Scale-out", torch/Pyro
part 1): ``score_matching_loss`` of an ``MLPEnergy`` (and a ``DEQEnergy``) wrapped in the
default ``DistributedDataParallel``, every method with fixed projections and noise equal to
one process on the concatenated batch (float64, 1e-9); per-rank generators keep the ranks in
sync. And the change that made the default DDP work: the energies' last bias (a constant
offset, gradient-free under score matching) is gone, and old checkpoints still load.

One spawn runs every distributed check (``_worker``, module-scoped fixture ``ranks``); the
references are computed here.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402

from ppl_score.spec import OBJECTIVES, UNCONDITIONAL_METHODS  # noqa: E402
from ppl_score.torch import score_matching_loss  # noqa: E402
from ppl_score.torch.deq import DEQEnergy, deq_params  # noqa: E402
from ppl_score.torch.distributed import rank_generator  # noqa: E402
from ppl_score.torch.nets import MLPEnergy, mlp_params  # noqa: E402
from tests.helpers.torch_distributed import WORLD, assert_close, run_ranks  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

F64 = torch.float64
B, D, M = 8, 3, 2  # rows (all ranks), event size, projections
STEPS = 3
LR = 1e-2
METHODS = sorted(UNCONDITIONAL_METHODS)
SHARDS = [torch.arange(r, B, WORLD) for r in range(WORLD)]
DEQ_OPTIONS = dict(gamma=0.8, tol=1e-12, max_iter=400)


def _batch():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(B, D, dtype=F64, generator=g)
    v = torch.randn(M, B, D, dtype=F64, generator=g)
    noise = torch.randn(B, D, dtype=F64, generator=g)
    return x, v, noise


def _draws(method, v, noise):
    """The fixed draws ``method`` takes (projections and/or noise)."""
    spec = OBJECTIVES[method]
    out = {}
    if spec.uses_projections:
        out["projections"] = v
    if spec.uses_noise:
        out["noise"] = noise
    return out


def _energy(kind="mlp"):
    torch.manual_seed(0)
    if kind == "deq":
        return DEQEnergy(D, 4, quadratic=1.0, **DEQ_OPTIONS).double()
    return MLPEnergy(D, hidden=(8, 8), quadratic=1.0).double()


def _params(module):
    return {name.removeprefix("module."): p.detach().clone() for name, p in module.named_parameters()}


def _run(net, x, method, steps=STEPS, **kw):
    """``steps`` SGD steps of ``score_matching_loss(net, x, method, **kw)`` (mean over rows)."""
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = score_matching_loss(net, x, method, **kw)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, _params(net)


def _worker(rank, world_size):
    out = {}
    x, v, noise = _batch()
    idx = SHARDS[rank]
    for method in METHODS:
        draws = _draws(method, v[:, idx], noise[idx])
        out[method] = _run(DDP(_energy()), x[idx], method, **draws)
    out["deq"] = _run(DDP(_energy("deq")), x[idx], "esm", steps=2)
    out["generator"] = _run(DDP(_energy()), x[idx], "ssm_vr", generator=rank_generator(0))
    return out


@pytest.fixture(scope="module")
def ranks():
    return run_ranks(_worker)


@pytest.mark.distributed
@pytest.mark.parametrize("method", METHODS)
def test_ddp_mlp_energy_with_fixed_draws_equals_one_process_on_the_whole_batch(ranks, method):
    """The default DDP (which failed on its second step while ``MLPEnergy`` had a last bias):
    each rank its rows and their projections and noise, the mean over ranks of the shards'
    means is the whole batch's mean, to 1e-9 on losses and parameters after 3 steps."""
    x, v, noise = _batch()
    losses, params = _run(_energy(), x, method, **_draws(method, v, noise))
    got = [ranks[r][method] for r in range(WORLD)]
    assert_close([sum(g[0][s] for g in got) / WORLD for s in range(STEPS)], losses, what=f"{method} losses")
    for r in range(WORLD):
        assert_close(got[r][1], params, what=f"{method} rank {r} params")
    assert not torch.equal(params["net.0.weight"], _energy().net[0].weight)


@pytest.mark.distributed
def test_ddp_deq_energy_equals_one_process(ranks):
    """``DEQEnergy`` (readout without bias) under the default DDP; the fixed points are
    solved to 1e-12, so the shards' solves agree with the whole batch's to 1e-9."""
    x, _, _ = _batch()
    losses, params = _run(_energy("deq"), x, "esm", steps=2)
    got = [ranks[r]["deq"] for r in range(WORLD)]
    assert_close([sum(g[0][s] for g in got) / WORLD for s in range(2)], losses, what="losses")
    for r in range(WORLD):
        assert_close(got[r][1], params, what=f"rank {r} params")


@pytest.mark.distributed
def test_ddp_with_rank_generators_keeps_the_ranks_in_sync(ranks):
    (l0, p0), (l1, p1) = ranks[0]["generator"], ranks[1]["generator"]
    assert l0 != l1
    for name in p0:
        assert torch.equal(p0[name], p1[name]), name


# ---------------------------------------------------------------------------------------
# The energies' constant offset (one process)
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["mlp", "deq"])
@pytest.mark.parametrize("method", METHODS)
def test_every_parameter_of_the_library_energies_gets_a_gradient(kind, method):
    """What the default DDP needs: no parameter left without gradient by the score."""
    net = _energy(kind)
    x, v, noise = _batch()
    score_matching_loss(net, x, method, **_draws(method, v, noise)).backward()
    assert [name for name, p in net.named_parameters() if p.grad is None] == []


def _old_checkpoint(net, key, value=3.0):
    state = dict(net.state_dict())
    state[key] = torch.full((1,), value, dtype=F64)
    return state


@pytest.mark.parametrize("kind, key", [("mlp", "net.4.bias"), ("deq", "readout.bias")])
def test_a_checkpoint_with_the_last_bias_still_loads(kind, key):
    """A ``state_dict`` of the earlier layout (with the last bias) loads, strictly, the bias
    dropped: the same score, and the log density up to that constant."""
    source = _energy(kind)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(0.1)
    state = _old_checkpoint(source, key)
    assert key not in source.state_dict()
    for target in (_energy(kind), torch.nn.Sequential(_energy(kind))):
        prefixed = state if not isinstance(target, torch.nn.Sequential) else {f"0.{k}": t for k, t in state.items()}
        result = target.load_state_dict(prefixed, strict=True)
        assert not result.missing_keys and not result.unexpected_keys
        net = target if not isinstance(target, torch.nn.Sequential) else target[0]
        x, _, _ = _batch()
        assert_close(net(x), source(x), tol=1e-12, what="log p")
        assert_close(score_matching_loss(net, x, "esm"), score_matching_loss(source, x, "esm"), tol=1e-12)
    assert key in state  # the caller's dict is left as it was


def test_the_energies_pickle_and_copy_with_their_load_hook():
    import copy
    import io
    import pickle

    for kind, key in (("mlp", "net.4.bias"), ("deq", "readout.bias")):
        net = _energy(kind)
        buf = io.BytesIO()
        torch.save(net, buf)
        buf.seek(0)
        copies = [pickle.loads(pickle.dumps(net)), copy.deepcopy(net), torch.load(buf, weights_only=False)]
        for twin in copies:
            assert not twin.load_state_dict(_old_checkpoint(net, key)).unexpected_keys


def test_parity_layouts_mark_the_missing_bias():
    """``mlp_params``: ``None`` for the last layer (the layout ``ppl_score.jax.nets`` reads);
    ``deq_params``: a zero readout ``c`` (``ppl_score.jax.deq`` keeps one)."""
    layers = mlp_params(_energy())
    assert [b is None for _, b in layers] == [False, False, True]
    assert layers[-1][0].shape == (8, 1)
    readout = deq_params(_energy("deq"))["readout"]
    assert readout[0].shape == (4, 1) and readout[1].tolist() == [0.0]
