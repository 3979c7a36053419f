"""collapse_probe.py — where does a one-step generator collapse? (issues 21, 22)

For a train_cifar.py checkpoint, at a ladder of noise levels t, on the same real images and the same ε:
  diversity  Inception-feature diversity of the EMA generator's x̂_0 = G(x_t, t) over that of the real images
             (1 ≈ as varied as the data, 0 = one image); t = T-1 is one-step generation from (nearly) pure noise
  D_gap      D(real) − D(fake) at t, real = sg G(x_{t_D}, t_D) (the self-cooperative "real"), fake = G(x_t, t)
  |∇ adv|, |∇ con|, |∇ rec|   the norm of each term's gradient on G's weights, as weighted in L_G
             (λ_adv L_adv, λ_con w_con L_con, λ_rec w_rec L_rec): which term drives G at that t
  mse        of the EMA generator's x̂_0 to the real images
  --blur     the same real images blurred (Gaussian σ = 1..4), their mse and diversity: blur alone lowers the
             figure (σ = 3: mse 0.06, diversity 0.75), so a low figure at small t may be blur, not collapse

    python notebooks/collapse_probe.py RUN_DIR_OR_CKPT [--n 64] [--data ZIP] [--json OUT.json] [--blur]
"""
from __future__ import annotations

import argparse, glob, json, os, sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train_cifar as tc  # noqa: E402
import yoso  # noqa: E402

LADDER = (0, 100, 250, 400, 550, 700, 850, 999)


def probe(ckpt: str, n: int, data: str | None, blur: bool = False) -> list[dict]:
    meta = yoso.read_checkpoint(ckpt)
    cfg = tc.make_config(meta["extra"]["config"]["preset"], base=meta["extra"]["config"])
    G, D, G_ema = tc.build_models(cfg)
    yoso.load_checkpoint(ckpt, {"G": G, "G_ema": G_ema, "D": D}, {})
    sched = yoso.NoiseSchedule.from_config(cfg)
    real = tc.reference_subset(tc.load_images(data or cfg.data, cfg.resolution)[0], n).float() / 127.5 - 1
    meter = yoso.CollapseMeter(real, "cpu")
    eps = torch.randn(real.shape, generator=torch.Generator().manual_seed(1))
    rows = []
    for t_int in LADDER:
        t = torch.full((n,), t_int, dtype=torch.long)
        t_D, t_C = (t - cfg.k_D).clamp(min=0), (t - cfg.k_C).clamp(min=0)
        with torch.no_grad():
            x0_ema = yoso.predict_x0(G_ema, sched.add_noise(real, eps, t), t, None, sched, cfg)
            x0_real = yoso.predict_x0(G, sched.add_noise(real, eps, t_D), t_D, None, sched, cfg)
            target = yoso.predict_x0(G, sched.add_noise(real, eps, t_C), t_C, None, sched, cfg)
        x0_hat = yoso.predict_x0(G, sched.add_noise(real, eps, t), t, None, sched, cfg)
        D.requires_grad_(False)
        logits_fake = D(x0_hat, t)
        terms = {"adv": cfg.lambda_adv * yoso.generator_adv_loss(logits_fake).mean(),
                 "con": cfg.lambda_con * (yoso.consistency_weight(t, t_C, sched, cfg.gamma)
                                          * yoso.mse_distance(x0_hat, target)).mean(),
                 "rec": cfg.lambda_rec * yoso.weighted_mse(x0_hat, real, yoso.reconstruction_weight(
                     t, sched, cfg.gamma, cfg.rec_weight)).mean()}
        row = dict(t=t_int, step=meta["step"], mse=(x0_ema.clamp(-1, 1) - real).pow(2).mean().item(), **meter(x0_ema))
        with torch.no_grad():
            row["D_gap"] = (D(x0_real, t) - logits_fake).mean().item()
        for name, loss in terms.items():
            grads = torch.autograd.grad(loss, list(G.parameters()), retain_graph=True, allow_unused=True)
            row[f"grad_{name}"] = torch.sqrt(sum((g.float() ** 2).sum() for g in grads if g is not None)).item()
        rows.append(row)
        print(f"step {row['step']:6d}  t {t_int:4d}  diversity {row['diversity']:.3f}  mse {row['mse']:.3f}  "
              f"D_gap {row['D_gap']:+.2f}  "
              f"|grad| adv {row['grad_adv']:.3g}  con {row['grad_con']:.3g}  rec {row['grad_rec']:.3g}", flush=True)
    for sigma in (1.0, 2.0, 3.0, 4.0) if blur else ():         # the reference: blur, and no collapse at all
        from torchvision.transforms.functional import gaussian_blur
        b = gaussian_blur(real, kernel_size=13, sigma=sigma)
        rows.append(dict(blur_sigma=sigma, step=meta["step"], mse=(b - real).pow(2).mean().item(), **meter(b)))
        print(f"real images, Gaussian blur σ {sigma}: diversity {rows[-1]['diversity']:.3f}  mse {rows[-1]['mse']:.3f}")
    return rows


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("path", help="a run folder (all its kept wall-* and the newest ckpt-*) or one checkpoint")
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--data", help="CIFAR-10 folder or zip (default: the run's own --data)")
    p.add_argument("--json", help="write the rows here")
    p.add_argument("--blur", action="store_true", help="also blurred real images, the reference for blur")
    a = p.parse_args()
    ckpts = [a.path] if os.path.isfile(a.path) else \
        sorted(glob.glob(os.path.join(a.path, "wall-*.pt"))) + yoso.list_checkpoints(a.path)[-1:]
    rows = [r for c in ckpts for r in probe(c, a.n, a.data, a.blur)]
    if a.json:
        json.dump(rows, open(a.json, "w"), indent=1)
