"""Noise-conditional score models and annealed Langevin dynamics
=============================================================

Tutorial: an NCSN-style model (Song & Ermon 2019) fitted by multi-scale denoising score
matching (``"ms_dsm"``) and sampled by annealed Langevin dynamics, on a 2-D mixture (Pyro),
on scikit-learn's 8x8 digits (the JAX backend with optax) and, when it is installed
(``make data``), on Fashion-MNIST (the torch backend).

A noise-conditional model ``s(x, sigma)`` learns the score of the data blurred by Gaussian
noise of each level ``sigma`` in ``sigmas`` (largest first): the objective draws a level per
example and matches ``s(x + sigma n, sigma)`` to ``-n / sigma``, weighted by ``sigma^2``.
In a Pyro / NumPyro model the site is a ``NoiseConditional(f(x, sigma), event_shape)``;
``ScoreMatching("ms_dsm", sigmas=...)`` sets the level of each datum.

Why the levels: score matching and Langevin dynamics at one small noise level both fail on
data with well-separated modes. The score in the empty space between the modes is learned
from almost no data, and chains started there fall into a mode by where they start and by
that poorly learned score, not by the modes' weights (with the exact score: in the
proportions of the starting basins, 1/2 here; see tests/conformance/test_annealed_langevin.py).
Annealing from a large ``sigma``, where the blurred modes overlap and the score sees the
whole mixture, down to a small one moves each chain into the mode it belongs to in the right
proportion. Printed: the fraction of samples in the heavy mode (true weight 0.8) by
annealed and by plain Langevin, and the kernel Stein discrepancy (KSD) test of each fitted
model at the smallest level on held-out data: for the mixture, held-out draws against
``s(x, 0.05)``; for the digits and Fashion-MNIST, held-out images noised at ``sigma_min``
(``x + sigma_min n``, one draw each) against ``s(x, sigma_min)``, the score of the data
blurred at that level. A small p-value says the held-out points are unlikely under the fitted
model. In 64 and 784 dimensions the test is expected to reject: at ``sigma_min = 0.02`` the
blurred images lie near a thin set whose score is large and hard to learn, and a few hundred
points already see a misfit (the p-value is reported as it comes out; in the full run, on 300
held-out images each, ``KSD^2`` about 300 for the digits and 2300 for Fashion-MNIST, both
p-values 0.002, the smallest possible with 500 bootstrap draws: rejected).

    python tutorials/noise_conditional.py            # full run, figure in tutorials/figures/
    python tutorials/noise_conditional.py --smoke    # seconds, for CI
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

import numpy as np

WEIGHTS = np.array([0.8, 0.2])
MEANS = np.array([[-3.0, -3.0], [3.0, 3.0]])
SD = 0.5
LIM = 6.0


def sample_mixture(n: int, rng) -> np.ndarray:
    k = rng.choice(2, size=n, p=WEIGHTS)
    return MEANS[k] + SD * rng.normal(size=(n, 2))


def heavy_fraction(x: np.ndarray) -> float:
    """Fraction of the points nearer the heavy mode (at -3, -3)."""
    return float((np.linalg.norm(x - MEANS[0], axis=1) < np.linalg.norm(x - MEANS[1], axis=1)).mean())


# --------------------------------------------------------------------------------------
# 2-D mixture with Pyro


def run_mixture(cfg, seed):
    import pyro
    import torch
    from pyro.infer import SVI
    from pyro.nn import PyroModule
    from pyro.optim import Adam

    from ppl_score.pyro import NoiseConditional, ScoreMatching, langevin, noise_level
    from ppl_score.torch.nets import NoiseConditionalEnergy

    torch.manual_seed(seed)
    pyro.clear_param_store()
    rng = np.random.default_rng(seed)
    data = torch.tensor(sample_mixture(cfg["n"], rng), dtype=torch.float32)
    test = sample_mixture(1000, rng)
    energy = PyroModule[NoiseConditionalEnergy](2, (128, 128))
    sigmas = tuple(np.geomspace(cfg["sigma_max"], 0.05, cfg["levels"]))

    def model(x, n=None):
        with pyro.plate("data", n if n is not None else len(x), subsample_size=len(x) if n else None):
            pyro.sample("x", NoiseConditional(energy, event_shape=(2,)), obs=x)

    svi = SVI(model, lambda x, n=None: None, Adam({"lr": cfg["lr"]}), loss=ScoreMatching("ms_dsm", sigmas=sigmas))
    t0 = time.perf_counter()
    for _ in range(cfg["steps"]):
        idx = torch.randint(len(data), (cfg["batch"],))
        svi.step(data[idx], len(data))
    seconds = time.perf_counter() - t0

    def site():
        pyro.sample("x", NoiseConditional(energy, event_shape=(2,)), obs=torch.zeros(2))

    init = torch.tensor(rng.uniform(-LIM, LIM, (cfg["chains"], 2)), dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    annealed = langevin(
        site,
        "x",
        num_chains=cfg["chains"],
        init=init,
        sigmas=sigmas,
        n_steps_each=cfg["n_steps_each"],
        step_lr=cfg["step_lr"],
        generator=gen,
    ).samples[0]
    # plain (unadjusted) Langevin at the smallest level, as many steps from the same start
    with noise_level(sigmas[-1]):
        plain = langevin(
            site,
            "x",
            num_chains=cfg["chains"],
            init=init,
            adjusted=False,
            step_size=cfg["step_lr"],
            num_steps=cfg["levels"] * cfg["n_steps_each"],
            thin=cfg["levels"] * cfg["n_steps_each"],
            num_warmup=0,
            generator=gen,
        ).samples[-1]
    ksd = stein_check(energy, test, sigmas[-1], seed)
    return dict(
        seconds=seconds,
        annealed=annealed.detach().numpy(),
        plain=plain.detach().numpy(),
        data=data.numpy(),
        energy=energy,
        sigmas=sigmas,
        ksd=ksd,
    )


def stein_check(energy, test, sigma, seed):
    """The KSD test of the fitted model at level ``sigma`` on held-out data: its score
    against the data's (a small sigma blurs the mixture by little)."""
    import torch

    from ppl_score.torch import ksd_test

    x = torch.tensor(test, dtype=torch.float32, requires_grad=True)
    level = torch.full((len(x),), sigma)
    (score,) = torch.autograd.grad(energy(x, level).sum(), x)
    result = ksd_test(x.detach(), score, n_bootstrap=500, generator=torch.Generator().manual_seed(seed))
    return float(result.statistic), float(result.p_value)


# --------------------------------------------------------------------------------------
# Digits with the JAX backend


def run_digits(cfg, seed):
    import jax
    import jax.numpy as jnp
    import optax

    from ppl_score.demo.datasets import load_digits
    from ppl_score.jax import score_matching_loss
    from ppl_score.jax.langevin import annealed_langevin
    from ppl_score.jax.nets import noise_conditional_score_apply, noise_conditional_score_init

    data = jnp.asarray(load_digits(seed=seed).train, jnp.float32)  # [N, 64], about [0, 1]
    sigmas = tuple(np.geomspace(1.0, 0.02, cfg["levels"]))
    conditioning = dict(condition_on_sigma=True, divide_by_sigma=True)  # NCSNv2's s_theta(x, sigma) / sigma
    key, init_key = jax.random.split(jax.random.PRNGKey(seed))
    params = noise_conditional_score_init(init_key, 64, (256, 256), **conditioning)
    opt = optax.adam(cfg["digits_lr"])
    state = opt.init(params)

    def loss_fn(p, x, k):
        fn = lambda z, s: noise_conditional_score_apply(p, z, s, **conditioning)  # noqa: E731
        return score_matching_loss(fn, x, "ms_dsm", key=k, kind="score", sigmas=sigmas)

    @jax.jit
    def update(p, s, k):
        k_batch, k_loss = jax.random.split(k)
        x = data[jax.random.randint(k_batch, (cfg["batch"],), 0, len(data))]
        value, grads = jax.value_and_grad(loss_fn)(p, x, k_loss)
        updates, s = opt.update(grads, s, p)
        return optax.apply_updates(p, updates), s, value

    t0 = time.perf_counter()
    for k in jax.random.split(key, cfg["digits_steps"]):
        params, state, value = update(params, state, k)
    seconds = time.perf_counter() - t0
    fn = jax.tree_util.Partial(_jax_score, params)
    init = jax.random.uniform(jax.random.PRNGKey(seed + 1), (cfg["images"], 64))
    out = annealed_langevin(
        fn, init, sigmas, cfg["n_steps_each"], cfg["step_lr_images"], key=jax.random.PRNGKey(seed + 2)
    )
    # the KSD test on held-out digits noised at the smallest level, against s(x, sigma_min)
    from ppl_score.jax import ksd_test

    test = jnp.asarray(load_digits(seed=seed).test[: cfg["ksd_points"]], jnp.float32)
    key_noise, key_boot = jax.random.split(jax.random.PRNGKey(seed + 3))
    x = test + float(sigmas[-1]) * jax.random.normal(key_noise, test.shape)
    ksd = ksd_test(x, fn(x, float(sigmas[-1])), key=key_boot, n_bootstrap=cfg["ksd_bootstrap"])
    return dict(
        seconds=seconds,
        loss=float(value),
        samples=np.asarray(out.samples),
        data=np.asarray(data),
        ksd=(float(ksd.statistic), float(ksd.p_value)),
        ksd_points=len(x),
        sigmas=sigmas,
    )


def _jax_score(params, x, sigma):
    from ppl_score.jax.nets import noise_conditional_score_apply

    return noise_conditional_score_apply(params, x, sigma, condition_on_sigma=True, divide_by_sigma=True)


# --------------------------------------------------------------------------------------
# Fashion-MNIST with the torch backend (when installed)


def preconditioned_score(dim: int, hidden: tuple, sigma_data: float):
    """A noise-conditional score for images: ``s(x, sigma) = (D(x, sigma) - x) / sigma^2`` with
    the denoiser ``D = c_skip x + c_out F(c_in x, log sigma)`` (the preconditioning of Karras
    et al. 2022; ``F`` is ``NoiseConditionalScore``'s MLP). A plain MLP score net must learn the
    ``-x / sigma^2`` part of the score through its hidden layers, which on 784-D images it does
    not within a CPU budget; here it is built in, and the MLP learns only the correction."""
    import torch

    from ppl_score.torch.nets import NoiseConditionalScore

    class Preconditioned(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = NoiseConditionalScore(dim, hidden)

        def forward(self, x, sigma):
            s2 = (sigma**2)[:, None]
            total = s2 + sigma_data**2
            c_skip, c_out, c_in = sigma_data**2 / total, sigma[:, None] * sigma_data / total.sqrt(), 1 / total.sqrt()
            denoised = c_skip * x + c_out * self.net(c_in * x, sigma)
            return (denoised - x) / s2

    return Preconditioned()


def run_fashion(cfg, seed):
    import torch

    from ppl_score.datasets import load_fashion_mnist
    from ppl_score.torch import score_matching_loss
    from ppl_score.torch.langevin import annealed_langevin

    torch.manual_seed(seed)
    images = load_fashion_mnist("train", flatten=True).images[: cfg["fashion_n"]]
    rng = np.random.default_rng(seed)
    data = torch.tensor((np.rint(images * 255) + rng.uniform(size=images.shape)) / 256, dtype=torch.float32)
    sigmas = tuple(np.geomspace(1.0, 0.02, cfg["levels"]))
    net = preconditioned_score(784, (512, 512), sigma_data=float(data.std()))
    opt = torch.optim.Adam(net.parameters(), lr=cfg["fashion_lr"])
    t0 = time.perf_counter()
    for _ in range(cfg["fashion_steps"]):
        x = data[torch.randint(len(data), (cfg["batch"],))]
        loss = score_matching_loss(net, x, "ms_dsm", kind="score", sigmas=sigmas)
        opt.zero_grad()
        loss.backward()
        opt.step()
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        out = annealed_langevin(
            net,
            torch.rand(cfg["images"], 784),
            sigmas,
            cfg["n_steps_each"],
            cfg["step_lr_images"],
            generator=torch.Generator().manual_seed(seed),
        )
        # the KSD test on held-out (test-split) images, dequantized like the training ones
        # and noised at the smallest level, against s(x, sigma_min)
        from ppl_score.torch import ksd_test

        test = load_fashion_mnist("test", flatten=True).images[: cfg["ksd_points"]]
        test = (np.rint(test * 255) + rng.uniform(size=test.shape)) / 256
        gen = torch.Generator().manual_seed(seed + 3)
        x = torch.tensor(test, dtype=torch.float32)
        x = x + float(sigmas[-1]) * torch.randn(x.shape, generator=gen)
        score = net(x, torch.full((len(x),), float(sigmas[-1])))
        ksd = ksd_test(x, score, n_bootstrap=cfg["ksd_bootstrap"], generator=gen)
    return dict(
        seconds=seconds,
        loss=loss.item(),
        samples=out.samples.numpy(),
        data=data.numpy(),
        ksd=(float(ksd.statistic), float(ksd.p_value)),
        ksd_points=len(x),
        sigmas=sigmas,
    )


# --------------------------------------------------------------------------------------


def image_grid(x: np.ndarray, side: int, cols: int = 8) -> np.ndarray:
    n = (len(x) // cols) * cols
    imgs = np.clip(x[:n].reshape(n, side, side), 0, 1)
    rows = imgs.reshape(n // cols, cols, side, side).transpose(0, 2, 1, 3)
    return rows.reshape(n // cols * side, cols * side)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a few steps, for CI (seconds)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "figures")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    os.environ.setdefault("MPLBACKEND", "Agg")
    if args.smoke:
        cfg = dict(n=400, steps=10, batch=64, lr=1e-3, chains=64, levels=4, sigma_max=6.0, n_steps_each=5)
        cfg.update(step_lr=2e-3, images=16, step_lr_images=2e-5, fashion_n=256, fashion_steps=2, fashion_lr=2e-3)
        cfg.update(digits_steps=10, digits_lr=2e-3, ksd_points=64, ksd_bootstrap=100)
    else:
        cfg = dict(n=5000, steps=6000, batch=256, lr=2e-3, chains=1000, levels=10, sigma_max=6.0, n_steps_each=100)
        cfg.update(digits_steps=8000, digits_lr=2e-3, ksd_points=300, ksd_bootstrap=500)
        cfg.update(step_lr=2e-3, images=32, step_lr_images=2e-5, fashion_n=20000, fashion_steps=5000, fashion_lr=2e-3)

    report = {}
    mix = run_mixture(cfg, args.seed)
    data_frac = heavy_fraction(mix["data"])
    report["mixture"] = dict(
        heavy_true=float(WEIGHTS[0]),
        heavy_data=data_frac,
        heavy_annealed=heavy_fraction(mix["annealed"]),
        heavy_plain=heavy_fraction(mix["plain"]),
        ksd=mix["ksd"][0],
        ksd_p_value=mix["ksd"][1],
        seconds=mix["seconds"],
    )
    se = math.sqrt(WEIGHTS[0] * WEIGHTS[1] / cfg["chains"])
    print(
        f"2-D mixture (Pyro): {cfg['steps']} SVI steps in {mix['seconds']:.1f} s, sigmas {mix['sigmas'][0]:.3g}..0.05"
    )
    print(f"  heavy-mode fraction: true 0.80, data {data_frac:.3f}, +-{se:.3f} for {cfg['chains']} chains")
    print(f"  annealed Langevin : {report['mixture']['heavy_annealed']:.3f}")
    print(f"  plain Langevin    : {report['mixture']['heavy_plain']:.3f}")
    print(f"  KSD test at sigma 0.05 on held-out data: KSD^2 {mix['ksd'][0]:.4g}, p-value {mix['ksd'][1]:.3f}")

    digits = run_digits(cfg, args.seed)
    report["digits"] = dict(
        loss=digits["loss"], seconds=digits["seconds"], ksd=digits["ksd"][0], ksd_p_value=digits["ksd"][1]
    )
    print(
        f"digits (JAX backend): {cfg['digits_steps']} steps in {digits['seconds']:.1f} s, last ms_dsm loss {digits['loss']:.4g}"
    )
    print(
        f"  KSD test at sigma_min {digits['sigmas'][-1]:.3g} (held-out digits + noise at sigma_min vs s(x, sigma_min), "
        f"N={digits['ksd_points']}): KSD^2 {digits['ksd'][0]:.4g}, p-value {digits['ksd'][1]:.3f}"
    )

    fashion = None
    try:
        from ppl_score.datasets import find_idx_dir

        find_idx_dir(split="train")
    except FileNotFoundError:
        print("Fashion-MNIST: not installed (`make data`), skipped")
    else:
        fashion = run_fashion(cfg, args.seed)
        report["fashion_mnist"] = dict(
            loss=fashion["loss"], seconds=fashion["seconds"], ksd=fashion["ksd"][0], ksd_p_value=fashion["ksd"][1]
        )
        print(
            f"Fashion-MNIST (torch backend): {cfg['fashion_steps']} steps in {fashion['seconds']:.1f} s, "
            f"last ms_dsm loss {fashion['loss']:.4g}"
        )
        print(
            f"  KSD test at sigma_min {fashion['sigmas'][-1]:.3g} (held-out images + noise at sigma_min vs "
            f"s(x, sigma_min), N={fashion['ksd_points']}): KSD^2 {fashion['ksd'][0]:.4g}, p-value {fashion['ksd'][1]:.3f}"
        )

    import matplotlib.pyplot as plt

    panels = 5 if fashion is not None else 4
    fig, axes = plt.subplots(1, panels, figsize=(4 * panels, 4))
    for ax, (title, pts) in zip(
        axes[:3],
        (
            ("data", mix["data"][: cfg["chains"]]),
            ("annealed Langevin", mix["annealed"]),
            ("plain Langevin", mix["plain"]),
        ),
    ):
        ax.scatter(pts[:, 0], pts[:, 1], s=2, alpha=0.5)
        ax.set(xlim=(-LIM, LIM), ylim=(-LIM, LIM), title=f"{title}: heavy mode {heavy_fraction(pts):.2f}")
        ax.set_aspect("equal")
    axes[3].imshow(image_grid(digits["samples"], 8), cmap="gray_r")
    axes[3].set(title="digits: annealed Langevin samples", xticks=[], yticks=[])
    if fashion is not None:
        axes[4].imshow(image_grid(fashion["samples"], 28), cmap="gray_r")
        axes[4].set(title="Fashion-MNIST: annealed samples", xticks=[], yticks=[])
    fig.tight_layout()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "noise_conditional.png"
    fig.savefig(path, dpi=90)
    print(f"figure: {path}")
    return report


if __name__ == "__main__":
    main()
