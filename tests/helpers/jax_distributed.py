"""The two-device scenarios of ``tests/{jax,numpyro}/test_distributed.py``.

JAX fixes its device count when it is imported, so the scenarios run in a subprocess started
with ``XLA_FLAGS=--xla_force_host_platform_device_count=2`` (two CPU devices) and float64;
each scenario function returns JSON-able numbers, which the test modules assert on.
``run(name)`` runs ``python -m tests.helpers.jax_distributed <name>`` once per test module
(compiles are slow: one process, tiny shapes).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEVICES = 2
N, D = 8, 2  # rows of the batch (divisible by DEVICES) and event size
STEPS = 3


def _env() -> dict:
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={DEVICES}"])
    env["JAX_PLATFORMS"] = "cpu"
    env["JAX_ENABLE_X64"] = "1"
    return env


def run(name: str, timeout: float = 300.0) -> dict:
    """The scenario ``name``'s results, from a fresh two-device process; its wall time in
    ``"seconds"``."""
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "tests.helpers.jax_distributed", name],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"scenario {name!r} failed (exit {proc.returncode}):\n{proc.stderr[-6000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["seconds"] = time.perf_counter() - start
    return out


def max_rel_diff(a, b) -> float:
    """``max |a - b| / max(|b|, tiny)`` over the leaves of two pytrees of arrays."""
    import jax
    import numpy as np

    diffs = [
        float(np.max(np.abs(np.asarray(x) - np.asarray(y)) / np.maximum(np.abs(np.asarray(y)), 1e-300)))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    ]
    return max(diffs)


def max_abs_diff(a, b) -> float:
    """``max |a - b|`` over the leaves of two pytrees of arrays (how far training moved)."""
    import jax
    import numpy as np

    return max(
        float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def _error(fn) -> list:
    """``[exception type name, message]`` of ``fn()``, or ``[None, None]``."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - reported to the test
        return [type(e).__name__, str(e)]
    return [None, None]


def _energy(params, x):
    """A tiny MLP log density ``x[B, D] -> [B]`` (float64), non-quadratic."""
    import jax.numpy as jnp

    (w1, b1), (w2, b2) = params
    return (jnp.tanh(x @ w1 + b1) @ w2 + b2)[:, 0] - 0.5 * (x * x).sum(-1)


def _energy_params():
    import jax

    k1, k2 = jax.random.split(jax.random.PRNGKey(1))
    h = 4
    return [
        (jax.random.normal(k1, (D, h)), jax.random.normal(k2, (h,)) * 0.1),
        (jax.random.normal(k2, (h, 1)) / 2.0, jax.random.normal(k1, (1,)) * 0.1),
    ]


def _data():
    import jax

    return jax.random.normal(jax.random.PRNGKey(0), (N, D))


# ---------------------------------------------------------------------------------------
# ppl_score.jax: the helpers, the sharded jit loop and the shard_map loop
# ---------------------------------------------------------------------------------------


def jax_scenarios() -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.sharding import PartitionSpec as P

    from ppl_score.jax import score_matching_loss
    from ppl_score.jax.distributed import (
        all_reduce_gradients,
        data_mesh,
        gather_rows,
        is_distributed,
        rank_key,
        replicate,
        shard_batch,
        world,
    )

    out = {"devices": jax.device_count(), "x64": bool(jax.config.jax_enable_x64)}
    mesh = data_mesh()
    x = _data()
    params0 = _energy_params()
    key0 = jax.random.PRNGKey(7)

    # -- shard_batch / replicate ----------------------------------------------------------
    xs = shard_batch(x, mesh)
    tree = shard_batch({"x": x, "w": jnp.arange(float(N))}, mesh)
    out["shard_spec"] = str(xs.sharding.spec)
    out["shard_shapes"] = sorted([list(s.data.shape) for s in xs.addressable_shards])
    out["shard_rows"] = [
        [int(s.index[0].start or 0), int(s.index[0].stop or N)]
        for s in sorted(xs.addressable_shards, key=lambda s: s.device.id)
    ]
    out["tree_shapes"] = sorted([list(s.data.shape) for s in tree["w"].addressable_shards])
    out["shard_values_equal"] = bool(np.array_equal(np.asarray(xs), np.asarray(x)))
    rep = replicate(params0, mesh)
    out["replicated_shapes"] = sorted([list(s.data.shape) for s in rep[0][0].addressable_shards])
    out["replicated_spec"] = str(rep[0][0].sharding.spec)
    out["indivisible"] = _error(lambda: shard_batch(x[:7], mesh))
    out["indivisible_tree"] = _error(lambda: shard_batch({"x": x, "y": x[:3]}, mesh))
    out["outside"] = [is_distributed(), list(world())]

    optimizer = optax.adam(0.05)
    tic = time.perf_counter()

    # -- recipe 1: the jitted optax loop, batch sharded vs not ----------------------------
    def loss_fn(p, xb, k, method):
        options = {"n_projections": 2} if method == "ssm_vr" else {}
        return score_matching_loss(lambda y: _energy(p, y), xb, method, key=k, **options)

    def make_step(method):
        @jax.jit
        def step(p, opt_state, xb, k):
            loss, g = jax.value_and_grad(loss_fn)(p, xb, k, method)
            updates, opt_state = optimizer.update(g, opt_state, p)
            return optax.apply_updates(p, updates), opt_state, loss

        return step

    for method in ("ssm_vr",):  # esm under sharding: tests/numpyro/test_distributed.py
        step = make_step(method)
        runs = {}
        for name, (p, batch) in {
            "unsharded": (params0, x),
            "sharded": (replicate(params0, mesh), xs),
        }.items():
            s = optimizer.init(p)
            losses = []
            for k in jax.random.split(key0, STEPS):
                p, s, loss = step(p, s, batch, k)
                losses.append(float(loss))
            runs[name] = (p, losses)
        out[f"jit_{method}"] = {
            "params_rel_diff": max_rel_diff(runs["sharded"][0], runs["unsharded"][0]),
            "loss_rel_diff": max_rel_diff(np.array(runs["sharded"][1]), np.array(runs["unsharded"][1])),
            "losses": runs["unsharded"][1],
            "moved": max_abs_diff(runs["unsharded"][0], params0),
            "params_spec": str(runs["sharded"][0][0][0].sharding.spec),
        }

    out["seconds_jit"] = time.perf_counter() - tic
    tic = time.perf_counter()

    # -- recipe 2: shard_map custom loop with per-device keys and averaged gradients ----
    def local_loss(p, xb, k):
        return loss_fn(p, xb, k, "ssm_vr")

    @jax.jit
    def by_hand(p, s, k):
        """The same step with each device's rows and folded key, the gradients' mean and sum
        over the devices computed here; the parameters follow the mean."""
        rows = N // DEVICES
        grads = [
            jax.grad(local_loss)(p, x[r * rows : (r + 1) * rows], jax.random.fold_in(k, r)) for r in range(DEVICES)
        ]
        g_sum = jax.tree.map(lambda *gs: sum(gs), *grads)
        g = jax.tree.map(lambda a: a / DEVICES, g_sum)
        updates, s = optimizer.update(g, s, p)
        return optax.apply_updates(p, updates), s, g, g_sum

    for check_vma in (True, False):

        def device_step(p, s, xb, k):
            g_local = jax.grad(local_loss)(p, xb, rank_key(k))
            g = all_reduce_gradients(g_local)
            g_sum = all_reduce_gradients(g_local, op="sum")
            naive = jax.lax.pmean(g_local, "data")  # the docs' warning: with check_vma, the sum
            updates, s = optimizer.update(g, s, p)
            return optax.apply_updates(p, updates), s, g, g_sum, naive

        sm_step = jax.jit(
            jax.shard_map(
                device_step,
                mesh=mesh,
                in_specs=(P(), P(), P("data"), P()),
                out_specs=(P(), P(), P(), P(), P()),
                check_vma=check_vma,
            )
        )
        p, s = replicate(params0, mesh), optimizer.init(params0)
        ph, sh = params0, optimizer.init(params0)
        diffs = {"mean": [], "sum": [], "naive_vs_mean": [], "naive_vs_sum": []}
        for k in jax.random.split(key0, STEPS):
            p, s, g, g_sum, naive = sm_step(p, s, xs, k)
            ph, sh, gh, gh_sum = by_hand(ph, sh, k)
            diffs["mean"].append(max_rel_diff(g, gh))
            diffs["sum"].append(max_rel_diff(g_sum, gh_sum))
            diffs["naive_vs_mean"].append(max_rel_diff(naive, gh))
            diffs["naive_vs_sum"].append(max_rel_diff(naive, gh_sum))
        out[f"shard_map_vma{int(check_vma)}"] = {
            **{f"{name}_rel_diff": max(d) for name, d in diffs.items()},
            "params_rel_diff": max_rel_diff(p, ph),
            "moved": max_abs_diff(p, params0),
        }
    out["seconds_shard_map"] = time.perf_counter() - tic

    # -- per-device keys and draws, world inside shard_map ------------------------------
    def keys_and_draws(k):
        kr = rank_key(k)
        rank, size = world()
        return (
            jax.random.key_data(kr)[None],
            jax.random.normal(kr, (1, 3, D)),
            jnp.reshape(rank, (1,)),
            jnp.full((1,), size),
            jnp.full((1,), is_distributed()),
        )

    keys, draws, ranks, sizes, bound = jax.jit(
        jax.shard_map(keys_and_draws, mesh=mesh, in_specs=P(), out_specs=P("data"))
    )(key0)
    expected_keys = np.stack([np.asarray(jax.random.fold_in(key0, r)) for r in range(DEVICES)])
    out["keys"] = {
        "equal_fold_in": bool(np.array_equal(np.asarray(keys), expected_keys)),
        "distinct": bool(not np.array_equal(np.asarray(keys[0]), np.asarray(keys[1]))),
        "draws_distinct": bool(not np.allclose(np.asarray(draws[0]), np.asarray(draws[1]))),
        "draws_equal_by_hand": bool(
            np.array_equal(
                np.asarray(draws),
                np.stack([np.asarray(jax.random.normal(jax.random.fold_in(key0, r), (3, D))) for r in range(DEVICES)]),
            )
        ),
        "ranks": np.asarray(ranks).tolist(),
        "sizes": np.asarray(sizes).tolist(),
        "bound": np.asarray(bound).tolist(),
        "outside_equals_device0": bool(np.array_equal(np.asarray(rank_key(key0)), expected_keys[0])),
    }

    # -- gather_rows: values, and the gradient of a batch-global term -------------------
    gathered = jax.jit(jax.shard_map(gather_rows, mesh=mesh, in_specs=P("data"), out_specs=P("data")))(xs)
    out["gather_equals_concat"] = bool(np.array_equal(np.asarray(gathered), np.tile(np.asarray(x), (DEVICES, 1))))

    w0 = jax.random.normal(jax.random.PRNGKey(3), (D, 3))

    def global_term(w, rows):
        """Couples the rows: the squared norm of the mean feature (a stand-in for MMD)."""
        return jnp.sum(jnp.mean(jnp.tanh(rows @ w), axis=0) ** 2)

    g_global = jax.grad(global_term)(w0, x)
    for check_vma in (True, False):

        def gathered_grad(w, xb):
            return all_reduce_gradients(jax.grad(lambda w: global_term(w, gather_rows(xb)))(w))

        def local_grad(w, xb):
            return all_reduce_gradients(jax.grad(global_term)(w, xb))

        for name, f in (("gathered", gathered_grad), ("local", local_grad)):
            g = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=(P(), P("data")), out_specs=P(), check_vma=check_vma))(
                w0, xs
            )
            out[f"global_{name}_vma{int(check_vma)}"] = max_rel_diff(g, g_global)
    return out


# ---------------------------------------------------------------------------------------
# ppl_score.numpyro: svi.update on a sharded batch
# ---------------------------------------------------------------------------------------


def numpyro_scenarios() -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import numpyro
    import numpyro.distributions as dist
    import optax
    from numpyro.infer import SVI

    from ppl_score.jax.distributed import data_mesh, replicate, shard_batch
    from ppl_score.numpyro import WAE, ScoreMatching

    out = {"devices": jax.device_count(), "x64": bool(jax.config.jax_enable_x64)}
    mesh = data_mesh()
    x = _data()
    xs = shard_batch(x, mesh)

    def fixed_model(x):
        loc = numpyro.param("loc", jnp.zeros(D))
        scale = numpyro.param("scale", jnp.ones(D), constraint=dist.constraints.positive)
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("x", dist.StudentT(4.0, loc, scale).to_event(1), obs=x)

    def latent_model(x):
        loc = numpyro.sample("loc", dist.Normal(jnp.zeros(D), 3.0).to_event(1))
        scale = numpyro.param("scale", jnp.ones(D), constraint=dist.constraints.positive)
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("x", dist.StudentT(4.0, loc, scale).to_event(1), obs=x)

    def latent_guide(x):
        mu = numpyro.param("mu", jnp.full(D, 0.5))
        sigma = numpyro.param("sigma", jnp.full(D, 0.5), constraint=dist.constraints.positive)
        numpyro.sample("loc", dist.Normal(mu, sigma).to_event(1))

    def compare(svi, name):
        """``STEPS`` jitted ``svi.update`` on ``x`` and on ``shard_batch(x)`` from one init, and
        on ``shard_batch(x)`` from the same init with another key (same compiled update)."""
        tic = time.perf_counter()
        update = jax.jit(svi.update)
        state0 = svi.init(jax.random.PRNGKey(2), x)
        runs = {}
        other = state0._replace(rng_key=jax.random.PRNGKey(11))
        for kind, (state, batch) in {
            "unsharded": (state0, x),
            "sharded": (replicate(state0, mesh), xs),
            "other_key": (replicate(other, mesh), xs),
        }.items():
            losses = []
            for _ in range(STEPS):
                state, loss = update(state, batch)
                losses.append(float(loss))
            runs[kind] = (svi.get_params(state), losses, state)
        params, losses = runs["unsharded"][:2]
        leaf = jax.tree.leaves(runs["sharded"][0])[0]
        out[name] = {
            "params_rel_diff": max_rel_diff(runs["sharded"][0], params),
            "loss_rel_diff": max_rel_diff(np.array(runs["sharded"][1]), np.array(losses)),
            "losses": losses,
            "moved": max_abs_diff(params, svi.get_params(state0)),
            "finite": bool(np.all(np.isfinite(losses))),
            "params_replicated": bool(leaf.sharding.is_fully_replicated),
            "other_key_rel_diff": max_rel_diff(runs["other_key"][0], params),
            "seconds": time.perf_counter() - tic,
        }

    compare(SVI(fixed_model, lambda x: None, optax.adam(0.05), loss=ScoreMatching("esm")), "esm")
    compare(
        SVI(
            latent_model,
            latent_guide,
            numpyro.optim.Adam(0.05),
            loss=ScoreMatching("ssm_vr", n_projections=2, projection="gaussian"),
        ),
        "ssm_vr",
    )

    # WAE: the Stein estimator of the aggregate posterior's score couples the whole batch
    e_dim, h = 2, 4
    k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(5), 4)
    enc0 = [
        (jax.random.normal(k1, (D, h)) / 2, jnp.zeros(h)),
        (jax.random.normal(k2, (h, e_dim)) / 2, jnp.zeros(e_dim)),
    ]
    dec0 = [(jax.random.normal(k3, (e_dim, h)) / 2, jnp.zeros(h)), (jax.random.normal(k4, (h, D)) / 2, jnp.zeros(D))]

    def mlp(params, z):
        (w1, b1), (w2, b2) = params
        return jnp.tanh(z @ w1 + b1) @ w2 + b2

    def decoder(x):
        dec = numpyro.param("dec", dec0)
        with numpyro.plate("data", x.shape[0]):
            z = numpyro.sample("z", dist.Normal(jnp.zeros(e_dim), 1.0).to_event(1))
            numpyro.sample("x", dist.Normal(mlp(dec, z), 0.1).to_event(1), obs=x)

    def encoder(x):
        enc = numpyro.param("enc", enc0)
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("z", dist.Delta(mlp(enc, x), event_dim=1))

    compare(SVI(decoder, encoder, optax.adam(0.01), loss=WAE("score", reconstruction="squared_error")), "wae_stein")
    return out


SCENARIOS = {"jax": jax_scenarios, "numpyro": numpyro_scenarios}

if __name__ == "__main__":
    import jax

    jax.config.update("jax_enable_x64", True)
    print(json.dumps(SCENARIOS[sys.argv[1]]()))
