"""Train YOSO from scratch as a one-step generator on unconditional CIFAR-10 32x32 (arXiv 2403.12931).

    python train_cifar.py                                   # the paper-scale run (preset "paper"); no GPU: "cpu"
    python train_cifar.py --preset cpu --set minutes=30     # an hour by default (any field: --set KEY=VALUE)
    python train_cifar.py --preset smoke --data cifar10-jpeg.zip   # about a minute; checks the whole pipeline
    python train_cifar.py --resume runs/cifar-XXXX          # continue exactly where a run stopped
    python train_cifar.py --sample CKPT --n 1000 [--steps 2] [--npz s.npz]   # a grid and an .npz, for FID elsewhere
    python train_cifar.py --sample RUN_DIR --fid 50000      # one-step FID of its newest EMA generator, to metrics
    torchrun --nproc_per_node=8 train_cifar.py              # DDP; the global batch is kept

The paper does not publish its CIFAR settings; the `paper` preset is our sane choice:
DDPM's 35.7M-parameter CIFAR UNet (diffusers UNet2DModel), yoso.Discriminator, T = 1000 linear VP,
k_D = 250, k_C = 25, batch 256, lr 2e-4, EMA 0.9999, v-prediction. The `cpu` preset departs from it (PRESETS).
Exit codes: 0 done (or interrupted and checkpointed), 2 bad input or settings, 3 training diverged.
"""
from __future__ import annotations

import argparse, contextlib, copy, hashlib, io, json, math, os, pathlib, shutil, sys, time, zipfile
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

import yoso

# ==== 1. Config: the defaults ARE the paper-scale run; presets override only deltas ===============

@dataclass
class TrainConfig(yoso.YOSOConfig):
    preset: str = "paper"              # the preset these settings came from (checked on --resume)
    lr: float = 2e-4                   # from scratch; yoso's default 2e-5 is the LoRA lr
    ema_decay: float = 0.9999          # long EMA, usual from scratch
    unet_channels: tuple = (128, 256, 256, 256)   # DDPM's CIFAR UNet: ch 128, mult (1,2,2,2): 35.7M
    unet_layers: int = 2               # res blocks per resolution (DDPM: 2)
    attn_resolutions: tuple = (16,)    # self-attention at 16x16 (DDPM)
    d_channels: tuple = (64, 128, 256, 256)       # yoso.Discriminator widths
    d_mbstd: int = 0                   # minibatch-std group of D (0 = off, as the paper; DDGAN's CIFAR D: 4)
    data: Optional[str] = None         # None: torchvision CIFAR-10 (downloads to ./data); else folder or .zip
    resolution: int = 32
    hflip: bool = True                 # random horizontal flips, as DDPM / EDM on CIFAR-10
    batch_size: int = 256              # GLOBAL batch per step, split over DDP ranks
    steps: int = 200_000               # our choice; the paper states no CIFAR iteration count
    precision: str = "bf16"            # bf16 | fp16 | fp32 (autocast; weights fp32) | auto: bf16 where native
    seed: int = 0
    log_every: int = 50                # metrics.jsonl line (means over the interval)
    sample_every: int = 5000           # grid of one-step EMA samples from one FIXED noise batch
    ckpt_every: int = 5000
    keep: int = 3                      # newest checkpoints kept
    n_grid: int = 64
    n_diversity: int = 64              # grid samples whose Inception diversity is logged (0 = none; ~0.4 s each on 1 CPU core)
    max_skipped: int = 20              # stop after this many non-finite steps in a row
    saturation_gap: float = 10.0       # warn when mean D(real) - D(fake) logit gap stays above this ...
    saturation_steps: int = 2000       # ... for this many steps in a row (D has won; G gets no signal)
    minutes: float = 0.0               # wall-clock budget of the training loop: checkpoint, exit 0 (0: none; resume adds on)
    ckpt_minutes: float = 0.0          # a kept wall-<seconds>s-<step>.pt at each such mark (equal-time comparisons)
    fixed_t: int = -1                  # >= 0: every sample at this t (GAN on data: cifar_budget.py)

    def __post_init__(self):
        super().__post_init__()        # k_D, k_C < T, prediction_type, gan_loss
        if min(self.steps, self.batch_size) <= 0 or min(self.minutes, self.ckpt_minutes) < 0 or \
                self.precision not in ("bf16", "fp16", "fp32", "auto") or not -1 <= self.fixed_t < self.T:
            raise ValueError("need steps, batch_size > 0, minutes, ckpt_minutes >= 0, precision bf16 | fp16 | fp32 | auto and "
                             "fixed_t -1 (off) or in [0, T); got " + ", ".join(f"{k}={getattr(self, k)!r}" for k in
                             ("steps", "batch_size", "minutes", "ckpt_minutes", "precision", "fixed_t")))

CACHE = os.environ.get("YOSO_CACHE", os.path.expanduser("~/.cache/yoso"))   # FID reference stats
PRESETS = {
    "paper": {},
    # an hour, bf16 where native, EMA 0.99, DDGAN's D guards; NOT the paper: k_D 999, half at t = T-1 (nb 02 §5g-5h)
    "cpu": dict(unet_channels=(32, 64, 64), unet_layers=1, attn_resolutions=(), d_channels=(32, 64, 64), batch_size=32,
                precision="auto", steps=100_000, minutes=60.0, ckpt_minutes=15.0, ema_decay=0.99, log_every=10,
                sample_every=250, ckpt_every=250, d_mbstd=4, r1_gamma=0.02, r1_every=15, betas_G=(0.5, 0.9),
                betas_D=(0.5, 0.9), lr=1.6e-4, lr_D=1.25e-4, k_D=999, one_step_share=0.5),
    # tiny nets, fp32 (bit-exact resume tests); checks the pipeline, not the method.
    "smoke": dict(unet_channels=(16, 32), unet_layers=1, attn_resolutions=(), d_channels=(16, 32), batch_size=8, steps=30,
                  precision="fp32", ema_decay=0.9, log_every=1, sample_every=10, ckpt_every=10, n_grid=16, n_diversity=4),
}

def make_config(preset: str, base: Optional[dict] = None, overrides: tuple = ()) -> TrainConfig:
    """preset deltas (or a saved config.json, `base`) + `--set KEY=VALUE` overrides -> a validated TrainConfig."""
    values = dict(base) if base is not None else {**PRESETS[preset], "preset": preset}
    try:                                                        # JSON stored the tuples as lists
        cfg = TrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
    except (ValueError, TypeError) as e:                        # TypeError: a field this script does not know
        raise yoso.UserError(f"impossible settings: {e}") from None
    return yoso.apply_overrides(cfg, overrides)

# ==== 2. Data (every image decoded once into one uint8 tensor: CIFAR-10 is 150 MB) and networks ===

def _decode(data: bytes, res: int) -> np.ndarray:
    """Image file bytes -> (res, res, 3) uint8: the centre square, resized (bicubic) to res; res x res: untouched."""
    from PIL import Image, ImageOps
    return np.asarray(ImageOps.fit(Image.open(io.BytesIO(data)).convert("RGB"), (res, res), Image.BICUBIC))

def load_images(path: Optional[str], res: int) -> tuple[torch.Tensor, int]:
    """(uint8 (N, 3, res, res), corrupt files skipped) from CIFAR-10 (None), a folder or a .zip."""
    if path is None:
        import torchvision
        made = not os.path.exists("./data")
        try:
            images = torchvision.datasets.CIFAR10("./data", train=True, download=True).data
        except Exception as e:
            if made:                                            # leave no empty ./data behind
                shutil.rmtree("./data", ignore_errors=True)
            raise yoso.UserError(f"could not download CIFAR-10 to ./data ({type(e).__name__}: {e}); "
                                 "offline? pass --data PATH to a local image folder or .zip") from None
        return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), 0
    fix = "pass --data PATH to an image folder (class subfolders or flat) or a .zip of one"
    exts = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
    if os.path.isdir(path):
        names = [os.path.relpath(os.path.join(d, n), path) for d, _, ns in os.walk(path) for n in ns]
        read = lambda n: pathlib.Path(path, n).read_bytes()
    elif zipfile.is_zipfile(path):
        zf = zipfile.ZipFile(path)
        names, read = zf.namelist(), zf.read
    else:
        why = "cannot be read as a .zip" if os.path.exists(path) else "no such file or folder"
        raise yoso.UserError(f"--data {path}: {why}; {fix}")
    names = sorted(n.replace(os.sep, "/") for n in names if n.lower().endswith(exts))
    names = [n for n in names if "train" in n.split("/")[:-1]] or names   # train/<class>/x.jpg: skip test/
    if not names:
        raise yoso.UserError(f"--data {path}: no images ({', '.join(exts)}) found; {fix}")
    images = []
    for n in tqdm(names, desc="decoding images", leave=False, mininterval=2, disable=len(names) < 5000):
        with contextlib.suppress(Exception):                    # truncated / not an image / unreadable: counted
            images.append(_decode(read(n), res))
    if not images:
        raise yoso.UserError(f"--data {path}: all {len(names)} image files are corrupt or unreadable; {fix}")
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), len(names) - len(images)

def get_batch(images: torch.Tensor, step: int, cfg: TrainConfig, dist: yoso.Dist) -> torch.Tensor:
    """This rank's share of the global batch at `step`, as float in [-1, 1], flipped deterministically."""
    idx = yoso.batch_indices(len(images), step, cfg.batch_size, cfg.seed)
    x = images[yoso.rank_slice(idx, dist)].float() / 127.5 - 1
    if cfg.hflip:                                               # seeded by the step, like the data order
        flip = torch.rand(cfg.batch_size, generator=torch.Generator().manual_seed(cfg.seed + 7919 * step)) < 0.5
        x = torch.where(yoso.rank_slice(flip, dist)[:, None, None, None], x.flip(3), x)
    return x

class UNetGenerator(nn.Module):
    """diffusers' UNet2DModel called as G(x_t, t, cond) -> raw output (v by default; yoso reads it as x̂_0)."""

    def __init__(self, cfg: TrainConfig):
        super().__init__()
        from diffusers import UNet2DModel
        attn = [cfg.resolution // 2 ** i in cfg.attn_resolutions for i in range(len(cfg.unet_channels))]
        self.unet = UNet2DModel(
            sample_size=cfg.resolution, in_channels=3, out_channels=3, block_out_channels=cfg.unet_channels,
            layers_per_block=cfg.unet_layers, attention_head_dim=min(64, cfg.unet_channels[-1]),
            norm_num_groups=math.gcd(32, *cfg.unet_channels),   # tiny presets have fewer than 32 channels
            down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
            up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)))

    def forward(self, x_t, t, cond=None):
        return self.unet(x_t, t).sample                         # (B, 3, H, W)

def build_models(cfg: TrainConfig) -> tuple[nn.Module, nn.Module, nn.Module]:
    G = UNetGenerator(cfg)
    D = yoso.Discriminator(3, cfg.d_channels, resolution=cfg.resolution, mbstd_group=cfg.d_mbstd)
    return G, D, copy.deepcopy(G).requires_grad_(False).eval()   # G, D, G_ema

# ==== 3. Samples and FID (as StyleGAN / EDM: Inception-v3 pool features vs the training set) ======

def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """‖μ1 − μ2‖² + Tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^½) (Heusel et al. 2017); eigh: finite for singular Σ."""
    w, V = np.linalg.eigh(sigma1)
    root1 = (V * np.sqrt(w.clip(min=0))) @ V.T                  # Σ1^½
    tr_covmean = np.sqrt(np.linalg.eigvalsh(root1 @ sigma2 @ root1).clip(min=0)).sum()
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)

def feature_stats(batches, features: Callable) -> tuple[np.ndarray, np.ndarray]:
    """μ, Σ (float64) of features(x) over an iterable of uint8 image batches (B, 3, H, W)."""
    feats = np.concatenate([features(x).double().cpu().numpy() for x in batches])
    return feats.mean(0), np.cov(feats, rowvar=False)

def reference_stats(images: torch.Tensor, features: Callable, key: str, cache_dir: str, batch: int = 250):
    """μ, Σ of the training set, cached per (dataset, detector) key as .npz."""
    cache = os.path.join(cache_dir, f"fid-ref-{hashlib.sha1(key.encode()).hexdigest()[:16]}.npz")
    if not os.path.isfile(cache):
        mu, sigma = feature_stats(images.split(batch), features)
        os.makedirs(cache_dir, exist_ok=True)
        np.savez(cache + ".tmp.npz", mu=mu, sigma=sigma)
        os.replace(cache + ".tmp.npz", cache)
    return tuple(np.load(cache)[k] for k in ("mu", "sigma"))

def reference_subset(images: torch.Tensor, n: int) -> torch.Tensor:
    """n training images spread evenly over the set (all of it when n is 0): a cheaper FID reference."""
    return images if not n or n >= len(images) else images[torch.linspace(0, len(images) - 1, n).long()]

def generated_batches(G: nn.Module, n: int, cfg: TrainConfig, device, steps: int = 1, batch: int = 250, seed: int = 1):
    """n samples from G (uint8), in batches, from a seeded generator so a FID is reproducible."""
    sched, gen = yoso.NoiseSchedule.from_config(cfg), torch.Generator(device=device).manual_seed(seed)
    for i in range(0, n, batch):
        noise = torch.randn(min(batch, n - i), 3, cfg.resolution, cfg.resolution, generator=gen, device=device)
        yield yoso.to_uint8(yoso.sample(G, noise, sched=sched, cfg=cfg, steps=steps, generator=gen))

def fid_of(G: nn.Module, n: int, cfg: TrainConfig, images: torch.Tensor, inception: Optional[str], device,
           steps: int = 1) -> float:
    """FID of n `steps`-step samples of G vs `images` (stats cached by their bytes and detector)."""
    path = yoso.resolve_inception(inception)
    features = yoso.inception_features(path, device)
    key = f"{hashlib.sha1(images.numpy().tobytes()).hexdigest()}|{os.path.abspath(path)}|{os.path.getsize(path)}"
    mu_r, sigma_r = reference_stats(images, features, key, CACHE)
    return frechet_distance(*feature_stats(generated_batches(G, n, cfg, device, steps), features), mu_r, sigma_r)

def load_generator(ckpt: str, overrides: tuple = (), device=None) -> tuple[nn.Module, TrainConfig, dict]:
    """(EMA generator on `device`, its run's config, the checkpoint's meta) of a checkpoint."""
    meta = yoso.read_checkpoint(ckpt)
    saved = meta["extra"].get("config", {})
    if "preset" not in saved:
        raise yoso.UserError(f"{ckpt} is not a train_cifar.py checkpoint (a finetune_t2i.py run samples with "
                             "`python finetune_t2i.py --sample RUN_DIR`)")
    cfg = make_config(saved["preset"], base=saved, overrides=overrides)
    G = UNetGenerator(cfg)
    yoso.load_checkpoint(ckpt, {"G_ema": G}, {})   # another architecture: UserError
    return G.eval().to(device), cfg, meta

def write_samples(G: nn.Module, cfg: TrainConfig, meta: dict, n: int, stem: str, device, steps: int = 1, seed: int = 0):
    """n samples -> stem.npz, 64 -> stem.png; seeded, so every checkpoint gets the same noise."""
    os.makedirs(os.path.dirname(os.path.abspath(stem)), exist_ok=True)
    x = torch.cat(list(generated_batches(G, n, cfg, device, steps, seed=seed))).cpu()
    np.savez_compressed(stem + ".tmp.npz", samples=x.permute(0, 2, 3, 1).numpy(), step=meta["step"],
                        elapsed=meta["extra"].get("elapsed", -1.0))
    os.replace(stem + ".tmp.npz", stem + ".npz")
    yoso.save_image_grid(x[:64].float() / 127.5 - 1, stem + ".png")

def run_sample(args) -> int:
    """--sample CKPT | RUN_DIR (its newest intact checkpoint): --n samples (.npz, grid), or --fid N into metrics."""
    ckpt = yoso.newest_intact_checkpoint(args.sample) if os.path.isdir(args.sample) else args.sample
    if ckpt is None:
        raise yoso.UserError(f"--sample {args.sample}: no intact ckpt-*.pt in it; pass a checkpoint or a run folder")
    out, to_npz = args.out or os.path.dirname(os.path.abspath(ckpt)), args.npz and not args.fid
    yoso.check_out_dir(os.path.dirname(os.path.abspath(args.npz)) if to_npz else out, "--npz" if to_npz else "--out")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    G, cfg, meta = load_generator(ckpt, args.set, device)
    if args.fid:
        images = reference_subset(load_images(args.data or cfg.data, cfg.resolution)[0], args.fid_ref)
        score = fid_of(G, args.fid, cfg, images, args.inception, device, args.steps)
        yoso.MetricsLog(os.path.join(out, "metrics.jsonl"))(step=meta["step"], fid=score, fid_n=args.fid,
                                                            fid_steps=args.steps)
        print(f"FID ({args.fid} {args.steps}-step EMA samples vs {len(images)} training images): {score:.3f}")
        return 0
    stem = os.path.splitext(args.npz)[0] if args.npz else os.path.join(out, f"samples-{meta['step']:08d}-{args.steps}step")
    write_samples(G, cfg, meta, args.n, stem, device, args.steps, args.seed)
    print(f"wrote {args.n} samples ({args.steps} step) to {stem}.npz, the first {min(args.n, 64)} to {stem}.png")
    return 0

# ==== 4. Training, and the command line ===========================================================

def train(args) -> int:
    if args.resume and args.out and os.path.abspath(args.out) != os.path.abspath(args.resume):
        raise yoso.UserError("--resume continues in the run's own folder; drop --out (or copy the run dir first)")
    out = args.resume or args.out or time.strftime("runs/cifar-%Y%m%d-%H%M%S")
    resume = yoso.open_run(out, bool(args.resume), f"--resume {out}", "samples-*.png", "train_cifar.py", mark="config")
    saved = resume["config"] if resume else None                # on --resume the run's own config is the base
    if saved and args.preset and args.preset != saved["preset"]:
        raise yoso.UserError(f"--resume {out}: the run was trained with preset {saved['preset']!r}, not "
                             f"{args.preset!r}; drop --preset to continue it as it was")
    cfg = make_config(args.preset or "paper", saved, tuple(args.set) + ((f"data={args.data!r}",) if args.data else ()))
    step, spent = (resume["step"], resume.get("elapsed", 0.0)) if resume else (0, 0.0)   # spent: seconds trained
    if resume and (step >= cfg.steps or 0 < cfg.minutes <= spent / 60):   # finished: add nothing, say how to extend
        how = f"steps=N (N > {step})" if step >= cfg.steps else f"minutes=M (M > the {spent / 60:.1f} spent)"
        print(f"{out} is complete ({step} steps, {spent / 60:.1f} min of training); nothing to do. "
              f"To train on: python train_cifar.py --resume {out} --set {how}")
        return 0
    world = int(os.environ.get("WORLD_SIZE", 1))                # checked before any process group waits
    if cfg.batch_size % world:
        raise yoso.UserError(f"batch_size {cfg.batch_size} is not divisible by the {world} processes; the global "
                             f"batch is split evenly, so pick a multiple of {world} (--set batch_size=N)")
    images, corrupt = load_images(cfg.data, cfg.resolution)
    if len(images) < cfg.batch_size:
        raise yoso.UserError(f"only {len(images)} usable images for a batch of {cfg.batch_size}; use more data or "
                             "--set batch_size=N")
    dist = yoso.init_distributed()
    device, main = dist.device, dist.main
    torch.manual_seed(cfg.seed)                                 # identical initial weights on every rank
    G, D, G_ema = (m.to(device) for m in build_models(cfg))
    if device.type == "cuda":                                   # measured in benchmarks/run.py --only measures
        torch.backends.cudnn.benchmark = True                   # fixed shapes: autotune each conv once
        G, D, G_ema = (m.to(memory_format=torch.channels_last) for m in (G, D, G_ema))   # NHWC tensor-core convs
    opt_G, opt_D = yoso.make_optimizers(G, D, cfg)
    native = torch.cuda.is_bf16_supported() if device.type == "cuda" else any(   # a CPU with avx512_bf16 or AMX: bf16
        getattr(torch.cpu, f"_is_{k}_supported", bool)() for k in ("avx512_bf16", "amx_tile"))  # ~0.66x fp32's step, else ~20x
    precision = cfg.precision if cfg.precision != "auto" else "bf16" if native else "fp32"   # "auto": bf16 where native
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]
    scalers = {f"scaler_{k}": torch.amp.GradScaler(device.type) for k in "GD"} if precision == "fp16" else {}
    modules, optimizers = {"G": G, "G_ema": G_ema, "D": D}, {"G": opt_G, "D": opt_D, **scalers}   # fp16: loss scales
    if resume:
        yoso.load_checkpoint(resume["path"], modules, optimizers)   # another architecture: UserError
    if main:
        os.makedirs(out, exist_ok=True)
        pathlib.Path(out, "config.json").write_text(json.dumps(asdict(cfg), indent=2))
        n_G, n_D = (sum(p.numel() for p in m.parameters()) / 1e6 for m in (G, D))
        print(f"{len(images)} training images{f', {corrupt} corrupt files skipped' if corrupt else ''}; run dir {out}; "
              f"world {dist.world}\npreset {cfg.preset}: G {n_G:.1f}M params, D {n_D:.1f}M params, batch {cfg.batch_size}, "
              f"{cfg.steps} steps{f' or {cfg.minutes:g} min' * bool(cfg.minutes)}, precision {precision}"
              + (f"; resumed from {resume['path']} at step {step}" if resume else ""))
    if dist.world > 1:
        G, D = (torch.nn.parallel.DistributedDataParallel(m) for m in (G, D))

    sched = yoso.NoiseSchedule.from_config(cfg)
    fixed_noise = torch.randn(cfg.n_grid, 3, cfg.resolution, cfg.resolution,
                              generator=torch.Generator().manual_seed(cfg.seed)).to(device)
    metrics = yoso.MetricsLog(os.path.join(out, "metrics.jsonl"), enabled=main)
    n_div = min(cfg.n_diversity, cfg.n_grid)                   # real images: as many as the samples measured
    collapse = yoso.CollapseMeter(reference_subset(images, n_div).float() / 127.5 - 1, device, args.inception) \
        if main and n_div > 1 else None

    def step_fn(s: int) -> dict:
        x0 = get_batch(images, s, cfg, dist).to(device)
        t, eps = yoso.step_noise(cfg.batch_size, x0.shape[1:], cfg.T, s, cfg.seed, dist, cfg.one_step_share)
        t = t if cfg.fixed_t < 0 else torch.full_like(t, cfg.fixed_t)
        return yoso.train_step(G, D, opt_G, opt_D, x0, sched=sched, cfg=cfg, G_ema=G_ema, amp_dtype=amp_dtype,
                               noise=(t, eps), step=s, **scalers)

    def save(s: int, mark: Optional[float] = None) -> None:    # rank 0's, as grid: the others write nothing
        epoch, index = divmod(s, len(images) // cfg.batch_size)
        extra = dict(config=asdict(cfg), data=dict(n=len(images), seed=cfg.seed, epoch=epoch, index=index),
                     elapsed=round(stop.elapsed(), 3))
        if mark is None:
            yoso.save_run_checkpoint(out, s, modules, optimizers, keep=cfg.keep, extra=extra)
        else:                                                  # not ckpt-*: kept, and never picked by --resume
            yoso.save_checkpoint(os.path.join(out, f"wall-{round(mark * 60):05d}s-{s:08d}.pt"),
                                 s, modules, optimizers, extra)

    def grid(s: int) -> None:
        x = yoso.sample(G_ema, fixed_noise, sched=sched, cfg=cfg)   # one step, EMA generator
        yoso.save_image_grid(x, os.path.join(out, f"samples-{s:08d}.png"))
        if collapse:                                           # collapse shows as diversity -> 0
            metrics(step=s, **collapse(x[:n_div]))
        yoso.plot_metrics(metrics.path)                        # metrics.png beside metrics.jsonl

    stop = yoso.Stop(cfg.minutes, cfg.ckpt_minutes, spent)   # made last: the clock starts at step 1
    wall_mark = lambda s: save(s, mark=stop.marks * cfg.ckpt_minutes) if stop.new_mark else None
    every = [(cfg.ckpt_every, save), (cfg.sample_every, grid), (1, wall_mark)] if main else []
    guard = (cfg.max_skipped, cfg.saturation_gap, cfg.saturation_steps)
    step, reason, skipped = yoso.run_loop(step_fn, step, cfg.steps, every=every, log_every=cfg.log_every, stop=stop,
                                          log=lambda **m: metrics(**m, elapsed=round(stop.elapsed(), 2)),
                                          guard=guard, run_dir=out, world=dist.world, main=main)
    if not main or reason == "diverged":                       # diverged: the last good checkpoint stays the newest
        return 3 if reason == "diverged" else 0
    save(step)
    if stop.out_of_time and cfg.ckpt_minutes:                  # the budget's own mark
        save(step, mark=cfg.minutes)
    grid(step)
    if reason == "interrupted" and not stop.out_of_time:
        print(f"\ninterrupted at step {step}; checkpoint saved. Resume with:\n  python train_cifar.py --resume {out}")
        return 0
    if args.fid:
        score = fid_of(G_ema, args.fid, cfg, reference_subset(images, args.fid_ref), args.inception, device, args.steps)
        metrics(step=step, fid=score, fid_n=args.fid, fid_steps=args.steps)
        yoso.plot_metrics(metrics.path)
        print(f"FID ({args.fid} {args.steps}-step EMA samples): {score:.3f}")
    budget = f" (wall-clock budget of {cfg.minutes:g} min reached)" if stop.out_of_time else ""
    print(f"done: {step} steps{budget}, {skipped} skipped; run dir {out}")
    return 0

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=list(PRESETS), help="named settings (default: paper, cpu without a GPU)")
    p.add_argument("--data", help="image folder or .zip (default: torchvision CIFAR-10, downloaded to ./data)")
    p.add_argument("--out", help="run dir (default: runs/cifar-<time>; with --sample: the checkpoint's folder)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run where it stopped (default: a new run)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field, "
                   "repeatable (default: the preset's; on --resume the run's config.json). KEY is one of: "
                   + ", ".join(yoso.config_keys(TrainConfig())))
    p.add_argument("--sample", metavar="CKPT|RUN_DIR", help="sample a checkpoint's EMA generator instead (default: train)")
    p.add_argument("--n", type=int, default=64, help="samples written by --sample (default: %(default)s)")
    p.add_argument("--npz", metavar="PATH", help="--sample's .npz, its first 64 also as .png (default: one in --out)")
    p.add_argument("--steps", type=int, help="sampling steps of --sample, --fid (default: 1; training: --set steps=N)")
    p.add_argument("--seed", type=int, default=0, help="noise seed of --sample (default: %(default)s)")
    p.add_argument("--fid", type=int, default=0, metavar="N", help="FID of N EMA samples after training or of --sample, "
                   "into metrics.jsonl (default: %(default)s, none)")
    p.add_argument("--fid-ref", type=int, default=0, metavar="N", help="FID reference: N training images spread over "
                   "the set (default: %(default)s, all)")
    p.add_argument("--inception", metavar="PT", help="Inception-v3 TorchScript (default: $YOSO_INCEPTION or the wheel's)")
    args = p.parse_args(argv)
    def body() -> int:
        if args.steps is not None and not (args.sample or args.fid):
            raise yoso.UserError(f"--steps {args.steps} sets the sampling steps of --sample and --fid; to train "
                                 f"{args.steps} steps use --set steps={args.steps}")
        args.steps = 1 if args.steps is None else args.steps
        if args.n <= 0 or args.steps <= 0 or args.fid < 0 or args.fid_ref < 0:
            raise yoso.UserError("--n and --steps must be positive, --fid and --fid-ref non-negative")
        if not (args.preset or args.resume or args.sample or torch.cuda.is_available()):
            print("no GPU: the paper preset runs at ~1 image/s on CPU (benchmarks/results-cpu-fp32.json), ~4 min a "
                  "step of 256 and years for 200k steps; training the `cpu` preset instead, an hour, with two departures "
                  "from the paper (k_D 999, half of each batch at t = T-1; README) (--preset paper insists)")
            args.preset = "cpu"
        return run_sample(args) if args.sample else train(args)
    return yoso.run_cli(body)

if __name__ == "__main__":
    sys.exit(main())
