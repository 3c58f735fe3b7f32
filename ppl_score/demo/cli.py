"""``python -m ppl_score demo``: fit a deep energy model by score matching and show it.

Framework-free orchestration: argument checks, the data, the metrics and the figure live
here; the training loop is ``ppl_score.torch.training`` or ``ppl_score.jax.training``,
imported only when that backend is asked for.

Metrics, on held-out data:

- exact score-matching loss ``E[tr H(x) + 1/2 ||s(x)||^2]`` (``esm``); it equals the Fisher
  divergence minus ``1/2 E||s_true||^2``, so lower is better and, where the true density is
  known, the gap to the true density's own loss estimates the Fisher divergence;
- where the true score is known (the mixture): the Fisher divergence
  ``1/2 E||s_model(x) - s_true(x)||^2``;
- for 2-D data: the log-likelihood with the model normalized numerically on the plot grid;
- the kernel Stein discrepancy test (IMQ kernel, wild bootstrap) of the held-out data under
  the fitted model: ``KSD^2`` and its p-value.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys

import numpy as np

from ..common.objectives import OBJECTIVES, UNCONDITIONAL_METHODS
from ..datasets import find_idx_dir
from . import datasets

__all__ = ["BACKENDS", "add_arguments", "check_args", "run"]

BACKENDS = ("torch", "jax")
# Options the CLI passes through, when the method takes them.
_PASSED_OPTIONS = ("sigma", "eps", "n_projections")
GRID = 160  # density grid per axis for 2-D data
KSD_POINTS = 500  # held-out points of the kernel Stein discrepancy test (O(N^2) pairs)
KSD_BOOTSTRAP = 500  # its wild-bootstrap draws
QUIVER = 17  # score arrows per axis
LANGEVIN_STEPS = 300


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def _hidden(text: str) -> tuple:
    try:
        sizes = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer widths like 128,128, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected positive layer widths like 128,128, got {text!r}")
    return sizes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``demo`` subcommand's options."""
    parser.add_argument("--backend", choices=BACKENDS, default="torch", help="array framework (default: torch)")
    parser.add_argument(
        "--method",
        choices=UNCONDITIONAL_METHODS,
        default="ssm_vr",
        help="score-matching objective (default: ssm_vr)",
    )
    parser.add_argument(
        "--data",
        default="mixture",
        help="'mixture' (built-in 2-D Gaussian mixture, known score), 'digits' (scikit-learn's "
        "8x8 digits), 'fashion-mnist' (28x28, from `make data` or $PPL_SCORE_DATA), or a path to a "
        ".npy/.npz array [N, *event] (default: mixture)",
    )
    parser.add_argument("--steps", type=_positive_int, default=2000, help="training steps (default: 2000)")
    parser.add_argument("--batch-size", type=_positive_int, default=256, help="minibatch size (default: 256)")
    parser.add_argument(
        "--lr",
        type=_positive_float,
        default=5e-3,
        help="Adam learning rate, decayed along a cosine to 5%% of it (default: 5e-3)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed for the weights, minibatches, projections and noise "
        "(the data and its train / held-out split are fixed)",
    )
    parser.add_argument("--out", default="out/demo", help="output folder for demo.png and metrics.json")
    parser.add_argument(
        "--hidden",
        type=_hidden,
        default=None,
        help="hidden layer widths of the MLP energy (default: 128,128 for 2-D data, else 256,256)",
    )
    parser.add_argument(
        "--sigma",
        type=_positive_float,
        default=None,
        help="noise scale of dsm / fd_dsm (default: 0.1 x the data's RMS coordinate std)",
    )
    parser.add_argument(
        "--eps",
        type=_positive_float,
        default=None,
        help="finite-difference step of fd_ssm / fd_dsm (default: 0.1 x the data's RMS coordinate std)",
    )
    parser.add_argument(
        "--n-projections",
        type=_positive_int,
        default=None,
        help="projections per example for ssm, ssm_vr, fd_ssm, fd_dsm (default: 1)",
    )
    parser.add_argument(
        "--scaling",
        choices=("unit", "standardize"),
        default="unit",
        help="array data: dequantized to [0, 1] ('unit') or standardized per coordinate",
    )
    parser.add_argument("--key", default=None, help="name of the array inside a .npz file")
    parser.add_argument(
        "--max-examples",
        type=_positive_int,
        default=None,
        help="array data and fashion-mnist: train on a random subset of this many examples (default: all)",
    )
    parser.add_argument(
        "--eval-size", type=_positive_int, default=2000, help="held-out examples used for the metrics (default: 2000)"
    )
    parser.add_argument(
        "--threads",
        type=_positive_int,
        default=1,
        help="torch intra-op threads (default: 1; the demo's models are too small to split)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Errors argparse cannot see by itself, reported through ``parser.error``."""
    takes = OBJECTIVES[args.method].defaults
    for option in _PASSED_OPTIONS:
        if getattr(args, option) is not None and option not in takes:
            users = [name for name, obj in OBJECTIVES.items() if option in obj.defaults]
            parser.error(
                f"--{option.replace('_', '-')} is not used by method {args.method!r} (only by {', '.join(users)})"
            )
    if args.data == "fashion-mnist":
        try:
            find_idx_dir(split="train")
            find_idx_dir(split="test")
        except FileNotFoundError as err:
            parser.error(f"--data fashion-mnist: {err}")
    elif args.data not in ("mixture", "digits"):
        if not os.path.isfile(args.data):
            parser.error(
                f"--data must be 'mixture', 'digits', 'fashion-mnist' or an existing .npy/.npz file, got {args.data!r}"
            )
        if os.path.splitext(args.data)[1].lower() not in (".npy", ".npz"):
            parser.error(f"--data file must end in .npy or .npz, got {args.data!r}")
    if getattr(args, "max_examples", None) is not None and args.data in ("mixture", "digits"):
        parser.error(f"--max-examples applies to fashion-mnist and array data, not to {args.data!r}")
    if getattr(args, "max_examples", None) is not None and args.max_examples < 2:
        parser.error("--max-examples must be at least 2")
    if args.key is not None and not args.data.lower().endswith(".npz"):
        parser.error("--key only applies to a .npz file given as --data")


# --------------------------------------------------------------------------------------
# Model and training (the only place that touches a backend)


def _objective_options(args, scale: float) -> dict:
    """The method's options: what the user passed, else ``sigma`` and ``eps`` set to a tenth
    of the data's length scale (the spec's defaults assume unit-scale data)."""
    takes = OBJECTIVES[args.method].defaults
    options = {}
    for option in _PASSED_OPTIONS:
        value = getattr(args, option)
        if value is None and option in ("sigma", "eps"):
            value = float(f"{0.1 * scale:.2g}")
        if value is not None and option in takes:
            options[option] = value
    return options


def _fit(args, data: datasets.Dataset, hidden: tuple, quadratic: float, options: dict):
    """The trained model (``FitResult``) and its log density as a backend callable."""
    common = dict(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        progress=not args.no_progress,
        **options,
    )
    if args.backend == "torch":
        import torch

        from ..torch.nets import MLPEnergy
        from ..torch.training import fit_energy

        torch.manual_seed(args.seed)
        model = MLPEnergy(data.dim, hidden, torch.nn.Softplus, quadratic)
        fit = fit_energy(model, data.train, args.method, **common)
        return fit, fit.model
    import functools

    import jax

    from ..jax.nets import energy_apply, energy_init
    from ..jax.training import fit_energy

    params = energy_init(jax.random.PRNGKey(args.seed), data.dim, hidden)
    apply_fn = functools.partial(energy_apply, activation=jax.nn.softplus, quadratic=quadratic)
    fit = fit_energy(apply_fn, params, data.train, args.method, **common)
    return fit, functools.partial(apply_fn, fit.params)


# --------------------------------------------------------------------------------------
# Metrics


def _mean_and_stderr(values: np.ndarray) -> tuple:
    values = np.asarray(values, dtype=np.float64)
    stderr = float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else 0.0
    return float(values.mean()), stderr


def _grid(data: datasets.Dataset, n: int):
    """A square grid over the 2-D data with a margin; returns the axes and ``[n*n, 2]`` points."""
    lo = np.quantile(data.train, 0.001, axis=0)
    hi = np.quantile(data.train, 0.999, axis=0)
    pad = 0.35 * (hi - lo)
    gx = np.linspace(lo[0] - pad[0], hi[0] + pad[0], n)
    gy = np.linspace(lo[1] - pad[1], hi[1] + pad[1], n)
    xx, yy = np.meshgrid(gx, gy)
    return gx, gy, np.stack([xx.ravel(), yy.ravel()], axis=-1)


def _grid_log_density(log_prob, gx, gy, points):
    """``log p`` on the grid, normalized numerically over it (Riemann sum)."""
    lp = log_prob(points)
    cell = (gx[1] - gx[0]) * (gy[1] - gy[0])
    top = lp.max()
    log_z = top + math.log(np.exp(lp - top).sum() * cell)
    return lp - log_z, log_z


def _ksd_test(args, x: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """The backend's kernel Stein discrepancy test of ``x`` under the fitted model (its
    ``scores`` at ``x``): ``(KSD^2, p-value)``."""
    flat_x, flat_s = x.reshape(len(x), -1), np.asarray(scores).reshape(len(x), -1)
    if args.backend == "torch":
        import torch

        from ..torch import ksd_test

        out = ksd_test(
            torch.as_tensor(flat_x),
            torch.as_tensor(flat_s, dtype=torch.float64),
            n_bootstrap=KSD_BOOTSTRAP,
            generator=torch.Generator().manual_seed(args.seed),
        )
    else:
        import jax

        from ..jax import ksd_test

        out = ksd_test(flat_x, flat_s, key=jax.random.PRNGKey(args.seed), n_bootstrap=KSD_BOOTSTRAP)
    return float(out.statistic), float(out.p_value)


def _langevin(args, log_density, score, x0: np.ndarray, step: float, n_steps: int, bound: float):
    """Unadjusted Langevin ``x <- x + step/2 s(x) + sqrt(step) z`` from ``x0`` with the
    backend's sampler (``ppl_score.{torch,jax}.langevin.ula``, whose step ``h`` is ``step/2``),
    then one noise-free step so the shown samples are not covered in the last noise.

    Above the stability limit (``step > 4 / curvature``) the chain diverges; when it does, or
    ends outside the box ``|x - x0.mean| <= bound``, the step is halved and the chain restarted.
    Returns the samples and the step used.
    """
    center = x0.mean(axis=0)
    for _ in range(30):
        try:
            x = _ula(args, log_density, x0, 0.5 * step, n_steps)
        except ValueError:  # the sampler's divergence error
            x = None
        if x is not None and np.isfinite(x).all() and np.abs(x - center).max() <= bound:
            x = x + 0.5 * step * score(x)
            if np.isfinite(x).all():
                return x, step
        step /= 2
    raise FloatingPointError("Langevin sampling diverged even with a tiny step; the model's score is unstable")


def _ula(args, log_density, x0: np.ndarray, h: float, n_steps: int) -> np.ndarray:
    """The last state of ``n_steps`` of the backend's unadjusted Langevin sampler, float64."""
    if args.backend == "torch":
        import torch

        from ..torch.langevin import ula

        dtype = next(log_density.parameters()).dtype
        generator = torch.Generator().manual_seed(args.seed)
        out = ula(log_density, torch.as_tensor(x0, dtype=dtype), h, n_steps, thin=n_steps, generator=generator)
        return out.samples[-1].to(torch.float64).numpy()
    import jax
    import jax.numpy as jnp

    from ..jax.langevin import ula

    dtype = jax.tree.leaves(log_density.args[0])[0].dtype
    out = ula(log_density, jnp.asarray(x0, dtype), h, n_steps, key=jax.random.PRNGKey(args.seed), thin=n_steps)
    return np.asarray(out.samples[-1], np.float64)


# --------------------------------------------------------------------------------------
# Figures (matplotlib, Agg)


def _figure_2d(data, fit, grid, true_lp_grid, model_lp_grid, title, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gx, gy, points = grid
    n = len(gx)
    extent = (gx[0], gx[-1], gy[0], gy[-1])
    panels = 5 if true_lp_grid is not None else 4
    fig, axes = plt.subplots(1, panels, figsize=(4.0 * panels, 4.2))
    ax = iter(axes)

    a = next(ax)
    shown = data.train[: min(3000, len(data.train))]
    a.scatter(shown[:, 0], shown[:, 1], s=2, alpha=0.4, color="k", rasterized=True)
    a.set(xlim=extent[:2], ylim=extent[2:], title=f"data ({len(shown)} training points)")
    vmax = max(np.exp(model_lp_grid).max(), np.exp(true_lp_grid).max() if true_lp_grid is not None else 0)
    if true_lp_grid is not None:
        a = next(ax)
        a.imshow(
            np.exp(true_lp_grid).reshape(n, n),
            origin="lower",
            extent=extent,
            cmap="viridis",
            vmin=0,
            vmax=vmax,
            aspect="auto",
        )
        a.set(title="true density")
    a = next(ax)
    a.imshow(
        np.exp(model_lp_grid).reshape(n, n),
        origin="lower",
        extent=extent,
        cmap="viridis",
        vmin=0,
        vmax=vmax,
        aspect="auto",
    )
    a.set(title="learned density exp(-E), normalized on grid")

    a = next(ax)
    qx = np.linspace(gx[0], gx[-1], QUIVER)
    qy = np.linspace(gy[0], gy[-1], QUIVER)
    qxx, qyy = np.meshgrid(qx, qy)
    qpoints = np.stack([qxx.ravel(), qyy.ravel()], axis=-1)
    a.contour(gx, gy, np.exp(model_lp_grid).reshape(n, n), levels=8, cmap="viridis", linewidths=0.8)

    def arrows(s):
        # length ~ sqrt(||s||) so that the small scores near the modes stay visible
        norm = np.linalg.norm(s, axis=-1, keepdims=True)
        return s / np.maximum(norm, 1e-12) * np.sqrt(norm)

    fields = [arrows(fit.score(qpoints))]
    if data.score is not None:
        fields.insert(0, arrows(data.score(qpoints)))
    # one scale for both fields: the longest arrow spans 1.3 grid cells
    longest = max(np.linalg.norm(f, axis=-1).max() for f in fields)
    scale = longest / (1.3 * (qx[1] - qx[0]))
    styles = ([dict(color="tab:orange", alpha=0.8, width=0.006)] if data.score is not None else []) + [
        dict(color="k", width=0.0025)
    ]
    for f, style in zip(fields, styles):
        a.quiver(qpoints[:, 0], qpoints[:, 1], f[:, 0], f[:, 1], angles="xy", scale_units="xy", scale=scale, **style)
    a.set(title="learned score (black) vs true (orange)" if data.score is not None else "learned score field")
    a.set(xlim=extent[:2], ylim=extent[2:])
    _loss_panel(next(ax), fit.losses)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _loss_panel(a, losses):
    steps = np.arange(1, len(losses) + 1)
    a.plot(steps, losses, color="0.75", lw=0.6, label="per step")
    window = max(1, len(losses) // 50)
    if len(losses) >= window > 1:
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        a.plot(steps[window - 1 :], smooth, color="tab:red", lw=1.2, label=f"mean of {window}")
    finite = losses[np.isfinite(losses)]
    if len(finite) > 10:
        lo, hi = np.quantile(finite, [0.01, 0.99])
        a.set_ylim(lo - 0.1 * (hi - lo), hi + 0.1 * (hi - lo))
    a.set(title="training loss", xlabel="step")
    a.legend(loc="upper right", fontsize=8)


def _image_grid(x: np.ndarray, image_shape: tuple, lo: float, hi: float, cols: int = 8) -> np.ndarray:
    n = len(x)
    rows = math.ceil(n / cols)
    h, w = image_shape[:2]
    channels = image_shape[2:]
    canvas = np.zeros((rows * (h + 1) + 1, cols * (w + 1) + 1, *channels))
    imgs = np.clip((x.reshape(n, *image_shape) - lo) / max(hi - lo, 1e-12), 0, 1)
    for i in range(n):
        r, c = divmod(i, cols)
        canvas[1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + c * (w + 1) : 1 + c * (w + 1) + w] = imgs[i]
    return canvas


def _figure_images(data, fit, samples, lp_test, lp_samples, lp_noise, title, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lo, hi = float(np.quantile(data.train, 0.001)), float(np.quantile(data.train, 0.999))
    with_images = data.image_shape is not None
    panels = 4 if with_images else 2
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 4.4))
    ax = iter(axes)
    if with_images:
        cmap = "gray_r" if len(data.image_shape) == 2 else None
        for name, x in (("held-out data", data.test[: len(samples)]), ("Langevin samples from the model", samples)):
            a = next(ax)
            grid = _image_grid(x, data.image_shape, lo, hi)
            a.imshow(grid, cmap=cmap, vmin=0, vmax=1)
            a.set(title=name)
            a.axis("off")
    a = next(ax)
    everything = np.concatenate([lp_test, lp_samples, lp_noise])
    bins = np.linspace(np.quantile(everything, 0.005), np.quantile(everything, 0.995), 50)
    for name, lp, color in (
        ("held-out data", lp_test, "tab:blue"),
        ("Langevin samples", lp_samples, "tab:green"),
        ("uniform noise", lp_noise, "tab:red"),
    ):
        a.hist(np.clip(lp, bins[0], bins[-1]), bins=bins, alpha=0.5, color=color, label=name, density=True)
    a.set(title="model log density -E(x) (unnormalized)", xlabel="-E(x)")
    a.legend(fontsize=8)
    _loss_panel(next(ax), fit.losses)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------


def _hidden_default(data: datasets.Dataset) -> tuple:
    return (128, 128) if data.dim <= 2 else (256, 256)


def _options_text(options: dict) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in options.items())


def run(args: argparse.Namespace, stream=None) -> dict:
    """Run the demo with parsed ``args``; prints to ``stream`` (default stdout) and returns
    the metrics (also written to ``<out>/metrics.json``)."""
    stream = sys.stdout if stream is None else stream

    def say(text=""):
        print(text, file=stream, flush=True)

    data = datasets.get_dataset(
        args.data, seed=0, scaling=args.scaling, key=args.key, max_examples=getattr(args, "max_examples", None)
    )
    scale = datasets.data_scale(data.train)
    hidden = tuple(args.hidden) if args.hidden else _hidden_default(data)
    # -quadratic/2 ||x||^2 keeps exp(-E) normalizable (softplus MLPs grow at most linearly);
    # a tenth of the data's curvature scale barely biases the fit inside the data
    quadratic = float(f"{0.1 / scale**2:.2g}")
    options = _objective_options(args, scale)
    opts_text = _options_text(options)

    say(f"ppl_score demo: {args.backend} backend, method {args.method}" + (f" ({opts_text})" if opts_text else ""))
    say(
        f"data: {data.name}, event shape {data.event_shape} (D={data.dim}), {len(data.train)} train / "
        f"{min(len(data.test), args.eval_size)} held-out examples, RMS coordinate std {scale:.3g}"
    )
    say(
        f"model: MLP energy {'-'.join(map(str, (data.dim, *hidden, 1)))}, softplus, "
        f"quadratic term {quadratic:g}/2 ||x||^2"
    )
    say(f"training: {args.steps} steps, batch {args.batch_size}, Adam lr {args.lr:g}, seed {args.seed}")
    os.makedirs(args.out, exist_ok=True)  # fail before training, not after
    with _torch_threads(args.backend, args.threads):
        fit, log_density = _fit(args, data, hidden, quadratic, options)
        say(
            f"training time: {fit.seconds:.2f} s ({1e3 * fit.seconds / args.steps:.2f} ms/step"
            + (", including jit compilation)" if args.backend == "jax" else ")")
        )
        return _evaluate_and_report(args, data, fit, log_density, hidden, quadratic, options, scale, say)


def _evaluate_and_report(args, data, fit, log_density, hidden, quadratic, options, scale, say) -> dict:
    """Held-out metrics, the figure and ``metrics.json``."""
    test = data.test[: args.eval_size]
    opts_text = _options_text(options)
    tail = fit.losses[-max(1, len(fit.losses) // 10) :]
    metrics = {
        "backend": args.backend,
        "method": args.method,
        "options": options,
        "data": data.name,
        "event_shape": list(data.event_shape),
        "n_train": len(data.train),
        "n_eval": len(test),
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "seed": args.seed,
        "hidden": list(hidden),
        "quadratic": quadratic,
        "train_seconds": fit.seconds,
        "final_train_loss": float(np.mean(tail)),
    }

    esm_mean, esm_se = _mean_and_stderr(fit.esm(test))
    metrics.update(heldout_esm=esm_mean, heldout_esm_stderr=esm_se)
    line = f"held-out exact score-matching loss (esm): {esm_mean:.4f} +- {esm_se:.4f}"
    if data.score is not None and data.hessian_trace is not None:
        s_true = data.score(test)
        true_esm = float(np.mean(data.hessian_trace(test) + 0.5 * (s_true**2).sum(-1)))
        metrics["heldout_esm_true_density"] = true_esm
        line += f"   [true density: {true_esm:.4f}]"
    say(line)
    if data.score is not None:
        s_true = data.score(test)
        diff = (fit.score(test) - s_true).reshape(len(test), -1)
        fisher, fisher_se = _mean_and_stderr(0.5 * (diff**2).sum(-1))
        metrics.update(
            fisher_divergence=fisher,
            fisher_divergence_stderr=fisher_se,
            half_mean_sq_true_score=float(np.mean(0.5 * (s_true.reshape(len(test), -1) ** 2).sum(-1))),
        )
        say(
            f"Fisher divergence 1/2 E||s_model - s_true||^2 (held-out): {fisher:.4f} +- {fisher_se:.4f}   "
            f"[1/2 E||s_true||^2 = {metrics['half_mean_sq_true_score']:.4f}]"
        )

    n_ksd = min(len(test), KSD_POINTS)
    ksd2, p_value = _ksd_test(args, test[:n_ksd], fit.score(test[:n_ksd]))
    metrics.update(ksd=ksd2, ksd_p_value=p_value, ksd_points=n_ksd)
    say(
        f"kernel Stein discrepancy test (IMQ, {n_ksd} held-out points, {KSD_BOOTSTRAP} wild-bootstrap draws): "
        f"KSD^2 {ksd2:.4g}, p-value {p_value:.3f}"
        + ("   [a small p-value: the held-out data are unlikely under the fitted model]" if p_value < 0.05 else "")
    )

    fig_path = os.path.join(args.out, "demo.png")
    title = f"{data.name}: {args.method} on {args.backend}, {args.steps} steps" + (
        f" ({opts_text})" if opts_text else ""
    )
    if data.dim == 2 and len(data.event_shape) == 1:
        grid = _grid(data, GRID)
        model_lp, log_z = _grid_log_density(fit.log_prob, *grid)
        heldout_ll = float(np.mean(fit.log_prob(test) - log_z))
        metrics["heldout_loglik_grid_normalized"] = heldout_ll
        line = f"held-out log-likelihood (model normalized on the plot grid): {heldout_ll:.4f}"
        true_lp = None
        if data.log_prob is not None:
            true_lp = data.log_prob(grid[2])
            metrics["heldout_loglik_true_density"] = float(np.mean(data.log_prob(test)))
            line += f"   [true density: {metrics['heldout_loglik_true_density']:.4f}]"
        say(line)
        _figure_2d(data, fit, grid, true_lp, model_lp, title, fig_path)
    else:
        rng = np.random.default_rng(args.seed)
        lo, hi = data.train.min(axis=0), data.train.max(axis=0)
        noise = rng.uniform(lo, hi, size=(64, *data.event_shape))
        samples, step = _langevin(
            args, log_density, fit.score, noise, (0.25 * scale) ** 2, LANGEVIN_STEPS, bound=2.0 * float((hi - lo).max())
        )
        metrics["langevin_step"] = step
        lp_test, lp_samples, lp_noise = fit.log_prob(test), fit.log_prob(samples), fit.log_prob(noise)
        metrics.update(
            mean_logp_heldout=float(lp_test.mean()),
            mean_logp_langevin=float(lp_samples.mean()),
            mean_logp_noise=float(lp_noise.mean()),
        )
        say(
            f"mean unnormalized log density -E(x): held-out data {lp_test.mean():.2f}, "
            f"Langevin samples {lp_samples.mean():.2f} ({LANGEVIN_STEPS} steps of {step:.2g} from uniform noise), "
            f"uniform noise {lp_noise.mean():.2f}"
        )
        _figure_images(data, fit, samples, lp_test, lp_samples, lp_noise, title, fig_path)

    metrics_path = os.path.join(args.out, "metrics.json")
    with open(metrics_path, "w") as f:
        json.dump(metrics, f, indent=2)
    say(f"wrote {fig_path} and {metrics_path}")
    return metrics


@contextlib.contextmanager
def _torch_threads(backend: str, threads: int):
    """Set torch's intra-op threads for the run and restore them after. The demo's models
    are small: on a shared 2-core CPU, two spinning worker threads made steps about 10x
    slower than one."""
    if backend != "torch":
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
