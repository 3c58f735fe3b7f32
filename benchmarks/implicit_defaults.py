"""Posterior spread of ``ImplicitELBO`` with a learned score estimator: old vs new defaults.

Model: Bayesian logistic regression, ``w ~ N(0, I_D)``, ``y_i ~ Bernoulli(sigmoid(x_i^T w))``
on a synthetic data set (``N`` points, ``D`` features, the first a constant column). Guide:
the implicit ``w = mu + tril(L) eps``, ``eps ~ N(0, I_D)``, whose entropy gradient comes
from ``LearnedScoreEstimator(D)`` with its default network (two hidden layers of 128) and
the old estimator settings (one Adam step at lr 1e-3 per SVI step), 5 steps at 3e-3 (the
issue's proposal) or the defaults (10 steps at 3e-3). Reference: NUTS (NumPyro, 4 chains
x 2000 draws). Reported: for each coordinate the ratio ``sd(guide) / sd(NUTS)`` of the fitted guide (``tril(L)``'s
row norms, exact for this guide), averaged over the last quarter of the SVI steps (the
final iterate alone is noisy: the estimated entropy gradient is), min and max over
coordinates, per seed and PPL.

A collapsing estimator gives ratios well below 1 (the entropy gradient it supplies lags
behind the guide: the guide contracts faster than the score network can follow).

    python benchmarks/implicit_defaults.py --json benchmarks/results/implicit_defaults.json
    python benchmarks/implicit_defaults.py --n 1000 --steps 1000 --seeds 2   # a narrower posterior
    python benchmarks/implicit_defaults.py --only-also --also 10:3e-3         # one setting only
    python benchmarks/implicit_defaults.py --quick      # fewer steps, one seed: a smoke run

The committed results, ``benchmarks/results/implicit_defaults*.json``, come from the first
command and the second (``_n1000``), run with the first two settings only, and from the third
on each data set (``_10steps``, ``_n1000_10steps``) once 10 steps had become the default.
"""

from __future__ import annotations

import os
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
sys.path.append(os.path.dirname(_HERE))  # a checkout without `pip install -e .`

import _common as C  # noqa: E402
import numpy as np  # noqa: E402

SETTINGS = {
    "old (1 step, lr 1e-3)": dict(n_steps=1, lr=1e-3),
    "new (5 steps, lr 3e-3)": dict(n_steps=5, lr=3e-3),
    "default (10 steps, lr 3e-3)": dict(n_steps=10, lr=3e-3),
}


def make_data(n: int, d: int, seed: int):
    r = np.random.default_rng(seed)
    x = np.concatenate([np.ones((n, 1)), r.normal(size=(n, d - 1))], axis=1)
    w = r.normal(size=d)
    y = (r.uniform(size=n) < 1.0 / (1.0 + np.exp(-x @ w))).astype(np.float64)
    return x, y


def nuts_sd(x, y, seed: int) -> np.ndarray:
    import jax
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as dist

    def model(x, y):
        w = numpyro.sample("w", dist.Normal(jnp.zeros(x.shape[1]), 1.0).to_event(1))
        numpyro.sample("y", dist.Bernoulli(logits=x @ w), obs=y)

    mcmc = numpyro.infer.MCMC(
        numpyro.infer.NUTS(model),
        num_warmup=1000,
        num_samples=2000,
        num_chains=4,
        chain_method="sequential",
        progress_bar=False,
    )
    mcmc.run(jax.random.PRNGKey(seed), jnp.asarray(x), jnp.asarray(y))
    return np.asarray(mcmc.get_samples()["w"]).std(0)


def pyro_sd(x, y, settings: dict, steps: int, particles: int, seed: int) -> np.ndarray:
    import pyro
    import pyro.distributions as dist
    import torch

    from ppl_score.pyro import ImplicitELBO
    from ppl_score.torch.estimators import LearnedScoreEstimator

    pyro.clear_param_store()
    torch.manual_seed(seed)
    xt, yt = torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.float32)
    d = x.shape[1]

    def model(x, y):
        w = pyro.sample("w", dist.Normal(torch.zeros(d), 1.0).to_event(1))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Bernoulli(logits=(x * w).sum(-1)), obs=y)  # w [P, 1, D] in the particle plate

    def guide(x, y):
        mu = pyro.param("mu", torch.zeros(d))
        L = pyro.param("L", 0.5 * torch.eye(d))
        eps = pyro.sample("eps", dist.Normal(torch.zeros(d), 1.0).to_event(1), infer={"is_auxiliary": True})
        pyro.sample("w", dist.Delta(mu + eps @ torch.tril(L).T, event_dim=1))

    est = LearnedScoreEstimator(d, generator=torch.Generator().manual_seed(seed), **settings)
    loss = ImplicitELBO(est, num_particles=particles, vectorize_particles=True, max_plate_nesting=1)
    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), loss)
    sds = []
    for step in range(steps):
        svi.step(xt, yt)
        if step >= steps - steps // 4:
            sds.append(torch.tril(pyro.param("L").detach()).double().pow(2).sum(1).sqrt().numpy())
    return np.mean(sds, axis=0)


def numpyro_sd(x, y, settings: dict, steps: int, particles: int, seed: int) -> np.ndarray:
    import jax
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as dist
    import optax

    from ppl_score.jax.estimators import learned_score_estimator
    from ppl_score.numpyro import ImplicitELBO, score_state

    d = x.shape[1]
    est = learned_score_estimator(d, optimizer=optax.adam(settings["lr"]), n_steps=settings["n_steps"])

    def model(x, y):
        w = numpyro.sample("w", dist.Normal(jnp.zeros(d), 1.0).to_event(1))
        numpyro.sample("y", dist.Bernoulli(logits=x @ w), obs=y)

    def guide(x, y):
        score_state("w", est, seed=seed)
        mu = numpyro.param("mu", jnp.zeros(d))
        L = numpyro.param("L", 0.5 * jnp.eye(d))
        eps = jax.random.normal(numpyro.prng_key(), (d,))
        numpyro.sample("w", dist.Delta(mu + jnp.tril(L) @ eps, event_dim=1))

    svi = numpyro.infer.SVI(model, guide, optax.adam(1e-2), ImplicitELBO(est, num_particles=particles))
    xj, yj = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
    state = svi.init(jax.random.PRNGKey(seed), xj, yj)

    def body(s, _):
        s = svi.update(s, xj, yj)[0]
        L = jnp.tril(svi.optim.get_params(s.optim_state)["L"])
        return s, jnp.sqrt((L**2).sum(1))

    _, sds = jax.jit(lambda s: jax.lax.scan(body, s, None, length=steps))(state)
    return np.asarray(sds[steps - steps // 4 :], np.float64).mean(0)


def main(argv=None) -> None:
    p = C.make_parser(__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--dim", type=int, default=4)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--particles", type=int, default=32)
    p.add_argument("--seeds", type=int, default=None)
    p.add_argument("--ppl", choices=("pyro", "numpyro", "both"), default="both")
    p.add_argument(
        "--also",
        nargs="*",
        default=[],
        metavar="STEPS:LR",
        help="more estimator settings to compare, e.g. 10:3e-3 5:1e-2",
    )
    p.add_argument("--only-also", action="store_true", help="compare only the --also settings")
    args = p.parse_args(argv)
    settings_all = {} if args.only_also else dict(SETTINGS)
    for item in args.also:
        n, lr = item.split(":")
        settings_all[f"{n} steps, lr {lr}"] = dict(n_steps=int(n), lr=float(lr))
    steps = args.steps or (300 if args.quick else 2000)
    n_seeds = args.seeds or (1 if args.quick else 3)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    x, y = make_data(args.n, args.dim, args.seed)
    ref = nuts_sd(x, y, args.seed)
    print("NUTS sd:", np.round(ref, 4))
    rows = []
    ppls = ("pyro", "numpyro") if args.ppl == "both" else (args.ppl,)
    for ppl in ppls:
        fit = pyro_sd if ppl == "pyro" else numpyro_sd
        for label, settings in settings_all.items():
            for s in range(n_seeds):
                t0 = time.perf_counter()
                sd = fit(x, y, settings, steps, args.particles, args.seed + s)
                ratio = sd / ref
                rows.append(
                    dict(
                        ppl=ppl,
                        settings=label,
                        seed=args.seed + s,
                        steps=steps,
                        particles=args.particles,
                        ratio_min=float(ratio.min()),
                        ratio_max=float(ratio.max()),
                        ratios=[float(r) for r in ratio],
                        seconds=time.perf_counter() - t0,
                    )
                )
                print(
                    ppl,
                    label,
                    "seed",
                    args.seed + s,
                    "sd ratio",
                    np.round(ratio, 3),
                    f"{rows[-1]['seconds']:.1f}s",
                    flush=True,
                )
    print(
        C.markdown_table(
            ["PPL", "estimator settings", "seed", "sd / NUTS sd (min - max over coordinates)"],
            [[r["ppl"], r["settings"], str(r["seed"]), f"{r['ratio_min']:.2f} - {r['ratio_max']:.2f}"] for r in rows],
        )
    )
    meta = C.environment_meta()
    meta.update(
        n=args.n,
        dim=args.dim,
        steps=steps,
        particles=args.particles,
        nuts_sd=[float(v) for v in ref],
        svi_optimizer="Adam lr 1e-2",
        guide="w = mu + tril(L) eps",
    )
    C.write_json(args.json, rows, meta)


if __name__ == "__main__":
    main()
