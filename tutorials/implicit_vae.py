"""A VAE with an implicit encoder
==============================

Tutorial: a VAE with an implicit encoder on scikit-learn's 8x8 digits, scored by AIS.

Binarized digits (pixel > 8/16), a Bernoulli decoder ``8 -> 128 -> 128 -> 64`` and four
(encoder, loss) pairs, all NumPyro ``SVI`` in a jitted ``lax.scan`` with the same decoder,
optimizer (Adam 1e-3), batch (100) and number of steps:

* Gaussian encoder ``q(z|x) = N(mu(x), diag sigma(x)^2)`` with ``Trace_ELBO``;
* implicit encoder ``z = f([x, eps])``, ``eps ~ N(0, I_8)`` (an MLP; no density), written
  ``numpyro.sample("z", Delta(f(x, eps), event_dim=1))``, trained with
  ``ppl_score.numpyro.implicit.ImplicitELBO`` and

  - a learned score network ``s_psi(z, x)`` of ``q(z|x)`` (context = the guide's input ``x``),
    one SSM-VR step per SVI step, one particle (Song et al. 2019);
  - the Stein estimator across 8 particles per digit (Li & Turner 2018);
  - SSGE across 8 particles per digit (Shi et al. 2018).

Test negative log-likelihood ``-log p(x)`` of held-out digits by annealed importance
sampling from the prior to the posterior (sigmoid schedule of ``T`` temperatures, HMC
transitions of 5 leapfrog steps with a per-chain step size adapted towards 65% acceptance,
``C`` chains per digit, log-mean-exp of the weights), with the same settings for every
model: an estimate (in expectation a lower bound on ``log p(x)``) that does not depend on
the encoder, so it compares the decoders the four losses trained.

    python tutorials/implicit_vae.py            # full run (minutes on CPU)
    python tutorials/implicit_vae.py --smoke    # seconds, for CI
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

LATENT, HIDDEN, NOISE = 8, 128, 8
MODELS = ("Gaussian encoder, Trace_ELBO", "implicit, learned (ssm_vr)", "implicit, Stein", "implicit, SSGE")


def load_binary_digits(seed):
    from sklearn.datasets import load_digits

    x = (load_digits().data > 8).astype(np.float32)
    perm = np.random.default_rng(seed).permutation(len(x))
    return x[perm[:1500]], x[perm[1500:]]


def mlp_init(key, sizes):
    from ppl_score.jax.nets import mlp_init as init

    return init(key, sizes, zero_bias=True)


def mlp(params, h):
    import jax

    from ppl_score.jax.nets import mlp_apply

    return mlp_apply(params, h, jax.nn.elu)


def log_lik(dec, z, x):
    """``log p(x | z)``, Bernoulli, for ``z [..., 8]`` and ``x`` broadcasting to ``[..., 64]``."""
    import jax

    logits = mlp(dec, z)
    return (x * logits - jax.nn.softplus(logits)).sum(-1)


def train(name, x_train, *, steps, batch, particles, seed):
    import jax
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as dist
    import optax

    from ppl_score.jax.estimators import learned_score_estimator
    from ppl_score.numpyro.implicit import ImplicitELBO, score_state

    k_enc, k_dec, k_init, k_run = jax.random.split(jax.random.PRNGKey(seed), 4)
    dec0 = mlp_init(k_dec, (LATENT, HIDDEN, HIDDEN, 64))
    gaussian = name.startswith("Gaussian")
    enc0 = mlp_init(k_enc, (64, HIDDEN, HIDDEN, 2 * LATENT) if gaussian else (64 + NOISE, HIDDEN, HIDDEN, LATENT))
    est = None
    if "learned" in name:
        est = learned_score_estimator(
            LATENT,
            context_dim=64,
            hidden=(256, 256),
            activation=jax.nn.tanh,
            method="ssm_vr",
            optimizer=optax.adam(1e-3),
            n_steps=1,
            projection="gaussian",
        )  # as measured for the README table

    def model(x):
        dec = numpyro.param("dec", dec0)
        with numpyro.plate("data", x.shape[0]):
            z = numpyro.sample("z", dist.Normal(jnp.zeros(LATENT), 1.0).to_event(1))
            numpyro.sample("x", dist.Bernoulli(logits=mlp(dec, z)).to_event(1), obs=x)

    def guide(x):
        if est is not None:
            score_state("z", est)
        enc = numpyro.param("enc", enc0)
        with numpyro.plate("data", x.shape[0]):
            if gaussian:
                out = mlp(enc, x)
                numpyro.sample(
                    "z", dist.Normal(out[..., :LATENT], jax.nn.softplus(out[..., LATENT:]) + 1e-4).to_event(1)
                )
            else:
                eps = jax.random.normal(numpyro.prng_key(), (*x.shape[:-1], NOISE))
                numpyro.sample("z", dist.Delta(mlp(enc, jnp.concatenate([x, eps], -1)), event_dim=1))

    if gaussian:
        loss = numpyro.infer.Trace_ELBO()
    elif est is not None:
        loss = ImplicitELBO(est, context=lambda x: x)
    else:
        loss = ImplicitELBO("stein" if "Stein" in name else "spectral", num_particles=particles)
    svi = numpyro.infer.SVI(model, guide, optax.adam(1e-3), loss)
    x_all = jnp.asarray(x_train)
    state = svi.init(k_init, x_all[:batch])

    @jax.jit
    def run(state, key):
        def body(s, k):
            idx = jax.random.choice(k, x_all.shape[0], (batch,), replace=False)
            return svi.update(s, x_all[idx])

        return jax.lax.scan(body, state, jax.random.split(key, steps))

    state, losses = run(state, k_run)
    return svi.get_params(state)["dec"], np.asarray(losses)


def ais_log_px(dec, x, key, *, temps, chains, leapfrog=5, step0=0.1):
    """AIS estimate of ``log p(x)`` per row of ``x [N, 64]``: prior -> posterior through
    ``log p(z) + beta_t log p(x | z)``, HMC transitions, ``chains`` chains per row."""
    import jax
    import jax.numpy as jnp
    from jax.scipy.special import logsumexp

    n = x.shape[0]
    xb = x[:, None, :]
    t = jnp.linspace(-5.0, 5.0, temps)
    betas = jax.nn.sigmoid(t)
    betas = jnp.concatenate([jnp.zeros(1), (betas - betas[0]) / (betas[-1] - betas[0])])

    def energy(z, beta):  # -log pi_beta(z), per chain
        return 0.5 * (z * z).sum(-1) - beta * log_lik(dec, z, xb)

    grad_e = jax.grad(lambda z, beta: energy(z, beta).sum())

    def hmc(z, step, beta, key):
        k_p, k_u = jax.random.split(key)
        p = jax.random.normal(k_p, z.shape)
        h0 = energy(z, beta) + 0.5 * (p * p).sum(-1)
        s = step[..., None]
        zn, pn = z, p - 0.5 * s * grad_e(z, beta)
        for i in range(leapfrog):
            zn = zn + s * pn
            if i < leapfrog - 1:
                pn = pn - s * grad_e(zn, beta)
        pn = pn - 0.5 * s * grad_e(zn, beta)
        h1 = energy(zn, beta) + 0.5 * (pn * pn).sum(-1)
        accept = jnp.log(jax.random.uniform(k_u, h0.shape)) < (h0 - h1)
        accept = accept & jnp.isfinite(h1)
        z = jnp.where(accept[..., None], zn, z)
        step = step * jnp.where(accept, 1.02, 0.98)  # towards ~65% acceptance
        return z, step

    def body(carry, inp):
        z, logw, step = carry
        b_prev, b, k = inp
        logw = logw + (b - b_prev) * log_lik(dec, z, xb)
        z, step = hmc(z, step, b, k)
        return (z, logw, step), None

    k0, k1 = jax.random.split(key)
    z0 = jax.random.normal(k0, (n, chains, LATENT))
    carry = (z0, jnp.zeros((n, chains)), jnp.full((n, chains), step0))
    keys = jax.random.split(k1, temps)
    (_, logw, _), _ = jax.lax.scan(body, carry, (betas[:-1], betas[1:], keys))
    return logsumexp(logw, axis=1) - jnp.log(chains)


def figure(decs, x_test, path, seed):
    import jax
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    z = jax.random.normal(jax.random.PRNGKey(seed + 7), (48, LATENT))
    fig, axes = plt.subplots(1, len(decs), figsize=(3.0 * len(decs), 3.1))
    for ax, (name, dec) in zip(np.atleast_1d(axes), decs.items()):
        probs = np.asarray(jax.nn.sigmoid(mlp(dec, z))).reshape(-1, 8, 8)
        grid = np.zeros((6 * 9 - 1, 8 * 9 - 1))
        for i, im in enumerate(probs):
            r, c = divmod(i, 8)
            grid[r * 9 : r * 9 + 8, c * 9 : c * 9 + 8] = im
        ax.imshow(grid, cmap="gray_r", vmin=0, vmax=1)
        ax.set_title(f"{name}\n(decoder means of prior draws)", fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a few steps, for CI (seconds)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "figures")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    import jax
    import jax.numpy as jnp

    x_train, x_test = load_binary_digits(args.seed)
    if args.smoke:
        steps, batch, particles, temps, chains, n_test = 30, 50, 4, 20, 2, 32
    else:
        steps, batch, particles, temps, chains, n_test = 8000, 100, 8, 500, 8, len(x_test)
    xt = jnp.asarray(x_test[:n_test])
    ais = jax.jit(lambda dec, key: ais_log_px(dec, xt, key, temps=temps, chains=chains))
    results, decs = {}, {}
    for name in MODELS:
        dec, losses = train(name, x_train, steps=steps, batch=batch, particles=particles, seed=args.seed)
        log_px = np.asarray(ais(dec, jax.random.PRNGKey(args.seed + 1000)))
        decs[name] = dec
        results[name] = {
            "test_nll": float(-log_px.mean()),
            "test_nll_se": float(log_px.std() / np.sqrt(len(log_px))),
            "final_train_loss": float(np.mean(losses[-max(1, steps // 20) :])),
        }
    print(
        f"VAE on binarized 8x8 digits: latent {LATENT}, {steps} Adam steps of batch {batch}; "
        f"kernel estimators with {particles} particles per digit"
    )
    print(
        f"AIS: {temps} temperatures, HMC (5 leapfrog), {chains} chains, {n_test} held-out digits (same for every model)\n"
    )
    print("| encoder / loss | test NLL (nats, AIS) | final training loss |")
    print("|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['test_nll']:.2f} ± {r['test_nll_se']:.2f} | {r['final_train_loss']:.2f} |")
    print(
        "\n(training loss: -ELBO for the Gaussian encoder; for the implicit encoders the negative ELBO "
        "without the encoder's entropy, which they cannot evaluate)"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "implicit_vae.png"
    figure(decs, x_test, path, args.seed)
    with open(args.out / "implicit_vae.json", "w") as f:
        json.dump(results, f, indent=1)
    print(f"\nfigure: {path}")
    return results


if __name__ == "__main__":
    main()
