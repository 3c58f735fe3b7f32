"""Sampling a fitted site: milliseconds per Langevin (MALA) step of the front ends' samplers.

The model: ``x ~ Unnormalized(MLP energy)`` (D=2, hidden 64x64, softplus, quadratic 0.1)
observed in a plate of ``N`` points, float32, one thread.

1. **NumPyro chains (issue 11, item 4.2).** ``C = 64`` chains over an ``N = 8``-point site:
   chains batched by a plate over chains (``vectorize="plate"``, the default) against one
   chain's model ``jax.vmap``-ed (``vectorize="vmap"``, the former implementation), and the
   same 512 points as one chain over a 512-point site (the floor). Steady state: the site
   density is built once and ``ppl_score.jax.langevin.mala`` is timed after its compilation.
2. **New points (item 4.3).** ``num_draws`` new i.i.d. points against the README's former
   call (``num_chains`` full copies of a subsampled site of 128 points), Pyro and NumPyro.
   Full: 500 draws against 500 chains x 128 points; ``--quick``: 64 against 64 x 128.

Timing: every variant in one process, interleaved (round-robin in a seeded random order per
repeat), medians over repeats; a sample runs ``steps`` MALA steps and is divided by them.

Result (``--repeats 7``, one thread, a 2-core machine under load ~10; ms per step):
NumPyro 64 chains x 8 points: plate 1.22, vmap 1.00, one 512-point call 0.82 (the plate and
vmap are within the timing noise of each other in steady state on CPU: XLA batches the
vmapped model as well; the per-chain vmap cost quoted in issue 11 did not reproduce here);
Pyro 64 x 8: 5.0 against 3.2 for one call. New points: 500 draws 0.84 (NumPyro) / 2.6
(Pyro) against 123 / 151 for 500 chains x 128 points (x147 / x58).

    python benchmarks/sampling.py --quick --json out/bench/sampling.json
"""

from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
sys.path.append(os.path.dirname(_HERE))  # a checkout without `pip install -e .`

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")

import _common as C  # noqa: E402

D = 2
HIDDEN = (64, 64)


def _numpyro_variants(n_chains: int, n_points: int, readme: tuple, steps: int, seed: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpyro

    from ppl_score.jax.langevin import mala
    from ppl_score.jax.nets import energy_apply, energy_init
    from ppl_score.numpyro import Unnormalized, sampling

    params = energy_init(jax.random.PRNGKey(seed), D, hidden=HIDDEN)

    def model(x):
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("x", Unnormalized(lambda y: energy_apply(params, y, quadratic=0.1), (D,)), obs=x)

    def timed(x, **kw):
        dens = sampling.site_log_density(model, "x", x, **kw)
        u0 = dens.init_unconstrained(None).reshape(dens.num_rows, *dens.unconstrained_shape)
        key = jax.random.PRNGKey(seed)

        def run():
            jax.block_until_ready(mala(dens.log_prob, u0, 0.01, steps, key=key).samples)

        run()  # compile
        return run

    data = jax.random.normal(jax.random.PRNGKey(seed + 1), (max(n_chains * n_points, readme[1]), D), jnp.float32)
    small, big, sub = data[:n_points], data[: n_chains * n_points], data[: readme[1]]
    return {
        "numpyro plate": timed(small, num_chains=n_chains),
        "numpyro vmap": timed(small, num_chains=n_chains, vectorize="vmap"),
        "numpyro one call": timed(big, num_chains=1),
        "numpyro readme site": timed(sub, num_chains=readme[0]),
        "numpyro readme draws": timed(sub, num_draws=readme[0]),
    }


def _pyro_variants(n_chains: int, n_points: int, readme: tuple, steps: int, seed: int) -> dict:
    import pyro
    import torch

    from ppl_score.pyro import Unnormalized, sampling
    from ppl_score.torch.langevin import mala
    from ppl_score.torch.nets import MLPEnergy

    torch.manual_seed(seed)
    energy = MLPEnergy(D, hidden=HIDDEN, quadratic=0.1)

    def model(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", Unnormalized(energy, (D,)), obs=x)

    def timed(x, **kw):
        dens = sampling.site_log_density(model, "x", x, **kw)
        u0 = dens.init_unconstrained(None).reshape(dens.num_rows, *dens.unconstrained_shape)

        def run():
            mala(dens.log_prob, u0, 0.01, steps, generator=torch.Generator().manual_seed(seed))

        return run

    data = torch.randn(max(n_chains * n_points, readme[1]), D)
    small, big, sub = data[:n_points], data[: n_chains * n_points], data[: readme[1]]
    return {
        "pyro site": timed(small, num_chains=n_chains),
        "pyro one call": timed(big, num_chains=1),
        "pyro readme site": timed(sub, num_chains=readme[0]),
        "pyro readme draws": timed(sub, num_draws=readme[0]),
    }


RATIOS = [
    ("numpyro vmap", "numpyro plate", "NumPyro chains: vmap / plate"),
    ("numpyro plate", "numpyro one call", "NumPyro chains: plate / one call"),
    ("pyro site", "pyro one call", "Pyro chains: plate / one call"),
    ("numpyro readme site", "numpyro readme draws", "NumPyro new points: copies / num_draws"),
    ("pyro readme site", "pyro readme draws", "Pyro new points: copies / num_draws"),
]


def main(argv=None) -> None:
    p = C.make_parser(__doc__.splitlines()[0])
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    n_chains, n_points = 64, 8
    readme = (64, 128) if args.quick else (500, 128)
    steps = 20 if args.quick else 50
    repeats = args.repeats or (5 if args.quick else 15)
    fns = {
        **_numpyro_variants(n_chains, n_points, readme, steps, args.seed),
        **_pyro_variants(n_chains, n_points, readme, steps, args.seed),
    }
    timings = C.interleaved_timings(
        fns,
        repeats,
        warmup=2,
        seed=args.seed,
        adjacent=[[a, b] for a, b, _ in RATIOS],
    )
    rows = []
    for name, t in timings.items():
        rows.append(
            {"variant": name, "ms_per_step": 1e3 * t.median / steps, "spread": t.spread, "samples": len(t.samples)}
        )
    ratios = []
    for a, b, label in RATIOS:
        ratios.append(
            {"ratio": label, "numerator": a, "denominator": b, "value": timings[a].median / timings[b].median}
        )
    print(
        C.markdown_table(
            ["variant", "ms / step", "spread"],
            [[r["variant"], C.fmt(r["ms_per_step"], ".3f"), C.fmt(r["spread"])] for r in rows],
        )
    )
    print()
    print(C.markdown_table(["ratio", "value"], [[r["ratio"], C.fmt(r["value"], ".1f")] for r in ratios]))
    meta = {
        **C.environment_meta(),
        "chains": n_chains,
        "points": n_points,
        "readme": list(readme),
        "steps_per_sample": steps,
        "repeats": repeats,
        "hidden": list(HIDDEN),
        "D": D,
    }
    C.write_json_object(args.json, {"rows": rows, "ratios": ratios, "meta": meta})


if __name__ == "__main__":
    main()
