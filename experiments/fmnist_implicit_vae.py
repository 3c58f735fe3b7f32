"""Implicit-encoder VAEs on Fashion-MNIST: does an SSM-trained implicit encoder beat the
Gaussian-encoder ELBO (Song, Garg, Shi, Ermon, UAI 2019, section 4.2)?

Data: ``experiments/_common.load_images`` (dequantized pixels in ``(0, 1)``). The decoder is
Bernoulli, so the images are binarized: **dynamic binarization** of every training batch
(``x ~ Bernoulli(pixels)``, fresh each step) and **one fixed stochastic binarization** of the
test subset (drawn once from a fixed generator, the same for every model and seed).

Models (Pyro, ``SVI``): the same decoder ``z (8) -> 256 -> 256 -> 784`` (tanh, Bernoulli
logits), prior ``N(0, I_8)``, the same budget (``--steps`` Adam steps at lr 1e-3, batch
``--batch``) and three encoders, all ``784 -> 256 -> 256`` tanh MLPs:

* ``gaussian``: ``q(z|x) = N(mu(x), diag sigma(x)^2)``, Pyro's ``Trace_ELBO``;
* ``implicit_ssm_vr``: ``z = f([x, eps])``, ``eps ~ N(0, I_8)`` (no density), written
  ``pyro.sample("z", Delta(f(x, eps), event_dim=1))`` and trained with
  ``ppl_score.pyro.ImplicitELBO`` whose entropy gradient comes from a learned conditional
  score network ``h_psi(z, x)`` (``LearnedScoreEstimator``, ``[z, x] -> 256 -> 256 -> 8``
  tanh, SSM-VR with one Gaussian projection, Adam) updated on the fresh detached codes of
  every step; one particle, as in the paper;
* ``implicit_stein``: the same encoder and loss with the Stein gradient estimator across
  ``--particles`` codes per image (a kernel estimator needs several particles; the decoder
  then also sees that many codes per image, an advantage in gradient variance).

``--frontend numpyro``: the same three encoders, architectures (``ppl_score.jax.nets``
MLPs with torch's default initialization), data, budget and seeds, trained with NumPyro
``SVI`` (``optax.adam``, the steps in one jitted ``lax.scan``; minibatches and dynamic
binarization drawn from JAX keys): NumPyro's ``Trace_ELBO`` for the Gaussian encoder,
``ppl_score.numpyro.ImplicitELBO`` with a ``learned_score_estimator`` (same network, SSM-VR,
optimizer and steps; state declared with ``score_state``) or ``"stein"`` (``--particles``
codes, ``vmap``) for the implicit ones. The trained weights are then copied into the torch
modules above, so both front ends are scored by the identical torch evaluation below.

Metric: test ``-log p(x)`` by annealed importance sampling (AIS), written here in torch and
vectorized over images and chains: from the prior to the posterior through
``p(z) p(x|z)^beta`` on a sigmoid schedule of ``--ais-temps`` temperatures, one HMC
transition per temperature (``--ais-leapfrog`` leapfrog steps, a per-chain step size adapted
towards 65% acceptance), ``--ais-chains`` chains per image, ``log mean exp`` of the weights:
an estimate of ``log p(x)`` that is a stochastic lower bound and does not involve the
encoder, so it compares the decoders the three objectives trained. Same AIS settings, test
subset and AIS random stream for every model. For the Gaussian encoder the test ELBO, its
reconstruction term and the IWAE bound (``--iwae-k`` samples) are reported as a sanity check
(AIS ``log p(x)`` should lie above the ELBO and near the IWAE bound; with a few hundred
temperatures it is still about half a nat below its limit, see the check below); every encoder's reconstruction term ``E_q log p(x|z)`` is
reported too. ``--seeds`` training seeds per encoder (mean +- standard error over seeds).

Budget (full run: <= 15 min wall, one thread, on a shared 2-core machine): the paper trains
for many epochs on MNIST with thousands of AIS temperatures. Cut here: ``--steps 900`` steps
of batch 100 (1.5 epochs), the score network's ``n_steps`` 2 per SVI step (library default
10; the paper 1), 8 Stein particles, AIS on 64 test images with 4 chains, 300 temperatures
and 4 leapfrog steps (plus, on the first seed, a check of the same AIS with 1000
temperatures on 16 of them). These models are far from converged; the comparison is at a
fixed small budget.

    python experiments/fmnist_implicit_vae.py --json experiments/results/fmnist_implicit_vae.json
    python experiments/fmnist_implicit_vae.py --smoke        # seconds, what the test runs
    python experiments/fmnist_implicit_vae.py --frontend numpyro \
        --json experiments/results/fmnist_implicit_vae_numpyro.json
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402

_common.single_thread()

import numpy as np  # noqa: E402

LATENT, HIDDEN, NOISE, PIXELS = 8, 256, 8, 784
ENCODERS = {
    "gaussian": "Gaussian encoder, Trace_ELBO",
    "implicit_ssm_vr": "implicit encoder, ImplicitELBO + learned score (ssm_vr)",
    "implicit_stein": "implicit encoder, ImplicitELBO + Stein",
}


# ---------------------------------------------------------------------------------------
# networks


def mlp(sizes):
    """Tanh MLP ``sizes[0] -> ... -> sizes[-1]`` (linear output)."""
    import torch.nn as nn

    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


def bernoulli_log_lik(decoder, z, x):
    """``log p(x | z)`` for codes ``z [..., 8]`` and binary ``x`` broadcasting to ``[..., 784]``."""
    import torch.nn.functional as F

    logits = decoder(z)
    return (x * logits - F.softplus(logits)).sum(-1)


# ---------------------------------------------------------------------------------------
# Pyro model, guides, losses


def make_model(decoder):
    import pyro
    import pyro.distributions as dist

    def model(x):
        pyro.module("decoder", decoder)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(LATENT), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=decoder(z), validate_args=False).to_event(1), obs=x)

    return model


def make_guide(kind, encoder):
    import pyro
    import pyro.distributions as dist
    import torch
    import torch.nn.functional as F

    if kind == "gaussian":

        def guide(x):
            pyro.module("encoder", encoder)
            with pyro.plate("data", x.shape[0]):
                loc, raw = encoder(x).split(LATENT, -1)
                pyro.sample("z", dist.Normal(loc, F.softplus(raw) + 1e-4).to_event(1))

        return guide

    def guide(x):
        pyro.module("encoder", encoder)
        with pyro.plate("data", x.shape[0]):
            # the noise is a (masked, log_prob 0) auxiliary site so that it is drawn inside the
            # particle plate of vectorize_particles=True
            eps = pyro.sample(
                "eps",
                dist.Normal(x.new_zeros(NOISE), 1.0).to_event(1).mask(False),
                infer={"is_auxiliary": True},
            )
            xs = x.expand(*eps.shape[:-1], x.shape[-1])
            pyro.sample("z", dist.Delta(encoder(torch.cat([xs, eps], -1)), event_dim=1))

    return guide


def make_loss(kind, *, particles, score_steps, score_lr):
    import torch
    from pyro.infer import Trace_ELBO

    from ppl_score.pyro import ImplicitELBO
    from ppl_score.torch.estimators import LearnedScoreEstimator

    if kind == "gaussian":
        return Trace_ELBO(max_plate_nesting=1), None
    if kind == "implicit_ssm_vr":
        est = LearnedScoreEstimator(
            LATENT,
            context_dim=PIXELS,
            hidden=(HIDDEN, HIDDEN),
            activation=torch.nn.Tanh,
            method="ssm_vr",
            lr=score_lr,
            n_steps=score_steps,
            n_projections=1,
            projection="gaussian",
        )
        return ImplicitELBO(est, sites="z", context=lambda x: x, max_plate_nesting=1), est
    if kind == "implicit_stein":
        loss = ImplicitELBO("stein", sites="z", num_particles=particles, vectorize_particles=True, max_plate_nesting=1)
        return loss, None
    raise ValueError(kind)


def train(kind, x_train, *, steps, batch, seed, lr, particles, score_steps, score_lr):
    """Fit (decoder, encoder) with Pyro SVI; returns them and per-step losses and seconds."""
    import pyro
    import torch
    from pyro.infer import SVI
    from pyro.optim import Adam

    pyro.clear_param_store()
    torch.manual_seed(1000 * seed + 17)
    pyro.set_rng_seed(1000 * seed + 17)
    decoder = mlp((LATENT, HIDDEN, HIDDEN, PIXELS))
    encoder = mlp(
        (PIXELS, HIDDEN, HIDDEN, 2 * LATENT) if kind == "gaussian" else (PIXELS + NOISE, HIDDEN, HIDDEN, LATENT)
    )
    loss, _ = make_loss(kind, particles=particles, score_steps=score_steps, score_lr=score_lr)
    svi = SVI(make_model(decoder), make_guide(kind, encoder), Adam({"lr": lr}), loss)
    gen = torch.Generator().manual_seed(seed)
    losses = np.empty(steps)
    t0 = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(x_train.shape[0], (batch,), generator=gen)
        xb = torch.bernoulli(x_train[idx], generator=gen)  # dynamic binarization
        losses[step] = svi.step(xb) / batch
    seconds = time.perf_counter() - t0
    return decoder.eval(), encoder.eval(), losses, seconds


# ---------------------------------------------------------------------------------------
# NumPyro model, guides, losses (``--frontend numpyro``)

_NUMPYRO_CACHE = {}  # (kind, settings) -> (svi, jitted run, estimator): one compilation per encoder


def _numpyro_svi(kind, *, n_train, steps, batch, lr, particles, score_steps, score_lr):
    """NumPyro ``SVI`` of one encoder and its jitted training loop (``lax.scan`` over
    ``steps`` updates, each on a fresh minibatch, drawn with replacement and dynamically
    binarized inside the loop); built once per encoder and reused across seeds (the seed
    enters only through the initial state and the key)."""
    cache_key = (kind, n_train, steps, batch, lr, particles, score_steps, score_lr)
    if cache_key in _NUMPYRO_CACHE:
        return _NUMPYRO_CACHE[cache_key]
    import jax
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as dist
    import optax

    from ppl_score.jax.estimators import learned_score_estimator
    from ppl_score.jax.nets import mlp_apply
    from ppl_score.numpyro import ImplicitELBO
    from ppl_score.numpyro.implicit import score_state

    def net(params, h):
        return mlp_apply(params, h, jax.nn.tanh)

    est = None
    if kind == "implicit_ssm_vr":
        est = learned_score_estimator(
            LATENT,
            context_dim=PIXELS,
            hidden=(HIDDEN, HIDDEN),
            activation=jax.nn.tanh,
            method="ssm_vr",
            optimizer=optax.adam(score_lr),
            n_steps=score_steps,
            n_projections=1,
            projection="gaussian",
        )

    def model(x):
        dec = numpyro.param("dec", None)  # initial values: SVI.init(init_params=...)
        with numpyro.plate("data", x.shape[0]):
            z = numpyro.sample("z", dist.Normal(jnp.zeros(LATENT), 1.0).to_event(1))
            numpyro.sample("x", dist.Bernoulli(logits=net(dec, z)).to_event(1), obs=x)

    def guide(x):
        if est is not None:
            score_state("z", est)  # the per-seed initial state comes through init_params
        enc = numpyro.param("enc", None)
        with numpyro.plate("data", x.shape[0]):
            if kind == "gaussian":
                loc, raw = jnp.split(net(enc, x), 2, -1)
                numpyro.sample("z", dist.Normal(loc, jax.nn.softplus(raw) + 1e-4).to_event(1))
            else:
                eps = jax.random.normal(numpyro.prng_key(), (*x.shape[:-1], NOISE))
                numpyro.sample("z", dist.Delta(net(enc, jnp.concatenate([x, eps], -1)), event_dim=1))

    if kind == "gaussian":
        loss = numpyro.infer.Trace_ELBO()
    elif kind == "implicit_ssm_vr":
        loss = ImplicitELBO(est, sites="z", context=lambda x: x)
    elif kind == "implicit_stein":
        loss = ImplicitELBO("stein", sites="z", num_particles=particles)
    else:
        raise ValueError(kind)
    svi = numpyro.infer.SVI(model, guide, optax.adam(lr), loss)
    dec_sizes = (LATENT, HIDDEN, HIDDEN, PIXELS)
    enc_sizes = (PIXELS, HIDDEN, HIDDEN, 2 * LATENT) if kind == "gaussian" else (PIXELS + NOISE, HIDDEN, HIDDEN, LATENT)

    @jax.jit
    def run(state, x_all, key):
        def body(s, k):
            k_idx, k_bin = jax.random.split(k)
            idx = jax.random.randint(k_idx, (batch,), 0, x_all.shape[0])
            xb = jax.random.bernoulli(k_bin, x_all[idx]).astype(x_all.dtype)  # dynamic binarization
            return svi.update(s, xb)

        return jax.lax.scan(body, state, jax.random.split(key, steps))

    entry = {"svi": svi, "run": run, "est": est, "sizes": (dec_sizes, enc_sizes), "compiled": None}
    _NUMPYRO_CACHE[cache_key] = entry
    return entry


def _to_torch(params, sizes):
    """A torch ``mlp(sizes)`` holding the weights of the JAX MLP ``params`` (``[(W [in, out], b)]``)."""
    import torch

    module = mlp(sizes)
    linears = [m for m in module if isinstance(m, torch.nn.Linear)]
    assert len(linears) == len(params)
    with torch.no_grad():
        for lin, (w, b) in zip(linears, params):
            lin.weight.copy_(torch.from_numpy(np.array(w, dtype=np.float32).T))
            lin.bias.copy_(torch.from_numpy(np.array(b, dtype=np.float32)))
    return module.eval()


def train_numpyro(kind, x_train, *, steps, batch, seed, lr, particles, score_steps, score_lr):
    """Fit (decoder, encoder) with NumPyro SVI (optax Adam, jitted ``lax.scan``) and copy
    them into the torch modules of ``train`` (same architecture), so that the evaluation is
    the identical torch code; returns them, per-step losses and seconds (compilation
    excluded; it is reported separately)."""
    import jax
    import jax.numpy as jnp

    from ppl_score.jax.nets import mlp_init
    from ppl_score.numpyro.implicit import score_state_name

    entry = _numpyro_svi(
        kind,
        n_train=x_train.shape[0],
        steps=steps,
        batch=batch,
        lr=lr,
        particles=particles,
        score_steps=score_steps,
        score_lr=score_lr,
    )
    dec_sizes, enc_sizes = entry["sizes"]
    svi, est = entry["svi"], entry["est"]
    k_dec, k_enc, k_est, k_init, k_run = jax.random.split(jax.random.PRNGKey(1000 * seed + 17), 5)
    init = {"dec": mlp_init(k_dec, dec_sizes), "enc": mlp_init(k_enc, enc_sizes)}  # torch's default init
    if est is not None:
        init[score_state_name("z")] = est.init(k_est)
    x_all = jnp.asarray(x_train.numpy() if hasattr(x_train, "numpy") else x_train)
    x0 = jax.random.bernoulli(k_init, x_all[:batch]).astype(x_all.dtype)
    state = svi.init(k_init, x0, init_params=init)
    compile_seconds = 0.0
    if entry["compiled"] is None:  # the first seed of this encoder
        t0 = time.perf_counter()
        entry["compiled"] = entry["run"].lower(state, x_all, k_run).compile()
        compile_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    state, losses = entry["compiled"](state, x_all, k_run)
    losses = np.asarray(jax.block_until_ready(losses)) / batch
    seconds = time.perf_counter() - t0
    params = svi.get_params(state)
    return _to_torch(params["dec"], dec_sizes), _to_torch(params["enc"], enc_sizes), losses, seconds, compile_seconds


# ---------------------------------------------------------------------------------------
# evaluation


def ais_log_px(
    log_lik,
    x,
    *,
    latent_dim,
    chains,
    temps,
    leapfrog=4,
    step_size=0.1,
    target_accept=0.65,
    adapt_rate=0.05,
    generator=None,
):
    """AIS estimate of ``log p(x) = log E_{N(z; 0, I)} p(x | z)`` per row of ``x [N, ...]``.

    Annealing from the prior ``N(0, I_latent_dim)`` to the posterior through
    ``pi_beta(z) ~ N(z; 0, I) p(x | z)^beta`` on a sigmoid schedule of ``temps`` values of beta
    (0 to 1), one HMC transition (``leapfrog`` steps, per-chain step size adapted towards
    ``target_accept``: multiplied by ``exp(adapt_rate (accepted - target_accept))`` after
    each transition) per intermediate temperature, ``chains`` independent chains per row,
    everything batched as ``[N, chains, latent_dim]``.

    Args:
        log_lik: ``log_lik(z [N, C, D], x [N, 1, ...]) -> [N, C]``, differentiable in ``z``.
        x: the data, ``[N, ...]``.

    Returns:
        ``(log_px [N], acceptance_rate)``: ``log mean_c exp(log w_c)`` and the mean HMC
        acceptance rate.
    """
    import torch

    n = x.shape[0]
    xb = x[:, None]
    t = torch.linspace(-5.0, 5.0, temps, dtype=torch.float64)
    s = torch.sigmoid(t)
    betas = ((s - s[0]) / (s[-1] - s[0])).tolist()

    def ll_and_grad(z):
        with torch.enable_grad():
            z = z.detach().requires_grad_(True)
            ll = log_lik(z, xb)
            (g,) = torch.autograd.grad(ll.sum(), z)
        return ll.detach(), g

    z = torch.randn(n, chains, latent_dim, generator=generator, dtype=x.dtype)
    ll, g = ll_and_grad(z)
    logw = torch.zeros(n, chains, dtype=torch.float64)
    step = torch.full((n, chains, 1), step_size, dtype=x.dtype)
    accepted = 0.0
    for i in range(1, temps):
        beta = betas[i]
        logw += (beta - betas[i - 1]) * ll.double()
        if i == temps - 1:
            break  # the last weight uses the state after the previous transition
        p = torch.randn(z.shape, generator=generator, dtype=x.dtype)
        h0 = 0.5 * (z * z).sum(-1) - beta * ll + 0.5 * (p * p).sum(-1)
        zn, lln, gn = z, ll, g
        pn = p - 0.5 * step * (zn - beta * gn)
        for k in range(leapfrog):
            zn = zn + step * pn
            lln, gn = ll_and_grad(zn)
            grad_u = zn - beta * gn
            pn = pn - (step if k < leapfrog - 1 else 0.5 * step) * grad_u
        h1 = 0.5 * (zn * zn).sum(-1) - beta * lln + 0.5 * (pn * pn).sum(-1)
        u = torch.rand(h0.shape, generator=generator, dtype=x.dtype)
        accept = (torch.log(u) < h0 - h1) & torch.isfinite(h1)
        z = torch.where(accept[..., None], zn, z)
        ll = torch.where(accept, lln, ll)
        g = torch.where(accept[..., None], gn, g)
        a = accept.to(x.dtype)
        step = step * torch.exp(adapt_rate * (a - target_accept))[..., None]
        accepted += float(a.mean())
    log_px = torch.logsumexp(logw, 1) - math.log(chains)
    return log_px, accepted / max(1, temps - 2)


def gaussian_bounds(decoder, encoder, x, *, k, generator):
    """Per image: ELBO, its reconstruction term (``E_q log p(x|z)``, 1 sample each averaged
    over ``k``) and the IWAE bound with ``k`` samples, for the Gaussian encoder."""
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        loc, raw = encoder(x).split(LATENT, -1)
        scale = F.softplus(raw) + 1e-4
        eps = torch.randn(x.shape[0], k, LATENT, generator=generator)
        z = loc[:, None] + scale[:, None] * eps
        ll = bernoulli_log_lik(decoder, z, x[:, None])  # [N, k]
        log_prior = -0.5 * (z * z).sum(-1) - 0.5 * LATENT * math.log(2 * math.pi)
        log_q = -0.5 * (eps * eps).sum(-1) - scale.log().sum(-1)[:, None] - 0.5 * LATENT * math.log(2 * math.pi)
        logw = ll + log_prior - log_q
        return logw.mean(1), ll.mean(1), torch.logsumexp(logw, 1) - math.log(k)


def implicit_codes(encoder, x, k, generator):
    import torch

    with torch.no_grad():
        eps = torch.randn(x.shape[0], k, NOISE, generator=generator)
        return encoder(torch.cat([x[:, None].expand(-1, k, -1), eps], -1))


def evaluate(kind, decoder, encoder, x_test, *, ais, k, seed, check_temps=0, check_images=25):
    """Test metrics of one trained model (per-image arrays and means)."""
    import torch

    for p in decoder.parameters():
        p.requires_grad_(False)
    out = {}
    gen = torch.Generator().manual_seed(10_000 + seed)
    if kind == "gaussian":
        elbo, recon, iwae = gaussian_bounds(decoder, encoder, x_test, k=k, generator=gen)
        out.update(elbo=float(elbo.mean()), iwae=float(iwae.mean()), recon=float(recon.mean()))
    else:
        with torch.no_grad():
            z = implicit_codes(encoder, x_test, 8, gen)
            out["recon"] = float(bernoulli_log_lik(decoder, z, x_test[:, None]).mean())
            out["code_sd"] = float(z.std(1).mean())  # spread of q(z|x) across noise draws
    t0 = time.perf_counter()
    ais_gen = torch.Generator().manual_seed(20_000 + seed)  # the same stream for every encoder
    log_px, acc = ais_log_px(
        lambda z, xb: bernoulli_log_lik(decoder, z, xb), x_test, latent_dim=LATENT, generator=ais_gen, **ais
    )
    out["ais_seconds"] = time.perf_counter() - t0
    out["ais_accept"] = acc
    out["nll"] = float(-log_px.mean())
    out["nll_se_images"] = float(log_px.std() / math.sqrt(len(log_px)))
    out["nll_per_image"] = (-log_px).tolist()
    if check_temps:
        # AIS convergence check: the first test images again, with many more temperatures
        xc = x_test[:check_images]
        log_long, _ = ais_log_px(
            lambda z, xb: bernoulli_log_lik(decoder, z, xb),
            xc,
            latent_dim=LATENT,
            generator=torch.Generator().manual_seed(30_000 + seed),
            **{**ais, "temps": check_temps},
        )
        out["ais_check"] = {
            "images": len(xc),
            "temps": check_temps,
            "nll_long": float(-log_long.mean()),
            "nll_short": float(-log_px[: len(xc)].mean()),
        }
    return out


# ---------------------------------------------------------------------------------------
# figure


def figure(models, x_test, summary, path):
    import matplotlib

    if matplotlib.get_backend().lower() not in ("agg", "pdf", "svg"):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    n_show = 8
    xs = x_test[:n_show]
    z_prior = torch.randn(2 * n_show, LATENT, generator=torch.Generator().manual_seed(7))
    fig, axes = plt.subplots(1, len(models) + 1, figsize=(3.3 * (len(models) + 1), 3.3))
    for ax, (kind, (decoder, encoder)) in zip(axes, models.items()):
        gen = torch.Generator().manual_seed(3)
        with torch.no_grad():
            if kind == "gaussian":
                z = encoder(xs).split(LATENT, -1)[0]
            else:
                z = implicit_codes(encoder, xs, 1, gen)[:, 0]
            recon = torch.sigmoid(decoder(z))
            samples = torch.sigmoid(decoder(z_prior))
        rows = [xs, recon, samples[:n_show], samples[n_show:]]
        grid = np.ones((4 * 29 - 1, n_show * 29 - 1))
        for r, row in enumerate(rows):
            for c, im in enumerate(row.numpy().reshape(-1, 28, 28)):
                grid[r * 29 : r * 29 + 28, c * 29 : c * 29 + 28] = im
        ax.imshow(grid, cmap="gray_r", vmin=0, vmax=1)
        ax.set_title(f"{kind}\n(test, reconstruction, 2 rows of prior samples)", fontsize=7)
        ax.axis("off")
    ax = axes[-1]
    names = list(summary)
    means = [summary[n]["nll_mean"] for n in names]
    ses = [summary[n]["nll_se"] if math.isfinite(summary[n]["nll_se"]) else 0.0 for n in names]
    ax.bar(range(len(names)), means, yerr=ses, capsize=4, color=["0.5", "C0", "C1"][: len(names)])
    lo = min(means) - 3 * max(max(ses), 1.0)
    ax.set_ylim(lo, max(means) + 3 * max(max(ses), 1.0))
    ax.set_xticks(range(len(names)), [n.replace("implicit_", "impl.\n") for n in names], fontsize=7)
    ax.set_ylabel("test NLL (nats, AIS), mean +- s.e. over seeds")
    ax.set_title("Fashion-MNIST, z_dim 8", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------


def mean_se(values):
    v = np.asarray(values, dtype=float)
    se = float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else float("nan")
    return float(v.mean()), se


def main(argv=None) -> dict:
    parser = _common.make_parser(__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=None, help="training seeds per encoder (default 3; smoke 2)")
    parser.add_argument("--steps", type=int, default=None, help="SVI steps (default 900; smoke 4)")
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--particles", type=int, default=8, help="Stein particles per image")
    parser.add_argument("--score-steps", type=int, default=2, help="score-network Adam steps per SVI step")
    parser.add_argument("--score-lr", type=float, default=3e-3)
    parser.add_argument("--n-test", type=int, default=None, help="test images for AIS (default 64)")
    parser.add_argument("--ais-temps", type=int, default=None, help="AIS temperatures (default 300)")
    parser.add_argument("--ais-chains", type=int, default=None, help="AIS chains per image (default 4)")
    parser.add_argument("--ais-leapfrog", type=int, default=4)
    parser.add_argument(
        "--ais-check-temps", type=int, default=None, help="AIS check on the first seed, first 16 images (default 1000)"
    )
    parser.add_argument("--iwae-k", type=int, default=None, help="IWAE samples, Gaussian encoder (default 1000)")
    parser.add_argument(
        "--encoders", default=",".join(ENCODERS), help="comma-separated subset of " + ",".join(ENCODERS)
    )
    parser.add_argument(
        "--frontend",
        choices=("pyro", "numpyro"),
        default="pyro",
        help="train with Pyro (torch) or NumPyro (JAX; weights copied to torch for the same AIS)",
    )
    args = parser.parse_args(argv)
    t_start = time.perf_counter()

    import torch

    smoke = args.smoke
    seeds = args.seeds or (2 if smoke else 3)
    steps = args.steps or (4 if smoke else 900)
    n_test = args.n_test or (16 if smoke else 64)
    ais = {
        "temps": args.ais_temps or (10 if smoke else 300),
        "chains": args.ais_chains or (2 if smoke else 4),
        "leapfrog": 2 if smoke else args.ais_leapfrog,
    }
    k = args.iwae_k or (16 if smoke else 1000)
    check_temps = args.ais_check_temps if args.ais_check_temps is not None else (20 if smoke else 1000)
    particles = 4 if smoke else args.particles
    batch = 32 if smoke else args.batch
    encoders = [e.strip() for e in args.encoders.split(",") if e.strip()]
    for e in encoders:
        if e not in ENCODERS:
            parser.error(f"unknown encoder {e!r}")

    train_np, test_np = _common.load_images(64 if smoke else None, n_test, seed=args.seed, path=args.data)
    x_train = torch.as_tensor(train_np)
    # one fixed binarization of the test subset, shared by every model and seed
    x_test = torch.bernoulli(torch.as_tensor(test_np), generator=torch.Generator().manual_seed(12345))
    print(
        f"Fashion-MNIST: {len(x_train)} training images (dynamic binarization), {len(x_test)} test images "
        f"(fixed binarization); {steps} steps of batch {batch}, {seeds} seeds, {args.frontend}",
        flush=True,
    )

    runs = {e: [] for e in encoders}
    shown = {}
    for seed in range(args.seed, args.seed + seeds):
        for kind in encoders:
            compile_seconds = None
            fit = dict(
                steps=steps,
                batch=batch,
                seed=seed,
                lr=args.lr,
                particles=particles,
                score_steps=args.score_steps,
                score_lr=args.score_lr,
            )
            if args.frontend == "pyro":
                decoder, encoder, losses, seconds = train(kind, x_train, **fit)
            else:
                decoder, encoder, losses, seconds, compile_seconds = train_numpyro(kind, x_train, **fit)
            res = evaluate(
                kind,
                decoder,
                encoder,
                x_test,
                ais=ais,
                k=k,
                seed=seed,
                check_temps=check_temps if seed == args.seed else 0,
                check_images=min(16, n_test),
            )
            res.update(
                seed=seed,
                train_seconds=seconds,
                ms_per_step=1000 * seconds / steps,
                final_train_loss=float(np.mean(losses[-max(1, steps // 20) :])),
            )
            if compile_seconds is not None:
                res["compile_seconds"] = compile_seconds
            runs[kind].append(res)
            if seed == args.seed:
                shown[kind] = (decoder, encoder)
            if "ais_check" in res:
                c = res["ais_check"]
                print(
                    f"  AIS check, first {c['images']} images: NLL {c['nll_short']:.2f} ({ais['temps']} temps) "
                    f"vs {c['nll_long']:.2f} ({c['temps']} temps)",
                    flush=True,
                )
            extra = f" -ELBO {-res['elbo']:.2f} -IWAE {-res['iwae']:.2f}" if kind == "gaussian" else ""
            print(
                f"seed {seed} {kind:16s} NLL {res['nll']:.2f} (+-{res['nll_se_images']:.2f} over images){extra} "
                f"recon {res['recon']:.2f} | train {seconds:.1f}s ({res['ms_per_step']:.1f} ms/step), "
                f"AIS {res['ais_seconds']:.1f}s acc {res['ais_accept']:.2f}"
                + (f", jit compile {compile_seconds:.1f}s" if compile_seconds else ""),
                flush=True,
            )

    summary = {}
    for kind, rs in runs.items():
        s = {"label": ENCODERS[kind], "seeds": [r["seed"] for r in rs]}
        for key in ("nll", "recon", "elbo", "iwae", "ms_per_step", "final_train_loss", "code_sd"):
            if key in rs[0]:
                s[key + "_mean"], s[key + "_se"] = mean_se([r[key] for r in rs])
        summary[kind] = s

    def pm(s, key):
        if key + "_mean" not in s:
            return "-"
        se = s[key + "_se"]
        return f"{s[key + '_mean']:.2f} ± {se:.2f}" if math.isfinite(se) else f"{s[key + '_mean']:.2f}"

    headers = [
        "encoder / loss",
        "test NLL (AIS, nats)",
        "test -ELBO",
        "test -IWAE",
        "test recon E_q log p(x|z)",
        "ms/step",
    ]
    rows = []
    for kind, s in summary.items():
        neg = {kk: {"m": -s[kk + "_mean"], "e": s[kk + "_se"]} for kk in ("elbo", "iwae") if kk + "_mean" in s}
        cells = [
            s["label"],
            pm(s, "nll"),
            f"{neg['elbo']['m']:.2f} ± {neg['elbo']['e']:.2f}" if "elbo" in neg else "-",
            f"{neg['iwae']['m']:.2f} ± {neg['iwae']['e']:.2f}" if "iwae" in neg else "-",
            pm(s, "recon"),
            f"{s['ms_per_step_mean']:.1f}",
        ]
        rows.append(cells)
    table = _common.markdown_table(headers, rows)
    wall = time.perf_counter() - t_start
    print(
        f"\nAIS: {ais['temps']} temperatures (sigmoid schedule), HMC with {ais['leapfrog']} leapfrog steps, "
        f"{ais['chains']} chains, {n_test} fixed-binarized test images; IWAE k = {k}. "
        f"Mean ± s.e. over {seeds} seeds.\n"
    )
    print(table)
    print(f"\nwall time {wall:.0f} s")

    suffix = "" if args.frontend == "pyro" else "_numpyro"
    fig_path = Path(args.figures) / f"fmnist_implicit_vae{suffix}.png"
    figure(shown, x_test, summary, fig_path)
    print(f"figure: {fig_path}")
    result = {
        "experiment": "fmnist_implicit_vae",
        "config": {
            "smoke": smoke,
            "seeds": seeds,
            "steps": steps,
            "batch": batch,
            "lr": args.lr,
            "optimizer": "Adam" if args.frontend == "pyro" else "optax.adam",
            "latent": LATENT,
            "hidden": HIDDEN,
            "noise": NOISE,
            "stein_particles": particles,
            "score_steps": args.score_steps,
            "score_lr": args.score_lr,
            "n_train": len(x_train),
            "n_test": n_test,
            "ais": ais,
            "iwae_k": k,
            "binarization": "dynamic (train batches), fixed stochastic (test subset, seed 12345)",
            "frontend": args.frontend,
        },
        "summary": summary,
        "runs": runs,
        "table": table,
        "ais_check": {kind: rs[0].get("ais_check") for kind, rs in runs.items()},
        "wall_seconds": wall,
        "figure": str(fig_path),
        "meta": _common.environment_meta(),
    }
    _common.write_json_object(args.json, result)
    return result


if __name__ == "__main__":
    main()
