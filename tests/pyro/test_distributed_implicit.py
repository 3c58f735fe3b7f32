"""``ppl_score.pyro.WAE`` and ``ppl_score.pyro.ImplicitELBO`` under
``DistributedDataParallel``: their batch-global terms with ``process_group`` (WAE's MMD and
aggregate-posterior score, the kernel estimators over a global latent's particles, the
learned estimator's updates) give, after DDP's gradient average, the loss and gradients of
one process on the whole batch (float64, to 1e-9), and the learned estimator's replicas stay
identical; without ``process_group`` the batch-global term is per rank (a different
objective: the differences are non-zero). Also ``generator`` (validation, reproducibility,
the global RNG left alone, pickling) in one process.

The two ranks (gloo, ``torch.multiprocessing.spawn``) run every check in one spawn
(``tests/helpers/torch_distributed_implicit.py``); the references are computed here.
"""

from __future__ import annotations

import copy
import io
import pickle

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pyro = pytest.importorskip("pyro")
import pyro.distributions as pdist  # noqa: E402

from ppl_score.pyro.implicit import ImplicitELBO  # noqa: E402
from ppl_score.pyro.wae import WAE  # noqa: E402
from ppl_score.torch.distributed import use_generator  # noqa: E402
from tests.helpers import torch_distributed_implicit as h  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread", "pyro_param_store")

TOL = 1e-9


@pytest.fixture(scope="module")
def ranks():
    if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available")
    return h.run_ranks()


def _reference(name):
    with torch.random.fork_rng(devices=[]):
        return h.reference(name)


def _max_diff(a, b):
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def _check_equal_to_reference(ranks, name):
    """Mean of the ranks' values and every rank's (DDP-averaged) gradients against one
    process on the whole batch; the learned estimator's state identical on the ranks and
    equal to the single process's."""
    ref = _reference(name)
    per_rank = [r[name] for r in ranks]
    value = np.mean([r["value"] for r in per_rank])
    assert abs(value - ref["value"]) <= TOL * max(1.0, abs(ref["value"])), (name, value, ref["value"])
    for r in per_rank:
        assert _max_diff(r["grads"], ref["grads"]) <= TOL, (name, _max_diff(r["grads"], ref["grads"]))
    if "state" in ref:
        for key, want in ref["state"].items():
            assert torch.equal(per_rank[0]["state"][key], per_rank[1]["state"][key]), (name, key)
            assert float((per_rank[0]["state"][key] - want).abs().max()) <= TOL, (name, key)
    return ref, per_rank


@pytest.mark.distributed
def test_wae_mmd_on_the_gathered_batch(ranks):
    # unequal shards (5 + 3 codes), explicit prior draws; then draws from a per-rank generator
    ref, per_rank = _check_equal_to_reference(ranks, "wae_mmd")
    for r in per_rank:  # the MMD itself: the same on every rank, the whole batch's
        assert abs(r["mmd"] - ref["mmd"]) <= TOL
    _check_equal_to_reference(ranks, "wae_mmd_gen")


@pytest.mark.distributed
@pytest.mark.parametrize("name", ["wae_stein", "wae_learned", "wae_learned_global_rng"])
def test_wae_score_on_the_gathered_batch(ranks, name):
    ref, per_rank = _check_equal_to_reference(ranks, name)
    if name == "wae_learned_global_rng":
        # an estimator without a generator draws from rank 0's global RNG, which advances
        # as in one process; the other ranks' global RNG is left alone
        assert per_rank[0]["next_draw"] == ref["next_draw"]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(51)
            assert per_rank[1]["next_draw"] == float(torch.rand(()))


@pytest.mark.distributed
@pytest.mark.parametrize(
    "name", ["elbo_global_stein", "elbo_global_spectral", "elbo_global_seq", "elbo_global_learned"]
)
def test_implicit_elbo_pools_a_global_latents_particles(ranks, name):
    # 3 particles per rank (the data on every rank) = one process with the 6 particles
    _check_equal_to_reference(ranks, name)


@pytest.mark.distributed
@pytest.mark.parametrize("name", ["elbo_local_learned", "elbo_local_stein"])
def test_implicit_elbo_local_latents_on_sharded_data(ranks, name):
    # an amortized encoder, the data sharded 4 + 4 (plate subsampling scale 2)
    _check_equal_to_reference(ranks, name)


@pytest.mark.distributed
def test_without_process_group_the_global_term_is_per_rank(ranks):
    # the batch-global terms from each rank's shard alone: another objective, measured
    # differences of 0.04-5 in the values or gradients
    for name in [
        "wae_mmd_none",
        "wae_stein_none",
        "wae_learned_none",
        "elbo_global_stein_none",
        "elbo_global_spectral_none",
        "elbo_local_learned_none",
    ]:
        ref = _reference(name)
        diff = max(_max_diff(r[name]["grads"], ref["grads"]) for r in ranks)
        assert diff > 1e-3, (name, diff)
        if "state" in ref:  # the replicas of the learned estimator drift apart
            assert any(not torch.equal(ranks[0][name]["state"][k], ranks[1][name]["state"][k]) for k in ref["state"])
    # the kernel estimates of local latents are per datum: nothing to gather
    ref = _reference("elbo_local_stein_none")
    assert max(_max_diff(r["elbo_local_stein_none"]["grads"], ref["grads"]) for r in ranks) <= TOL


@pytest.mark.distributed
def test_process_group_pickling_and_rank_seeds(ranks):
    for r in ranks:
        extras = r["extras"]
        for cls in ("WAE", "ImplicitELBO"):
            assert extras[f"{cls}_world_roundtrip"] is True
            assert "cannot be pickled" in extras[f"{cls}_subgroup_error"]
        assert extras["rank_seed"] == extras["rank_generator_seed"]
    assert ranks[0]["extras"]["rank_seed"] != ranks[1]["extras"]["rank_seed"]


# --------------------------------------------------------------------------------------
# generator= and pickling, in one process


def _wae_problem():
    torch.manual_seed(0)
    enc = torch.nn.Linear(3, 2).double()
    dec = torch.nn.Linear(2, 3).double()

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", pdist.Normal(torch.zeros(2, dtype=x.dtype), 1.0).to_event(1))
            pyro.sample("x", pdist.Normal(dec(z), 0.5).to_event(1), obs=x)

    def guide(x):  # an implicit encoder: noise from torch.randn
        with pyro.plate("data", x.shape[0]):
            eps = torch.randn(x.shape[0], 2, dtype=x.dtype)
            pyro.sample("z", pdist.Delta(enc(x) + 0.3 * eps, event_dim=1))

    return model, guide, torch.as_tensor(h.X_WAE)


def _elbo_problem():
    loc = torch.zeros(2, dtype=torch.float64, requires_grad=True)

    def model():
        pyro.sample("z", pdist.Normal(torch.zeros(2, dtype=torch.float64), 1.0).to_event(1))

    def guide():
        pyro.sample("z", pdist.Delta(loc + torch.randn(2, dtype=torch.float64), event_dim=1))

    return model, guide, loc


def test_generator_is_validated():
    for cls in (WAE, ImplicitELBO):
        with pytest.raises(TypeError, match="'generator' must be a torch.Generator"):
            cls(generator=0)
        with pytest.raises(TypeError, match="'process_group' must be None or a torch.distributed.ProcessGroup"):
            cls(process_group="WORLD")


@pytest.mark.parametrize("regularizer", ["mmd", "score"])
def test_wae_generator_draws_reproducibly_and_leaves_the_global_rng(regularizer):
    model, guide, x = _wae_problem()
    state = torch.get_rng_state()
    values = [WAE(regularizer, generator=torch.Generator().manual_seed(3)).loss(model, guide, x) for _ in range(2)]
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG was not used
    assert values[0] == values[1]
    other = WAE(regularizer, generator=torch.Generator().manual_seed(4)).loss(model, guide, x)
    assert other != values[0]
    # the generator's stream stands in for the global RNG: the same numbers as seeding it
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        assert WAE(regularizer).loss(model, guide, x) == values[0]


def test_implicit_elbo_generator_draws_the_particles():
    model, guide, loc = _elbo_problem()
    grads = []
    for _ in range(2):
        loc.grad = None
        loss = ImplicitELBO("stein", num_particles=4, generator=torch.Generator().manual_seed(5))
        state = torch.get_rng_state()
        loss.differentiable_loss(model, guide).backward()
        assert torch.equal(torch.get_rng_state(), state)
        grads.append(loc.grad.clone())
    assert torch.equal(grads[0], grads[1])


def _roundtrips(obj):
    yield pickle.loads(pickle.dumps(obj))
    yield copy.deepcopy(obj)
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    yield torch.load(buf, weights_only=False)


def test_losses_with_a_generator_roundtrip():
    model, guide, x = _wae_problem()
    loss = WAE("mmd", generator=torch.Generator().manual_seed(8))
    loss.loss(model, guide, x)  # advance the stream
    want = loss.generator.get_state()
    for other in _roundtrips(loss):
        assert isinstance(other.generator, torch.Generator)
        assert torch.equal(other.generator.get_state(), want)
        assert other.process_group is None
        same = torch.Generator()
        same.set_state(want)
        assert other.loss(model, guide, x) == WAE("mmd", generator=same).loss(model, guide, x)
    model, guide, _ = _elbo_problem()
    elbo = ImplicitELBO("stein", num_particles=3, generator=torch.Generator().manual_seed(9))
    for other in _roundtrips(elbo):
        assert torch.equal(other.generator.get_state(), elbo.generator.get_state())
    for other in _roundtrips(ImplicitELBO("stein", num_particles=3)):
        assert other.generator is None


def test_use_generator_stands_in_for_the_global_rng():
    g, twin = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    state = torch.get_rng_state()
    with use_generator(g):
        a = torch.randn(5)
        b = pdist.Normal(torch.zeros(3), 1.0).sample()
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, torch.randn(5, generator=twin))
    assert torch.equal(b, torch.normal(torch.zeros(3), torch.ones(3), generator=twin))
    assert torch.equal(g.get_state(), twin.get_state())
    with use_generator(None):  # nothing
        torch.randn(1)
    assert not torch.equal(torch.get_rng_state(), state)
