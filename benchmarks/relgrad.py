"""Relative-gradient maximum likelihood for full-Jacobian flows (Gresele et al. 2020).

Two experiments on ``InvertibleMLP`` (dense ``D x D`` layers, smooth leaky ReLU, Gaussian base):

1. **Scaling.** Time of one training step (loss, gradient, Adam update) against ``D`` in
   {64, ..., 2048}, batch 100, float32: the relative gradient (``relative_gradient_loss``,
   ``O(B D^2)``) against plain autograd through ``slogdet`` (``-log_prob(x).mean()``, ``O(D^3)``),
   torch and JAX (``jax.jit`` of ``value_and_grad`` + optax, compiled before timing). Log-log
   slopes are fitted over ``D >= max(D) / 8``, where the asymptotic terms dominate.
2. **Density estimation.** The same architecture trained at equal steps (same init, same
   minibatches, Adam with a cosine learning-rate decay) by MLE with the relative gradient,
   MLE with autograd, and score matching (``ssm_vr``, ``fd_ssm``, ``dsm`` on
   ``unnormalized_log_prob``), then judged by the exact test log-likelihood (torch, float64);
   mean and spread over ``--density-seeds`` runs (3; 1 with ``--quick``). Data: the bundled
   8x8 digits, dequantized (``(k + U[0, 1)) / 17``), logit-transformed
   (``logit(0.05 + 0.9 x)``) and standardized with training statistics; ``test_loglik`` is in
   nats per image for the dequantized data in ``[0, 1]^64`` (the Jacobians of the logit and
   the standardization are added back; ``test_loglik_model_space`` is the value in the
   standardized logit space). And a 2-D Gaussian mixture
   (``ppl_score.demo.datasets.mixture_dataset``), with the true density's value as a reference row.

Targets (issue 6): slope of the relative gradient <= 2.3; >= 5x faster than autograd at
D=2048; MLE by relative gradient within 1% of MLE by autograd on test log-likelihood.

Threads: ``--threads 1`` (default) pins torch and XLA to one thread, which keeps timings
stable on a loaded machine; ``--threads 0`` leaves the libraries' defaults.

    python benchmarks/relgrad.py --quick --json out/bench/relgrad.json
"""

from __future__ import annotations

import math
import os
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
sys.path.append(os.path.dirname(_HERE))  # a checkout without `pip install -e .`

import _common as C  # noqa: E402
import numpy as np  # noqa: E402

DIMS_FULL = (64, 128, 256, 512, 1024, 2048)
DIMS_QUICK = (64, 128, 256, 512)
BATCH = 100
SCALING_LAYERS = 2
ALPHA = 0.1
METHODS = ("mle_relgrad", "mle_autograd", "ssm_vr", "fd_ssm", "dsm")
LOGIT_LAMBDA = 0.05
# per data set: layers, learning rate (the same for every method)
DENSITY_CONFIG = {"digits": dict(n_layers=3, lr=1e-3), "mixture2d": dict(n_layers=6, lr=3e-3)}
TARGETS_TEXT = "slope_relgrad <= 2.3; speedup >= 5x at D=2048; |MLE relgrad - MLE autograd| <= 1% of test log-lik"


def set_threads(threads: int) -> None:
    """Pin torch and XLA (must run before JAX is imported) to ``threads`` (0: defaults)."""
    if threads > 0:
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = (
            f"{flags} --xla_cpu_multi_thread_eigen={'true' if threads > 1 else 'false'} "
            f"intra_op_parallelism_threads={threads}"
        ).strip()
        import torch

        torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------
# 1. scaling
# ------------------------------------------------------------------------------------------


def torch_steps(dim: int, n_layers: int, batch: int, seed: int) -> dict:
    """``{"relgrad": step, "autograd": step}``: one Adam step each, float32."""
    import torch

    from ppl_score.torch.flows import InvertibleMLP

    gen = torch.Generator().manual_seed(seed)
    x = 0.5 * torch.randn(batch, dim, generator=gen)
    out = {}
    for name in ("relgrad", "autograd"):
        flow = InvertibleMLP(dim, n_layers, ALPHA, generator=torch.Generator().manual_seed(seed))
        opt = torch.optim.Adam(flow.parameters(), lr=1e-5)

        def step(flow=flow, opt=opt, name=name):
            opt.zero_grad(set_to_none=True)
            loss = flow.relative_gradient_loss(x) if name == "relgrad" else -flow.log_prob(x).mean()
            loss.backward()
            opt.step()

        out[name] = step
    return out


def jax_steps(dim: int, n_layers: int, batch: int, seed: int) -> dict:
    """The JAX twins of ``torch_steps``: jitted ``value_and_grad`` + ``optax.adam``."""
    import jax
    import jax.numpy as jnp
    import optax

    from ppl_score.jax.flows import InvertibleMLP

    flow = InvertibleMLP(dim, n_layers, ALPHA)
    x = 0.5 * jax.random.normal(jax.random.PRNGKey(seed + 1), (batch, dim), jnp.float32)
    opt = optax.adam(1e-5)
    losses = {
        "relgrad": flow.relative_gradient_loss,
        "autograd": lambda p, xb: -flow.log_prob(p, xb).mean(),
    }
    out = {}
    for name, loss_fn in losses.items():

        @jax.jit
        def update(params, state, xb, loss_fn=loss_fn):
            loss, grads = jax.value_and_grad(loss_fn)(params, xb)
            updates, state = opt.update(grads, state, params)
            return optax.apply_updates(params, updates), state, loss

        params = flow.init(jax.random.PRNGKey(seed), jnp.float32)
        carry = [params, opt.init(params)]

        def step(update=update, carry=carry):
            params, state, loss = update(carry[0], carry[1], x)
            loss.block_until_ready()
            carry[0], carry[1] = params, state

        out[name] = step
    return out


def fit_slope(dims, ms) -> float:
    """Least-squares slope of ``log ms`` on ``log D`` over ``D >= max(D) / 8``."""
    pts = [(d, t) for d, t in zip(dims, ms) if t is not None and math.isfinite(t)]
    if not pts:
        return math.nan
    top = max(d for d, _ in pts)
    pts = [(d, t) for d, t in pts if d >= top / 8]
    if len(pts) < 2:
        return math.nan
    return float(np.polyfit(np.log([d for d, _ in pts]), np.log([t for _, t in pts]), 1)[0])


def scaling(
    backends, dims, *, n_layers=SCALING_LAYERS, batch=BATCH, repeats=5, max_call_s=60.0, seed=0, log=print
) -> list[dict]:
    """Rows ``{"backend", "D", "relgrad_ms", "autograd_ms", "speedup"}`` (medians)."""
    makers = {"torch": torch_steps, "jax": jax_steps}
    rows = []
    for backend in backends:
        for dim in dims:
            fns = makers[backend](dim, n_layers, batch, seed)
            timings = C.interleaved_timings(fns, repeats, max_call_s=max_call_s, seed=seed)
            ms = {k: (None if t.skipped else 1e3 * t.median) for k, t in timings.items()}
            speedup = ms["autograd"] / ms["relgrad"] if None not in ms.values() else None
            rows.append(
                {
                    "backend": backend,
                    "D": dim,
                    "relgrad_ms": ms["relgrad"],
                    "autograd_ms": ms["autograd"],
                    "speedup": speedup,
                }
            )
            log(
                f"  {backend:5s} D={dim:5d}  relgrad {C.fmt(ms['relgrad'], '.2f')} ms  "
                f"autograd {C.fmt(ms['autograd'], '.2f')} ms  ({C.fmt(speedup, '.1f')}x)"
            )
    return rows


def slopes(rows) -> dict:
    out = {}
    for backend in dict.fromkeys(r["backend"] for r in rows):
        sel = [r for r in rows if r["backend"] == backend]
        dims = [r["D"] for r in sel]
        out[backend] = {
            "relgrad": fit_slope(dims, [r["relgrad_ms"] for r in sel]),
            "autograd": fit_slope(dims, [r["autograd_ms"] for r in sel]),
            "fit_dims": [d for d in dims if d >= max(dims) / 8],
        }
    return out


# ------------------------------------------------------------------------------------------
# 2. density estimation
# ------------------------------------------------------------------------------------------


class DensityData:
    """Training and test arrays in the space the flow models, and per-example log-Jacobians
    ``log|d(model space)/d(data space)|`` that bring a log-likelihood back to the data space."""

    def __init__(self, name, train, test, test_log_jac, reference=None, space=""):
        self.name, self.train, self.test = name, train, test
        self.test_log_jac = test_log_jac
        self.reference = reference  # exact test log-likelihood of the true density, if known
        self.space = space


def digits_data(seed: int = 0, test_fraction: float = 0.2) -> DensityData:
    """8x8 digits, uniformly dequantized to ``[0, 1]``, ``y = logit(lam + (1 - 2 lam) x)``, then
    standardized; ``log|dy/dx| = sum_i log(1 - 2 lam) - log p_i - log(1 - p_i) - log std_i``."""
    from sklearn.datasets import load_digits

    raw = load_digits().data.astype(np.float64)
    rng = np.random.default_rng([seed, 6])
    x = (raw + rng.random(raw.shape)) / 17.0
    perm = rng.permutation(len(x))
    n_test = int(round(test_fraction * len(x)))
    x_train, x_test = x[perm[n_test:]], x[perm[:n_test]]

    def logit(v):
        p = LOGIT_LAMBDA + (1.0 - 2.0 * LOGIT_LAMBDA) * v
        return np.log(p) - np.log1p(-p), (math.log(1.0 - 2.0 * LOGIT_LAMBDA) - np.log(p) - np.log1p(-p)).sum(-1)

    y_train, _ = logit(x_train)
    y_test, jac_test = logit(x_test)
    mean, std = y_train.mean(0), y_train.std(0)
    return DensityData(
        "digits",
        (y_train - mean) / std,
        (y_test - mean) / std,
        jac_test - np.log(std).sum(),
        space="nats per image, dequantized data in [0,1]^64",
    )


def mixture_data(seed: int = 0) -> DensityData:
    from ppl_score.demo.datasets import mixture_dataset

    ds = mixture_dataset(seed=seed)
    return DensityData(
        "mixture2d",
        ds.train,
        ds.test,
        np.zeros(len(ds.test)),
        reference=float(ds.log_prob(ds.test).mean()),
        space="nats per point",
    )


def train_flow(
    data: DensityData, method: str, *, steps: int, n_layers: int, lr: float, batch: int = BATCH, seed: int = 0
):
    """Train ``InvertibleMLP`` by ``method`` (float64, Adam with a cosine decay of the learning
    rate to zero over ``steps``); return ``(flow, seconds)``. The initialisation and the
    minibatches depend on ``seed`` only, so every method sees the same ones."""
    import torch

    from ppl_score.torch import score_matching_loss
    from ppl_score.torch.flows import InvertibleMLP

    train = torch.as_tensor(data.train)
    flow = InvertibleMLP(
        train.shape[1], n_layers, ALPHA, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)
    )
    opt = torch.optim.Adam(flow.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    batches = torch.Generator().manual_seed(seed + 1)
    draws = torch.Generator().manual_seed(seed + 2)
    t0 = time.perf_counter()
    for _ in range(steps):
        xb = train[torch.randint(0, train.shape[0], (batch,), generator=batches)]
        opt.zero_grad(set_to_none=True)
        if method == "mle_relgrad":
            loss = flow.relative_gradient_loss(xb)
        elif method == "mle_autograd":
            loss = -flow.log_prob(xb).mean()
        else:
            loss = score_matching_loss(flow.unnormalized_log_prob, xb, method, generator=draws)
        loss.backward()
        opt.step()
        schedule.step()
    return flow, time.perf_counter() - t0


def density(datasets, methods=METHODS, *, steps: int, seeds: int = 1, seed: int = 0, log=print) -> list[dict]:
    """Rows ``{"data", "method", "test_loglik", "test_loglik_std", "test_loglik_model_space",
    "train_s", "steps", "seeds", "space"}``: means (and standard deviations) over ``seeds``
    training runs (initialisation and minibatches), each judged by the exact test log-likelihood."""
    import torch

    rows = []
    for data in datasets:
        cfg = DENSITY_CONFIG[data.name]
        test = torch.as_tensor(data.test)
        for method in methods:
            lls, lls_model, secs = [], [], 0.0
            for s in range(seeds):
                flow, t = train_flow(data, method, steps=steps, seed=seed + 1000 * s, **cfg)
                with torch.no_grad():
                    ll_model = flow.log_prob(test).numpy()
                lls.append(float((ll_model + data.test_log_jac).mean()))
                lls_model.append(float(ll_model.mean()))
                secs += t
            row = {
                "data": data.name,
                "method": method,
                "test_loglik": float(np.mean(lls)),
                "test_loglik_std": float(np.std(lls, ddof=1)) if seeds > 1 else 0.0,
                "test_loglik_model_space": float(np.mean(lls_model)),
                "train_s": secs / seeds,
                "steps": steps,
                "seeds": seeds,
                "space": data.space,
            }
            rows.append(row)
            log(
                f"  {data.name:9s} {method:12s} test log-lik {row['test_loglik']:10.3f} "
                f"+- {row['test_loglik_std']:.3f}  ({row['train_s']:.1f} s per run)"
            )
        if data.reference is not None:
            rows.append(
                {
                    "data": data.name,
                    "method": "true density",
                    "test_loglik": data.reference,
                    "test_loglik_std": 0.0,
                    "test_loglik_model_space": data.reference,
                    "train_s": None,
                    "steps": None,
                    "seeds": None,
                    "space": data.space,
                }
            )
    return rows


# ------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------


def targets(scaling_rows, slope, density_rows) -> dict:
    out = {}
    torch_slope = slope.get("torch", {}).get("relgrad", math.nan)
    out["slope_relgrad<=2.3"] = None if math.isnan(torch_slope) else bool(torch_slope <= 2.3)
    at = [r for r in scaling_rows if r["backend"] == "torch" and r["D"] == 2048]
    out["speedup>=5x@D=2048"] = bool(at[0]["speedup"] >= 5.0) if at and at[0]["speedup"] else None
    for name in dict.fromkeys(r["data"] for r in density_rows):
        rows = {r["method"]: r for r in density_rows if r["data"] == name}
        if "mle_relgrad" in rows and "mle_autograd" in rows:
            a, b = rows["mle_relgrad"], rows["mle_autograd"]
            diff = a["test_loglik"] - b["test_loglik"]
            rel = abs(diff) / abs(b["test_loglik"])
            out[f"mle_within_1%[{name}]"] = bool(rel <= 0.01)
            out[f"mle_rel_diff[{name}]"] = rel
            if (a["seeds"] or 0) > 1:  # the difference in standard errors of the seed means
                se = math.sqrt((a["test_loglik_std"] ** 2 + b["test_loglik_std"] ** 2) / a["seeds"])
                out[f"mle_diff_in_se[{name}]"] = diff / se if se > 0 else math.nan
    return out


def report(result: dict) -> str:
    lines = []
    if result["scaling"]:
        lines.append(
            C.markdown_table(
                ["backend", "D", "relgrad ms", "autograd ms", "speedup"],
                [
                    [
                        r["backend"],
                        str(r["D"]),
                        C.fmt(r["relgrad_ms"]),
                        C.fmt(r["autograd_ms"]),
                        C.fmt(r["speedup"], ".1f"),
                    ]
                    for r in result["scaling"]
                ],
            )
        )
        lines.append("")
        lines.append(
            C.markdown_table(
                ["backend", "slope relgrad", "slope autograd", "fit over D"],
                [
                    [b, C.fmt(s["relgrad"]), C.fmt(s["autograd"]), ",".join(map(str, s["fit_dims"]))]
                    for b, s in result["slopes"].items()
                ],
            )
        )
        lines.append("")
    if result["density"]:
        lines.append(
            C.markdown_table(
                ["data", "method", "test log-lik", "std over seeds", "space"],
                [
                    [
                        r["data"],
                        r["method"],
                        C.fmt(r["test_loglik"], ".3f"),
                        C.fmt(r["test_loglik_std"], ".3f"),
                        r["space"],
                    ]
                    for r in result["density"]
                ],
            )
        )
        lines.append("")
    lines.append(
        "targets: "
        + ", ".join(f"{k}={C.fmt(v, '.4f') if isinstance(v, float) else v}" for k, v in result["targets"].items())
    )
    return "\n".join(lines)


def run(
    *,
    quick: bool,
    backends=("torch", "jax"),
    dims=None,
    repeats=None,
    density_steps=None,
    seeds=None,
    methods=METHODS,
    seed=0,
    skip_scaling=False,
    skip_density=False,
    max_call_s=120.0,
    log=print,
) -> dict:
    """Both experiments; returns the JSON-ready result."""
    dims = tuple(dims or (DIMS_QUICK if quick else DIMS_FULL))
    repeats = repeats or (3 if quick else 7)
    steps = density_steps or (300 if quick else 3000)
    seeds = seeds or (1 if quick else 3)
    rows = []
    if not skip_scaling:
        log(f"scaling: batch {BATCH}, {SCALING_LAYERS} layers, float32, median of {repeats}")
        rows = scaling(backends, dims, repeats=repeats, max_call_s=max_call_s, seed=seed, log=log)
    slope = slopes(rows) if rows else {}
    dens = []
    if not skip_density:
        log(f"density: {steps} Adam steps per method (cosine decay), batch {BATCH}, float64, {seeds} seed(s)")
        dens = density([digits_data(seed), mixture_data(seed)], methods, steps=steps, seeds=seeds, seed=seed, log=log)
    main_slope = slope.get("torch") or next(iter(slope.values()), {})
    return {
        "scaling": rows,
        "slope_relgrad": main_slope.get("relgrad"),
        "slope_autograd": main_slope.get("autograd"),
        "slopes": slope,
        "density": dens,
        "targets": targets(rows, slope, dens),
        "config": {
            "batch": BATCH,
            "scaling_layers": SCALING_LAYERS,
            "alpha": ALPHA,
            "dims": list(dims),
            "repeats": repeats,
            "density_steps": steps,
            "density_seeds": seeds,
            "density": DENSITY_CONFIG,
            "logit_lambda": LOGIT_LAMBDA,
            "targets": TARGETS_TEXT,
        },
    }


def main(argv=None) -> dict:
    p = C.make_parser(__doc__.splitlines()[0])
    p.add_argument("--backends", default="torch,jax", help="comma-separated subset of torch,jax (scaling)")
    p.add_argument("--dims", default=None, help="comma-separated D values (default: by mode)")
    p.add_argument("--density-steps", type=int, default=None, help="training steps per method (default: by mode)")
    p.add_argument(
        "--density-seeds", type=int, default=None, help="training runs per method (default: 1 quick, 3 full)"
    )
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--threads", type=int, default=1, help="torch / XLA threads; 0 = library defaults")
    p.add_argument("--max-call-s", type=float, default=120.0, help="skip a variant whose first step is slower")
    p.add_argument("--skip-scaling", action="store_true")
    p.add_argument("--skip-density", action="store_true")
    args = p.parse_args(argv)
    set_threads(args.threads)
    backends = tuple(b for b in args.backends.split(",") if b)
    for b in backends:
        if b not in ("torch", "jax"):
            p.error(f"--backends: unknown backend {b!r}")
    dims = tuple(int(d) for d in args.dims.split(",")) if args.dims else None
    methods = tuple(m for m in args.methods.split(",") if m)
    for m in methods:
        if m not in METHODS:
            p.error(f"--methods: unknown method {m!r}")
    result = run(
        quick=args.quick,
        backends=backends,
        dims=dims,
        repeats=args.repeats,
        density_steps=args.density_steps,
        seeds=args.density_seeds,
        methods=methods,
        seed=args.seed,
        skip_scaling=args.skip_scaling,
        skip_density=args.skip_density,
        max_call_s=args.max_call_s,
    )
    result["meta"] = {**C.environment_meta(), "threads": args.threads, "quick": args.quick}
    print()
    print(report(result))
    C.write_json_object(args.json, result)
    return result


if __name__ == "__main__":
    main()
