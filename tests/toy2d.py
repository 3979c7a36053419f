"""YOSO on 2-D mixtures of Gaussians: data, small time-conditioned MLPs, metrics, baselines, the study.

Imported by tests/test_toy2d.py and by notebooks/01_yoso_in_2d.ipynb; the method itself is yoso.py
(this file only builds the toy around it). Run the study of the notebook in the background with

    nohup python tests/toy2d.py --study notebooks/results --steps 15000 --datasets ring8 \
          > notebooks/results/study_ring8.log 2>&1 &          (and the same with grid25)

which writes notebooks/results/study_<dataset>.json (~35 min wall for both on 2 shared CPU cores).

Sections
    1. Data: 8 Gaussians on a ring, 25 Gaussians on a 5x5 grid
    2. Networks: G(x_t, t) and D(x, t) as small MLPs on 2-D points
    3. Metrics: sliced Wasserstein distance, modes covered, share of high-quality samples
    4. Training: YOSO (yoso.train_step) and the three baselines of Sec. 3 of the method doc
    5. The study: every method x dataset x seed, one JSON + PNGs
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import yoso  # noqa: E402

Tensor = torch.Tensor


# ==================================================================================================
# 1. Data
# ==================================================================================================

@dataclass(frozen=True)
class Mixture:
    """Equal-weight mixture of isotropic Gaussians N(mode_k, std² I) in 2-D."""
    name: str
    modes: Tensor          # (K, 2)
    std: float

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        k = torch.randint(0, len(self.modes), (n,), generator=generator)
        return self.modes[k] + self.std * torch.randn(n, 2, generator=generator)   # (n, 2)


def ring8(radius: float = 1.0, std: float = 0.05) -> Mixture:
    """8 Gaussians evenly on a circle; neighbours 2r·sin(π/8) = 0.77 r apart, so 3 std = 0.15 is well inside."""
    a = torch.arange(8) * (2 * math.pi / 8)
    return Mixture("ring8", radius * torch.stack([a.cos(), a.sin()], 1), std)


def grid25(spacing: float = 0.5, std: float = 0.05) -> Mixture:
    """25 Gaussians on a 5x5 grid in [-1, 1]²; neighbours 0.5 apart, 3 std = 0.15."""
    g = (torch.arange(5) - 2) * spacing
    return Mixture("grid25", torch.cartesian_prod(g, g).float(), std)


DATASETS = {"ring8": ring8, "grid25": grid25}


# ==================================================================================================
# 2. Networks: G(x_t, t, cond) -> (B, 2) and D(x, t, cond) -> (B,), the calls yoso.py expects
# ==================================================================================================

class TimeMLP(nn.Module):
    """[x, emb(t)] → (Linear → SiLU) × depth → Linear(out). emb = sinusoidal(t) → Linear → SiLU."""

    def __init__(self, out_dim: int, hidden: int = 128, depth: int = 3, emb_dim: int = 32):
        super().__init__()
        self.emb_dim = emb_dim
        self.t_proj = nn.Sequential(nn.Linear(emb_dim, emb_dim), nn.SiLU())
        layers, d = [], 2 + emb_dim
        for _ in range(depth):
            layers += [nn.Linear(d, hidden), nn.SiLU()]
            d = hidden
        self.net = nn.Sequential(*layers, nn.Linear(d, out_dim))

    def forward(self, x: Tensor, t: Tensor, cond=None) -> Tensor:
        emb = self.t_proj(yoso.timestep_embedding(t, self.emb_dim))       # (B, emb_dim)
        return self.net(torch.cat([x, emb], 1))


class ToyG(TimeMLP):
    """The generator network: its output is ε, v or x_0 (cfg.prediction_type); predict_x0 reads it."""

    def __init__(self, hidden: int = 128, depth: int = 3):
        super().__init__(2, hidden, depth)


class ToyD(TimeMLP):
    """The discriminator: one logit per 2-D point, conditioned on the step t it judges."""

    def __init__(self, hidden: int = 128, depth: int = 3):
        super().__init__(1, hidden, depth)

    def forward(self, x: Tensor, t: Tensor, cond=None) -> Tensor:
        return super().forward(x, t, cond).squeeze(1)                     # (B,)


# ==================================================================================================
# 3. Metrics
# ==================================================================================================

def sliced_wasserstein(a: Tensor, b: Tensor, n_proj: int = 256, seed: int = 0) -> float:
    """Sliced 1-Wasserstein distance: mean over random directions of W1 between the 1-D projections.

    a, b: (n, 2) with the same n. Fixed directions (seeded) so numbers compare across runs.
    """
    g = torch.Generator().manual_seed(seed)
    dirs = F.normalize(torch.randn(2, n_proj, generator=g), dim=0)      # (2, n_proj)
    pa, _ = (a.float() @ dirs).sort(0)
    pb, _ = (b.float() @ dirs).sort(0)
    return float((pa - pb).abs().mean())


def mode_stats(x: Tensor, data: Mixture, n_std: float = 3.0, min_share: float = 0.0) -> dict:
    """Nearest-mode statistics of samples x (n, 2).

    high_quality: share of samples within n_std·std of their nearest mode.
    shares:       per mode, share of ALL samples that are high-quality and nearest to it.
    modes:        number of modes whose share exceeds min_share (a mode is "covered").
    """
    dist = torch.cdist(x.float(), data.modes)                           # (n, K)
    d_min, nearest = dist.min(1)
    good = d_min < n_std * data.std
    shares = torch.bincount(nearest[good], minlength=len(data.modes)).float() / len(x)
    return dict(high_quality=float(good.float().mean()), modes=int((shares > min_share).sum()),
                shares=shares.tolist())


def evaluate(G: nn.Module, data: Mixture, sched: yoso.NoiseSchedule, cfg: yoso.YOSOConfig,
             n: int = 4000, seed: int = 1234) -> dict:
    """One-step samples from a FIXED noise batch, their SWD to fresh data and their mode statistics."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, 2, generator=g)
    x = yoso.sample(G, noise, sched=sched, cfg=cfg)
    real = data.sample(n, generator=g)
    return dict(swd=sliced_wasserstein(x, real), **mode_stats(x, data, min_share=0.1 / len(data.modes)),
                samples=x)


# ==================================================================================================
# 4. Training: YOSO and the baselines (Sec. 3 of the method doc: (a) GAN on real data,
#    (b) UFOGen-style adversarial matching of noised data, (c) the reconstruction term alone)
# ==================================================================================================

def toy_config(**overrides) -> yoso.YOSOConfig:
    """The 2-D toy's deltas from the paper's settings, and why (see also tests/test_toy2d.py).

    zero_terminal_snr: one-step sampling starts from pure N(0, I), the natural prior from scratch;
                       with v-prediction x̂_0 = −v̂ at t = T−1, so high noise is a direct prediction.
    lambda_rec 0.01:   the official 0.5 pulls G(x_t) toward the posterior mean (a blur) at low-mid
                       noise, and on 2-D data that blur is what the adversarial term must undo mode by
                       mode; 50x less lets quality flow down the chain in a few thousand steps (real
                       data still enters through D's "real" samples, which are ≈ x_0 for t < k_D).
    k_C 100:           the consistency target sits 100 steps lower instead of 25, so sharpness needs
                       10 hops instead of 40 to reach t = T−1 (measured: lower SWD, fewer thin modes).
    lr 1e-3:           small MLPs from scratch (the official 2e-5 is for LoRA fine-tuning).
    ema_decay 0.99:    runs are a few thousand steps, so a 100-step EMA horizon.
    weight_decay 0:    the study was measured without it (the released code's 1e-2 is yoso's default); on
                       ~10k-parameter MLPs at lr 1e-3 it shrinks the weights enough to thin the outer modes.
    """
    base = dict(zero_terminal_snr=True, lambda_rec=0.01, k_C=100, lr=1e-3, ema_decay=0.99, weight_decay=0.0)
    base.update(overrides)
    return yoso.YOSOConfig(**base)


def rec_step(G, opt_G, x0, *, sched, cfg) -> dict:
    """Baseline (c): the reconstruction term alone, w_rec(t)·‖G(x_t, t) − x_0‖² — plain x_0 regression.

    Its minimiser is the posterior mean E[x_0 | x_t], which at t = T−1 (no signal) is the data mean.
    """
    t = torch.randint(0, cfg.T, (x0.shape[0],), device=x0.device)
    x_t = sched.add_noise(x0, torch.randn_like(x0), t)
    x0_hat = yoso.predict_x0(G, x_t, t, None, sched, cfg)
    loss = yoso.weighted_mse(x0_hat, x0, yoso.reconstruction_weight(t, sched, cfg.gamma)).mean()
    opt_G.zero_grad(set_to_none=True)
    loss.backward()
    yoso.optimizer_step(opt_G, G.parameters(), None, max_norm=cfg.grad_clip)
    return dict(L_rec=float(loss.detach()))


def gan_step(G, D, opt_G, opt_D, x0, *, sched, cfg, noised: bool) -> dict:
    """Baselines (a) and (b), with YOSO's loss functions, optimisers and clipping.

    noised=False, (a) a GAN against real data: fake = G(z, T−1) from z ~ N(0, I), real = x_0,
                  both scored by D at T−1. No reconstruction term (there is no paired x_0).
    noised=True,  (b) UFOGen-style: x̂ = G(x_t, t) from noised real data at a random t; D compares
                  q(x_s | x_0) with q(x_s | x̂) at s = max(t − k_D, 0), fresh noise each, plus
                  YOSO's λ_rec·w_rec(t)·‖x̂ − x_0‖² (UFOGen keeps a reconstruction term too).
    """
    B = x0.shape[0]
    if noised:
        t = torch.randint(0, cfg.T, (B,), device=x0.device)
        s, _ = yoso.noise_levels(t, cfg)
        x_t = sched.add_noise(x0, torch.randn_like(x0), t)
        renoise = lambda x: sched.add_noise(x, torch.randn_like(x), s)
    else:
        t = s = torch.full((B,), cfg.T - 1, dtype=torch.long)
        x_t = torch.randn_like(x0)                              # ᾱ_{T−1} = 0: x_{T−1} is pure noise
        renoise = lambda x: x
    x0_hat = yoso.predict_x0(G, x_t, t, None, sched, cfg)
    # D step
    logits = D(torch.cat([renoise(x0), renoise(x0_hat.detach())]), torch.cat([s, s]))
    loss_D = yoso.discriminator_loss(logits[:B], logits[B:]).mean()
    opt_D.zero_grad(set_to_none=True)
    loss_D.backward()
    yoso.optimizer_step(opt_D, D.parameters(), None, max_norm=None)
    # G step, D frozen so its parameters collect no gradient
    D.requires_grad_(False)
    L_adv = yoso.logistic_loss(D(renoise(x0_hat), s), real=True).mean()   # softplus(−D(x̂))
    L_rec = yoso.weighted_mse(x0_hat, x0, yoso.reconstruction_weight(t, sched, cfg.gamma)).mean() if noised else 0 * L_adv
    loss_G = L_adv + cfg.lambda_rec * L_rec
    opt_G.zero_grad(set_to_none=True)
    loss_G.backward()
    yoso.optimizer_step(opt_G, G.parameters(), None, max_norm=cfg.grad_clip)
    D.requires_grad_(True)
    return dict(loss_D=float(loss_D.detach()), L_adv=float(L_adv.detach()), L_rec=float(L_rec.detach()))


METHODS = ("yoso", "gan", "ufogen", "rec")


def train(method: str, data: Mixture, cfg: yoso.YOSOConfig, *, steps: int, batch: int = 256, seed: int = 0,
          eval_every: int = 0, hidden: int = 128, log=None) -> dict:
    """Train one method from a seeded init; returns G, G_ema and a curve of (step, swd, hq, modes) of G_ema."""
    torch.manual_seed(seed)
    G, D = ToyG(hidden), ToyD(hidden)
    G_ema = copy.deepcopy(G).requires_grad_(False)
    opt_G, opt_D = yoso.make_optimizers(G, D, cfg)
    sched = yoso.NoiseSchedule.from_config(cfg)
    data_gen = torch.Generator().manual_seed(10_000 + seed)
    curve, t0 = [], time.time()
    for step in range(1, steps + 1):
        x0 = data.sample(batch, generator=data_gen)
        if method == "yoso":
            stats = yoso.train_step(G, D, opt_G, opt_D, x0, sched=sched, cfg=cfg)
        elif method == "rec":
            stats = rec_step(G, opt_G, x0, sched=sched, cfg=cfg)
        elif method in ("gan", "ufogen"):
            stats = gan_step(G, D, opt_G, opt_D, x0, sched=sched, cfg=cfg, noised=method == "ufogen")
        else:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        yoso.ema_update(G_ema, G, cfg.ema_decay)
        if eval_every and (step % eval_every == 0 or step == steps):
            ev = evaluate(G_ema, data, sched, cfg, n=2000)
            curve.append(dict(step=step, swd=ev["swd"], high_quality=ev["high_quality"], modes=ev["modes"],
                              **{k: v for k, v in stats.items() if k in ("loss_D", "L_adv", "L_rec", "L_con")}))
            if log:
                log(f"{method:6s} {data.name} seed {seed} step {step:6d} swd {ev['swd']:.3f} "
                    f"hq {ev['high_quality']:.2f} modes {ev['modes']} ({time.time() - t0:.0f}s)")
    return dict(G=G, G_ema=G_ema, D=D, sched=sched, curve=curve, seconds=time.time() - t0)


# ==================================================================================================
# 5. The study: YOSO vs (a) GAN on real data, (b) UFOGen-style, (c) reconstruction only
# ==================================================================================================

def run_study(out_dir: str, steps: int = 10_000, seeds=(0, 1, 2), datasets=("ring8", "grid25"),
              methods=METHODS, eval_every: int = 500) -> dict:
    """Every method x dataset x seed with the same nets, optimisers and budget; writes
    out_dir/study_<datasets>.json (rewritten after each run): final metrics of G_ema on 4000 one-step
    samples, the training curve, and 1000 of the samples for plots."""
    os.makedirs(out_dir, exist_ok=True)
    cfg = toy_config()
    results = dict(config=dataclasses.asdict(cfg), steps=steps, batch=256, seeds=list(seeds), runs=[])
    log = lambda msg: print(msg, flush=True)
    for name in datasets:
        data = DATASETS[name]()
        for method in methods:
            for seed in seeds:
                run = train(method, data, cfg, steps=steps, seed=seed, eval_every=eval_every, log=log)
                ev = evaluate(run["G_ema"], data, run["sched"], cfg)
                results["runs"].append(dict(dataset=name, method=method, seed=seed, seconds=run["seconds"],
                                            swd=ev["swd"], high_quality=ev["high_quality"], modes=ev["modes"],
                                            shares=ev["shares"], curve=run["curve"],
                                            samples=ev["samples"][:1000].round(decimals=4).tolist()))
                with open(os.path.join(out_dir, f"study_{'_'.join(datasets)}.json"), "w") as f:   # rewrite after each run
                    json.dump(results, f)
    return results


def summarize(runs: list) -> list:
    """One row per (dataset, method): mean, std and min/max over seeds of modes covered, share of
    high-quality samples (within 3 std of a mode) and SWD."""
    rows = []
    for key in dict.fromkeys((r["dataset"], r["method"]) for r in runs):
        rs = [r for r in runs if (r["dataset"], r["method"]) == key]
        row = dict(dataset=key[0], method=key[1], seeds=len(rs), modes_total=len(rs[0]["shares"]))
        for m in ("modes", "high_quality", "swd"):
            v = torch.tensor([float(r[m]) for r in rs])
            row.update({m: float(v.mean()), m + "_std": float(v.std(unbiased=False)),
                        m + "_min": float(v.min()), m + "_max": float(v.max())})
        rows.append(row)
    return rows


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--study", metavar="OUT_DIR", required=True, help="run the study, write OUT_DIR/study_<datasets>.json")
    p.add_argument("--steps", type=int, default=10_000)
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    p.add_argument("--threads", type=int, default=1, help="torch threads (small MLPs run best on one)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    run_study(args.study, steps=args.steps, datasets=tuple(args.datasets))
