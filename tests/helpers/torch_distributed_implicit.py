"""Two-rank checks of the batch-global terms of ``ppl_score.pyro.WAE`` and
``ppl_score.pyro.ImplicitELBO`` under ``torch.nn.parallel.DistributedDataParallel``
(``tests/pyro/test_distributed_implicit.py``).

The problems are built alike in the parent (single-process references on the whole batch)
and in the ranks (gloo, ``torch.multiprocessing.spawn``), in float64 and with all randomness
fixed: explicit prior draws, explicit guide noise, seeded estimators. Each rank runs every
check in one spawn (``tests.helpers.torch_distributed.run_ranks``); :func:`run_ranks` returns
the results.

Checks (``name -> {"value", "grads", ...}`` per rank; ``reference(name)`` in the parent):

* ``wae_mmd[_none]``: WAE-MMD, unequal shards (5 + 3 codes), explicit prior draws;
* ``wae_mmd_gen``: WAE-MMD with the prior draws from a per-rank ``generator``;
* ``wae_stein[_none]``: WAE with the aggregate posterior's score by the Stein estimator;
* ``wae_learned[_none]``: the same with a learned estimator (replicas seeded differently);
* ``wae_learned_global_rng``: the same, the estimator without a generator of its own: its
  draws come from rank 0's global RNG, which alone advances;
* ``elbo_global_{stein,spectral}[_none]``: ImplicitELBO, a global implicit latent whose
  particles are split over the ranks (3 each), the data on every rank;
* ``elbo_global_seq``: the same with sequential particles;
* ``elbo_global_learned``: the same with a learned estimator;
* ``elbo_local_{learned,stein}[_none]``: ImplicitELBO, an amortized implicit encoder of local
  latents, the data sharded (4 + 4), a context-conditioned learned estimator or Stein.

``_none``: the same run without ``process_group`` (the per-rank objective).
"""

from __future__ import annotations

import pickle

import numpy as np

WORLD_SIZE = 2
D_X, D_Z = 3, 2

# WAE: 8 codes, shards of 5 and 3 (unequal: the per-datum terms are divided by B / world_size)
X_WAE = np.random.default_rng(11).normal(size=(8, D_X))
DRAWS = np.random.default_rng(12).normal(size=(8, D_Z))
WAE_SHARDS = (slice(0, 5), slice(5, 8))

# ImplicitELBO, global latent: 3 particles per rank, the data on every rank
X_GLOBAL = np.random.default_rng(13).normal(size=(4, D_Z))
P_RANK = 3
EPS_GLOBAL = np.random.default_rng(14).normal(size=(WORLD_SIZE * P_RANK, D_Z))

# ImplicitELBO, local latents: 8 data, shards of 4 (a plate's subsampling scale N / B_r), 2 particles
X_LOCAL = np.random.default_rng(15).normal(size=(8, D_X))
P_LOCAL = 2
EPS_LOCAL = np.random.default_rng(16).normal(size=(P_LOCAL, 8, D_Z))
LOCAL_SHARDS = (slice(0, 4), slice(4, 8))

CHECKS = (
    "wae_mmd",
    "wae_mmd_none",
    "wae_mmd_gen",
    "wae_stein",
    "wae_stein_none",
    "wae_learned",
    "wae_learned_none",
    "wae_learned_global_rng",
    "elbo_global_stein",
    "elbo_global_stein_none",
    "elbo_global_spectral",
    "elbo_global_spectral_none",
    "elbo_global_seq",
    "elbo_global_learned",
    "elbo_local_learned",
    "elbo_local_learned_none",
    "elbo_local_stein",
    "elbo_local_stein_none",
)


# --------------------------------------------------------------------------------------
# the problems (torch and Pyro are imported inside: the module is imported by the test's
# collection, and the spawned ranks import it again)


def _torch():
    import pyro
    import pyro.distributions as pdist
    import torch

    return torch, pyro, pdist


def _draws_normal():
    torch, pyro, pdist = _torch()

    class DrawsNormal(pdist.Normal):
        """``Normal`` whose ``sample()`` returns given draws (when given): WAE's prior draws."""

        def __init__(self, loc, scale, draws=None):
            super().__init__(loc, scale)
            self.draws = draws

        def sample(self, sample_shape=torch.Size()):
            return super().sample(sample_shape) if self.draws is None else self.draws

        def expand(self, batch_shape, _instance=None):
            shape = torch.Size(batch_shape)
            return DrawsNormal(self.loc.expand(shape), self.scale.expand(shape), self.draws)

    return DrawsNormal


def _nets(seed):
    torch, _, _ = _torch()
    torch.manual_seed(seed)
    enc = torch.nn.Sequential(torch.nn.Linear(D_X, 6), torch.nn.Tanh(), torch.nn.Linear(6, D_Z)).double()
    dec = torch.nn.Sequential(torch.nn.Linear(D_Z, 6), torch.nn.Tanh(), torch.nn.Linear(6, D_X)).double()
    return enc, dec


def _estimator(init_seed, gen_seed, context_dim=0):
    torch, _, _ = _torch()
    from ppl_score.torch.estimators import LearnedScoreEstimator

    torch.manual_seed(init_seed)
    return LearnedScoreEstimator(
        D_Z,
        context_dim,
        hidden=(8,),
        n_steps=3,
        lr=1e-2,
        dtype=torch.float64,
        generator=torch.Generator().manual_seed(gen_seed),
    )


def _wae_pair(enc, dec, draws):
    torch, pyro, pdist = _torch()
    DrawsNormal = _draws_normal()

    def model(x):
        with pyro.plate("data", x.shape[0]):
            prior = DrawsNormal(torch.zeros(x.shape[0], D_Z, dtype=x.dtype), 1.0, draws)
            z = pyro.sample("z", prior.to_event(1))
            pyro.sample("x", pdist.Normal(dec(z), 0.5).to_event(1), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", pdist.Delta(enc(x), event_dim=1))

    return model, guide


class _Affine:
    """``z = loc + exp(log_scale) * eps``: the implicit guide of the global latent."""

    @staticmethod
    def make():
        torch, _, _ = _torch()

        class Affine(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.loc = torch.nn.Parameter(torch.tensor([0.2, -0.1], dtype=torch.float64))
                self.log_scale = torch.nn.Parameter(torch.tensor([-0.3, 0.1], dtype=torch.float64))

            def forward(self, eps):
                return self.loc + self.log_scale.exp() * eps

        return Affine()


def _global_pair(affine, eps, vectorized):
    torch, pyro, pdist = _torch()
    rows = iter(eps)

    def model(x):
        z = pyro.sample("z", pdist.Normal(torch.zeros(D_Z, dtype=x.dtype), 1.5).to_event(1))
        with pyro.plate("data", x.shape[0]):
            # z is [D] (sequential particles) or [P, 1, D] (vectorized): broadcast with x [N, D]
            pyro.sample("x", pdist.Normal(torch.tanh(z) + 0.3 * z, 0.7).to_event(1), obs=x)

    def guide(x):
        e = eps.unsqueeze(-2) if vectorized else next(rows)  # [P, 1, D] in the particle plate
        pyro.sample("z", pdist.Delta(affine(e), event_dim=1))

    return model, guide


def _local_pair(enc, dec, n_total):
    torch, pyro, pdist = _torch()

    def model(x, eps, idx):
        with pyro.plate("data", n_total, subsample=idx):
            z = pyro.sample("z", pdist.Normal(torch.zeros(D_Z, dtype=x.dtype), 1.0).to_event(1))
            pyro.sample("x", pdist.Normal(dec(z), 0.5).to_event(1), obs=x)

    def guide(x, eps, idx):
        with pyro.plate("data", n_total, subsample=idx):
            h = torch.cat([x.expand(eps.shape[0], -1, -1), eps], -1)  # [P, B, D_X + D_Z]
            pyro.sample("z", pdist.Delta(enc(h), event_dim=1))

    return model, guide


def _local_nets(seed):
    torch, _, _ = _torch()
    torch.manual_seed(seed)
    enc = torch.nn.Sequential(torch.nn.Linear(D_X + D_Z, 6), torch.nn.Tanh(), torch.nn.Linear(6, D_Z)).double()
    dec = torch.nn.Sequential(torch.nn.Linear(D_Z, 6), torch.nn.Tanh(), torch.nn.Linear(6, D_X)).double()
    return enc, dec


def _grads(*modules):
    return [p.grad.detach().clone() for m in modules for p in m.parameters()]


def _state(est):
    return {k: v for k, v in est.state_dict()["net"].items()}


# --------------------------------------------------------------------------------------
# one check: (loss, modules, model, guide, args) -> value and gradients; ``wrap`` is DDP in
# the ranks and the identity in the parent


def _wae_check(name, wrap, shard, group, rank):
    torch, _, _ = _torch()
    from ppl_score.pyro.wae import WAE

    regularizer = "mmd" if name.startswith("wae_mmd") else "score"
    enc, dec = _nets(0)
    denc, ddec = wrap(enc), wrap(dec)
    x = torch.as_tensor(X_WAE[shard])
    draws = torch.as_tensor(DRAWS[shard])
    generator = None
    est = None
    if name == "wae_mmd_gen":
        draws = None  # prior.sample(): from the generator
        generator = torch.Generator().manual_seed(100 + rank)
    if name.startswith("wae_learned"):
        # the replicas start from different networks and generators: the group syncs them;
        # without one, from the same (the per-rank shards alone make them differ)
        seed = rank if group is not None else 0
        est = _estimator(10 + seed, 20 + seed)
        if name == "wae_learned_global_rng":
            est.generator = None
            torch.manual_seed(50 + rank)
    estimator = est if est is not None else "stein"
    loss = WAE(regularizer, lam=3.0, estimator=estimator, generator=generator, process_group=group)
    model, guide = _wae_pair(denc, ddec, draws)
    value = loss.differentiable_loss(model, guide, x)
    value.backward()
    out = {"value": float(value.detach()), "grads": _grads(enc, dec)}
    if est is not None:
        out["state"] = _state(est)
        out["next_draw"] = float(torch.rand(()))  # where the global RNG stands
    if regularizer == "mmd":
        with torch.no_grad():
            out["mmd"] = loss.terms(model, guide, x)["mmd"]
    return out


def _elbo_global_check(name, wrap, rows, group, rank):
    torch, _, _ = _torch()
    from ppl_score.pyro.implicit import ImplicitELBO

    vectorized = "seq" not in name
    affine = _Affine.make()
    model, guide = _global_pair(wrap(affine), torch.as_tensor(EPS_GLOBAL[rows]), vectorized)
    estimator = "spectral" if "spectral" in name else "stein"
    est = None
    if "learned" in name:
        seed = rank if group is not None else 0
        est = estimator = _estimator(60 + seed, 70 + seed)
    n = rows.stop - rows.start
    loss = ImplicitELBO(
        estimator,
        num_particles=n,
        vectorize_particles=vectorized,
        max_plate_nesting=1,  # the data plate (the particle plate is added by Pyro)
        process_group=group,
    )
    value = loss.differentiable_loss(model, guide, torch.as_tensor(X_GLOBAL))
    value.backward()
    out = {"value": float(value.detach()), "grads": _grads(affine)}
    if est is not None:
        out["state"] = _state(est)
    return out


def _elbo_local_check(name, wrap, shard, group, rank):
    torch, _, _ = _torch()
    from ppl_score.pyro.implicit import ImplicitELBO

    enc, dec = _local_nets(1)
    model, guide = _local_pair(wrap(enc), wrap(dec), X_LOCAL.shape[0])
    est = None
    if "learned" in name:
        seed = rank if group is not None else 0
        est = _estimator(30 + seed, 40 + seed, context_dim=D_X)
    loss = ImplicitELBO(
        est if est is not None else "stein",
        num_particles=P_LOCAL,
        vectorize_particles=True,
        max_plate_nesting=1,
        context=(lambda x, eps, idx: x) if est is not None else None,
        process_group=group,
    )
    idx = torch.arange(X_LOCAL.shape[0])[shard]
    args = (torch.as_tensor(X_LOCAL[shard]), torch.as_tensor(EPS_LOCAL[:, shard]), idx)
    value = loss.differentiable_loss(model, guide, *args)
    value.backward()
    out = {"value": float(value.detach()), "grads": _grads(enc, dec)}
    if est is not None:
        out["state"] = _state(est)
    return out


def _run(name, wrap, rank, group):
    """Check ``name`` on rank ``rank`` of ``WORLD_SIZE`` (``group`` None: without
    ``process_group``), or in one process on the whole batch (``rank`` None)."""
    if name.endswith("_none"):
        group = None
    full = rank is None
    if name.startswith("wae"):
        shard = slice(0, X_WAE.shape[0]) if full else WAE_SHARDS[rank]
        return _wae_check(name, wrap, shard, group, 0 if full else rank)
    if name.startswith("elbo_global"):
        rows = slice(0, EPS_GLOBAL.shape[0]) if full else slice(rank * P_RANK, (rank + 1) * P_RANK)
        return _elbo_global_check(name, wrap, rows, group, 0 if full else rank)
    shard = slice(0, X_LOCAL.shape[0]) if full else LOCAL_SHARDS[rank]
    return _elbo_local_check(name, wrap, shard, group, 0 if full else rank)


def reference(name: str) -> dict:
    """The single-process value of check ``name`` on the whole batch (no process group)."""
    import pyro
    import torch

    if name == "wae_mmd_gen":
        # the ranks' generator draws, concatenated: what the ranks gather
        from ppl_score.torch.distributed import use_generator

        parts = []
        for r, shard in enumerate(WAE_SHARDS):
            with use_generator(torch.Generator().manual_seed(100 + r)):
                n = shard.stop - shard.start
                parts.append(pyro.distributions.Normal(torch.zeros(n, D_Z, dtype=torch.float64), 1.0).sample())
        global DRAWS
        saved, DRAWS = DRAWS, torch.cat(parts).numpy()
        try:
            return _run("wae_mmd", lambda m: m, None, None)
        finally:
            DRAWS = saved
    return _run(name.removesuffix("_none"), lambda m: m, None, None)


# --------------------------------------------------------------------------------------
# the ranks


def _extras(rank, group):
    """Pickling a loss that holds the default group, and one holding another group."""
    import torch.distributed as dist

    from ppl_score.pyro.implicit import ImplicitELBO
    from ppl_score.pyro.wae import WAE
    from ppl_score.torch.distributed import rank_generator, rank_seed

    out = {"rank_seed": rank_seed(7), "rank_generator_seed": rank_generator(7).initial_seed()}
    for cls in (WAE, ImplicitELBO):
        loss = cls(process_group=group) if cls is WAE else cls(num_particles=2, process_group=group)
        back = pickle.loads(pickle.dumps(loss))
        out[f"{cls.__name__}_world_roundtrip"] = back.process_group is dist.group.WORLD
        sub = dist.new_group([0, 1])
        try:
            pickle.dumps(cls(process_group=sub))
            out[f"{cls.__name__}_subgroup_error"] = None
        except TypeError as err:
            out[f"{cls.__name__}_subgroup_error"] = str(err)
    return out


def _checks(rank: int, world_size: int) -> dict:
    """Every check on this rank (run by ``tests.helpers.torch_distributed.run_ranks``)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    group = dist.group.WORLD
    results = {name: _run(name, DDP, rank, group) for name in CHECKS}
    results["extras"] = _extras(rank, group)
    return results


def run_ranks() -> list[dict]:
    """Run every check on ``WORLD_SIZE`` ranks (one spawn); their results, by rank."""
    from tests.helpers.torch_distributed import run_ranks as spawn

    return spawn(_checks, world_size=WORLD_SIZE)
