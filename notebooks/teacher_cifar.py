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
        figure      notebooks/results/teacher_rows.png: 20 samples of each --rows name, one strip a row
    python notebooks/teacher_cifar.py --out /work/runs/teacher --stage eval --student NAME=/work/runs/student ...

Everything runs on one CPU thread; the budgets (--minutes) are wall-clock, so a busier machine gets fewer steps.
"""
from __future__ import annotations

import argparse
import json
import os
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
    zf = zipfile.ZipFile(ZIP)
    names = sorted(n for n in zf.namelist() if n.startswith(split + "/") and n.endswith(".jpg"))
    x = torch.from_numpy(np.stack([train_cifar._decode(zf.read(n), 32) for n in names])).permute(0, 3, 1, 2).contiguous()
    y = torch.tensor([CLASSES.index(n.split("/")[1]) for n in names])
    os.makedirs(out, exist_ok=True)
    torch.save({"x": x, "y": y}, cache)
    return x, y


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
    vae = AutoencoderKL.from_pretrained(os.path.join(a.out, "vae")).eval()
    torch.manual_seed(0)
    tokenizer = make_tokenizer()
    text_encoder = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=64, d_kv=16, d_ff=128, num_layers=2,
                                           num_heads=4, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)).eval()
    # the 11 conditionings (10 captions + "" for caption dropout), computed once: the T5 is frozen
    cond = encode_text(tokenizer, text_encoder, PROMPTS + [""])
    e = cond["emb"][:10].flatten(1)
    print("min pairwise distance between caption embeddings:", torch.cdist(e, e).add(torch.eye(10) * 1e9).min().item())
    transformer = PixArtTransformer2DModel(
        num_attention_heads=4, attention_head_dim=32, in_channels=4, out_channels=8, num_layers=6,
        cross_attention_dim=128, caption_channels=64, sample_size=8, patch_size=2, norm_num_groups=32,
        use_additional_conditions=False)                        # out_channels 8: PixArt's learned-sigma half, unused
    print(f"transformer: {sum(p.numel() for p in transformer.parameters()) / 1e6:.2f}M parameters")
    # PixArt-α's schedule: "linear" β 1e-4..0.02, 1000 steps, ε-prediction (ᾱ_{T-1} ≈ 4.0e-5 > 0: the flawed schedule)
    ycfg = yoso.YOSOConfig(beta_schedule="linear", beta_start=1e-4, beta_end=0.02, prediction_type="epsilon")
    sched = yoso.NoiseSchedule.from_config(ycfg)
    with torch.no_grad():                                       # latents of all training images (posterior mean)
        z = torch.cat([vae.encode(to_unit(x[i:i + 1000])).latent_dist.mode() for i in range(0, len(x), 1000)])
        z = z * vae.config.scaling_factor
    print(f"latents {tuple(z.shape)}, std {z.std():.3f}")
    opt = torch.optim.AdamW(transformer.parameters(), lr=a.lr, weight_decay=0.0)
    ema = [p.detach().clone() for p in transformer.parameters()]
    more, step, t0, run = budget(a.minutes), 0, time.time(), 0.0
    while more():
        idx = torch.randint(0, len(z), (a.batch,))
        x0, label = z[idx], y[idx].clone()
        label[torch.rand(a.batch) < 0.1] = 10                   # caption dropout 10%: "" (allows CFG later)
        t = torch.randint(0, ycfg.T, (a.batch,))
        eps = torch.randn_like(x0)
        out = transformer(sched.add_noise(x0, eps, t), encoder_hidden_states=cond["emb"][label],
                          encoder_attention_mask=cond["mask"][label], timestep=t,
                          added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]
        loss = F.mse_loss(out[:, :4], eps)                      # ε-prediction; the learned-sigma half is left alone
        optimise(opt, loss, transformer.parameters())
        with torch.no_grad():
            decay = min(0.999, (1 + step) / (10 + step))        # warm-up EMA, as in diffusers' EMAModel
            for e_, p in zip(ema, transformer.parameters()):
                e_.lerp_(p, 1 - decay)
        run = loss.item() if step == 0 else 0.98 * run + 0.02 * loss.item()
        if step % 100 == 0:
            print(f"teacher step {step} loss {run:.4f} ({time.time() - t0:.0f}s)", flush=True)
        step += 1
    with torch.no_grad():
        for e_, p in zip(ema, transformer.parameters()):
            p.copy_(e_)
    scheduler = DPMSolverMultistepScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                                            prediction_type="epsilon", num_train_timesteps=1000)
    pipe = PixArtAlphaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                               scheduler=scheduler)
    pipe.save_pretrained(os.path.join(a.out, "pipeline"))
    print(f"teacher done: {step} steps of batch {a.batch} in {time.time() - t0:.0f}s, final loss {run:.4f}")
    write_image_folder(a.out, x, y, a.data_items)


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
    """Stage generate: every row's images to out/samples/NAME-nN.npz (e.g. on a GPU; eval reads them anywhere)."""
    os.makedirs(os.path.join(a.out, "samples"), exist_ok=True)
    for name, row in eval_rows(a).items():
        if name != "real":
            t0 = time.time()
            imgs, labels = generate(a, row)
            np.savez_compressed(samples_path(a, name), images=imgs.numpy(), labels=labels.numpy())
            print(f"{name}: {len(imgs)} images in {time.time() - t0:.1f}s", flush=True)


def evaluate(a):
    from torchvision.utils import save_image
    results_dir = os.path.join(ROOT, "notebooks", "results")
    os.makedirs(results_dir, exist_ok=True)
    path = os.path.join(results_dir, "teacher_eval.json")
    results = json.load(open(path)) if os.path.isfile(path) else {}
    x, _ = load_cifar(a.out)
    features = train_cifar.inception_features(train_cifar.resolve_inception(), "cpu")
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
    clf.load_state_dict(torch.load(os.path.join(a.out, "classifier.pt")))
    clf.eval()
    t20 = os.path.join(a.out, f"stats-teacher_20step-n{a.n}.npz")   # how far from the 20-step teacher's own samples
    for name, row in sorted(eval_rows(a).items(), key=lambda kv: kv[0] != "teacher_20step"):   # teacher-20 first
        t0 = time.time()
        if name == "real":
            xt, yt = load_cifar(a.out, "test")
            pick = torch.randperm(len(xt), generator=torch.Generator().manual_seed(3))[:a.n]
            imgs, labels = xt[pick], yt[pick]
        elif os.path.isfile(samples_path(a, name)):            # made earlier by --stage generate
            f = np.load(samples_path(a, name))
            imgs, labels = torch.from_numpy(f["images"]), torch.from_numpy(f["labels"])
        else:
            imgs, labels = generate(a, row)
        t_gen = time.time() - t0
        mu, sig = train_cifar.feature_stats((imgs[i:i + 100] for i in range(0, len(imgs), 100)), features)
        with torch.no_grad():
            acc = (clf(to_unit(imgs)).argmax(1) == labels).float().mean().item()
        np.savez(os.path.join(a.out, f"stats-{name}-n{a.n}.npz"), mu=mu, sigma=sig)
        to_teacher = train_cifar.frechet_distance(mu, sig, np.load(t20)["mu"], np.load(t20)["sigma"]) \
            if os.path.isfile(t20) else None
        key = name if a.n == 200 else f"{name}@n{a.n}"          # N = 200 rows keep their names from the first eval
        results[key] = dict(fid=train_cifar.frechet_distance(mu, sig, mu_r, sig_r), fid_to_teacher20=to_teacher,
                            adherence=acc, n=a.n, n_ref=a.n_ref, steps=row["steps"], model=row.get("student", "teacher"),
                            gen_seconds=round(t_gen, 1), eval_seconds=round(time.time() - t0, 1))
        print(key, results[key], flush=True)
        grid = torch.cat([imgs[labels == c][:4] for c in range(10)])          # 4 per class, one class per row
        png = f"{name}.png" if name.startswith("teacher") else f"teacher_{name}.png"
        save_image(grid.float() / 255, os.path.join(results_dir, png), nrow=4)
        json.dump(results, open(path, "w"), indent=1)


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
    path = os.path.join(ROOT, "notebooks", "results", "teacher_rows.png")
    fig.savefig(path, dpi=100)
    print(path)


# ==================================================================================================
# Command line
# ==================================================================================================

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/teacher")
    p.add_argument("--stage", choices=("vae", "teacher", "classifier", "generate", "eval", "figure", "all"),
                   default="all")
    p.add_argument("--minutes", type=float, help="wall-clock budget of a training stage (defaults: vae 5, "
                                                 "teacher 25, classifier 4)")
    p.add_argument("--batch", type=int, default=64, help="teacher batch size")
    p.add_argument("--lr", type=float, default=5e-4, help="teacher learning rate")
    p.add_argument("--data-items", type=int, default=5000, help="images in the student's --data folder")
    p.add_argument("--n", type=int, default=200, help="samples per eval row (FID and adherence)")
    p.add_argument("--n-ref", type=int, default=1000, help="training images for the FID reference statistics")
    p.add_argument("--teacher-steps", type=int, nargs="*", default=[20, 4, 2, 1])
    p.add_argument("--real", action="store_true", help="also a row of N CIFAR-10 test images (the FID floor)")
    p.add_argument("--student", action="append", help="NAME=FOLDER of a finetune_t2i.py run to evaluate")
    p.add_argument("--student-steps", nargs="*", default=["1", "2"], help="student rows: 1, 2 (LCM), ddim20 (DDIM)")
    p.add_argument("--teacher-ipi", metavar="FILE", help="also the teacher's 1 and 2 steps from this informative "
                                                          "prior (a no-adaption student's ipi.safetensors)")
    p.add_argument("--rows", nargs="*", help="--stage figure: the sample sets to show, top to bottom: NAME or NAME:LABEL")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="for generation")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    defaults = dict(vae=5, teacher=25, classifier=4)
    stages = ("vae", "teacher", "classifier", "eval") if a.stage == "all" else (a.stage,)
    for stage in stages:
        a.minutes = a.minutes if a.minutes is not None and a.stage != "all" else defaults.get(stage)
        t0 = time.time()
        dict(vae=train_vae, teacher=train_teacher, classifier=train_classifier, generate=generate_all,
             eval=evaluate, figure=figure)[stage](a)
        print(f"stage {stage}: {time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
