"""A deep equilibrium energy on the 8x8 digits
===========================================

Tutorial: a deep equilibrium (DEQ) energy on the 8x8 digits, fitted by sliced score
matching through exact implicit differentiation, and sampled by Langevin dynamics.

The energy is ``log p(x) = w^T z*(x) + c - quadratic/2 ||x||^2`` where ``z*`` is the fixed
point of one weight-tied layer ``z = softplus(W_hat z + U x + b)``, with ``W`` rescaled to
spectral norm ``<= gamma < 1`` so that the fixed point is unique (``ppl_score.torch.deq``).
Score matching needs ``grad_x log p`` and Hessian-vector products, i.e. derivatives of
``z*`` of first and second order, and their parameter gradients: the ``implicit`` backward
gets all of them from adjoint fixed-point solves, so memory does not grow with the number
of solver iterations (the DEQ's "depth"); ``benchmarks/deq.py`` measures it against
explicit MLP energies of depth 2 to 40.

Inside a Pyro model the same energy is ``ppl_score.pyro.deq.DEQEnergy`` (a ``PyroModule``)
in an ``Unnormalized`` site, and in NumPyro ``ppl_score.numpyro.deq.deq_energy_module``;
here we call the backend loss directly to keep the loop explicit.

The digits are dequantized 8x8 images in [0, 1]: a density concentrated near a low-dimensional
set, whose score blows up and whose modes Langevin dynamics cannot leave. As in noise-
conditional score models we fit the Gaussian-smoothed density ``p_sigma = p * N(0, sigma^2 I)``
instead: each batch is ``x + sigma n`` with fresh noise (the objective is still ``ssm_vr``,
the exact second-order one). MALA samples ``p_sigma``, and Tweedie's formula
``E[x | x_sigma] = x_sigma + sigma^2 grad log p_sigma(x_sigma)`` denoises the final states
with one more score evaluation.

Printed: the held-out exact score-matching loss on noise-perturbed test digits (Hessian trace
plus half the squared score), the mean number of solver iterations, the MALA acceptance
rate, and the kernel Stein discrepancy test (``ppl_score.torch.ksd_test``) of the fitted
``p_sigma`` on the same perturbed test digits (all 359, one noise draw each), with the
scores ``grad_x log p_sigma`` by autograd of the energy. A small p-value means the held-out
data are unlikely under the fitted model; with thousands of points the test also detects
small misfits. Here it has little power: 359 points in 64 dimensions do not reject the
DEQ (p-value 0.17 in the full run), but they do not reject the Gaussian with the training
digits' mean and covariance either (printed as a reference), so the non-rejection is weak
evidence of fit.

Figures (full run, in ``tutorials/figures/``): training digits, MALA samples and their
Tweedie denoising; peak memory against depth from the benchmark's JSON when it exists.

    python tutorials/deq_digits.py            # full run (minutes on a CPU)
    python tutorials/deq_digits.py --smoke    # seconds, for CI
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

_ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(_ROOT))  # a checkout without `pip install -e .`

QUADRATIC = 1.0
SIGMA = 0.15  # the smoothing noise, in pixel units (pixels lie in [0, 1])
BENCH_JSON = _ROOT / "benchmarks" / "results" / "deq.json"
N_KSD, KSD_BOOTSTRAP = 500, 1000  # at most this many held-out points in the KSD test; its bootstrap draws


def train(data, cfg, seed):
    """Fit a DEQ energy to ``p_sigma`` by ssm_vr; return the module, the loss trace and the
    mean number of forward solver iterations."""
    import torch

    from ppl_score.torch import score_matching_loss
    from ppl_score.torch.deq import DEQEnergy

    torch.manual_seed(seed)
    energy = DEQEnergy(
        data.shape[1], cfg["width"], quadratic=QUADRATIC, backward="implicit", gamma=cfg["gamma"], tol=1e-4, max_iter=50
    )
    opt = torch.optim.Adam(energy.parameters(), lr=cfg["lr"])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg["steps"])
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    x = torch.as_tensor(data, dtype=torch.float32)
    losses, iters = [], []
    for step in range(cfg["steps"]):
        batch = x[torch.as_tensor(rng.integers(0, len(x), cfg["batch"]))]
        batch = batch + SIGMA * torch.randn(batch.shape, generator=gen)
        opt.zero_grad(set_to_none=True)
        loss = score_matching_loss(energy, batch, "ssm_vr", generator=gen)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        iters.append(energy.last_info.iterations)
        if (step + 1) % max(1, cfg["steps"] // 10) == 0:
            print(
                f"step {step + 1:5d}  ssm_vr {np.mean(losses[-50:]):9.3f}  solver iterations {np.mean(iters[-50:]):.1f}",
                flush=True,
            )
    return energy, losses, float(np.mean(iters))


def perturbed_test(test, n, seed):
    """The first ``n`` test digits plus ``SIGMA`` times one fixed noise draw: held-out draws of
    ``p_sigma`` (the noise of a row does not depend on ``n``)."""
    import torch

    noise = np.random.default_rng([seed, 7]).normal(size=test[:n].shape)
    return torch.as_tensor(test[:n] + SIGMA * noise, dtype=torch.float32)


def held_out_sm(energy, test, n, seed):
    """Exact SM loss of the energy on ``n`` noise-perturbed test digits (one fixed draw)."""
    from ppl_score.torch import score_matching_loss

    x = perturbed_test(test, n, seed)
    return float(sum(score_matching_loss(energy, xb, "esm", reduction="sum").item() for xb in x.split(128)) / len(x))


def held_out_ksd(energy, train, test, n, seed, n_bootstrap):
    """KSD tests on ``n`` noise-perturbed test digits (the draw of ``held_out_sm``), in
    float64: of the fitted ``p_sigma`` (scores by autograd of the energy), and of the
    reference ``N(mean, cov + SIGMA^2 I)`` with the training digits' mean and covariance.
    Returns ``{"DEQ": (KSD^2, p-value), "Gaussian": (KSD^2, p-value)}``."""
    import torch

    from ppl_score.torch import ksd_test

    x = perturbed_test(test, n, seed)
    scores = []
    for xb in x.split(128):
        xb = xb.clone().requires_grad_(True)
        (score,) = torch.autograd.grad(energy(xb).sum(), xb)
        scores.append(score.detach())
    x = x.double()
    mean = torch.as_tensor(train.mean(0), dtype=torch.float64)
    cov = torch.as_tensor(np.cov(train.T), dtype=torch.float64) + SIGMA**2 * torch.eye(train.shape[1])
    gaussian = -torch.linalg.solve(cov, (x - mean).T).T
    out = {}
    for name, s in (("DEQ", torch.cat(scores).double()), ("Gaussian", gaussian)):
        result = ksd_test(x, s, n_bootstrap=n_bootstrap, generator=torch.Generator().manual_seed(seed))
        out[name] = (float(result.statistic), float(result.p_value))
    return out


def sample(energy, data, cfg, seed):
    """MALA chains on ``p_sigma`` started from noise around the mean image, then one Tweedie
    step: ``(samples, denoised, acceptance rate)``."""
    import torch

    from ppl_score.torch.langevin import mala

    gen = torch.Generator().manual_seed(seed + 1)
    mean, sd = data.mean(0), data.std(0).mean()
    x0 = torch.as_tensor(
        mean + sd * np.random.default_rng(seed + 2).normal(size=(cfg["chains"], data.shape[1])), dtype=torch.float32
    )
    out = mala(energy, x0, cfg["step_size"], cfg["langevin_steps"], thin=cfg["langevin_steps"], generator=gen)
    xs = out.samples[-1].detach().requires_grad_(True)
    (score,) = torch.autograd.grad(energy(xs).sum(), xs)
    denoised = (xs + SIGMA**2 * score).detach()
    return xs.detach().numpy(), denoised.numpy(), float(out.accept_rate.mean())


def plot_samples(data, samples, denoised, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = min(32, len(samples))
    rows = (
        (data[:n], "training digits"),
        (samples[:n], f"MALA samples of the DEQ energy (sigma = {SIGMA})"),
        (denoised[:n], "the same, denoised by Tweedie's formula"),
    )
    fig, axes = plt.subplots(len(rows), 1, figsize=(8, 1.3 * len(rows) + 0.2))
    for ax, (imgs, title) in zip(axes, rows):
        strip = np.concatenate([np.pad(im.reshape(8, 8), 1, constant_values=np.nan) for im in imgs], axis=1)
        ax.imshow(strip, cmap="gray_r", vmin=0, vmax=1)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_memory(bench_json, path) -> bool:
    """Peak memory against depth (explicit MLPs) with the DEQ rows, per backend/objective."""
    if not Path(bench_json).exists():
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = json.loads(Path(bench_json).read_text())["rows"]
    groups = sorted({(r["backend"], r.get("task", ""), r.get("objective", "")) for r in rows})
    ncols = min(4, len(groups))
    nrows = -(-len(groups) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols, 3.2 * nrows), squeeze=False)
    for ax in axes.flat[len(groups) :]:
        ax.axis("off")
    for ax, g in zip(axes.flat, groups):
        rs = [r for r in rows if (r["backend"], r.get("task", ""), r.get("objective", "")) == g]
        ex = sorted((r["depth"], r["peak_mem_mb"]) for r in rs if r["model"] == "explicit")
        ax.plot([d for d, _ in ex], [m for _, m in ex], "o-", label="explicit MLP")
        for r in rs:
            if r["model"] == "deq":
                gamma = f", gamma {r['gamma']:g}" if r.get("gamma") is not None else ""
                ax.plot([r["depth"]], [r["peak_mem_mb"]], "*", ms=12, label=f"DEQ ({r['backward']}{gamma})")
        ax.set_xlabel("depth (DEQ: mean solver iterations)")
        ax.set_ylabel("peak memory per step (MB)")
        ax.set_title(" / ".join(g), fontsize=8)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a few steps, for CI (seconds)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "figures")
    parser.add_argument("--bench-json", type=Path, default=BENCH_JSON)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    os.environ.setdefault("MPLBACKEND", "Agg")
    import torch

    torch.set_num_threads(1)  # tiny batched LAPACK calls (Anderson) stall on a shared CPU

    from ppl_score.demo.datasets import load_digits

    if args.smoke:
        cfg = dict(
            width=16, gamma=0.5, steps=4, batch=32, lr=1e-2, n_eval=32, chains=8, langevin_steps=3, step_size=1e-3
        )
        cfg.update(n_ksd=32, ksd_bootstrap=100)
    else:
        cfg = dict(
            width=256,
            gamma=0.5,
            steps=6000,
            batch=128,
            lr=1e-2,
            n_eval=359,
            chains=64,
            langevin_steps=2000,
            step_size=5e-3,
            n_ksd=N_KSD,
            ksd_bootstrap=KSD_BOOTSTRAP,
        )
    ds = load_digits(scaling="unit", seed=args.seed)
    train_x = ds.train.reshape(len(ds.train), -1).astype(np.float32)
    test_x = ds.test.reshape(len(ds.test), -1).astype(np.float32)

    t0 = time.perf_counter()
    energy, _, mean_iters = train(train_x, cfg, args.seed)
    sm = held_out_sm(energy, test_x, cfg["n_eval"], args.seed)
    samples, denoised, accept = sample(energy, train_x, cfg, args.seed)
    print(
        f"held-out exact SM loss {sm:.3f}; mean solver iterations {mean_iters:.1f}; "
        f"MALA acceptance {accept:.2f}; {time.perf_counter() - t0:.0f} s"
    )
    n_ksd = min(cfg["n_ksd"], len(test_x))
    ksd = held_out_ksd(energy, train_x, test_x, n_ksd, args.seed, cfg["ksd_bootstrap"])
    ksd2, p_value = ksd["DEQ"]
    print(f"KSD test (held-out, N={n_ksd}): KSD^2 {ksd2:.4g}, p-value {p_value:.3f}")
    gauss2, gauss_p = ksd["Gaussian"]
    print(
        f"  reference, the Gaussian with the training digits' mean and covariance (+ sigma^2 I): "
        f"KSD^2 {gauss2:.4g}, p-value {gauss_p:.3f}",
        flush=True,
    )

    args.out.mkdir(parents=True, exist_ok=True)
    plot_samples(train_x, samples, denoised, args.out / "deq_digits_samples.png")
    has_memory = plot_memory(args.bench_json, args.out / "deq_memory_vs_depth.png")
    print(f"figures in {args.out}" + ("" if has_memory else f" (no memory plot: {args.bench_json} not found)"))
    return {
        "test_sm_loss": sm,
        "mean_iters": mean_iters,
        "accept": accept,
        "ksd": ksd2,
        "ksd_p_value": p_value,
        "ksd_points": n_ksd,
        "ksd_gaussian": gauss2,
        "ksd_gaussian_p_value": gauss_p,
    }


if __name__ == "__main__":
    main()
