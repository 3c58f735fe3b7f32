"""Cost of the joint-density ``ScoreMatching`` (commit 1871d31): the fast path against the
library before the change, the joint path against a hand-written joint density, and
vectorized particles against sequential ones.

Everything runs in one process. The library before the change (``--old-rev``, default
``49bc77d``) is loaded as a second package, ``ppl_score_old``: ``git archive REV ppl_score``
unpacked into a temporary folder and renamed (the package imports itself only relatively).
The new library is this checkout's ``ppl_score``. Float32, data ``B = 128`` points of
dimension ``D = 16``; the energy is the MLP of ``benchmarks/frontends.py`` (hidden 64x64,
softplus, quadratic 1). Sections:

1. ``fast``: no site depends on a matched value, so the new loss takes the fast path (the
   matched site's own distribution, one batched call), the only route the old one had. One
   SVI step of the same model with the old and the new ``ScoreMatching`` (each library with
   its own ``Unnormalized``), Pyro ``SVI.step`` with validation on (``pyro``, Pyro's
   default) and off (``pyro-noval``), NumPyro ``jax.jit(svi.update)``. Models: ``energy``,
   ``x ~ Unnormalized(E_theta)`` observed in a plate; ``energy+y``, the same plus an observed
   ``y ~ Normal(y_loc, 1)`` in the plate that does not depend on ``x`` (``sites=["x"]``,
   ``y_loc`` a parameter, so Pyro's dependency analysis runs its autograd query on it);
   ``energy+y0``, the same with ``y ~ Normal(0, 1)`` (no parameter: nothing to query).
   Reported: new / old (target <= 1.05: no slowdown). Before timing, old and new must give
   the same loss on the same seed (asserted); for NumPyro, ``hlo_identical`` says whether
   the two compiled steps are the same program (optimized HLO, debug metadata removed).
2. ``joint``: ``y | x ~ Normal(W x + b, 1)`` observed in the plate, ``sites=["x"]``: the new
   front end (model re-executed with the stacked copies substituted: a ``pyro.plate`` over
   them, a ``vmap`` in NumPyro) against the backend's ``score_matching_loss`` of the
   hand-written ``log p(x) + log N(y; W x + b, 1)`` plus the same optimizer step, for
   ``ssm_vr`` (one stacked copy) and ``fd_ssm`` (``2M + 1`` copies). The losses are checked
   equal first. Reported: front end / direct.
3. ``particles``: generalized Bayes, ``loc ~ Normal(0, 10 I)`` latent, ``x ~ Normal(loc, I)``
   observed in the plate, ``AutoNormal`` guide, ``ssm_vr``: 8 particles against 1. Pyro:
   vectorized (the new default), ``vectorize_particles=False`` (a loop) and the old library
   (a loop, the issue's "8 particles cost 6.6x one"); NumPyro: ``vmap`` (default) and
   ``vectorize_particles=False`` (``lax.map``). Reported: cost of 8 / cost of 1.

Timing: medians of wall-clock samples, all variants of a section interleaved round-robin
(``_common.interleaved_timings``), the pairs that make a ratio timed back to back
(``adjacent``); ``paired`` is the median of the per-repeat ratios (robust to load drift on a
shared machine). Each ratio also has its process-CPU-time counterpart (``time.process_time``
medians, interleaved), and NumPyro rows the ratio of the compiled steps' FLOPs (XLA's
``cost_analysis``, timing-free). torch and XLA run one thread unless ``--threads 0``.

    python benchmarks/joint.py --quick --json out/bench/joint.json
"""

from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
sys.path.insert(0, _HERE)
sys.path.append(_ROOT)  # a checkout without `pip install -e .`

import _common as C  # noqa: E402

D, BATCH, HIDDEN = 16, 128, (64, 64)
OLD_REV = "49bc77d"
FAST_TARGET = 1.05
# fast-path models: (label, y): no y; y ~ Normal(y_loc, 1) with y_loc a parameter; y ~ Normal(0, 1)
FAST_MODELS = (("energy", None), ("energy+y", "param"), ("energy+y0", "const"))
ISSUE_SEQUENTIAL_8 = 6.6  # the issue's cost of 8 sequential particles / 1


# ---------------------------------------------------------------------------------------
# The library before the change, as a second package
# ---------------------------------------------------------------------------------------


def load_old(rev: str) -> tuple[str, str]:
    """Unpack ``ppl_score`` at ``rev`` as package ``ppl_score_old`` on ``sys.path``;
    returns ``(folder, full commit)``."""
    import atexit
    import glob
    import io
    import shutil
    import subprocess
    import tarfile
    import tempfile

    sha = subprocess.run(
        ["git", "-C", _ROOT, "rev-parse", rev], capture_output=True, text=True, check=True
    ).stdout.strip()
    folder = tempfile.mkdtemp(prefix="ppl_score_old_")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    archive = subprocess.run(["git", "-C", _ROOT, "archive", sha, "ppl_score"], capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")
    os.rename(os.path.join(folder, "ppl_score"), os.path.join(folder, "ppl_score_old"))
    absolute = [
        path
        for path in glob.glob(os.path.join(folder, "ppl_score_old", "**", "*.py"), recursive=True)
        if _imports_ppl_score(path)
    ]
    if absolute:  # an absolute import would load the new package inside the old one
        raise RuntimeError(f"the old package imports ppl_score absolutely: {absolute}")
    sys.path.insert(0, folder)
    return folder, sha


def _imports_ppl_score(path: str) -> bool:
    """Whether the module at ``path`` has an absolute ``import ppl_score...`` statement."""
    import ast

    with open(path) as f:
        tree = ast.parse(f.read())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "ppl_score" for a in node.names):
            return True
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "ppl_score":
            return True
    return False


def checkout_state() -> dict:
    """HEAD and whether the files of the change differ from it (the new library is the checkout)."""
    import subprocess

    files = [
        "ppl_score/sites.py",
        "ppl_score/pyro/score_matching.py",
        "ppl_score/numpyro/score_matching.py",
        "ppl_score/frontend.py",
        "ppl_score/torch/objectives.py",
        "ppl_score/jax/objectives.py",
    ]
    head = subprocess.run(["git", "-C", _ROOT, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", _ROOT, "status", "--porcelain", "--", *files], capture_output=True, text=True
    ).stdout.split("\n")
    return {"head": head, "modified_hot_files": [ln[3:] for ln in dirty if ln.strip()]}


# ---------------------------------------------------------------------------------------
# Timing helpers
# ---------------------------------------------------------------------------------------


def cpu_medians(fns: dict, repeats: int, inner: dict, seed: int, adjacent=()) -> dict:
    """Median process CPU seconds per call of each ``fns[name]()`` (``inner[name]`` calls per
    sample), interleaved as ``_common.interleaved_timings`` does."""
    import random
    import statistics
    import time

    rng = random.Random(seed + 1)
    grouped = {n for g in adjacent for n in g}
    units = [list(g) for g in adjacent] + [[n] for n in fns if n not in grouped]
    samples = {name: [] for name in fns}
    for _ in range(repeats):
        rng.shuffle(units)
        for unit in units:
            rng.shuffle(unit)
            for name in unit:
                t0 = time.process_time()
                for _ in range(inner[name]):
                    fns[name]()
                samples[name].append((time.process_time() - t0) / inner[name])
    return {name: statistics.median(v) for name, v in samples.items()}


def _cost(compiled) -> dict:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return {"flops": float(cost.get("flops", float("nan"))), "bytes": float(cost.get("bytes accessed", float("nan")))}


def _hlo_digest(compiled) -> str:
    """A digest of the optimized HLO's instructions, debug metadata (source files, function
    names, stack frames) removed: equal digests mean the same compiled program."""
    import hashlib
    import re

    lines = [
        ln
        for ln in compiled.as_text().splitlines()
        if " = " in ln or ln.strip().startswith(("ROOT", "ENTRY", "%", "}"))
    ]
    text = re.sub(r", metadata=\{[^}]*\}|, stack_frame_id=\d+", "", "\n".join(lines))
    return hashlib.sha256(text.encode()).hexdigest()


def _close(a: float, b: float, what: str, rtol: float = 1e-5) -> None:
    if not abs(a - b) <= rtol * max(1.0, abs(a), abs(b)):
        raise AssertionError(f"{what}: {a!r} vs {b!r}")


def measure(
    fns: dict, pairs: list, repeats: int, seed: int, costs: dict, section: str, extra: dict, min_sample_s: float = 0.02
) -> list:
    """Time ``fns`` (pairs adjacent) and return a row per ``(numerator, denominator)`` pair."""
    import statistics

    adjacent = [list(dict.fromkeys(p)) for p in pairs]
    # a name in several pairs can sit in one group only: merge groups that share names
    merged: list[list] = []
    for g in adjacent:
        hit = [m for m in merged if set(m) & set(g)]
        new = list(dict.fromkeys([n for m in hit for n in m] + g))
        merged = [m for m in merged if m not in hit] + [new]
    timings = C.interleaved_timings(fns, repeats, warmup=3, min_sample_s=min_sample_s, seed=seed, adjacent=merged)
    inner = {name: t.inner for name, t in timings.items()}
    cpu = cpu_medians(fns, repeats, inner, seed, adjacent=merged)
    rows = []
    for num, den in pairs:
        tn, td = timings[num], timings[den]
        paired = statistics.median(a / b for a, b in zip(tn.samples, td.samples))
        row = {
            "section": section,
            "variant": num,
            "vs": den,
            **extra.get((num, den), {}),
            "ms": 1e3 * tn.median,
            "vs_ms": 1e3 * td.median,
            "spread": tn.spread,
            "vs_spread": td.spread,
            "ratio": tn.median / td.median,
            "ratio_paired": paired,
            "cpu_ms": 1e3 * cpu[num],
            "vs_cpu_ms": 1e3 * cpu[den],
            "ratio_cpu": cpu[num] / cpu[den],
        }
        if num in costs and den in costs:
            row["flops_ratio"] = costs[num]["flops"] / costs[den]["flops"]
            row["compile_s"] = costs[num].get("compile_s")
            row["vs_compile_s"] = costs[den].get("compile_s")
            if "hlo" in costs[num] and "hlo" in costs[den]:
                row["hlo_identical"] = costs[num]["hlo"] == costs[den]["hlo"]
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------
# 1. fast path: old vs new
# ---------------------------------------------------------------------------------------


def _pyro_fast(seed: int, method: str) -> tuple[dict, list, dict]:
    import ppl_score_old.pyro as old
    import pyro
    import pyro.distributions as dist
    import torch
    from pyro.infer import SVI
    from pyro.nn import PyroModule

    import ppl_score.pyro as new
    from ppl_score.torch.nets import MLPEnergy

    torch.manual_seed(seed)
    pyro.clear_param_store()
    x, y = torch.randn(BATCH, D), torch.randn(BATCH, D)
    energy = PyroModule[MLPEnergy](D, hidden=HIDDEN, quadratic=1.0)  # shared: the same parameters

    def make(lib, with_y):
        def model(x, y):
            with pyro.plate("data", x.shape[0]):
                pyro.sample("x", lib.Unnormalized(energy, (D,)), obs=x)
                if with_y:
                    loc = pyro.param("y_loc", torch.zeros(D)) if with_y == "param" else torch.zeros(D)
                    pyro.sample("y", dist.Normal(loc, 1.0).to_event(1), obs=y)

        return model

    def guide(x, y):
        pass

    fns, pairs, extra = {}, [], {}
    for label, with_y in FAST_MODELS:
        elbos = {tag: lib.ScoreMatching(method, sites=["x"]) for tag, lib in (("old", old), ("new", new))}
        models = {"old": make(old, with_y), "new": make(new, with_y)}
        losses = {}
        for tag in ("old", "new"):
            torch.manual_seed(seed + 1)
            losses[tag] = elbos[tag].loss(models[tag], guide, x, y)
        _close(losses["new"], losses["old"], f"pyro fast path {label}: new and old losses differ")
        for tag in ("old", "new"):
            svi = SVI(models[tag], guide, pyro.optim.Adam({"lr": 1e-4}), loss=elbos[tag])

            def step(svi=svi):
                svi.step(x, y)

            def step_noval(svi=svi):
                with pyro.validation_enabled(False):
                    svi.step(x, y)

            fns[f"pyro {label} {tag}"] = step
            fns[f"pyro-noval {label} {tag}"] = step_noval
        for fe in ("pyro", "pyro-noval"):
            pair = (f"{fe} {label} new", f"{fe} {label} old")
            pairs.append(pair)
            extra[pair] = {
                "frontend": fe,
                "model": label,
                "method": method,
                "loss_new": losses["new"],
                "loss_old": losses["old"],
            }
    return fns, pairs, extra


def _numpyro_fast(seed: int, method: str, costs: dict) -> tuple[dict, list, dict]:
    import time
    from functools import partial

    import jax
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as dist
    import optax
    import ppl_score_old.numpyro as old
    from numpyro.infer import SVI

    import ppl_score.numpyro as new
    from ppl_score.jax.nets import energy_apply, energy_init

    key_init, key_x, key_y, key_run = jax.random.split(jax.random.PRNGKey(seed), 4)
    x, y = jax.random.normal(key_x, (BATCH, D)), jax.random.normal(key_y, (BATCH, D))
    init = energy_init(key_init, D, hidden=HIDDEN)

    def make(lib, with_y):
        def model(x, y):
            params = numpyro.param("energy", init)
            with numpyro.plate("data", x.shape[0]):
                numpyro.sample("x", lib.Unnormalized(partial(energy_apply, params, quadratic=1.0), (D,)), obs=x)
                if with_y:
                    loc = numpyro.param("y_loc", jnp.zeros(D)) if with_y == "param" else jnp.zeros(D)
                    numpyro.sample("y", dist.Normal(loc, 1.0).to_event(1), obs=y)

        return model

    def guide(x, y):
        pass

    fns, pairs, extra = {}, [], {}
    for label, with_y in FAST_MODELS:
        losses = {}
        for tag, lib in (("old", old), ("new", new)):
            elbo, model = lib.ScoreMatching(method, sites=["x"]), make(lib, with_y)
            params = {"energy": init, **({"y_loc": jnp.zeros(D)} if with_y == "param" else {})}
            losses[tag] = float(jax.jit(lambda p, x, y: elbo.loss(key_run, p, model, guide, x, y))(params, x, y))
            svi = SVI(model, guide, optax.adam(1e-4), loss=elbo)
            update = jax.jit(svi.update)
            state = {"s": svi.init(key_run, x, y)}
            t0 = time.perf_counter()
            compiled = update.lower(state["s"], x, y).compile()
            name = f"numpyro {label} {tag}"
            costs[name] = {**_cost(compiled), "compile_s": time.perf_counter() - t0, "hlo": _hlo_digest(compiled)}

            def step(update=update, state=state):
                state["s"], loss = update(state["s"], x, y)
                loss.block_until_ready()

            fns[name] = step
        _close(losses["new"], losses["old"], f"numpyro fast path {label}: new and old losses differ")
        pair = (f"numpyro {label} new", f"numpyro {label} old")
        pairs.append(pair)
        extra[pair] = {
            "frontend": "numpyro",
            "model": label,
            "method": method,
            "loss_new": losses["new"],
            "loss_old": losses["old"],
        }
    return fns, pairs, extra


# ---------------------------------------------------------------------------------------
# 2. joint path: front end vs a hand-written joint density
# ---------------------------------------------------------------------------------------


def _torch_joint(seed: int, method: str) -> tuple[dict, list, dict]:
    import pyro
    import pyro.distributions as dist
    import torch
    from pyro.infer import SVI
    from pyro.nn import PyroModule

    from ppl_score.pyro import ScoreMatching, Unnormalized
    from ppl_score.torch import score_matching_loss
    from ppl_score.torch.nets import MLPEnergy

    torch.manual_seed(seed)
    pyro.clear_param_store()
    x = torch.randn(BATCH, D)
    y = 0.5 * x + torch.randn(BATCH, D)

    class Joint(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.energy = MLPEnergy(D, hidden=HIDDEN, quadratic=1.0)
            self.link = torch.nn.Linear(D, D)

    front = PyroModule[Joint]()
    direct = Joint()
    direct.load_state_dict(front.state_dict())

    def model(x, y):
        with pyro.plate("data", x.shape[0]):
            xs = pyro.sample("x", Unnormalized(front.energy, (D,)), obs=x)
            pyro.sample("y", dist.Normal(front.link(xs), 1.0).to_event(1), obs=y)

    def guide(x, y):
        pass

    def joint_log_density(rows):
        k = rows.shape[0] // BATCH  # the stacked copies
        lp_y = torch.distributions.Normal(direct.link(rows), 1.0).log_prob(y.repeat(k, 1)).sum(-1)
        return direct.energy(rows) + lp_y

    elbo = ScoreMatching(method, sites=["x"])
    torch.manual_seed(seed + 1)
    loss_front = elbo.loss(model, guide, x, y)
    torch.manual_seed(seed + 1)
    loss_direct = score_matching_loss(joint_log_density, x, method, reduction="sum").item()
    _close(loss_front, loss_direct, f"pyro joint path ({method}) and the hand-written joint density differ", 1e-4)

    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-4}), loss=elbo)
    opt = torch.optim.Adam(direct.parameters(), lr=1e-4)

    def pyro_step():
        svi.step(x, y)

    def pyro_noval_step():
        with pyro.validation_enabled(False):
            svi.step(x, y)

    def torch_step():
        opt.zero_grad()
        score_matching_loss(joint_log_density, x, method, reduction="sum").backward()
        opt.step()

    fns = {
        f"pyro joint {method}": pyro_step,
        f"pyro-noval joint {method}": pyro_noval_step,
        f"torch joint {method}": torch_step,
    }
    pairs = [(f"pyro joint {method}", f"torch joint {method}"), (f"pyro-noval joint {method}", f"torch joint {method}")]
    extra = {
        p: {
            "frontend": p[0].split()[0],
            "model": "y|x",
            "method": method,
            "loss_front": loss_front,
            "loss_direct": loss_direct,
        }
        for p in pairs
    }
    return fns, pairs, extra


def _jax_joint(seed: int, method: str, costs: dict) -> tuple[dict, list, dict]:
    import time
    from functools import partial

    import jax
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as dist
    import optax
    from numpyro.infer import SVI

    from ppl_score.jax import score_matching_loss
    from ppl_score.jax.nets import energy_apply, energy_init
    from ppl_score.numpyro import ScoreMatching, Unnormalized

    key_init, key_w, key_x, key_y, key_run = jax.random.split(jax.random.PRNGKey(seed), 5)
    x = jax.random.normal(key_x, (BATCH, D))
    y = 0.5 * x + jax.random.normal(key_y, (BATCH, D))
    init = {
        "energy": energy_init(key_init, D, hidden=HIDDEN),
        "W": 0.1 * jax.random.normal(key_w, (D, D)),
        "b": jnp.zeros(D),
    }

    def model(x, y):
        p = numpyro.param("joint", init)
        with numpyro.plate("data", x.shape[0]):
            xs = numpyro.sample("x", Unnormalized(partial(energy_apply, p["energy"], quadratic=1.0), (D,)), obs=x)
            numpyro.sample("y", dist.Normal(xs @ p["W"] + p["b"], 1.0).to_event(1), obs=y)

    def guide(x, y):
        pass

    def direct_loss(p, x, y, key):
        def joint_log_density(rows):
            k = rows.shape[0] // BATCH
            lp_y = jax.scipy.stats.norm.logpdf(jnp.tile(y, (k, 1)), rows @ p["W"] + p["b"]).sum(-1)
            return energy_apply(p["energy"], rows, quadratic=1.0) + lp_y

        return score_matching_loss(joint_log_density, x, method, key=key, reduction="sum")

    elbo = ScoreMatching(method, sites=["x"])
    loss_front = float(jax.jit(lambda p, x, y: elbo.loss(key_run, p, model, guide, x, y))({"joint": init}, x, y))
    loss_direct = float(jax.jit(direct_loss)(init, x, y, jax.random.split(key_run, 3)[2]))
    _close(loss_front, loss_direct, f"numpyro joint path ({method}) and the hand-written joint density differ", 1e-4)

    svi = SVI(model, guide, optax.adam(1e-4), loss=elbo)
    update = jax.jit(svi.update)
    state = {"svi": svi.init(key_run, x, y)}
    optimizer = optax.adam(1e-4)

    @jax.jit
    def step(params, opt_state, key, x, y):
        key, key_step = jax.random.split(key)
        loss, grads = jax.value_and_grad(direct_loss)(params, x, y, jax.random.split(key_step, 3)[2])
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, key, loss

    state["direct"] = (init, optimizer.init(init), key_run)
    front_name, direct_name = f"numpyro joint {method}", f"jax joint {method}"
    t0 = time.perf_counter()
    costs[front_name] = _cost(update.lower(state["svi"], x, y).compile())
    costs[front_name]["compile_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    costs[direct_name] = _cost(step.lower(*state["direct"], x, y).compile())
    costs[direct_name]["compile_s"] = time.perf_counter() - t0

    def numpyro_step():
        state["svi"], loss = update(state["svi"], x, y)
        loss.block_until_ready()

    def jax_step():
        params, opt_state, key, loss = step(*state["direct"], x, y)
        state["direct"] = (params, opt_state, key)
        loss.block_until_ready()

    pair = (front_name, direct_name)
    extra = {
        pair: {
            "frontend": "numpyro",
            "model": "y|x",
            "method": method,
            "loss_front": loss_front,
            "loss_direct": loss_direct,
        }
    }
    return {front_name: numpyro_step, direct_name: jax_step}, [pair], extra


# ---------------------------------------------------------------------------------------
# 3. particles
# ---------------------------------------------------------------------------------------

PARTICLES = 8


def _pyro_particles(seed: int, method: str) -> tuple[dict, list, dict]:
    import ppl_score_old.pyro as old
    import pyro
    import pyro.distributions as dist
    import torch
    from pyro.infer import SVI
    from pyro.infer.autoguide import AutoNormal

    import ppl_score.pyro as new

    torch.manual_seed(seed)
    pyro.clear_param_store()
    x = 1.0 + torch.randn(BATCH, D)

    def model(x):
        loc = pyro.sample("loc", dist.Normal(torch.zeros(D), 10.0).to_event(1))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(loc, 1.0).to_event(1), obs=x)

    guide = AutoNormal(model)
    guide(x)  # set the guide up outside any particle plate
    variants = {
        "pyro 8 vectorized": new.ScoreMatching(method, num_particles=PARTICLES),
        "pyro 8 loop": new.ScoreMatching(method, num_particles=PARTICLES, vectorize_particles=False),
        "pyro 1": new.ScoreMatching(method),
        "pyro-old 8 loop": old.ScoreMatching(method, num_particles=PARTICLES),
        "pyro-old 1": old.ScoreMatching(method),
    }
    if not variants["pyro 8 vectorized"].vectorize_particles:
        raise AssertionError("ScoreMatching(num_particles=8) does not vectorize by default")
    fns = {}
    for name, elbo in variants.items():
        elbo.loss(model, guide, x)  # sets max_plate_nesting up
        svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-4}), loss=elbo)
        fns[name] = lambda svi=svi: svi.step(x)
    pairs = [
        ("pyro 8 vectorized", "pyro 1"),
        ("pyro 8 loop", "pyro 1"),
        ("pyro-old 8 loop", "pyro-old 1"),
        ("pyro 1", "pyro-old 1"),
    ]
    extra = {p: {"frontend": p[0].split()[0], "model": "gb", "method": method} for p in pairs}
    return fns, pairs, extra


def _numpyro_particles(seed: int, method: str, costs: dict) -> tuple[dict, list, dict]:
    import time

    import jax
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as dist
    import optax
    from numpyro.infer import SVI
    from numpyro.infer.autoguide import AutoNormal

    import ppl_score.numpyro as new

    key_x, key_run = jax.random.split(jax.random.PRNGKey(seed))
    x = 1.0 + jax.random.normal(key_x, (BATCH, D))

    def model(x):
        loc = numpyro.sample("loc", dist.Normal(jnp.zeros(D), 10.0).to_event(1))
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("x", dist.Normal(loc, 1.0).to_event(1), obs=x)

    variants = {
        "numpyro 8 vmap": new.ScoreMatching(method, num_particles=PARTICLES),
        "numpyro 8 lax.map": new.ScoreMatching(method, num_particles=PARTICLES, vectorize_particles=False),
        "numpyro 1": new.ScoreMatching(method),
    }
    fns = {}
    for name, elbo in variants.items():
        svi = SVI(model, AutoNormal(model), optax.adam(1e-4), loss=elbo)
        update = jax.jit(svi.update)
        state = {"s": svi.init(key_run, x)}
        t0 = time.perf_counter()
        costs[name] = _cost(update.lower(state["s"], x).compile())
        costs[name]["compile_s"] = time.perf_counter() - t0

        def step(update=update, state=state):
            state["s"], loss = update(state["s"], x)
            loss.block_until_ready()

        fns[name] = step
    pairs = [("numpyro 8 vmap", "numpyro 1"), ("numpyro 8 lax.map", "numpyro 1")]
    extra = {p: {"frontend": "numpyro", "model": "gb", "method": method} for p in pairs}
    return fns, pairs, extra


# ---------------------------------------------------------------------------------------


def _run(section, builders, repeats, seed, min_sample_s):
    fns, pairs, extra, costs = {}, [], {}, {}
    for build in builders:
        f, p, e = build(costs)
        fns.update(f)
        pairs += p
        extra.update(e)
    return measure(fns, pairs, repeats, seed, costs, section, extra, min_sample_s)


def main(argv=None) -> None:
    p = C.make_parser(__doc__.splitlines()[0])
    p.add_argument("--old-rev", default=OLD_REV, help=f"the library before the change (default {OLD_REV})")
    p.add_argument(
        "--sections", nargs="+", default=["fast", "joint", "particles"], choices=["fast", "joint", "particles"]
    )
    p.add_argument(
        "--min-sample-s",
        type=float,
        default=None,
        help="shortest timed sample, calls repeated to fill it (default 0.02 quick, 0.04 full)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads and single-threaded XLA (default 1; 0 keeps the defaults)",
    )
    args = p.parse_args(argv)
    if args.threads:
        os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
        import torch

        torch.set_num_threads(args.threads)
    repeats = args.repeats or (7 if args.quick else 31)
    min_s = args.min_sample_s or (0.02 if args.quick else 0.04)
    folder, old_sha = load_old(args.old_rev)
    s = args.seed

    rows = []
    if "fast" in args.sections:
        builders = [lambda c: _pyro_fast(s, "ssm_vr"), lambda c: _numpyro_fast(s, "ssm_vr", c)]
        rows += _run("fast", builders, repeats, s, min_s)
    if "joint" in args.sections:
        for method in ("ssm_vr", "fd_ssm"):
            builders = [lambda c, m=method: _torch_joint(s, m), lambda c, m=method: _jax_joint(s, m, c)]
            rows += _run("joint", builders, repeats, s, min_s)
    if "particles" in args.sections:
        builders = [lambda c: _pyro_particles(s, "ssm_vr"), lambda c: _numpyro_particles(s, "ssm_vr", c)]
        rows += _run("particles", builders, repeats, s, min_s)

    headers = ["section", "variant", "vs", "ms", "vs ms", "ratio", "paired", "ratio (CPU)", "FLOPs ratio", "same HLO"]
    print(
        C.markdown_table(
            headers,
            (
                [
                    r["section"],
                    r["variant"],
                    r["vs"],
                    C.fmt(r["ms"]),
                    C.fmt(r["vs_ms"]),
                    C.fmt(r["ratio"]),
                    C.fmt(r["ratio_paired"]),
                    C.fmt(r["ratio_cpu"]),
                    C.fmt(r.get("flops_ratio"), ".4f"),
                    {True: "yes", False: "no"}.get(r.get("hlo_identical"), "-"),
                ]
                for r in rows
            ),
        )
    )
    meta = {
        **C.environment_meta(),
        "quick": args.quick,
        "repeats": repeats,
        "min_sample_s": min_s,
        "threads": args.threads,
        "xla_flags": os.environ.get("XLA_FLAGS"),
        "old_rev": old_sha,
        "new": checkout_state(),
        "D": D,
        "batch": BATCH,
        "hidden": list(HIDDEN),
        "fast_target": FAST_TARGET,
        "issue_sequential_8": ISSUE_SEQUENTIAL_8,
        "note": (
            "medians of interleaved samples; ratio = variant / vs wall time (ratio_paired: median of the "
            "per-repeat ratios, the pair timed back to back), ratio_cpu the same with process CPU time; "
            "flops_ratio from XLA cost_analysis; hlo_identical: same optimized HLO instructions; "
            "compile_s: one lower+compile, not interleaved"
        ),
    }
    C.write_json(args.json, rows, meta)


if __name__ == "__main__":
    main()
