"""teacher_cifar.py — a small PixArt-α-style teacher on CIFAR-10, to prove finetune_t2i.py on a CPU (issue 8).

    python notebooks/teacher_cifar.py --out /work/runs/teacher                  # all stages in order
    python notebooks/teacher_cifar.py --out /work/runs/teacher --stage vae      # or one at a time:
        vae         AutoencoderKL, 32x32x3 -> 8x8x4 latents (reconstruction MSE + small KL)
        teacher     PixArtTransformer2DModel, ε-prediction on PixArt-α's own linear 1e-4..0.02 schedule (flawed
                    terminal SNR kept on purpose), captions "a photo of a <class>" through a tiny frozen T5;
                    saved as a diffusers PixArtAlphaPipeline folder (out/pipeline) + a metadata.jsonl image
                    folder (out/data) for `finetune_t2i.py --base out/pipeline --data out/data`
        classifier  a small CIFAR-10 CNN for prompt adherence (generated image's class vs the prompt's)
        generate    (optional) every eval row's images to out/samples/*.npz, e.g. on a GPU (--device)
        eval        FID (offline Inception) and adherence for teacher rows and for --student runs; reads the
                    images of --stage generate where present, else generates them on --device
        figure      notebooks/results/teacher[_TAG]_rows.png: 20 samples of each --rows name, one strip a row
        pack        logs, students' small files and every out/samples/*.npz (xz) into <= 3 tar files of <= 15.5 MiB
        unpack      those tar files back into out (samples/*.npz, logs/, students/)
        table       the 3-route x 3-seed table of a --tag's results, with the "far closer" verdict per seed
    python notebooks/teacher_cifar.py --out /work/runs/teacher --stage eval --student NAME=/work/runs/student ...

Everything runs on one CPU thread by default; the budgets (--minutes) are wall-clock, so a busier machine gets fewer
steps. On a GPU, notebooks/teacher_gpu.sh runs the teacher, all students and their images in one ~7-minute call (issue
12); pack / unpack carry the images back, table prints the 3-route x 3-seed comparison:
    python notebooks/teacher_cifar.py --out runs/teacher-linear --stage unpack --pack-dir GPU_OUT/teacher
    python notebooks/teacher_cifar.py --out runs/teacher-linear --stage eval --n 500 --real --all-samples --tag linear
    python notebooks/teacher_cifar.py --stage table --n 500 --tag linear
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import zipfile

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train_cifar  # noqa: E402  (FID helpers and the JPEG decoder)
import yoso  # noqa: E402

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
PROMPTS = [f"a photo of a {c}" for c in CLASSES]
ZIP = os.environ.get("YOSO_CIFAR_ZIP", os.path.join(ROOT, "..", "shared", "data", "cifar10-jpeg.zip"))
MAX_TOKENS = 16                        # finetune_t2i's max_tokens in the matching preset; captions are ~7 tokens


# ==================================================================================================
# Data: CIFAR-10 with labels, from the JPEG zip (cached once as a uint8 tensor)
# ==================================================================================================

def load_cifar(out: str, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (N, 3, 32, 32) images and int64 (N,) labels of a split, in the zip's sorted order."""
    cache = os.path.join(out, f"cifar-{split}.pt")
    if os.path.isfile(cache):
        d = torch.load(cache)
        return d["x"], d["y"]
    names = sorted(n for n in zipfile.ZipFile(ZIP).namelist() if n.startswith(split + "/") and n.endswith(".jpg"))
    from concurrent.futures import ProcessPoolExecutor
    with ProcessPoolExecutor(min(8, os.cpu_count() or 1)) as pool:       # ~2 ms a JPEG: 36k take a minute on one core
        x = np.concatenate(list(pool.map(_decode_names, [names[i:i + 2000] for i in range(0, len(names), 2000)])))
    x = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
    y = torch.tensor([CLASSES.index(n.split("/")[1]) for n in names])
    os.makedirs(out, exist_ok=True)
    torch.save({"x": x, "y": y}, cache)
    return x, y


def _decode_names(names: list) -> np.ndarray:
    zf = zipfile.ZipFile(ZIP)
    return np.stack([train_cifar._decode(zf.read(n), 32) for n in names])


def to_unit(x_uint8: torch.Tensor) -> torch.Tensor:
    return x_uint8.float() / 127.5 - 1                         # [-1, 1], the VAE's range


def optimise(opt, loss, clip_params=None) -> None:
    """One plain optimiser step (the three training stages share it); clip_params: clip their grad norm to 1."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if clip_params is not None:
        torch.nn.utils.clip_grad_norm_(clip_params, 1.0)
    opt.step()


def budget(minutes: float):
    """True while the wall-clock budget lasts."""
    end = time.time() + 60 * minutes
    return lambda: time.time() < end


# ==================================================================================================
# Stage vae: a small AutoencoderKL (f = 4, 4 latent channels)
# ==================================================================================================

def make_vae():
    from diffusers import AutoencoderKL
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64, 64),
                         down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                         layers_per_block=1, norm_num_groups=16, sample_size=32)


def train_vae(a):
    x, _ = load_cifar(a.out)
    torch.manual_seed(0)
    vae = make_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    more, step, t0 = budget(a.minutes), 0, time.time()
    while more():
        batch = to_unit(x[torch.randint(0, len(x), (64,))])
        post = vae.encode(batch).latent_dist
        rec = vae.decode(post.sample()).sample
        mse = F.mse_loss(rec, batch)
        kl = post.kl().mean() / batch[0].numel()                # per pixel, so the weight reads as in SD's VAE
        loss = mse + 1e-4 * kl                                  # small KL: a near-deterministic, well-scaled latent
        optimise(opt, loss)
        if step % 50 == 0:
            print(f"vae step {step} mse {mse.item():.4f} kl {kl.item():.2f} ({time.time() - t0:.0f}s)", flush=True)
        step += 1
    vae.eval()
    with torch.no_grad():                                       # SD's recipe: scaling_factor = 1 / std of latents
        z = torch.cat([vae.encode(to_unit(x[i:i + 500])).latent_dist.mode() for i in range(0, 2000, 500)])
        mse = F.mse_loss(vae.decode(z[:500]).sample, to_unit(x[:500])).item()
    vae.register_to_config(scaling_factor=float(1 / z.std()))
    vae.save_pretrained(os.path.join(a.out, "vae"))
    print(f"vae done: {step} steps, recon mse {mse:.4f}, latent std {z.std():.3f}, mean {z.mean():.3f}")


# ==================================================================================================
# Stage teacher: T5 (tiny, frozen, random) + PixArtTransformer2DModel trained with ε-MSE on the PixArt-α schedule
# ==================================================================================================

def make_tokenizer():
    """T5's tokenizer (a Unigram model, pad=0, eos=1, unk=2) with one piece per caption word, built in-process.

    deviation: T5's SentencePiece vocabulary is 32k pieces learnt on C4; these captions need 14 words.
    """
    from transformers import T5TokenizerFast
    words = sorted({w for p in PROMPTS for w in p.split()})
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)] + [("▁" + w, -1.0) for w in words]
    return T5TokenizerFast(vocab=vocab, extra_ids=0)


@torch.no_grad()
def encode_text(tokenizer, text_encoder, prompts: list) -> dict:
    tok = tokenizer(list(prompts), padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt")
    return {"emb": text_encoder(tok.input_ids, attention_mask=tok.attention_mask)[0], "mask": tok.attention_mask}


def train_teacher(a):
    from diffusers import (AutoencoderKL, DPMSolverMultistepScheduler, PixArtAlphaPipeline,
                           PixArtTransformer2DModel)
    from transformers import T5Config, T5EncoderModel
    x, y = load_cifar(a.out)
    dev = torch.device(a.device)
    vae = AutoencoderKL.from_pretrained(a.vae or os.path.join(a.out, "vae")).eval().to(dev)
    torch.manual_seed(0)
    tokenizer = make_tokenizer()
    text_encoder = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=64, d_kv=16, d_ff=128, num_layers=2,
                                           num_heads=4, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)).eval()
    # the 11 conditionings (10 captions + "" for caption dropout), computed once: the T5 is frozen
    cond = encode_text(tokenizer, text_encoder, PROMPTS + [""])
    e = cond["emb"][:10].flatten(1)
    print("min pairwise distance between caption embeddings:", torch.cdist(e, e).add(torch.eye(10) * 1e9).min().item())
    transformer = PixArtTransformer2DModel(
        num_attention_heads=a.heads, attention_head_dim=a.head_dim, in_channels=4, out_channels=8,
        num_layers=a.layers, cross_attention_dim=a.heads * a.head_dim, caption_channels=64, sample_size=8,
        patch_size=2, norm_num_groups=32, use_additional_conditions=False)   # out_channels 8: learned-sigma half, unused
    transformer.to(dev)
    cond = {k: v.to(dev) for k, v in cond.items()}
    print(f"transformer: {sum(p.numel() for p in transformer.parameters()) / 1e6:.2f}M parameters")
    # PixArt-α's schedule: "linear" β 1e-4..0.02, 1000 steps, ε-prediction (ᾱ_{T-1} ≈ 4.0e-5 > 0: the flawed schedule)
    ycfg = yoso.YOSOConfig(beta_schedule="linear", beta_start=1e-4, beta_end=0.02, prediction_type="epsilon")
    sched = yoso.NoiseSchedule.from_config(ycfg)
    with torch.no_grad():                                       # latents of all training images (posterior mean)
        z = torch.cat([vae.encode(to_unit(x[i:i + 1000]).to(dev)).latent_dist.mode() for i in range(0, len(x), 1000)])
        z = z * vae.config.scaling_factor
    print(f"latents {tuple(z.shape)}, std {z.std():.3f}")
    y, sched.alphas_cumprod = y.to(dev), sched.alphas_cumprod.to(dev)   # the whole loop stays on the device
    params = list(transformer.parameters())
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0)
    ema = [p.detach().clone() for p in params]
    more, step, t0, run, last = budget(a.minutes), 0, time.time(), torch.zeros((), device=dev), 0.0
    while more():
        for g in opt.param_groups:                              # linear warm-up: large batches start stable
            g["lr"] = a.lr * min(1.0, (step + 1) / a.warmup)
        idx = torch.randint(0, len(z), (a.batch,), device=dev)
        x0, label = z[idx], y[idx].clone()
        label[torch.rand(a.batch, device=dev) < 0.1] = 10      # caption dropout 10%: "" (allows CFG later)
        t = torch.randint(0, ycfg.T, (a.batch,), device=dev)
        eps = torch.randn_like(x0)
        out = transformer(sched.add_noise(x0, eps, t), encoder_hidden_states=cond["emb"][label],
                          encoder_attention_mask=cond["mask"][label], timestep=t,
                          added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]
        loss = F.mse_loss(out[:, :4], eps)                      # ε-prediction; the learned-sigma half is left alone
        optimise(opt, loss, params)
        with torch.no_grad():
            decay = min(0.999, (1 + step) / (10 + step))        # warm-up EMA, as in diffusers' EMAModel
            torch._foreach_lerp_(ema, params, 1 - decay)        # one fused update: on a GPU the step is launch-bound
            run = loss.detach() if step == 0 else 0.98 * run + 0.02 * loss.detach()   # no sync per step
        if step % 100 == 0 or time.time() - last > 10:
            last = time.time()
            print(f"teacher step {step} loss {run.item():.4f} ({time.time() - t0:.0f}s)", flush=True)
        step += 1
    run = run.item()
    with torch.no_grad():
        for e_, p in zip(ema, params):
            p.copy_(e_)
    transformer.cpu(), vae.cpu()
    scheduler = DPMSolverMultistepScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                                            prediction_type="epsilon", num_train_timesteps=1000)
    pipe = PixArtAlphaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                               scheduler=scheduler)
    pipe.save_pretrained(os.path.join(a.out, "pipeline"))
    print(f"teacher done: {step} steps of batch {a.batch} in {time.time() - t0:.0f}s, final loss {run:.4f}")
    write_image_folder(a.out, x, y.cpu(), a.data_items)


def write_image_folder(out: str, x, y, n: int):
    """n training images (class-balanced by a fixed permutation) + metadata.jsonl, for finetune_t2i.py --data."""
    from PIL import Image
    folder = os.path.join(out, "data")
    os.makedirs(folder, exist_ok=True)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(1))[:n]
    with open(os.path.join(folder, "metadata.jsonl"), "w") as f:
        for i in perm.tolist():
            Image.fromarray(x[i].permute(1, 2, 0).numpy()).save(os.path.join(folder, f"{i:05d}.png"))
            f.write(json.dumps({"file_name": f"{i:05d}.png", "text": PROMPTS[int(y[i])]}) + "\n")


# ==================================================================================================
# Stage classifier: a small CNN for prompt adherence
# ==================================================================================================

def make_classifier():
    def block(c_in, c_out):
        return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(),
                             nn.Conv2d(c_out, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(), nn.MaxPool2d(2))
    return nn.Sequential(block(3, 32), block(32, 64), block(64, 128), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(128, 10))


def train_classifier(a):
    x, y = load_cifar(a.out)
    xt, yt = load_cifar(a.out, "test")
    torch.manual_seed(0)
    net = make_classifier()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=5e-4)
    more, step, t0 = budget(a.minutes), 0, time.time()
    while more():
        for g in opt.param_groups:                              # cosine decay over the wall-clock budget
            g["lr"] = 1e-3 * (1 + np.cos(np.pi * min(1.0, (time.time() - t0) / (60 * a.minutes))))
        idx = torch.randint(0, len(x), (128,))
        xb = to_unit(x[idx])
        xb = torch.where(torch.rand(len(xb), 1, 1, 1) < 0.5, xb.flip(3), xb)       # horizontal flips
        loss = F.cross_entropy(net(xb), y[idx])
        optimise(opt, loss)
        if step % 100 == 0:
            print(f"classifier step {step} loss {loss.item():.3f} ({time.time() - t0:.0f}s)", flush=True)
        step += 1
    net.eval()
    with torch.no_grad():
        acc = (torch.cat([net(to_unit(xt[i:i + 500])).argmax(1) for i in range(0, len(xt), 500)]) == yt).float().mean()
    torch.save(net.state_dict(), os.path.join(a.out, "classifier.pt"))
    json.dump({"steps": step, "test_accuracy": float(acc)}, open(os.path.join(a.out, "classifier.json"), "w"))
    print(f"classifier done: {step} steps, test accuracy {acc:.3f} (all {len(xt)} test images)")


# ==================================================================================================
# Stage eval: FID against a fixed subset of training images + prompt adherence, same N for every row
# ==================================================================================================

def eval_rows(a) -> dict:
    """name -> row: the teacher at each step count, a second teacher-20 draw (the distance floor), students."""
    rows = {"real": dict(steps=0)} if a.real else {}             # N CIFAR-10 test images: the small-N FID floor
    rows.update({f"teacher_{k}step": dict(steps=k) for k in a.teacher_steps})
    if 20 in a.teacher_steps:                                   # same sampler, other noise: how close "the same" is
        rows["teacher_20step_seed2"] = dict(steps=20, seed=10_000)
    for g in a.teacher_cfg or []:                               # classifier-free guidance at sampling (prompt adherence)
        rows.update({f"teacher_{k}step_cfg{g:g}": dict(steps=k, cfg=g) for k in a.cfg_steps})
    if a.teacher_ipi:                                           # the teacher itself started from the informative prior
        rows.update({f"teacher_{k}step_ipi": dict(steps=k, ipi=a.teacher_ipi) for k in (1, 2)})
    for spec in a.student or []:
        name, folder = spec.split("=")
        for k in a.student_steps:                               # "1", "2": LCM as exported; "ddim20": 20 DDIM steps
            ddim = k.startswith("ddim")
            rows[f"{name}_{k}" if ddim else f"{name}_{k}step"] = dict(steps=int(k[4:] if ddim else k),
                                                                      student=folder, ddim=ddim)
    return rows


@torch.no_grad()
def generate(a, row: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """N uint8 images for one row and the class each prompt asked for (prompts cycle through the 10 classes)."""
    from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, LCMScheduler, PixArtAlphaPipeline,
                           PixArtTransformer2DModel)
    base = os.path.join(a.out, "pipeline")
    if row.get("student"):
        scheduler = LCMScheduler.from_pretrained(os.path.join(row["student"], "scheduler"))
        if row.get("ddim"):                                     # the student as a plain v / zero-SNR denoiser
            scheduler = DDIMScheduler.from_config(scheduler.config)
        pipe = PixArtAlphaPipeline.from_pretrained(
            base, transformer=PixArtTransformer2DModel.from_pretrained(os.path.join(row["student"], "transformer")),
            scheduler=scheduler)
    else:
        pipe = PixArtAlphaPipeline.from_pretrained(base)
        # 1 step: the pipeline reads the x_0 prediction from step()[1], which DDIM returns and DPM-Solver does not;
        # one first-order step from t = 999 to 0 is the same update in both: x̂_0 = (x_T − σ ε̂) / α
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing") \
            if row["steps"] == 1 else DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.to(a.device)
    pipe.set_progress_bar_config(disable=True)
    labels = torch.arange(a.n) % 10
    images = []
    for s in range(0, a.n, 100):
        lab = labels[s:s + 100]
        latents = None
        ipi_path = row.get("ipi") or os.path.join(row.get("student", ""), "ipi.safetensors")
        if (row.get("ipi") or row.get("student")) and os.path.isfile(ipi_path):   # ε-model: informative prior
            from safetensors.torch import load_file
            ipi = yoso.IPI.from_state_dict(load_file(ipi_path))
            latents = ipi.prior(len(lab), yoso.NoiseSchedule(pipe.scheduler.betas), torch.Generator().manual_seed(s))
        seed = row.get("seed", 0) + 1000 + s
        img = pipe([PROMPTS[i] for i in lab], num_inference_steps=row["steps"], guidance_scale=row.get("cfg", 1.0),
                   generator=torch.Generator().manual_seed(seed), latents=latents, height=32, width=32,
                   use_resolution_binning=False, clean_caption=False, max_sequence_length=MAX_TOKENS,
                   output_type="pt").images
        images.append(yoso.to_uint8(img.float().cpu() * 2 - 1))
    return torch.cat(images), labels


def samples_path(a, name: str) -> str:
    return os.path.join(a.out, "samples", f"{name}-n{a.n}.npz")


def generate_all(a):
    """Stage generate: every row's images to out/samples/NAME-nN.npz (e.g. on a GPU; eval reads them anywhere).

    Each file also records its row (steps, cfg, model), so `--stage eval --all-samples` needs no flags to rebuild the
    rows. A row that fails is reported and skipped: the others still get written (exit code 1 at the end)."""
    os.makedirs(os.path.join(a.out, "samples"), exist_ok=True)
    failed = []
    for name, row in eval_rows(a).items():
        if name != "real":
            t0 = time.time()
            try:
                imgs, labels = generate(a, row)
            except Exception as e:  # one broken student must not cost the other rows
                print(f"{name}: FAILED {type(e).__name__}: {e}", flush=True)
                failed.append(name)
                continue
            tmp = samples_path(a, name) + ".tmp.npz"
            np.savez(tmp, images=imgs.numpy(), labels=labels.numpy(), row=json.dumps(row))   # packed later
            os.replace(tmp, samples_path(a, name))
            print(f"{name}: {len(imgs)} images in {time.time() - t0:.1f}s", flush=True)
    if failed:
        raise SystemExit(f"generate: {len(failed)} rows failed: {' '.join(failed)}")


def sample_rows(a) -> dict:
    """--all-samples: the rows of every out/samples/*-nN.npz, read back from the files themselves, most needed
    first (an eval stopped early still has the floors, the teacher's 2 and 1 steps and the main students' 1 step)."""
    rows, suffix = {}, f"-n{a.n}.npz"
    for f in sorted(os.listdir(os.path.join(a.out, "samples"))):
        if f.endswith(suffix):
            d = np.load(os.path.join(a.out, "samples", f))
            rows[f[:-len(suffix)]] = json.loads(str(d["row"])) if "row" in d else dict(steps=-1)
    if a.real:
        rows |= {"real": dict(steps=0), "real_vae": dict(steps=0)}
    first = ["teacher_20step", "teacher_20step_seed2", "teacher_2step", "teacher_1step", "real"]
    main = [f"{r}_s{s}_1step" for s in range(3) for r in ("paper", "released", "noadapt")]
    rank = lambda n: (first.index(n) if n in first else len(first) + main.index(n) if n in main
                      else 20 + ("cfg" not in n) + 2 * n.startswith("abl-") + 4 * (n == "real_vae"))
    return dict(sorted(rows.items(), key=lambda kv: (rank(kv[0]), kv[0])))


def evaluate(a):
    from torchvision.utils import save_image
    results_dir = os.path.join(ROOT, "notebooks", "results")
    os.makedirs(results_dir, exist_ok=True)
    path = os.path.join(results_dir, f"teacher{'_' + a.tag if a.tag else ''}_eval.json")
    grids = os.path.join(results_dir, f"teacher_{a.tag}") if a.tag else results_dir     # a tagged run's own folder
    os.makedirs(grids, exist_ok=True)
    results = json.load(open(path)) if os.path.isfile(path) else {}
    x, _ = load_cifar(a.out)
    features = yoso.inception_features(yoso.resolve_inception(), "cpu")
    ref_idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(2))[:a.n_ref]
    ref_cache = os.path.join(a.out, f"fid-ref-{a.n_ref}.npz")
    if os.path.isfile(ref_cache):
        f = np.load(ref_cache)
        mu_r, sig_r = f["mu"], f["sigma"]
    else:
        t0 = time.time()
        mu_r, sig_r = train_cifar.feature_stats((x[ref_idx[i:i + 100]] for i in range(0, a.n_ref, 100)), features)
        np.savez(ref_cache, mu=mu_r, sigma=sig_r)
        print(f"reference stats of {a.n_ref} training images in {time.time() - t0:.0f}s", flush=True)
    clf = make_classifier()
    clf.load_state_dict(torch.load(a.classifier or os.path.join(a.out, "classifier.pt")))
    clf.eval()
    t20 = os.path.join(a.out, f"stats-teacher_20step-n{a.n}.npz")   # how far from the 20-step teacher's own samples
    rows = sample_rows(a) if a.all_samples else eval_rows(a)
    for name, row in sorted(rows.items(), key=lambda kv: kv[0] != "teacher_20step"):   # teacher-20 first
        key = name if a.n == 200 else f"{name}@n{a.n}"          # N = 200 rows keep their names from the first eval
        if a.skip_done and key in results and os.path.isfile(t20):
            if "tiling" not in results[key] and os.path.isfile(samples_path(a, name)):   # added later: images suffice
                results[key]["tiling"] = tiling(torch.from_numpy(np.load(samples_path(a, name))["images"]))
                json.dump(results, open(path, "w"), indent=1)
            continue
        t0 = time.time()
        if name in ("real", "real_vae"):
            xt, yt = load_cifar(a.out, "test")
            pick = torch.randperm(len(xt), generator=torch.Generator().manual_seed(3))[:a.n]
            imgs, labels = xt[pick], yt[pick]
            if name == "real_vae":                              # through the VAE: the best a latent model can reach
                imgs, labels = vae_roundtrip(a, imgs), labels
        elif os.path.isfile(samples_path(a, name)):            # made earlier by --stage generate
            f = np.load(samples_path(a, name))
            imgs, labels = torch.from_numpy(f["images"]), torch.from_numpy(f["labels"])
        else:
            imgs, labels = generate(a, row)
        t_gen = time.time() - t0
        feats = torch.cat([features(imgs[i:i + 100]) for i in range(0, len(imgs), 100)])   # once: FID, diversity
        mu, sig = train_cifar.feature_stats([feats], lambda f: f)
        with torch.no_grad():
            acc = (clf(to_unit(imgs)).argmax(1) == labels).float().mean().item()
        np.savez(os.path.join(a.out, f"stats-{name}-n{a.n}.npz"), mu=mu, sigma=sig)
        to_teacher = train_cifar.frechet_distance(mu, sig, np.load(t20)["mu"], np.load(t20)["sigma"]) \
            if os.path.isfile(t20) else None
        results[key] = dict(fid=train_cifar.frechet_distance(mu, sig, mu_r, sig_r), fid_to_teacher20=to_teacher,
                            adherence=acc, tiling=tiling(imgs), n=a.n, n_ref=a.n_ref, steps=row["steps"],
                            class_diversity=class_diversity(feats, labels),
                            cfg=row.get("cfg", 1.0), model=os.path.basename(row.get("student", "teacher")),
                            gen_seconds=round(t_gen, 1), eval_seconds=round(time.time() - t0, 1))
        print(key, results[key], flush=True)
        grid = torch.cat([imgs[labels == c][:4] for c in range(10)])          # 4 per class, one class per row
        png = f"{name}.png" if name.startswith("teacher") or a.tag else f"teacher_{name}.png"
        save_image(grid.float() / 255, os.path.join(grids, png), nrow=4)
        json.dump(results, open(path, "w"), indent=1)


def class_diversity(feats: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean over classes of the mean pairwise Inception-feature distance among one prompt's images: how much the
    noise still changes the picture (0: one image per prompt). Compare rows by their ratio to the teacher's."""
    return float(np.mean([yoso.feature_diversity(feats[labels == c]) for c in labels.unique()]))


def tiling(imgs: torch.Tensor) -> float:
    """yoso.token_tiling with one 8x8-pixel block per latent token (8x8 latents, patch 2): 0.11 for the 20-step
    teacher; a student that repeats one pattern in every token comes near 1."""
    return yoso.token_tiling(imgs, 8)


@torch.no_grad()
def vae_roundtrip(a, imgs: torch.Tensor) -> torch.Tensor:
    """uint8 images encoded (posterior mean) and decoded by the teacher's VAE."""
    from diffusers import AutoencoderKL
    vae = AutoencoderKL.from_pretrained(a.vae or os.path.join(a.out, "vae")).eval()
    out = [vae.decode(vae.encode(to_unit(imgs[i:i + 100])).latent_dist.mode()).sample for i in range(0, len(imgs), 100)]
    return yoso.to_uint8(torch.cat(out).clamp(-1, 1))


def figure(a):
    """Stage figure: one strip of 20 samples (2 per class, classes left to right) per --rows name, one PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(a.rows), 1, figsize=(10, 0.62 * len(a.rows) + 0.3))
    for ax, spec in zip(np.atleast_1d(axes), a.rows):
        name, _, label = spec.partition(":")                   # NAME or NAME:LABEL
        f = np.load(samples_path(a, name))
        imgs, labels = f["images"], f["labels"]
        pick = np.concatenate([np.flatnonzero(labels == c)[:2] for c in range(10)])
        ax.imshow(np.concatenate(list(imgs[pick].transpose(0, 2, 3, 1)), axis=1))
        ax.set_xticks([]), ax.set_yticks([])
        ax.set_ylabel(label or name.replace("_", " "), rotation=0, ha="right", va="center", fontsize=8)
    fig.suptitle("2 samples per class, classes " + ", ".join(CLASSES), fontsize=8)
    fig.tight_layout()
    path = os.path.join(ROOT, "notebooks", "results", f"teacher{'_' + a.tag if a.tag else ''}_rows.png")
    fig.savefig(path, dpi=100)
    print(path)


# ==================================================================================================
# Stages pack / unpack / table: a GPU run's results in a few files, read back and summarised here
# ==================================================================================================

PACK_LIMIT = int(15.5 * 2 ** 20)                                # the GPU machine returns files of at most 16 MiB


def _xz(path: str) -> bytes:
    """An uncompressed .npz, compressed with a horizontal-delta filter: ~0.9 MB per 500 CIFAR images (npz: 1.3)."""
    import lzma
    return lzma.compress(open(path, "rb").read(), format=lzma.FORMAT_XZ,
                         filters=[{"id": lzma.FILTER_DELTA, "dist": 1}, {"id": lzma.FILTER_LZMA2, "preset": 9}])


def pack(a):
    """Stage pack: out/logs, the students' small files and every out/samples/*.npz into at most --pack-files tar
    files of <= 15.5 MiB in --pack-dir, in order of importance; MANIFEST.json (in the first) lists what was left out."""
    import io
    import tarfile
    from concurrent.futures import ProcessPoolExecutor
    small = []                                                  # (arcname, path): logs, metrics, sample grids, configs
    for top in ("logs", "students"):
        for root, _, files in os.walk(os.path.join(a.out, top)):
            for f in sorted(files):
                path = os.path.join(root, f)
                rel = os.path.relpath(path, a.out)
                keep = top == "logs" or (f.endswith((".json", ".jsonl", ".md", ".png", ".txt", ".log"))
                                         and "/transformer/" not in "/" + rel and "/adapter/" not in "/" + rel)
                if keep and os.path.getsize(path) < 2 ** 20:
                    small.append((rel, path))
    for f in ("pipeline/model_index.json", "pipeline/transformer/config.json", "pipeline/scheduler/scheduler_config.json"):
        if os.path.isfile(os.path.join(a.out, f)):
            small.append((f, os.path.join(a.out, f)))
    folder = os.path.join(a.out, "samples")
    npz = sorted(f for f in os.listdir(folder) if f.endswith(".npz") and ".tmp" not in f) if os.path.isdir(folder) else []
    first = lambda f: (not f.startswith("teacher_"), "abl-" in f, not f.endswith("_1step" + f[f.rindex("-n"):]), f)
    npz.sort(key=first)                                         # teacher rows, main students' 1 step, 2 steps, ablations
    with ProcessPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:
        blobs = list(pool.map(_xz, [os.path.join(folder, f) for f in npz]))
    members = [(rel, open(path, "rb").read()) for rel, path in small]
    members += [(f"samples/{f}.xz", b) for f, b in zip(npz, blobs)]
    bins, left = [[] for _ in range(a.pack_files)], []
    room = [PACK_LIMIT - 64 * 1024] * a.pack_files              # the first keeps room for MANIFEST.json
    for rel, data in members:
        size = 512 + (len(data) + 511) // 512 * 512             # tar header + padded data
        i = next((i for i in range(a.pack_files) if room[i] >= size), None)
        if i is None:
            left.append(rel)
            continue
        bins[i].append((rel, data))
        room[i] -= size
    manifest = dict(files={f"teacher-{i + 1}.tar": [r for r, _ in b] for i, b in enumerate(bins) if b}, left_out=left)
    bins[0].insert(0, ("MANIFEST.json", json.dumps(manifest, indent=1).encode()))
    os.makedirs(a.pack_dir, exist_ok=True)
    for i, b in enumerate(bins):
        if not b:
            continue
        path = os.path.join(a.pack_dir, f"teacher-{i + 1}.tar")
        with tarfile.open(path + ".tmp", "w") as tar:
            for rel, data in b:
                info = tarfile.TarInfo(rel)
                info.size, info.mtime = len(data), int(time.time())
                tar.addfile(info, io.BytesIO(data))
        os.replace(path + ".tmp", path)
        print(f"{path}: {len(b)} files, {os.path.getsize(path) / 2 ** 20:.1f} MiB", flush=True)
    print(f"packed {len(npz)} sample files; left out: {left or 'nothing'}")


def unpack(a):
    """Stage unpack: the tar files of --pack-dir into out (samples/*.npz decompressed, logs/, students/)."""
    import lzma
    import tarfile
    for f in sorted(os.listdir(a.pack_dir)):
        if f.startswith("teacher-") and f.endswith(".tar"):
            with tarfile.open(os.path.join(a.pack_dir, f)) as tar:
                for m in tar.getmembers():
                    if not m.isfile() or m.name.startswith("/") or ".." in m.name.split("/"):
                        continue
                    data = tar.extractfile(m).read()
                    name = m.name
                    if name.endswith(".npz.xz"):
                        data, name = lzma.decompress(data), name[:-3]
                    path = os.path.join(a.out, name)
                    os.makedirs(os.path.dirname(path), exist_ok=True)
                    open(path, "wb").write(data)
            print(f"unpacked {f}")
    manifest = os.path.join(a.out, "MANIFEST.json")
    if os.path.isfile(manifest):
        print("left out on the GPU machine:", json.load(open(manifest))["left_out"] or "nothing")


ROUTES = (("paper", "adaption + zero-SNR, per-sample w_rec"), ("released", "adaption + zero-SNR, batch-mean w_rec"),
          ("noadapt", "no adaption, ε base from the IPI"))


def table(a):
    """Stage table: the 3-route x 3-seed teacher table from the --tag results, and per seed whether a route is
    "far closer" to the 20-step teacher: to-teacher-20 <= floor + (teacher 2-step - floor) / 2, where the floor is
    a second 20-step teacher draw's distance."""
    path = os.path.join(ROOT, "notebooks", "results", f"teacher{'_' + a.tag if a.tag else ''}_eval.json")
    res = json.load(open(path))
    get = lambda name: res.get(name if a.n == 200 else f"{name}@n{a.n}")
    fmt = lambda v, f="{:6.1f}": (f.format(v) if v is not None else "     -")
    line = lambda label, r: print(f"{label:34s} {fmt(r and r['fid'])} {fmt(r and r['fid_to_teacher20'])} "
                                  f"{fmt(r and 100 * r['adherence'], '{:5.1f}%')} {fmt(r and r.get('tiling'), '{:6.2f}')}")
    print(f"{'row (N = ' + str(a.n) + ')':34s} {'FID':>6s} {'to T20':>6s} {'adher.':>6s} {'tiling':>6s}")
    for name in ("real", "real_vae", "teacher_20step", "teacher_20step_seed2", "teacher_4step", "teacher_2step",
                 "teacher_1step") + tuple(sorted(k.split("@")[0] for k in res if "_cfg" in k and k.startswith("teacher"))):
        if get(name):
            line(name, get(name))
    floor, t2 = get("teacher_20step_seed2"), get("teacher_2step")
    bar = floor and t2 and floor["fid_to_teacher20"] + (t2["fid_to_teacher20"] - floor["fid_to_teacher20"]) / 2
    print(f"far closer: to T20 <= {fmt(bar)} (floor {fmt(floor and floor['fid_to_teacher20'])}, "
          f"teacher 2-step {fmt(t2 and t2['fid_to_teacher20'])})")
    students = sorted({k.split("@")[0].rsplit("_", 1)[0] for k in res if k.split("@")[0].endswith("step")
                       and not k.startswith(("teacher", "real"))})
    verdict = {}
    others = sorted({re.sub(r"_s\d+$", "", s) for s in students} - {r for r, _ in ROUTES})   # ablations, all seeds
    for route, what in ROUTES + tuple((s, "ablation") for s in others):
        print(f"-- {route}: {what}")
        for name in [s for s in students if s == route or re.fullmatch(rf"{route}_s\d+", s)]:
            for k in ("1", "2", "ddim20"):
                r = get(f"{name}_{k}step" if k.isdigit() else f"{name}_{k}")
                if r:
                    far = bar is not None and r["fid_to_teacher20"] <= bar
                    line(f"  {name} {k}{'-step' if k.isdigit() else ''}" + ("  far closer" if far else ""), r)
                    if k == "1":
                        verdict.setdefault(route, []).append(far)
    for route, v in verdict.items():
        print(f"{route}: far closer in {sum(v)} of {len(v)} seeds (1 step)")


# ==================================================================================================
# Command line
# ==================================================================================================

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/teacher")
    p.add_argument("--stage", choices=("vae", "teacher", "classifier", "generate", "eval", "figure", "pack", "unpack",
                                       "table", "all"), default="all")
    p.add_argument("--minutes", type=float, help="wall-clock budget of a training stage (defaults: vae 5, "
                                                 "teacher 25, classifier 4)")
    p.add_argument("--batch", type=int, default=64, help="teacher batch size")
    p.add_argument("--lr", type=float, default=5e-4, help="teacher learning rate")
    p.add_argument("--warmup", type=int, default=1, help="teacher lr warm-up steps")
    p.add_argument("--layers", type=int, default=6, help="teacher transformer blocks")
    p.add_argument("--heads", type=int, default=4, help="teacher attention heads")
    p.add_argument("--head-dim", type=int, default=32, help="teacher attention head width")
    p.add_argument("--vae", help="the VAE folder (default OUT/vae)")
    p.add_argument("--classifier", help="the adherence classifier (default OUT/classifier.pt)")
    p.add_argument("--data-items", type=int, default=5000, help="images in the student's --data folder")
    p.add_argument("--n", type=int, default=200, help="samples per eval row (FID and adherence)")
    p.add_argument("--n-ref", type=int, default=1000, help="training images for the FID reference statistics")
    p.add_argument("--teacher-steps", type=int, nargs="*", default=[20, 4, 2, 1])
    p.add_argument("--real", action="store_true", help="also a row of N CIFAR-10 test images (the FID floor); with "
                                                         "--all-samples also those images through the VAE")
    p.add_argument("--teacher-cfg", type=float, nargs="*", help="also teacher rows with this guidance scale ...")
    p.add_argument("--cfg-steps", type=int, nargs="*", default=[20], help="... at these step counts")
    p.add_argument("--all-samples", action="store_true", help="eval: the rows of every out/samples/*-nN.npz")
    p.add_argument("--skip-done", action="store_true", help="eval: leave out rows already in the results (resume)")
    p.add_argument("--tag", help="eval/table: results in notebooks/results/teacher_TAG_eval.json, grids in "
                                 "notebooks/results/teacher_TAG/ (a new teacher's rows apart from the old ones)")
    p.add_argument("--pack-dir", help="pack/unpack: the folder of teacher-N.tar files")
    p.add_argument("--pack-files", type=int, default=3, help="pack: at most this many tar files")
    p.add_argument("--student", action="append", help="NAME=FOLDER of a finetune_t2i.py run to evaluate")
    p.add_argument("--student-steps", nargs="*", default=["1", "2"], help="student rows: 1, 2 (LCM), ddim20 (DDIM)")
    p.add_argument("--teacher-ipi", metavar="FILE", help="also the teacher's 1 and 2 steps from this informative "
                                                          "prior (a no-adaption student's ipi.safetensors)")
    p.add_argument("--rows", nargs="*", help="--stage figure: the sample sets to show, top to bottom: NAME or NAME:LABEL")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="for the teacher's training and for generation")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (eval's Inception on a free machine: more)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    defaults = dict(vae=5, teacher=25, classifier=4)
    stages = ("vae", "teacher", "classifier", "eval") if a.stage == "all" else (a.stage,)
    for stage in stages:
        a.minutes = a.minutes if a.minutes is not None and a.stage != "all" else defaults.get(stage)
        t0 = time.time()
        dict(vae=train_vae, teacher=train_teacher, classifier=train_classifier, generate=generate_all,
             eval=evaluate, figure=figure, pack=pack, unpack=unpack, table=table)[stage](a)
        print(f"stage {stage}: {time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
