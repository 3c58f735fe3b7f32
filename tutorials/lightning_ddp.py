"""Score matching on two processes with PyTorch Lightning
======================================================

Tutorial: a deep energy model in a Pyro model, fitted by ``ScoreMatching("ssm_vr")`` inside a
``lightning.LightningModule`` and trained by Lightning's ``Trainer`` with the default
data-parallel strategy (``DistributedDataParallel``, gloo on CPU, two processes).

Nothing here is specific to the library but three lines: the energy has no last-layer bias
(``MLPEnergy``: a constant offset never reaches the score, and DDP refuses parameters
without a gradient), the loss draws its projections from a per-rank generator
(``ppl_score.torch.distributed.rank_generator``: the same seed gives each rank its own
stream), and each rank passes its shard of data-point indices to ``pyro.plate(...,
subsample=idx)`` so every datum weighs ``N / len(idx)`` and Lightning's gradient average is
the gradient of the full-data objective (the shards come from Lightning's
``DistributedSampler``).

Printed: the held-out exact score-matching loss (``esm``) of the energy before and after
training, whether the two ranks ended with the same weights, and the kernel Stein discrepancy
(KSD) test (``ppl_score.torch.ksd_test``) of held-out data against the trained energy's score
``grad_x f(x)`` (a small p-value says the held-out points are unlikely under the fitted model;
the smoke run's few steps leave a poor fit, which it rejects; the full run's 500 held-out
points do not reject the trained energy, p-value 0.26).

    python tutorials/lightning_ddp.py            # full run
    python tutorials/lightning_ddp.py --smoke    # seconds, for CI

Needs ``pip install lightning`` (not a dependency of the library).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

HIDDEN = (64, 64)
QUADRATIC = 0.1


try:  # not a dependency of the library
    import lightning as L
except ImportError:
    L = None

if L is not None:
    import pyro
    import torch

    from ppl_score.pyro import ScoreMatching, Unnormalized
    from ppl_score.torch.distributed import rank_generator
    from ppl_score.torch.nets import MLPEnergy

    class EnergyModel(torch.nn.Module):
        """A Pyro model: the observed site ``x`` has the unnormalized density ``exp(f(x))``."""

        def __init__(self, data: torch.Tensor):
            super().__init__()
            self.data = data
            self.energy = MLPEnergy(data.shape[1], HIDDEN, quadratic=QUADRATIC)

        def forward(self, idx: torch.Tensor) -> None:
            # this process's shard of data-point indices: each datum weighs N / len(idx)
            with pyro.plate("data", len(self.data), subsample=idx):
                pyro.sample("x", Unnormalized(self.energy, (self.data.shape[1],)), obs=self.data[idx])

    def guide(idx: torch.Tensor) -> None:
        pass

    class ScoreMatchingModule(L.LightningModule):
        """``ScoreMatching("ssm_vr")`` of ``EnergyModel`` as a LightningModule."""

        def __init__(self, data: torch.Tensor, seed: int, lr: float, out: str):
            super().__init__()
            self.model = EnergyModel(data)
            self.seed, self.lr, self.out = seed, lr, out
            self.elbo = None

        def setup(self, stage: str) -> None:
            # after the process group is up: each rank its own stream from one seed
            self.elbo = ScoreMatching("ssm_vr", generator=rank_generator(self.seed))

        def training_step(self, batch, batch_idx):
            (idx,) = batch
            return self.elbo.differentiable_loss(self.model, guide, idx) / len(self.model.data)

        def configure_optimizers(self):
            return torch.optim.Adam(self.model.parameters(), lr=self.lr)

        def on_train_end(self) -> None:
            # every rank saves its weights, to check that DDP kept the replicas equal
            flat = torch.cat([p.detach().reshape(-1) for p in self.model.parameters()])
            torch.save(flat, Path(self.out) / f"weights_rank{self.global_rank}.pt")


def held_out_esm(energy, x) -> float:
    import torch

    from ppl_score.torch import score_matching_loss

    with torch.no_grad():
        return float(score_matching_loss(energy, x, "esm"))


def held_out_ksd(energy, x, n_bootstrap: int, seed: int):
    """The KSD test of the held-out ``x`` against the energy's score (by autograd)."""
    import torch

    from ppl_score.torch import ksd_test

    x = x.clone().requires_grad_(True)
    (score,) = torch.autograd.grad(energy(x).sum(), x)
    result = ksd_test(x.detach(), score, n_bootstrap=n_bootstrap, generator=torch.Generator().manual_seed(seed))
    return float(result.statistic), float(result.p_value)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a few steps, for CI (seconds)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "figures")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if L is None:
        print("Lightning is not installed (pip install lightning); nothing to run")
        return {}
    from torch.utils.data import DataLoader, TensorDataset

    from ppl_score.demo.datasets import mixture_dataset

    if args.smoke:
        cfg = dict(n=512, batch=64, steps=4, lr=1e-2, ksd_points=100, ksd_bootstrap=100)
    else:
        cfg = dict(n=10_000, batch=256, steps=2000, lr=3e-3, ksd_points=500, ksd_bootstrap=500)
    args.out.mkdir(parents=True, exist_ok=True)
    data = mixture_dataset(n_train=cfg["n"], n_test=cfg["n"] // 2, seed=args.seed)
    train = torch.as_tensor(data.train, dtype=torch.float32)
    test = torch.as_tensor(data.test, dtype=torch.float32)

    torch.manual_seed(args.seed)  # rank 0's initial weights; DDP broadcasts them
    module = ScoreMatchingModule(train, args.seed, cfg["lr"], str(args.out))
    before = held_out_esm(module.model.energy, test)
    loader = DataLoader(TensorDataset(torch.arange(len(train))), batch_size=cfg["batch"], shuffle=True)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        max_steps=cfg["steps"],
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        enable_checkpointing=False,
    )
    trainer.fit(module, loader)
    after = held_out_esm(module.model.energy, test)
    w0, w1 = (torch.load(args.out / f"weights_rank{r}.pt") for r in range(2))
    same = bool(torch.equal(w0, w1))
    print(f"Lightning DDP, 2 processes, {cfg['steps']} steps of batch {cfg['batch']} per process")
    print(f"held-out esm loss: before {before:.4f}, after {after:.4f}")
    print(f"replicas equal after training: {same}")
    ksd2, p_value = held_out_ksd(module.model.energy, test[: cfg["ksd_points"]], cfg["ksd_bootstrap"], args.seed)
    print(f"KSD test (held-out, N={cfg['ksd_points']}): KSD^2 {ksd2:.4g}, p-value {p_value:.3f}")
    return {"before": before, "after": after, "replicas_equal": same, "ksd": ksd2, "ksd_p_value": p_value}


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
