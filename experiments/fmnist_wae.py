"""Wasserstein auto-encoders on Fashion-MNIST: score regularizer (learned SSM-VR estimator, Stein
estimator) against the MMD regularizer, with ``ppl_score.pyro.WAE`` (default) or
``ppl_score.numpyro.WAE`` (``--frontend numpyro``).

Built on ``tutorials/wae_digits.py``: a (decoder model, deterministic encoder guide) pair trained
with plain ``SVI``::

    model:  z ~ N(0, I_8),  x ~ N(decoder(z), 0.1^2 I_784)    (decoder 8-H-H-784, ELU, sigmoid mean)
    guide:  z = Delta(encoder(x))                              (encoder 784-H-H-8, ELU)
    loss:   mean_i ||x_i - decoder(z_i)||^2 + lam * D(q_Z, p_Z),   lam = 10

``D``: ``"score"`` with a learned score network of the aggregate posterior (SSM-VR, a few steps
per SVI step; Song et al. 2019), ``"score"`` with the Stein estimator across the minibatch
codes (Li & Turner 2018), ``"mmd"`` (WAE-MMD, IMQ kernels; Tolstikhin et al. 2018). All three
get the same networks, optimizer, minibatches (same seed) and number of steps.

Metrics on the test split (dequantized images in [0, 1]):

* reconstruction error ``||x - dec(enc(x))||^2`` per image (summed over the 784 pixels);
* sample MMD^2 (unbiased) between decoded prior draws and test images, under one fixed Gaussian
  kernel ``exp(-||x - y||^2 / (2 h^2))`` whose bandwidth ``h`` is the median pairwise distance
  of the test images used, computed once; next to it the same MMD^2 of training images (floor);
* code MMD^2: encoded test images against as many ``N(0, I)`` draws, IMQ kernel with
  ``C = 2 z_dim`` (``ppl_score.torch.mmd.imq_mmd2``, WAE-MMD's kernel and scales);
* FD: Frechet distance between Gaussians fitted to the penultimate-layer features of a small
  MLP classifier (784-256-128-10, trained here on the training labels) of decoded prior draws
  and of test images; next to it the FD of training images (floor).

Seeds: ``--seeds`` runs (default 3) from ``--seed``; the table shows mean +- standard error.
The metrics (kernel bandwidth, classifier, evaluation images) are fixed across seeds.

    python experiments/fmnist_wae.py --json experiments/results/fmnist_wae.json   # full run
    python experiments/fmnist_wae.py --smoke                                       # seconds
    python experiments/fmnist_wae.py --frontend numpyro --smoke
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

_common.single_thread()

import numpy as np  # noqa: E402

IMG, LAM, SIGMA_X = 784, 10.0, 0.1
VARIANTS = {
    "score (learned, ssm_vr)": ("score", "learned"),
    "score (Stein)": ("score", "stein"),
    "mmd (IMQ)": ("mmd", None),
}
FULL = dict(steps=2000, batch=100, hidden=256, z_dim=8, est_steps=5, n_eval=2000, clf_epochs=2, seeds=3)
SMOKE = dict(steps=4, batch=16, hidden=32, z_dim=4, est_steps=2, n_eval=32, clf_epochs=1, seeds=1)


# --------------------------------------------------------------------------------------------
# training, Pyro


def train_pyro(variant, x_train, cfg, seed):
    """Fit one WAE with ``ppl_score.pyro.WAE``; returns numpy ``encode``/``decode`` and the losses."""
    import pyro
    import pyro.distributions as dist
    import torch
    from torch import nn

    from ppl_score.pyro import WAE
    from ppl_score.torch.estimators import LearnedScoreEstimator

    regularizer, kind = VARIANTS[variant]
    z_dim, hidden = cfg["z_dim"], cfg["hidden"]
    pyro.clear_param_store()
    torch.manual_seed(seed)
    enc = nn.Sequential(nn.Linear(IMG, hidden), nn.ELU(), nn.Linear(hidden, hidden), nn.ELU(), nn.Linear(hidden, z_dim))
    dec = nn.Sequential(
        nn.Linear(z_dim, hidden), nn.ELU(), nn.Linear(hidden, hidden), nn.ELU(), nn.Linear(hidden, IMG), nn.Sigmoid()
    )

    def model(x):
        pyro.module("dec", dec)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(z_dim), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(dec(z), SIGMA_X).to_event(1), obs=x)

    def guide(x):
        pyro.module("enc", enc)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Delta(enc(x), event_dim=1))

    estimator = kind
    if kind == "learned":
        estimator = LearnedScoreEstimator(z_dim, hidden=(128, 128), method="ssm_vr", lr=1e-3, n_steps=cfg["est_steps"])
    loss = WAE(
        regularizer,
        lam=LAM,
        estimator=estimator if kind else "stein",
        reconstruction="squared_error",
        generator=torch.Generator().manual_seed(seed + 1),
    )
    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), loss)
    x_all = torch.as_tensor(x_train)
    order = batches(len(x_train), cfg["batch"], cfg["steps"], seed)
    losses = np.empty(cfg["steps"])
    for i, idx in enumerate(order):
        losses[i] = svi.step(x_all[torch.as_tensor(idx)])

    def encode(x):
        with torch.no_grad():
            return enc(torch.as_tensor(x)).numpy()

    def decode(z):
        with torch.no_grad():
            return dec(torch.as_tensor(z, dtype=torch.float32)).numpy()

    return encode, decode, losses


def batches(n, batch, steps, seed):
    """``steps`` minibatch index arrays: epochs of a seeded permutation (the same for every
    regularizer of a seed)."""
    rng = np.random.default_rng([seed, 7])
    out, per_epoch = [], max(1, n // batch)
    while len(out) < steps:
        perm = rng.permutation(n)
        out.extend(perm[j * batch : (j + 1) * batch] for j in range(per_epoch))
    return out[:steps]


# --------------------------------------------------------------------------------------------
# training, NumPyro


def train_numpyro(variant, x_train, cfg, seed):
    """Fit one WAE with ``ppl_score.numpyro.WAE`` (jitted ``svi.update`` in a ``lax.scan``)."""
    import jax
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as dist
    import optax

    from ppl_score.jax.estimators import learned_score_estimator
    from ppl_score.jax.nets import mlp_apply, mlp_init
    from ppl_score.numpyro import WAE
    from ppl_score.numpyro.implicit import score_state

    regularizer, kind = VARIANTS[variant]
    z_dim, hidden = cfg["z_dim"], cfg["hidden"]
    k_enc, k_dec, k_init, k_run = jax.random.split(jax.random.PRNGKey(seed), 4)
    enc0 = mlp_init(k_enc, (IMG, hidden, hidden, z_dim))
    dec0 = mlp_init(k_dec, (z_dim, hidden, hidden, IMG))
    est = None
    if kind == "learned":
        est = learned_score_estimator(
            z_dim, hidden=(128, 128), method="ssm_vr", optimizer=optax.adam(1e-3), n_steps=cfg["est_steps"]
        )

    def encoder(enc, x):
        return mlp_apply(enc, x, jax.nn.elu)

    def decoder(dec, z):
        return jax.nn.sigmoid(mlp_apply(dec, z, jax.nn.elu))

    def model(x):
        dec = numpyro.param("dec", dec0)
        with numpyro.plate("data", x.shape[0]):
            z = numpyro.sample("z", dist.Normal(jnp.zeros(z_dim), 1.0).to_event(1))
            numpyro.sample("x", dist.Normal(decoder(dec, z), SIGMA_X).to_event(1), obs=x)

    def guide(x):
        if est is not None:
            score_state("z", est, seed=seed)
        enc = numpyro.param("enc", enc0)
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("z", dist.Delta(encoder(enc, x), event_dim=1))

    loss = WAE(regularizer, lam=LAM, estimator=est if est is not None else "stein", reconstruction="squared_error")
    svi = numpyro.infer.SVI(model, guide, optax.adam(1e-3), loss)
    x_all = jnp.asarray(x_train)
    idx = jnp.asarray(np.stack(batches(len(x_train), cfg["batch"], cfg["steps"], seed)))
    state = svi.init(k_init, x_all[idx[0]])

    @jax.jit
    def run(state, idx):
        def body(s, i):
            s, value = svi.update(s, x_all[i])
            return s, value

        return jax.lax.scan(body, state, idx)

    state, losses = run(state, idx)
    params = svi.get_params(state)
    enc_fn = jax.jit(lambda x: encoder(params["enc"], x))
    dec_fn = jax.jit(lambda z: decoder(params["dec"], z))
    return (
        lambda x: np.array(enc_fn(jnp.asarray(x))),  # writable copies (torch metrics)
        lambda z: np.array(dec_fn(jnp.asarray(z, dtype=jnp.float32))),
        np.asarray(losses),
    )


# --------------------------------------------------------------------------------------------
# metrics (torch, the same for both front ends)


def sq_dists(a, b):
    """Squared distances, the product in float32 (fast; errors ~1e-4 against h^2 ~ 100) and
    returned in float64 for the kernel sums."""
    a, b = a.float(), b.float()
    d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return d2.double().clamp_min(0.0)


def gaussian_mmd2(x, y, h):
    """Unbiased MMD^2 with ``exp(-||x - y||^2 / (2 h^2))`` (float64)."""
    import torch

    x, y = torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y, dtype=torch.float64)

    def off(k, n):
        return (k.sum() - k.diagonal().sum()) / (n * (n - 1))

    k = lambda a, b: torch.exp(-sq_dists(a, b) / (2.0 * h * h))  # noqa: E731
    return float(off(k(x, x), len(x)) + off(k(y, y), len(y)) - 2.0 * k(x, y).mean())


def median_distance(x):
    import torch

    x = torch.as_tensor(x, dtype=torch.float64)
    d = sq_dists(x, x).sqrt()
    i, j = torch.triu_indices(len(x), len(x), 1)
    return float(d[i, j].median())


def train_classifier(x, y, epochs, seed):
    """MLP 784-256-128-10 (ReLU) on the training labels; returns the feature map (the 128
    penultimate activations)."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    feat = nn.Sequential(nn.Linear(IMG, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU())
    head = nn.Linear(128, 10)
    opt = torch.optim.Adam([*feat.parameters(), *head.parameters()], lr=1e-3)
    xt, yt = torch.as_tensor(x), torch.as_tensor(y.astype(np.int64))
    rng = np.random.default_rng([seed, 3])
    for _ in range(epochs):
        for idx in np.array_split(rng.permutation(len(x)), max(1, len(x) // 128)):
            loss = nn.functional.cross_entropy(head(feat(xt[idx])), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()

    def features(images):
        with torch.no_grad():
            return feat(torch.as_tensor(images, dtype=torch.float32)).double().numpy()

    def accuracy(images, labels):
        with torch.no_grad():
            pred = head(feat(torch.as_tensor(images))).argmax(1).numpy()
        return float((pred == labels).mean())

    return features, accuracy


def gaussian_stats(f):
    return f.mean(0), np.cov(f, rowvar=False)


def frechet(stats_a, stats_b):
    """``||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2)`` (symmetric eigh form)."""
    (ma, sa), (mb, sb) = stats_a, stats_b
    w, v = np.linalg.eigh(sa)
    root = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(root @ sb @ root), 0.0, None)).sum()
    return float(((ma - mb) ** 2).sum() + np.trace(sa) + np.trace(sb) - 2.0 * cross)


class Evaluator:
    """Everything fixed across runs: test images, MMD subsets and bandwidth, classifier."""

    def __init__(self, x_train, y_train, x_test, y_test, cfg, seed):
        n = min(cfg["n_eval"], len(x_test))
        self.x_test, self.x_mmd, self.z_dim = x_test, x_test[:n], cfg["z_dim"]
        self.h = median_distance(self.x_mmd)
        self.features, accuracy = train_classifier(x_train, y_train, cfg["clf_epochs"], seed)
        self.accuracy = accuracy(x_test, y_test)
        self.test_stats = gaussian_stats(self.features(x_test))
        ref = x_train[: len(x_test)]
        self.floor = {
            "sample_mmd": gaussian_mmd2(x_train[:n], self.x_mmd, self.h),
            "fd": frechet(gaussian_stats(self.features(ref)), self.test_stats),
        }

    def __call__(self, encode, decode, seed):
        import torch

        from ppl_score.torch.mmd import imq_mmd2

        codes = encode(self.x_test)
        recons = decode(codes)
        rng = np.random.default_rng([seed, 11])
        samples = decode(rng.standard_normal((len(self.x_test), self.z_dim)).astype(np.float32))
        n = len(self.x_mmd)
        prior = torch.as_tensor(rng.standard_normal((n, self.z_dim)))
        return {
            "reconstruction": float(((recons - self.x_test) ** 2).sum(1).mean()),
            "sample_mmd": gaussian_mmd2(samples[:n], self.x_mmd, self.h),
            "code_mmd": float(imq_mmd2(torch.as_tensor(codes[:n], dtype=torch.float64), prior, 2.0 * self.z_dim)),
            "fd": frechet(gaussian_stats(self.features(samples)), self.test_stats),
            "code_std": float(codes.std(0).mean()),
            "_samples": samples[:64],
            "_recons": recons[:8],
        }


# --------------------------------------------------------------------------------------------
# output


METRICS = (
    ("reconstruction", "test recon. sq. err.", ".2f"),
    ("sample_mmd", "sample MMD² (RBF)", ".4f"),
    ("code_mmd", "code MMD² to N(0,I)", ".4f"),
    ("fd", "FD (classifier feat.)", ".2f"),
)


def summarize(values):
    v = np.asarray(values, dtype=float)
    se = float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else float("nan")
    return float(v.mean()), se


def cell(values, spec):
    mean, se = summarize(values)
    return format(mean, spec) + ("" if np.isnan(se) else " ± " + format(se, spec))


def figure(per_variant, x_test, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def grid(imgs, rows, cols):
        imgs = np.asarray(imgs).reshape(-1, 28, 28)[: rows * cols]
        out = np.ones((rows * 29 - 1, cols * 29 - 1))
        for i, im in enumerate(imgs):
            r, c = divmod(i, cols)
            out[r * 29 : r * 29 + 28, c * 29 : c * 29 + 28] = im
        return out

    names = list(per_variant)
    fig, axes = plt.subplots(
        2, len(names), figsize=(3.6 * len(names), 5.6), gridspec_kw={"height_ratios": [4, 1.1]}, squeeze=False
    )
    for j, name in enumerate(names):
        e = per_variant[name]
        axes[0, j].imshow(grid(e["_samples"], 8, 8), cmap="gray_r", vmin=0, vmax=1)
        axes[0, j].set_title(f"{name}\nprior samples (MMD² {e['sample_mmd']:.4f}, FD {e['fd']:.1f})", fontsize=8)
        both = np.concatenate([np.asarray(x_test[:8]), e["_recons"][:8]])
        axes[1, j].imshow(grid(both, 2, 8), cmap="gray_r", vmin=0, vmax=1)
        axes[1, j].set_title(f"test (top) / reconstruction (err {e['reconstruction']:.1f})", fontsize=8)
        for ax in axes[:, j]:
            ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> dict:
    t_start = time.perf_counter()
    parser = _common.make_parser(__doc__.splitlines()[0])
    parser.add_argument("--frontend", choices=("pyro", "numpyro"), default="pyro")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default: 3, smoke 1)")
    parser.add_argument("--steps", type=int, default=None, help="SVI steps per run")
    parser.add_argument("--batch", type=int, default=None, help="minibatch size")
    parser.add_argument("--hidden", type=int, default=None, help="width of the encoder's and decoder's layers")
    parser.add_argument(
        "--est-steps", type=int, default=None, help="SSM-VR steps of the learned estimator per SVI step"
    )
    parser.add_argument("--n-eval", type=int, default=None, help="test images in the MMD^2 metrics")
    parser.add_argument("--n-train", type=int, default=None, help="training images (default: all)")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    args = parser.parse_args(argv)
    cfg = dict(SMOKE if args.smoke else FULL)
    for key in ("seeds", "steps", "batch", "hidden", "est_steps", "n_eval"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    train = train_pyro if args.frontend == "pyro" else train_numpyro

    x_train, x_test, y_train, y_test = _common.load_images(
        args.n_train, None, seed=args.seed, path=args.data, with_labels=True
    )
    t0 = time.perf_counter()
    evaluate = Evaluator(x_train, y_train, x_test, y_test, cfg, args.seed)
    t_metric = time.perf_counter() - t0
    seeds = [args.seed + i for i in range(cfg["seeds"])]
    runs = {name: [] for name in args.variants}
    for seed in seeds:
        for name in args.variants:
            t0 = time.perf_counter()
            encode, decode, losses = train(name, x_train, cfg, seed)
            wall = time.perf_counter() - t0
            e = evaluate(encode, decode, seed)
            e.update(
                seed=seed,
                train_s=wall,
                eval_s=time.perf_counter() - t0 - wall,
                final_loss=float(np.mean(losses[-max(1, len(losses) // 20) :])),
            )
            runs[name].append(e)
            print(
                f"[{name}, seed {seed}] {wall:.1f} s ({1e3 * wall / cfg['steps']:.1f} ms/step), eval {e['eval_s']:.1f} s; "
                + ", ".join(f"{k} {e[k]:.4g}" for k, _, _ in METRICS),
                flush=True,
            )

    print(
        f"\nWAE on Fashion-MNIST ({args.frontend}): z_dim {cfg['z_dim']}, MLP hidden {cfg['hidden']}x2, lam {LAM}, "
        f"{cfg['steps']} Adam steps (lr 1e-3) of batch {cfg['batch']} on {len(x_train)} training images; "
        f"learned estimator: SSM-VR score net 128x2, {cfg['est_steps']} Adam steps (lr 1e-3) per SVI step; "
        f"seeds {seeds} (mean ± s.e.)."
    )
    print(
        f"Test split: {len(x_test)} images (reconstruction, code MMD on the first {len(evaluate.x_mmd)}, FD); "
        f"sample MMD²: Gaussian kernel, bandwidth h = {evaluate.h:.3f} (median distance among the first "
        f"{len(evaluate.x_mmd)} test images), {len(evaluate.x_mmd)} prior samples; code MMD²: IMQ, C = 2 z_dim; "
        f"FD: 128 penultimate features of an MLP classifier (test accuracy {evaluate.accuracy:.3f}).\n"
    )
    headers = ["regularizer", *(h for _, h, _ in METRICS), "train s / run"]
    rows = [
        [
            name,
            *(cell([r[k] for r in rs], spec) for k, _, spec in METRICS),
            f"{np.mean([r['train_s'] for r in rs]):.0f}",
        ]
        for name, rs in runs.items()
    ]
    rows.append(
        ["(training images)", "-", f"{evaluate.floor['sample_mmd']:.4f}", "-", f"{evaluate.floor['fd']:.2f}", "-"]
    )
    table = _common.markdown_table(headers, rows)
    print(table)

    suffix = "" if args.frontend == "pyro" else "_numpyro"
    path = Path(args.figures) / f"fmnist_wae{suffix}.png"
    figure({name: rs[0] for name, rs in runs.items()}, x_test, path)
    wall = time.perf_counter() - t_start
    print(f"\nfigure (seed {seeds[0]}): {path}; wall {wall:.0f} s (metric set-up {t_metric:.0f} s)")
    result = {
        "frontend": args.frontend,
        "config": cfg | {"lam": LAM, "sigma_x": SIGMA_X, "n_train": len(x_train), "n_test": len(x_test)},
        "seeds": seeds,
        "metric": {
            "bandwidth": evaluate.h,
            "n_mmd": len(evaluate.x_mmd),
            "classifier_accuracy": evaluate.accuracy,
            "floor": evaluate.floor,
        },
        "rows": [
            {"regularizer": name}
            | {k: summarize([r[k] for r in rs])[0] for k, _, _ in METRICS}
            | {k + "_se": summarize([r[k] for r in rs])[1] for k, _, _ in METRICS}
            | {"runs": [{k: v for k, v in r.items() if not k.startswith("_")} for r in rs]}
            for name, rs in runs.items()
        ],
        "table": table,
        "figure": str(path),
        "wall_s": wall,
        "meta": _common.environment_meta(),
    }
    _common.write_json_object(args.json, result)
    return result


if __name__ == "__main__":
    main()
