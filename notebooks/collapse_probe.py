"""collapse_probe.py — where does a one-step generator collapse? (issues 21, 22)

For a train_cifar.py checkpoint, or a finetune_t2i.py run (--t2i), at a ladder of noise levels t, on the same real
data and the same ε:
  diversity  Inception-feature diversity of the EMA generator's x̂_0 = G(x_t, t) over that of the real images
             (1 ≈ as varied as the data, 0 = one image); t = T-1 is one-step generation from (nearly) pure noise
  tiling     (--t2i) the token-tiling score of those images (teacher_cifar.py's 20-step teacher: 0.11; 1 = one
             pattern in every latent token)
  D_gap      D(real) − D(fake) at t, real = sg G(x_{t_D}, t_D) (the self-cooperative "real"), fake = G(x_t, t)
  |∇ adv|, |∇ con|, |∇ rec|   the norm of each term's gradient on G's trained weights, as weighted in L_G
             (λ_adv L_adv, λ_con w_con L_con, λ_rec w_rec L_rec): which term drives G at that t
  mse        of the EMA generator's x̂_0 to the real data (pixels; --t2i: latents)
  --blur     the same real images blurred (Gaussian σ = 1..4), their mse and diversity: blur alone lowers the
             figure (σ = 3: mse 0.06, diversity 0.75), so a low figure at small t may be blur, not collapse

    python notebooks/collapse_probe.py RUN_DIR_OR_CKPT [--n 64] [--data ZIP] [--json OUT.json] [--blur]
    python notebooks/collapse_probe.py T2I_RUN_DIR --t2i --n 64 --json OUT.json -- --preset cifar-teacher \\
        --base TEACHER/pipeline --data TEACHER/data --set seed=0      # the run's own finetune_t2i.py flags

A checkpoint of finetune_t2i.py's adaption stage (--stage adapt) gives, per t, the tiling, diversity and mse of the
adapted student's x̂_0 and of the x̂_0 its adaption target implies: what the YOSO stage's "real" starts from.
"""
from __future__ import annotations

import argparse, contextlib, copy, glob, json, os, sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train_cifar as tc  # noqa: E402
import yoso  # noqa: E402

LADDER = (0, 100, 250, 400, 550, 700, 850, 999)


def ladder(G, D, ema, x0, cond, to_images, meter, sched, cfg, distance, step, pixels=True) -> list[dict]:
    """The rows of one checkpoint: `ema()` a context in which G is the EMA generator, `to_images` x_0 -> [-1, 1]."""
    params = [p for p in G.parameters() if p.requires_grad]
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    D.requires_grad_(False)
    rows = []
    for t_int in LADDER:
        t = torch.full((len(x0),), min(t_int, sched.T - 1), dtype=torch.long)
        t_D, t_C = yoso.noise_levels(t, cfg)
        with torch.no_grad():
            with ema():
                x0_ema = yoso.predict_x0(G, sched.add_noise(x0, eps, t), t, cond, sched, cfg)
            x0_real, target = yoso.self_cooperative_samples(G, sched.add_noise(x0, eps, t_D), t_D,
                                                            sched.add_noise(x0, eps, t_C), t_C, cond, sched, cfg)
        x0_hat = yoso.predict_x0(G, sched.add_noise(x0, eps, t), t, cond, sched, cfg)
        logits_fake = D(x0_hat, t, cond)
        terms = {"adv": cfg.lambda_adv * yoso.logistic_loss(logits_fake, True).mean(),
                 "con": cfg.lambda_con * (yoso.consistency_weight(t, t_C, sched, cfg.gamma)
                                          * distance(x0_hat, target, cond)).mean(),
                 "rec": cfg.lambda_rec * yoso.weighted_mse(x0_hat, x0, yoso.reconstruction_weight(
                     t, sched, cfg.gamma, cfg.rec_weight)).mean()}
        mse = ((x0_ema.clamp(-1, 1) if pixels else x0_ema) - x0).pow(2).mean().item()
        row = dict(t=t_int, step=step, mse=mse, **meter(to_images(x0_ema)))
        with torch.no_grad():
            row["D_gap"] = (D(x0_real, t, cond) - logits_fake).mean().item()
        for name, loss in terms.items():
            grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
            row[f"grad_{name}"] = torch.sqrt(sum((g.float() ** 2).sum() for g in grads if g is not None)).item()
        rows.append(row)
        print(f"step {step:6d}  t {t_int:4d}  diversity {row.get('diversity', float('nan')):.3f}  "
              + (f"tiling {row['tiling']:.3f}  " if "tiling" in row else "") + f"mse {row['mse']:.3f}  "
              f"D_gap {row['D_gap']:+.2f}  "
              f"|grad| adv {row['grad_adv']:.3g}  con {row['grad_con']:.3g}  rec {row['grad_rec']:.3g}", flush=True)
    return rows


def probe(ckpt: str, n: int, data: str | None, blur: bool = False) -> list[dict]:
    meta = yoso.read_checkpoint(ckpt)
    cfg = tc.make_config(meta["extra"]["config"]["preset"], base=meta["extra"]["config"])
    G, D, G_ema = tc.build_models(cfg)
    yoso.load_checkpoint(ckpt, {"G": G, "G_ema": G_ema, "D": D}, {})
    sched = yoso.NoiseSchedule.from_config(cfg)
    real = tc.reference_subset(tc.load_images(data or cfg.data, cfg.resolution)[0], n).float() / 127.5 - 1
    meter = yoso.CollapseMeter(real, "cpu")

    @contextlib.contextmanager
    def ema():                                                  # G's weights <-> G_ema's, for the EMA rows
        saved = copy.deepcopy(G.state_dict())
        G.load_state_dict(G_ema.state_dict())
        try:
            yield
        finally:
            G.load_state_dict(saved)
    rows = ladder(G, D, ema, real, None, lambda x: x.clamp(-1, 1), meter, sched, cfg, yoso.mse_distance,
                  meta["step"])
    for sigma in (1.0, 2.0, 3.0, 4.0) if blur else ():         # the reference: blur, and no collapse at all
        from torchvision.transforms.functional import gaussian_blur
        b = gaussian_blur(real, kernel_size=13, sigma=sigma)
        rows.append(dict(blur_sigma=sigma, step=meta["step"], mse=(b - real).pow(2).mean().item(), **meter(b)))
        print(f"real images, Gaussian blur σ {sigma}: diversity {rows[-1]['diversity']:.3f}  mse {rows[-1]['mse']:.3f}")
    return rows


def probe_t2i(ckpt: str, n: int, run_args: list) -> list[dict]:
    """A finetune_t2i.py checkpoint, the run rebuilt from its own flags (`run_args`): of the YOSO stage, the
    ladder; of the adaption stage, probe_adaption's rows."""
    import finetune_t2i as ft
    cfg = ft.config_from_args(ft.parse_args(run_args + ["--out", os.path.dirname(ckpt)]))
    meta = yoso.read_checkpoint(ckpt)
    phase = meta["extra"].get("phase")
    if phase not in ("adapt", "yoso"):
        raise SystemExit(f"{ckpt}: not a finetune_t2i.py checkpoint (phase {phase})")
    pipe, model, D, frozen, params, _ = ft.build(cfg, torch.device("cpu"))
    ema = copy.deepcopy(params).requires_grad_(False)
    yoso.load_checkpoint(ckpt, {"G": params, "G_ema": ema} | ({"D": D} if phase == "yoso" else {}), {})
    ycfg = ft.schedule_config(cfg.yoso, pipe.scheduler.config, phase == "adapt" or meta["extra"]["adapted"])
    items, _ = ft.read_items(cfg)
    data = ft.Items(items, pipe, frozen, cfg, torch.device("cpu"), contextlib.nullcontext)
    idx = torch.linspace(0, len(data) - 1, n).long().tolist()  # spread over the items (all classes)
    x0, cond = data.get(idx)
    to_images = lambda z: ft.decode(pipe.vae, z).clamp(-1, 1)
    meter = yoso.CollapseMeter(to_images(x0), "cpu", block=pipe.vae_scale_factor * pipe.transformer.config.patch_size)
    G, sched = ft.PixArtDenoiser(model), yoso.NoiseSchedule.from_config(ycfg)
    if phase == "adapt":
        teacher_sched = yoso.NoiseSchedule.from_config(ft.schedule_config(cfg.yoso, pipe.scheduler.config, False))
        return probe_adaption(G, lambda: ft.swapped(params, ema), frozen, x0, cond, to_images, meter, sched,
                              teacher_sched, ycfg, pipe.scheduler.config.prediction_type, meta["step"])
    distance = yoso.latent_perceptual_distance(ft.perceptual_features(
        frozen, cfg.feature_block or len(frozen.transformer.transformer_blocks) // 2))
    return ladder(G, D, lambda: ft.swapped(params, ema), x0, cond, to_images, meter, sched, ycfg, distance,
                  meta["step"], pixels=False)


def probe_adaption(G, ema, frozen, x0, cond, to_images, meter, sched, teacher_sched, cfg, teacher_pred, step):
    """Quick adaption's x̂_0 per t, before any adversarial term: the EMA student's (what the YOSO stage's
    self-cooperative "real" starts from) and the one its v-target implies, x̂_0 = α_t x_t − σ_t v_target
    (the frozen teacher's, re-combined on the new schedule); row t = -1: the real latents."""
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    rows = [dict(t=-1, what="real", step=step, mse=0.0, **meter(to_images(x0)))]
    for t_int in LADDER:
        t = torch.full((len(x0),), t_int, dtype=torch.long)
        x_t_teacher, x_t = teacher_sched.add_noise(x0, eps, t), sched.add_noise(x0, eps, t)
        alpha_t, sigma_t = sched.alpha_sigma(t, x0.ndim)
        with torch.no_grad():
            with ema():
                student = yoso.predict_x0(G, x_t, t, cond, sched, cfg)
            with frozen():
                out = frozen.denoiser(x_t_teacher, t, cond).float()
            v = yoso.adaption_target(out, x_t_teacher, t, teacher_sched, sched, teacher_pred)
        for what, z in (("student", student), ("target", alpha_t * x_t - sigma_t * v)):
            rows.append(dict(t=t_int, what=what, step=step, mse=(z - x0).pow(2).mean().item(), **meter(to_images(z))))
            print(f"step {step:6d}  t {t_int:4d}  {what:8s} diversity {rows[-1].get('diversity', float('nan')):.3f}"
                  f"  tiling {rows[-1]['tiling']:.3f}  mse {rows[-1]['mse']:.3f}", flush=True)
    return rows

if __name__ == "__main__":
    argv = sys.argv[1:]
    run_args = argv[argv.index("--") + 1:] if "--" in argv else []
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("path", help="a run folder (all its kept wall-* and the newest ckpt-*) or one checkpoint")
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--data", help="CIFAR-10 folder or zip (default: the run's own --data)")
    p.add_argument("--json", help="write the rows here")
    p.add_argument("--blur", action="store_true", help="also blurred real images, the reference for blur")
    p.add_argument("--t2i", action="store_true", help="a finetune_t2i.py run; its own flags follow `--`")
    a = p.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    ckpts = [a.path] if os.path.isfile(a.path) else \
        sorted(glob.glob(os.path.join(a.path, "wall-*.pt"))) + yoso.list_checkpoints(a.path)[-1:]
    rows = [r for c in ckpts for r in (probe_t2i(c, a.n, run_args) if a.t2i else probe(c, a.n, a.data, a.blur))]
    if a.json:
        json.dump(rows, open(a.json, "w"), indent=1)
