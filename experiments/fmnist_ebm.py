"""Deep energy-based model on Fashion-MNIST (784-D): the shape of FD-SSM's deep-EBM table
(Pang et al., NeurIPS 2020, "Efficient learning of generative models via finite-difference
score matching"), on a CPU, in both backends.

One MLP energy ``log p(x) = -E(x) + const`` (``ppl_score.torch.nets.MLPEnergy`` and its JAX
mirror ``ppl_score.jax.nets.energy_apply``: softplus MLP ``784 -> hidden -> 1`` plus the
quadratic term ``-q/2 ||x||^2`` that keeps ``exp(-E)`` normalizable) is trained on
dequantized images **in [0, 1] pixel space** (``experiments/_common.load_images``; no logit
transform) by ``dsm``, ``fd_dsm``, ``ssm``, ``ssm_vr`` and ``fd_ssm``, in torch and in JAX,
with the library's training loops (``ppl_score.{torch,jax}.training.fit_energy``: Adam, cosine
decay, minibatches drawn with replacement): same steps, batch, learning rate and seed for every
run, and the **same initial weights** in both backends (drawn once with numpy, torch's
``nn.Linear`` law, and loaded into both).

Settings, following ``python -m ppl_score demo`` (``ppl_score/demo/cli.py``) for the data
scale ``s`` (RMS per-pixel standard deviation, 0.29 here): ``q = 0.1 / s^2``, DSM noise
``sigma = 0.1 s``; the finite-difference step is the paper's deep-EBM ``eps = 0.05``; one
projection for the sliced and finite-difference methods (Rademacher for ``ssm`` /
``ssm_vr``, directions uniform on the sphere for ``fd_*``).

Metrics per (backend, method):

* **held-out ESM**: the exact score-matching loss ``E[tr H + 1/2 ||s||^2]`` (batched ``esm``
  through the library's ``score_matching_loss``: torch ``FitResult.esm``, JAX the same call
  jitted once with the parameters as an argument) on a fixed subset of the test split;
  lower is better, and it is the same yardstick for every objective;
* **step time**: median ms of one training step's loss and parameter gradient (the Adam
  update, identical for all methods, is left out) on a fixed batch, all ten variants timed
  round-robin in one process (``interleaved_timings``; the FD method and its exact
  counterpart always back to back), in two passes: one before training and one after, so the
  spread of the ratios between passes shows how much the shared machine's load moves them;
* **step memory**: torch, the peak of torch's allocator during one step above its level at
  the start (``torch_peak_bytes``; temporaries plus gradients); JAX, the compiled step's
  ``memory_analysis()`` (temporaries plus outputs less aliased buffers, as
  ``benchmarks/objectives.py`` ``jax_step_bytes``). Not the same quantity across backends;
  compare ratios within a backend;
* **FD / exact ratios** ``fd_ssm / ssm``, ``fd_ssm / ssm_vr`` and ``fd_dsm / dsm`` for time and
  memory, beside the paper's GPU numbers (FD-SSM 230-276 ms vs SSM 673 ms per step and
  3.4-3.7 GB vs 5.1 GB; FD-DSM 162-191 ms vs DSM 282 ms);
* **samples**: 64 unadjusted Langevin chains (``ppl_score.{torch,jax}.langevin.ula``, not
  annealed) from uniform noise for every model, then one noise-free step; the figure
  ``fmnist_ebm_samples.png`` shows held-out images beside them (the best model by held-out
  ESM per backend marked), ``fmnist_ebm_cost.png`` the time and memory bars. The mean
  ``-E`` of samples, held-out data and the initial noise goes to the JSON.

What was cut to fit 15 minutes single-threaded on a 2-core CPU shared with other jobs (the
paper trains a much larger deep energy network on a GPU for many more steps): an MLP energy
with two hidden layers of 256; 1500 steps of batch 64
(1.6 epochs of the 60000 training images); held-out ESM on 256 test images (its exact trace
costs 784 Hessian-vector products per image); 64 Langevin chains of 500 steps, plain ULA
rather than annealed, and the samples stay noise-like (plain ULA from noise does not find the
image modes of these energies; the very negative ESM of ``ssm_vr`` likely comes from tight
fits of the near-constant background pixels at the [0, 1] boundary, which score matching's
integration by parts ignores); 20 timing repeats per pass. Measured: 211-324 s wall for the
full run at load averages 4-7 on the 2-core machine. ``--smoke`` shrinks everything
(64 training images, a 16-unit energy, 10 steps) and compiles JAX with
``jax_disable_most_optimizations``, so its numbers mean nothing; it checks the pipeline.

    python experiments/fmnist_ebm.py --json experiments/results/fmnist_ebm.json
    python experiments/fmnist_ebm.py --smoke --json /tmp/fmnist_ebm.json   # seconds, tests
"""

from __future__ import annotations

import math
import os
import statistics
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)

import _common as C  # noqa: E402

C.single_thread()  # before JAX is imported (it reads XLA_FLAGS once)

import numpy as np  # noqa: E402

METHODS = ("dsm", "fd_dsm", "ssm", "ssm_vr", "fd_ssm")
BACKENDS = ("torch", "jax")
# (numerator, denominator, paper's time ratio range, paper's memory ratio range)
RATIOS = (
    ("fd_ssm", "ssm", (230 / 673, 276 / 673), (3.4 / 5.1, 3.7 / 5.1)),
    ("fd_ssm", "ssm_vr", None, None),
    ("fd_dsm", "dsm", (162 / 282, 191 / 282), None),
)
PAPER_TEXT = {
    ("fd_ssm", "ssm"): ("230-276 / 673 ms", "3.4-3.7 / 5.1 GB"),
    ("fd_dsm", "dsm"): ("162-191 / 282 ms", "-"),
}
FULL = dict(
    n_train=None,
    n_eval=256,
    hidden=(256, 256),
    steps=1500,
    batch_size=64,
    lr=1e-3,
    repeats=20,
    min_sample_s=0.05,
    chains=64,
    langevin_steps=500,
)
SMOKE = dict(
    n_train=64,
    n_eval=16,
    hidden=(16,),
    steps=10,
    batch_size=16,
    lr=1e-3,
    repeats=2,
    min_sample_s=0.0,
    chains=16,
    langevin_steps=20,
)
MB = 2.0**20
FD_EPS = 0.05  # the paper's finite-difference step for the deep EBM


def parse_args(argv=None):
    p = C.make_parser(__doc__.split("\n\n")[0])
    p.add_argument("--backend", choices=(*BACKENDS, "both"), default="both")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    p.add_argument("--steps", type=int, default=None, help="training steps (default 1500; smoke 10)")
    p.add_argument("--batch-size", type=int, default=None, help="minibatch size (default 64; smoke 16)")
    p.add_argument("--hidden", default=None, help="hidden widths, e.g. 256,256 (default; smoke 16)")
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate (default 1e-3)")
    p.add_argument("--n-train", type=int, default=None, help="training images (default all 60000; smoke 64)")
    p.add_argument("--n-eval", type=int, default=None, help="held-out images for the exact SM loss (default 256)")
    p.add_argument("--eps", type=float, default=FD_EPS, help="finite-difference step of fd_* (default 0.05)")
    p.add_argument("--sigma", type=float, default=None, help="DSM noise (default 0.1 x the data's RMS std)")
    p.add_argument("--repeats", type=int, default=None, help="timing repeats per pass (default 20)")
    p.add_argument("--passes", type=int, default=2, help="timing passes (1: before training; 2: also after)")
    p.add_argument("--langevin-steps", type=int, default=None, help="ULA steps per chain (default 500)")
    args = p.parse_args(argv)
    cfg = dict(SMOKE if args.smoke else FULL)
    for name in ("steps", "batch_size", "lr", "n_train", "n_eval", "repeats", "langevin_steps"):
        if getattr(args, name) is not None:
            cfg[name] = getattr(args, name)
    if args.hidden:
        cfg["hidden"] = tuple(int(h) for h in args.hidden.split(","))
    args.methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        p.error(f"--methods: unknown {unknown}; choose from {METHODS}")
    args.backends = BACKENDS if args.backend == "both" else (args.backend,)
    return args, cfg


def init_weights(hidden, seed: int, dim: int = 784):
    """``[(W [in, out], b [out] or None)]`` drawn with numpy from torch's ``nn.Linear`` law
    (uniform in +-1/sqrt(fan_in)); the last layer has no bias, as in ``MLPEnergy``. The one
    initialization both backends load, so they start from the same weights."""
    rng = np.random.default_rng([seed, 784])
    sizes = (dim, *hidden, 1)
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        bound = 1.0 / math.sqrt(a)
        w = rng.uniform(-bound, bound, size=(a, b)).astype(np.float32)
        bias = None if i == len(sizes) - 2 else rng.uniform(-bound, bound, size=b).astype(np.float32)
        layers.append((w, bias))
    return layers


def method_options(method: str, sigma: float, eps: float) -> dict:
    return {
        "dsm": {"sigma": sigma},
        "fd_dsm": {"sigma": sigma, "eps": eps},
        "ssm": {"n_projections": 1},
        "ssm_vr": {"n_projections": 1},
        "fd_ssm": {"eps": eps, "n_projections": 1},
    }[method]


def mean_se(values) -> tuple[float, float]:
    values = np.asarray(values, dtype=np.float64)
    se = float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else 0.0
    return float(values.mean()), se


# ------------------------------------------------------------------------------ backends


class TorchBackend:
    name = "torch"

    def __init__(self, weights, quadratic: float, seed: int):
        import torch

        from ppl_score.torch import score_matching_loss
        from ppl_score.torch.nets import MLPEnergy

        self.torch, self.loss = torch, score_matching_loss
        hidden = tuple(w.shape[1] for w, _ in weights[:-1])
        self.model = MLPEnergy(784, hidden, torch.nn.Softplus, quadratic)
        linears = [m for m in self.model.modules() if isinstance(m, torch.nn.Linear)]
        with torch.no_grad():
            for lin, (w, b) in zip(linears, weights):
                lin.weight.copy_(torch.as_tensor(w.T))
                if b is not None:
                    lin.bias.copy_(torch.as_tensor(b))
        self.seed = seed

    def step_fn(self, x: np.ndarray, method: str, options: dict):
        """One step's loss and parameter gradients (``backward``) on the fixed batch ``x``."""
        torch = self.torch
        model = self.model
        xb = torch.as_tensor(x)
        gen = torch.Generator().manual_seed(self.seed)

        def step():
            model.zero_grad(set_to_none=True)
            self.loss(model, xb, method, generator=gen, **options).backward()

        return step

    def step_bytes(self, step) -> int:
        step()  # warm-up: one-time allocations are not the step's
        return C.torch_peak_bytes(step)

    def fit(self, train, method, cfg, seed, options):
        from ppl_score.torch.training import fit_energy

        return fit_energy(
            self.model,
            train,
            method,
            steps=cfg["steps"],
            batch_size=cfg["batch_size"],
            lr=cfg["lr"],
            seed=seed,
            progress=False,
            **options,
        )

    def evaluator(self, fit):
        """``(log_prob, score, esm)`` numpy callables: the library's ``FitResult`` ones."""
        return fit.log_prob, fit.score, fit.esm

    def langevin(self, fit, x0: np.ndarray, h: float, n_steps: int, seed: int) -> np.ndarray:
        torch = self.torch
        from ppl_score.torch.langevin import ula

        gen = torch.Generator().manual_seed(seed)
        out = ula(fit.model, torch.as_tensor(x0, dtype=torch.float32), h, n_steps, thin=n_steps, generator=gen)
        return out.samples[-1].to(torch.float64).numpy()


class JaxBackend:
    name = "jax"

    def __init__(self, weights, quadratic: float, seed: int):
        import jax
        import jax.numpy as jnp

        from ppl_score.jax import score_matching_loss
        from ppl_score.jax.nets import energy_apply

        self.jax, self.jnp, self.loss = jax, jnp, score_matching_loss
        self.params = [(jnp.asarray(w), None if b is None else jnp.asarray(b)) for w, b in weights]

        # One plain function for every model, so that ``ula(Partial(apply, params))`` compiles
        # once: a ``functools.partial`` here would not do (``jax.tree_util.Partial`` wraps one in
        # a fresh shim object per call, and the sampler's compilation cache is keyed by it).
        def apply(params, x):
            return energy_apply(params, x, jax.nn.softplus, quadratic)

        self.apply = apply
        self.seed = seed
        # evaluators jitted once with the parameters as an argument (written before
        # ``FitResult``'s evaluators did the same; kept so that the published results come from
        # this code)
        apply, loss = self.apply, score_matching_loss
        self._log_prob = jax.jit(apply)
        self._score = jax.jit(lambda p, x: jax.grad(lambda y: apply(p, y).sum())(x))
        self._esm = jax.jit(lambda p, x: loss(lambda y: apply(p, y), x, "esm", reduction="none"))

    def evaluator(self, fit):
        """``(log_prob, score, esm)`` numpy callables at ``fit.params``, float64 out."""
        jnp = self.jnp

        def bind(f):
            return lambda x: np.asarray(f(fit.params, jnp.asarray(x, jnp.float32)), np.float64)

        return bind(self._log_prob), bind(self._score), bind(self._esm)

    def step_fn(self, x: np.ndarray, method: str, options: dict):
        """The compiled ``value_and_grad`` of the loss in the parameters on the fixed batch ``x``."""
        jax, apply, params = self.jax, self.apply, self.params
        xb, key = self.jnp.asarray(x), jax.random.PRNGKey(self.seed)

        def loss(p, xb, key):
            return self.loss(lambda y: apply(p, y), xb, method, key=key, **options)

        compiled = jax.jit(jax.value_and_grad(loss)).lower(params, xb, key).compile()
        step = lambda: jax.block_until_ready(compiled(params, xb, key))
        step.compiled = compiled
        return step

    def step_bytes(self, step) -> int:
        """Temporaries plus outputs (loss and gradients), less aliased buffers: as
        ``benchmarks/objectives.py`` ``jax_step_bytes``."""
        m = step.compiled.memory_analysis()
        return int(m.temp_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes)

    def fit(self, train, method, cfg, seed, options):
        from ppl_score.jax.training import fit_energy

        return fit_energy(
            self.apply,
            self.params,
            train,
            method,
            steps=cfg["steps"],
            batch_size=cfg["batch_size"],
            lr=cfg["lr"],
            seed=seed,
            progress=False,
            **options,
        )

    def langevin(self, fit, x0: np.ndarray, h: float, n_steps: int, seed: int) -> np.ndarray:
        jax = self.jax
        from ppl_score.jax.langevin import ula

        fn = jax.tree_util.Partial(self.apply, fit.params)
        out = ula(fn, self.jnp.asarray(x0, self.jnp.float32), h, n_steps, key=jax.random.PRNGKey(seed), thin=n_steps)
        return np.asarray(out.samples[-1], np.float64)


def langevin_samples(backend, fit, score, x0: np.ndarray, step: float, n_steps: int, seed: int):
    """``n_steps`` of ULA ``x <- x + h s(x) + sqrt(2h) z`` from ``x0``, then one noise-free step
    ``x + h s(x)``. A run that diverges (the sampler's ``ValueError``) or ends far outside the
    pixel range restarts with half the step. Returns the samples and ``h``."""
    h = step
    for _ in range(20):
        try:
            x = backend.langevin(fit, x0, h, n_steps, seed)
        except ValueError:
            x = None
        if x is not None and np.isfinite(x).all() and np.abs(x - 0.5).max() <= 5.0:
            x = x + h * score(x)
            if np.isfinite(x).all():
                return x, h
        h /= 2
    raise FloatingPointError(f"{backend.name}: Langevin diverged even with h={h:g}")


# ------------------------------------------------------------------------------ timing


def time_pass(step_fns: dict, cfg: dict, seed: int) -> dict:
    """Median ms per step of every ``(backend, method)``, round-robin in one process; each FD
    method is timed right beside its exact counterparts (paired samples)."""
    adjacent = []
    for b in {k[0] for k in step_fns}:
        adjacent.append([(b, m) for m in ("fd_ssm", "ssm", "ssm_vr") if (b, m) in step_fns])
        adjacent.append([(b, m) for m in ("fd_dsm", "dsm") if (b, m) in step_fns])
    timings = C.interleaved_timings(
        step_fns, cfg["repeats"], warmup=2, min_sample_s=cfg["min_sample_s"], seed=seed, adjacent=adjacent
    )
    return {k: t for k, t in timings.items()}


def paired_ratio(timings: dict, num, den) -> float:
    """Median over repeats of ``num_i / den_i`` (the two were timed back to back)."""
    a, b = timings.get(num), timings.get(den)
    if a is None or b is None or not a.samples or not b.samples:
        return math.nan
    return statistics.median(x / y for x, y in zip(a.samples, b.samples))


# ------------------------------------------------------------------------------ figures


def image_grid(x: np.ndarray, cols: int = 8) -> np.ndarray:
    n = len(x)
    rows = math.ceil(n / cols)
    canvas = np.ones((rows * 29 + 1, cols * 29 + 1))
    imgs = np.clip(x.reshape(n, 28, 28), 0.0, 1.0)
    for i in range(n):
        r, c = divmod(i, cols)
        canvas[1 + r * 29 : 29 + r * 29, 1 + c * 29 : 29 + c * 29] = imgs[i]
    return canvas


def figure_samples(path, test, samples, rows_by_key, backends, methods, best, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncols = 1 + len(methods)
    fig, axes = plt.subplots(len(backends), ncols, figsize=(2.6 * ncols, 3.3 * len(backends) + 0.4), squeeze=False)
    shown = len(next(iter(samples.values()))) if samples else 64
    for i, b in enumerate(backends):
        a = axes[i, 0]
        a.imshow(image_grid(test[:shown]), cmap="gray_r", vmin=0, vmax=1)
        a.set_title("held-out data", fontsize=9)
        a.axis("off")
        for j, m in enumerate(methods, start=1):
            a = axes[i, j]
            a.axis("off")
            if (b, m) not in samples:
                a.set_title(f"{b} {m}: failed", fontsize=9)
                continue
            a.imshow(image_grid(samples[(b, m)]), cmap="gray_r", vmin=0, vmax=1)
            esm = rows_by_key[(b, m)]["heldout_esm"]
            mark = " (best)" if best.get(b) == m else ""
            a.set_title(f"{b} {m}{mark}\nESM {C.fmt(esm, '.4g')}", fontsize=9, weight="bold" if mark else None)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def figure_cost(path, rows, backends, methods):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    width = 0.8 / len(backends)
    xs = np.arange(len(methods))
    by = {(r["backend"], r["method"]): r for r in rows}
    for ax, key, label in ((axes[0], "step_ms", "ms per step (median)"), (axes[1], "step_mb", "MB per step")):
        for i, b in enumerate(backends):
            vals = [by.get((b, m), {}).get(key) for m in methods]
            vals = [np.nan if v is None else v for v in vals]
            ax.bar(xs + (i - (len(backends) - 1) / 2) * width, vals, width, label=b)
        ax.set_xticks(xs, methods)
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    axes[0].set_title("step time (loss + gradient), single thread")
    axes[1].set_title("step memory (torch: allocator peak; JAX: compiled)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------ main


def main(argv=None) -> dict:
    wall0 = time.perf_counter()
    args, cfg = parse_args(argv)
    phases = {}
    cpu = [sum(os.times()[:2])]

    def phase(name, t0):
        now = sum(os.times()[:2])
        phases[name] = {"wall_s": time.perf_counter() - t0, "cpu_s": now - cpu[0]}
        cpu[0] = now
        print(f"[{name}: {phases[name]['wall_s']:.1f} s wall, {phases[name]['cpu_s']:.1f} s cpu]", flush=True)

    t0 = time.perf_counter()
    train, test = C.load_images(cfg["n_train"], cfg["n_eval"], seed=args.seed, path=args.data)
    from ppl_score.demo.datasets import data_scale

    scale = data_scale(train)
    quadratic = float(f"{0.1 / scale**2:.2g}")
    sigma = args.sigma if args.sigma is not None else float(f"{0.1 * scale:.2g}")
    eps = args.eps
    options = {m: method_options(m, sigma, eps) for m in args.methods}
    weights = init_weights(cfg["hidden"], args.seed)
    arch = "-".join(map(str, (784, *cfg["hidden"], 1)))
    print(
        f"Fashion-MNIST deep EBM, [0, 1] pixel space (dequantized), D=784: {len(train)} train / {len(test)} held-out "
        f"images, RMS pixel std {scale:.3g}\nenergy: MLP {arch}, softplus, quadratic {quadratic:g}/2 ||x||^2; "
        f"sigma={sigma:g}, eps={eps:g}; {cfg['steps']} steps, batch {cfg['batch_size']}, Adam lr {cfg['lr']:g} "
        f"(cosine decay), seed {args.seed}; backends {', '.join(args.backends)}" + (" [smoke]" if args.smoke else ""),
        flush=True,
    )
    if args.smoke and "jax" in args.backends:
        import jax

        jax.config.update("jax_disable_most_optimizations", True)  # halves compile time; smoke only
    backends = {}
    for b in args.backends:
        backends[b] = (TorchBackend if b == "torch" else JaxBackend)(weights, quadratic, args.seed)
    phase("load and import", t0)

    # step functions on one fixed batch, memory, first timing pass
    t0 = time.perf_counter()
    batch = train[np.random.default_rng(args.seed).integers(len(train), size=cfg["batch_size"])]
    step_fns, step_bytes = {}, {}
    for b, be in backends.items():
        for m in args.methods:
            step_fns[(b, m)] = be.step_fn(batch, m, options[m])
            step_bytes[(b, m)] = be.step_bytes(step_fns[(b, m)])
    phase("compile and memory", t0)
    passes = []
    t0 = time.perf_counter()
    passes.append(time_pass(step_fns, cfg, args.seed))
    phase("timing pass 1", t0)

    # training and held-out exact score matching
    rows, fits, evals = [], {}, {}
    t0 = time.perf_counter()
    for b, be in backends.items():
        for m in args.methods:
            t1 = time.perf_counter()
            row = {"backend": b, "method": m, "options": options[m]}
            try:
                fit = be.fit(train, m, cfg, args.seed, options[m])
            except FloatingPointError as err:
                row.update(error=str(err), heldout_esm=math.nan, heldout_esm_stderr=math.nan)
                print(f"  {b} {m}: {err}", flush=True)
                rows.append(row)
                continue
            fits[(b, m)] = fit
            evals[(b, m)] = be.evaluator(fit)
            esm, esm_se = mean_se(evals[(b, m)][2](test))
            tail = fit.losses[-max(1, len(fit.losses) // 10) :]
            row.update(
                heldout_esm=esm,
                heldout_esm_stderr=esm_se,
                final_train_loss=float(np.mean(tail)),
                train_seconds=fit.seconds,
                train_ms_per_step=1e3 * fit.seconds / cfg["steps"],
            )
            rows.append(row)
            print(
                f"  {b:5s} {m:6s}: held-out ESM {esm:.4g} +- {esm_se:.2g}, train {fit.seconds:.1f} s "
                f"({time.perf_counter() - t1:.1f} s with eval)",
                flush=True,
            )
    phase("training and evaluation", t0)

    if args.passes > 1:
        t0 = time.perf_counter()
        for i in range(1, args.passes):
            passes.append(time_pass(step_fns, cfg, args.seed + 1000 * i))
        phase("timing passes 2..", t0)

    # Langevin samples of every model
    t0 = time.perf_counter()
    rng = np.random.default_rng([args.seed, 7])
    x0 = rng.uniform(0.0, 1.0, size=(cfg["chains"], 784))
    h0 = 0.5 * (0.25 * scale) ** 2  # the demo's step (0.25 s)^2 in x <- x + step/2 s + sqrt(step) z
    samples = {}
    by_key = {(r["backend"], r["method"]): r for r in rows}
    for (b, m), fit in fits.items():
        try:
            x, h = langevin_samples(backends[b], fit, evals[(b, m)][1], x0, h0, cfg["langevin_steps"], args.seed)
        except FloatingPointError as err:
            by_key[(b, m)]["langevin_error"] = str(err)
            continue
        samples[(b, m)] = x
        log_prob = evals[(b, m)][0]
        by_key[(b, m)].update(
            langevin_h=h,
            mean_logp_samples=float(log_prob(x).mean()),
            mean_logp_heldout=float(log_prob(test).mean()),
            mean_logp_noise=float(log_prob(x0).mean()),
            samples_pixel_mean=float(x.mean()),
            samples_in_range=float(((x >= 0) & (x <= 1)).mean()),
        )
    phase("langevin", t0)

    # timings and memory into the rows
    for r in rows:
        k = (r["backend"], r["method"])
        ms = [1e3 * p[k].median for p in passes]
        r.update(
            step_ms=statistics.median(ms),
            step_ms_passes=ms,
            step_iqr_over_median=[p[k].spread for p in passes],
            step_mb=step_bytes[k] / MB,
        )
    best = {}
    for b in backends:
        ok = [r for r in rows if r["backend"] == b and math.isfinite(r["heldout_esm"])]
        if ok:
            best[b] = min(ok, key=lambda r: r["heldout_esm"])["method"]
    ratios = []
    for b in backends:
        for num, den, paper_t, paper_m in RATIOS:
            if (b, num) not in step_fns or (b, den) not in step_fns:
                continue
            t_pass = [p[(b, num)].median / p[(b, den)].median for p in passes]
            paired = [paired_ratio(p, (b, num), (b, den)) for p in passes]
            ratios.append(
                {
                    "backend": b,
                    "ratio": f"{num}/{den}",
                    "time_passes": t_pass,
                    "time_paired_passes": paired,
                    "memory": step_bytes[(b, num)] / step_bytes[(b, den)],
                    "paper_time": list(paper_t) if paper_t else None,
                    "paper_memory": list(paper_m) if paper_m else None,
                }
            )

    # figures
    t0 = time.perf_counter()
    os.makedirs(args.figures, exist_ok=True)
    fig_samples = os.path.join(args.figures, "fmnist_ebm_samples.png")
    fig_cost = os.path.join(args.figures, "fmnist_ebm_cost.png")
    title = (
        f"Fashion-MNIST [0,1] pixel space, MLP {arch} energy, {cfg['steps']} steps; "
        f"{cfg['langevin_steps']} ULA steps from uniform noise (+1 noise-free step)"
    )
    figure_samples(fig_samples, test, samples, by_key, list(backends), args.methods, best, title)
    figure_cost(fig_cost, rows, list(backends), args.methods)
    phase("figures", t0)

    # tables
    headers = [
        "backend",
        "method",
        "held-out ESM",
        "train loss",
        "ms/step",
        "ms/step per pass",
        "step MB",
        "train s",
        "-E samples / data / noise",
    ]
    table_rows = []
    for r in rows:
        esm = f"{C.fmt(r['heldout_esm'], '.1f')} +- {C.fmt(r['heldout_esm_stderr'], '.1f')}"
        if best.get(r["backend"]) == r["method"]:
            esm = f"**{esm}**"
        logp = "-"
        if "mean_logp_samples" in r:
            logp = " / ".join(C.fmt(r[k], ".0f") for k in ("mean_logp_samples", "mean_logp_heldout", "mean_logp_noise"))
        table_rows.append(
            [
                r["backend"],
                r["method"],
                esm,
                C.fmt(r.get("final_train_loss"), ".1f"),
                C.fmt(r["step_ms"], ".2f"),
                " / ".join(C.fmt(v, ".2f") for v in r["step_ms_passes"]),
                C.fmt(r["step_mb"], ".2f"),
                C.fmt(r.get("train_seconds"), ".0f"),
                logp,
            ]
        )
    print()
    print(C.markdown_table(headers, table_rows))
    print()
    ratio_rows = []
    for q in ratios:
        paper = PAPER_TEXT.get(tuple(q["ratio"].split("/")), ("-", "-"))
        pt = q["paper_time"]
        pm = q["paper_memory"]
        ratio_rows.append(
            [
                q["backend"],
                q["ratio"],
                " / ".join(C.fmt(v, ".2f") for v in q["time_passes"]),
                " / ".join(C.fmt(v, ".2f") for v in q["time_paired_passes"]),
                C.fmt(q["memory"], ".2f"),
                (f"{pt[0]:.2f}-{pt[1]:.2f} ({paper[0]})" if pt else "-"),
                (f"{pm[0]:.2f}-{pm[1]:.2f} ({paper[1]})" if pm else "-"),
            ]
        )
    print(
        C.markdown_table(
            [
                "backend",
                "FD / exact",
                "time ratio per pass",
                "paired time ratio per pass",
                "memory ratio",
                "paper time ratio (GPU)",
                "paper memory ratio (GPU)",
            ],
            ratio_rows,
        )
    )
    wall = time.perf_counter() - wall0
    print(f"\nspace: [0, 1] pixels; figures: {fig_samples}, {fig_cost}; wall {wall:.0f} s")

    result = {
        "rows": rows,
        "ratios": ratios,
        "best": best,
        "config": {
            **{k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()},
            "space": "[0, 1] pixels, dequantized",
            "n_train": len(train),
            "n_eval": len(test),
            "architecture": f"MLP {arch}, softplus",
            "quadratic": quadratic,
            "sigma": sigma,
            "eps": eps,
            "data_scale": scale,
            "seed": args.seed,
            "smoke": args.smoke,
            "backends": list(backends),
            "methods": list(args.methods),
            "timing_passes": args.passes,
            "step": "loss + parameter gradient on one fixed batch (no optimizer update)",
        },
        "paper": {
            "fd_ssm_ms": [230, 276],
            "ssm_ms": 673,
            "fd_ssm_gb": [3.4, 3.7],
            "ssm_gb": 5.1,
            "fd_dsm_ms": [162, 191],
            "dsm_ms": 282,
            "setting": "GPU, deep EBM (Pang et al. 2020)",
        },
        "figures": [fig_samples, fig_cost],
        "phases_s": phases,
        "wall_s": wall,
        "meta": C.environment_meta(),
    }
    C.write_json_object(args.json, result)
    return result


if __name__ == "__main__":
    main()
