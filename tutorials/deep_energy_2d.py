"""A deep energy model on a 2-D mixture
====================================

Tutorial: a deep energy model on a 2-D mixture, fitted by sliced score matching and
sampled by Langevin dynamics, in Pyro and in NumPyro.

The model is ``p(x) = exp(f_theta(x)) / Z(theta)`` with ``f_theta`` an MLP (softplus, plus a
fixed ``-0.05 ||x||^2`` so that every ``theta`` gives a normalizable density): ``Z`` is
intractable in general, so maximum likelihood is out, but score matching needs only
``grad_x f``. The energy sits in an ``Unnormalized`` site inside a subsampled plate;
``ScoreMatching("ssm_vr")`` (Song et al. 2019) fits it with plain SVI on minibatches.
A fitted ``Unnormalized`` site cannot be sampled directly: ``ppl_score.{pyro,numpyro}.langevin``
runs Metropolis-adjusted Langevin chains on it.

Score matching sees each mode's shape through the local score but is nearly blind to the
relative weights of well-separated modes (the objective is an expectation of local
quantities), so the learned weights can be uneven; and Langevin chains rarely cross between
modes, so their draws keep roughly the proportions of their starting basins.

Printed: held-out log-likelihood under the learned density (normalized on a grid, which
is possible in 2-D only) against the true mixture's, the energy distance between the
Langevin samples and fresh data (with the distance between two data sets of the same
size as the noise floor), and the kernel Stein discrepancy test of each fitted model on
held-out data (``goodness_of_fit`` on the observed site ``"x"``, which needs only the
learned score, not the normalizer). A small p-value means the held-out data are unlikely
under the fitted model; with thousands of points the test also detects small misfits. It
runs on 500 of the held-out points (its cost grows as N^2). In the full run neither fit is rejected at 0.05, though
both come close (p-values 0.09 Pyro, 0.06 NumPyro): like score matching, the KSD sees a
mixture through local scores and has little power against wrong relative weights of
well-separated modes (Wenliang & Kanagawa 2020), such as the uneven weights of the fits.

    python tutorials/deep_energy_2d.py            # full run, figure in tutorials/figures/
    python tutorials/deep_energy_2d.py --smoke    # seconds, for CI
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

K, RADIUS, SD = 6, 1.8, 0.4  # mixture: K equal Gaussians on a circle
HIDDEN = (64, 64)
QUADRATIC = 0.1  # log p = MLP(x) - QUADRATIC/2 ||x||^2
LIM = 3.5  # plotting / grid box [-LIM, LIM]^2
N_KSD, KSD_BOOTSTRAP = 500, 1000  # held-out points and wild-bootstrap draws of the KSD test


def centers() -> np.ndarray:
    angle = 2 * np.pi * np.arange(K) / K
    return RADIUS * np.stack([np.cos(angle), np.sin(angle)], -1)


def sample_mixture(n: int, rng) -> np.ndarray:
    return centers()[rng.integers(K, size=n)] + SD * rng.normal(size=(n, 2))


def mixture_log_prob(x: np.ndarray) -> np.ndarray:
    d2 = ((x[:, None, :] - centers()[None]) ** 2).sum(-1)
    comp = -0.5 * d2 / SD**2 - np.log(2 * np.pi * SD**2) - np.log(K)
    m = comp.max(1)
    return m + np.log(np.exp(comp - m[:, None]).sum(1))


def grid(n: int):
    g = np.linspace(-LIM, LIM, n)
    xx, yy = np.meshgrid(g, g)
    return np.stack([xx.ravel(), yy.ravel()], -1), (g[1] - g[0]) ** 2


def grid_normalizer(log_f_grid: np.ndarray, cell: float) -> float:
    m = log_f_grid.max()
    return float(m + np.log(np.exp(log_f_grid - m).sum() * cell))


def energy_distance(a: np.ndarray, b: np.ndarray) -> float:
    def mean_dist(u, v):
        return np.sqrt(((u[:, None, :] - v[None]) ** 2).sum(-1)).mean()

    return float(2 * mean_dist(a, b) - mean_dist(a, a) - mean_dist(b, b))


# ---------------------------------------------------------------------------------------
# Pyro
# ---------------------------------------------------------------------------------------


def run_pyro(data, test, cfg, seed):
    """Fit by SVI with ScoreMatching("ssm_vr"); return (log f on a callable, Langevin samples,
    acceptance, KSD test of the fit on the held-out ``test``)."""
    import pyro
    import torch
    from pyro.infer import SVI
    from pyro.optim import ClippedAdam

    from ppl_score.pyro import ScoreMatching, Unnormalized, goodness_of_fit, langevin
    from ppl_score.torch.nets import MLPEnergy

    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    torch.manual_seed(seed)
    energy = MLPEnergy(2, hidden=HIDDEN, quadratic=QUADRATIC)

    def model(x, batch_size=None):
        # the energy runs inside the loss, not in the model body: register its parameters here
        pyro.module("energy", energy)
        with pyro.plate("data", x.shape[0], subsample_size=batch_size) as idx:
            pyro.sample("x", Unnormalized(energy, event_shape=(2,)), obs=x[idx])

    # the rate decays to 5% of lr over the run (as optax.exponential_decay in the NumPyro twin)
    optim = ClippedAdam({"lr": cfg["lr"], "lrd": 0.05 ** (1 / cfg["steps"])})
    svi = SVI(model, lambda x, batch_size=None: None, optim, loss=ScoreMatching("ssm_vr"))
    x = torch.as_tensor(data, dtype=torch.float32)
    for _ in range(cfg["steps"]):
        svi.step(x, batch_size=cfg["batch"])

    # Langevin on the fitted site: model(x) with one data row, so each chain is one 2-D point
    init = torch.as_tensor(cfg["init"], dtype=torch.float32)[:, None, :]
    out = langevin(
        model,
        "x",
        torch.zeros(1, 2),
        num_chains=len(init),
        init=init,
        num_steps=cfg["langevin_steps"],
        num_warmup=0,
        step_size=cfg["step_size"],
        thin=cfg["langevin_steps"],
        generator=torch.Generator().manual_seed(seed),
    )

    # the KSD test of the fitted site on held-out data (the whole plate: no batch_size)
    ksd = goodness_of_fit(
        model,
        "x",
        torch.as_tensor(test, dtype=torch.float32),
        n_bootstrap=cfg["ksd_bootstrap"],
        generator=torch.Generator().manual_seed(seed),
    )

    def log_f(points):
        with torch.no_grad():
            return energy(torch.as_tensor(points, dtype=torch.float32)).double().numpy()

    ksd = (float(ksd.statistic), float(ksd.p_value))
    return log_f, out.samples[-1, :, 0].double().numpy(), float(out.accept_rate.mean()), ksd


# ---------------------------------------------------------------------------------------
# NumPyro
# ---------------------------------------------------------------------------------------


def run_numpyro(data, test, cfg, seed):
    import jax
    import jax.numpy as jnp
    import numpyro
    import optax
    from numpyro.infer import SVI

    from ppl_score.jax.nets import energy_apply, energy_init
    from ppl_score.numpyro import ScoreMatching, Unnormalized, goodness_of_fit, langevin

    init_params = energy_init(jax.random.PRNGKey(seed), 2, hidden=HIDDEN)

    def model(x, batch_size=None):
        params = numpyro.param("energy", init_params)
        f = lambda v: energy_apply(params, v, quadratic=QUADRATIC)  # noqa: E731
        with numpyro.plate("data", x.shape[0], subsample_size=batch_size):
            batch = numpyro.subsample(x, event_dim=1)
            numpyro.sample("x", Unnormalized(f, event_shape=(2,)), obs=batch)

    schedule = optax.exponential_decay(cfg["lr"], transition_steps=cfg["steps"], decay_rate=0.05)
    svi = SVI(model, lambda x, batch_size=None: None, optax.adam(schedule), loss=ScoreMatching("ssm_vr"))
    key_fit, key_sample = jax.random.split(jax.random.PRNGKey(seed))
    x = jnp.asarray(data, jnp.float32)
    result = svi.run(key_fit, cfg["steps"], x, batch_size=cfg["batch"], progress_bar=False)
    params = result.params

    # the KSD test of the fitted site on held-out data (the whole plate: no batch_size)
    ksd = goodness_of_fit(
        model,
        "x",
        jnp.asarray(test, jnp.float32),
        rng_key=jax.random.PRNGKey(seed),
        params=params,
        n_bootstrap=cfg["ksd_bootstrap"],
    )

    init = jnp.asarray(cfg["init"], jnp.float32)[:, None, :]
    out = langevin(
        model,
        "x",
        jnp.zeros((1, 2), jnp.float32),
        key=key_sample,
        params=params,
        num_chains=len(init),
        init=init,
        num_steps=cfg["langevin_steps"],
        num_warmup=0,
        step_size=cfg["step_size"],
        thin=cfg["langevin_steps"],
    )

    log_f = jax.jit(lambda p: energy_apply(params["energy"], p, quadratic=QUADRATIC))
    return (
        lambda points: np.asarray(log_f(jnp.asarray(points, jnp.float32)), np.float64),
        np.asarray(out.samples[-1, :, 0], np.float64),
        float(out.accept_rate.mean()),
        (float(ksd.statistic), float(ksd.p_value)),
    )


# ---------------------------------------------------------------------------------------


def plot(data, panels, grid_n, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts, _ = grid(grid_n)
    fig, axes = plt.subplots(2, 3, figsize=(11, 7.4))
    extent = (-LIM, LIM, -LIM, LIM)

    def density(ax, log_p, title):
        ax.imshow(np.exp(log_p).reshape(grid_n, grid_n), origin="lower", extent=extent, cmap="viridis")
        ax.set_title(title, fontsize=10)

    def scatter(ax, x, title, color):
        ax.scatter(x[:, 0], x[:, 1], s=2, alpha=0.4, color=color)
        ax.set_xlim(-LIM, LIM)
        ax.set_ylim(-LIM, LIM)
        ax.set_aspect("equal")
        ax.set_title(title, fontsize=10)

    scatter(axes[0, 0], data[:2000], "training data (2000 shown)", "k")
    density(axes[1, 0], mixture_log_prob(pts), "true density")
    for row, (name, (log_p, samples, accept)) in enumerate(panels.items()):
        density(axes[row, 1], log_p, f"{name}: learned density exp(f)/Z")
        scatter(axes[row, 2], samples, f"{name}: MALA samples (accept {accept:.2f})", "C1" if row else "C0")
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("Deep energy model fitted by ScoreMatching('ssm_vr'), sampled by Langevin", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a few steps, for CI (seconds)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "figures")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    os.environ.setdefault("MPLBACKEND", "Agg")

    if args.smoke:
        cfg = dict(n=500, steps=5, batch=64, lr=1e-3, chains=64, langevin_steps=4, step_size=0.02, grid=40)
        cfg.update(ksd_points=100, ksd_bootstrap=100)
    else:
        cfg = dict(n=5000, steps=8000, batch=256, lr=3e-3, chains=2000, langevin_steps=1000, step_size=0.05, grid=200)
        cfg.update(ksd_points=N_KSD, ksd_bootstrap=KSD_BOOTSTRAP)
    rng = np.random.default_rng(args.seed)
    data = sample_mixture(cfg["n"], rng)
    test = sample_mixture(2000, rng)
    cfg["init"] = rng.uniform(-LIM, LIM, size=(cfg["chains"], 2))  # chains start spread over the box

    pts, cell = grid(cfg["grid"])
    report, panels = {}, {}
    true_ll = float(mixture_log_prob(test).mean())
    floor = energy_distance(sample_mixture(cfg["chains"], rng), sample_mixture(cfg["chains"], rng))
    print(
        f"N={cfg['n']}, SVI steps={cfg['steps']} (batch {cfg['batch']}), {cfg['chains']} chains x "
        f"{cfg['langevin_steps']} MALA steps of {cfg['step_size']}"
    )
    print(f"  true mixture: held-out log-lik {true_ll:.3f}; energy distance data vs data {floor:.4f}")
    for name, run in (("Pyro", run_pyro), ("NumPyro", run_numpyro)):
        # the KSD test uses the first ksd_points held-out points (no new draws from rng)
        log_f, samples, accept, (ksd2, p_value) = run(data, test[: cfg["ksd_points"]], cfg, args.seed)
        log_z = grid_normalizer(log_f(pts), cell)
        ll = float((log_f(test) - log_z).mean())
        ed = energy_distance(samples, sample_mixture(len(samples), rng))
        report[name] = dict(heldout_loglik=ll, energy_distance=ed, accept_rate=accept, ksd=ksd2, ksd_p_value=p_value)
        panels[name] = (log_f(pts) - log_z, samples, accept)
        print(
            f"  {name:8s}: held-out log-lik {ll:.3f}; Langevin samples vs data: energy distance {ed:.4f}; "
            f"MALA acceptance {accept:.2f}"
        )
        print(
            f"  {name:8s}: KSD test (held-out, N={cfg['ksd_points']}): KSD^2 {ksd2:.4g}, p-value {p_value:.3f}",
            flush=True,
        )
    report["true_loglik"], report["energy_distance_floor"] = true_ll, floor

    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "deep_energy_2d.png"
    plot(data, panels, cfg["grid"], path)
    print(f"figure: {path}")
    return report


if __name__ == "__main__":
    main()
