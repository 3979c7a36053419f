"""finetune_t2i.py — turn PixArt-α into a one-step text-to-image generator with YOSO (arXiv 2403.12931; README.md)

    python finetune_t2i.py --base PixArt-alpha --data DIR          # images + metadata.jsonl {"file_name", "text"}
    python finetune_t2i.py --base PixArt-alpha --prompts FILE      # the base's own 20-step samples are the data
    python finetune_t2i.py --sample runs/yoso-pixart --prompt "a red house" --steps 1
    python finetune_t2i.py --transplant runs/yoso-pixart           # 512 delta -> PixArt-alpha-1024 (Sec. 4.4)
    torchrun --nproc-per-node 8 finetune_t2i.py ...                # DDP

Two stages run in sequence (--stage all):
  adapt  quick adaption (Sec. 4.3): Stage I distils ε -> v on the teacher's schedule, Stage II moves the
         student to the zero-terminal-SNR schedule while the teacher keeps its own ("decoupled schedulers").
  yoso   yoso.train_step with the latent perceptual loss (Sec. 4.1) and the latent discriminator (Sec. 4.2).
--stage yoso on an ε-prediction base skips the adaption and samples with the informative prior (IPI).
LoRA is the default; the frozen pre-trained model is then the trained one with its adapters off (FrozenBase).
The output folder (--out) holds the result in diffusers / peft layout and a model card (export).
"""
from __future__ import annotations

import argparse, contextlib, copy, dataclasses, importlib.metadata, json, logging, math, os, shlex, shutil, sys
import time, warnings
from dataclasses import dataclass, field, replace

import torch
import torch.nn as nn
from PIL import Image
from safetensors.torch import load_file, save_file
from tqdm import tqdm

import yoso

BASES = {"PixArt-alpha": "PixArt-alpha/PixArt-XL-2-512x512", "PixArt-alpha-1024": "PixArt-alpha/PixArt-XL-2-1024-MS"}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_KW = "dtype" if tuple(map(int, importlib.metadata.version("diffusers").split(".")[:2])) >= (0, 42) else "torch_dtype"
PHASES = ("adapt", "yoso")

# ==== 1. Config: the paper's PixArt-α run where it says, else the official SD-1.5 LoRA run ========

@dataclass
class T2IConfig:
    base: str = "PixArt-alpha"          # BASES key, hub id or local diffusers pipeline folder
    data: str | None = None             # image folder with metadata.jsonl ({"file_name", "text"} per line)
    prompts: str | None = None          # or: a prompt file; the base's own samples become the "real" data
    cache: str | None = None            # precompute VAE latents + T5 embeddings here once (T5 then leaves memory)
    out: str = "runs/yoso-pixart"
    stage: str = "all"                  # adapt | yoso | all
    lora_rank: int = 64                 # official LoRA rank; 0 = full fine-tuning (the paper's PixArt run)
    lora_alpha: float = 8.0             # official lora_alpha (scale alpha/rank = 1/8)
    adapt_steps: int = 1000             # quick adaption, "about 1k iterations" (Sec. 4.3); half Stage I, half Stage II
    yoso_steps: int = 5000              # official LoRA run: 5000 steps
    batch_size: int = 256               # GLOBAL batch per step, split over processes (official: 4 GPUs x 16 x 4)
    grad_accum: int = 4                 # micro-batches per process per step (official: 4)
    resolution: int | None = None       # training image size in pixels; None = the base's own (512 for PixArt-α-512)
    precision: str = "bf16"             # bf16 | fp16 | fp32 (mixed precision via autocast; trained weights fp32)
    grad_checkpointing: bool = True     # recompute transformer blocks in backward: memory for ~30% time
    feature_block: int | None = None    # perceptual features after this many blocks; None = the middle (Sec. 4.1)
    disc_blocks: int | None = None      # blocks copied into D; None = the first half (as SD's down+mid half)
    max_tokens: int = 120               # T5 tokens, PixArt-α's max_sequence_length
    teacher_steps: int = 20             # DPM-Solver++ steps when --prompts makes the data
    teacher_guidance: float = 4.5       # PixArt-α's default classifier-free guidance for those samples
    ipi_items: int = 1000               # training latents used to estimate the informative prior
    sample_prompts: tuple = ("a photo of a red house on a hill", "a small blue bird on a branch",
                             "a cat wearing sunglasses, studio light", "an astronaut riding a horse, oil painting")
    n_diversity: int = 64               # fixed-noise one-step samples scored for collapse at each grid; 0 = none
    sample_every: int = 250             # steps between sample grids (fixed prompts, fixed noise)
    ckpt_every: int = 500               # steps between resumable checkpoints
    log_every: int = 10                 # steps between metrics.jsonl lines
    seed: int = 0
    resume: bool = False                # continue from the newest checkpoint in `out`
    max_skipped: int = 20               # stop (exit 3) after this many non-finite steps in a row
    saturation_gap: float = 10.0        # warn when the D(real) - D(fake) logit gap stays above this ...
    saturation_steps: int = 2000        # ... for this many steps in a row (D has won; G learns little)
    yoso: yoso.YOSOConfig = field(default_factory=lambda: yoso.YOSOConfig(
        beta_schedule="linear", beta_start=1e-4, beta_end=0.02,   # PixArt-α's; overwritten by the base's scheduler
        boundary_scaling=True,          # official on; pins G(x_0, 0) = x_0 as LCMScheduler assumes
        lr=2e-5, ema_decay=0.999))      # official LoRA lr and EMA

    def __post_init__(self):
        if self.lora_rank < 0:
            raise ValueError(f"lora_rank must be >= 0 (0 = full fine-tuning), got {self.lora_rank}")
        if self.stage not in ("adapt", "yoso", "all") or self.precision not in DTYPES:
            raise ValueError(f"stage must be adapt, yoso or all and precision bf16, fp16 or fp32, "
                             f"got stage={self.stage!r}, precision={self.precision!r}")
        for name in [f"{p}_steps" for p in PHASES if self.stage in (p, "all")] \
                + ["batch_size", "grad_accum", "ckpt_every", "sample_every", "log_every", "max_skipped"]:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {name}={getattr(self, name)}")

PRESETS = {
    "smoke": dict(lora_rank=4, adapt_steps=4, yoso_steps=3, batch_size=2, grad_accum=1, precision="fp32",
                  max_tokens=16, teacher_steps=2, teacher_guidance=1.0, ipi_items=8, n_diversity=4,
                  sample_prompts=("a red house", "a blue car"), sample_every=3, ckpt_every=3, log_every=1,
                  yoso=dict(lr=1e-3, ema_decay=0.5, k_D=250, k_C=25)),
    # LoRA scale 1 and 15x the official lr: 1000 YOSO steps of batch 32, not 5000 of 256 (issue 8)
    "cifar-teacher": dict(lora_rank=32, lora_alpha=32.0, adapt_steps=400, yoso_steps=1000, batch_size=32, grad_accum=1,
                          precision="fp32", grad_checkpointing=False, max_tokens=16, ckpt_every=250,
                          sample_prompts=tuple(f"a photo of a {c}" for c in ("airplane", "cat", "horse", "truck")),
                          yoso=dict(lr=3e-4, ema_decay=0.99)),
}


# ==== 2. The base model: loading, PixArt-α as G(x_t, t, cond), the frozen base, quick adaption ====

@contextlib.contextmanager
def loading(what: str, name: str):
    """`name`'s pipeline path, loaded quietly in the `with`; any failure is one UserError line."""
    import diffusers, transformers
    path = BASES.get(name, name)
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "model_index.json")):
        raise yoso.UserError(f"{what}: {path} is a folder but not a diffusers pipeline (no model_index.json)")
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    hub_log.setLevel(logging.ERROR)     # while loading: offline, its retries print before our line
    try:
        with warnings.catch_warnings():     # and its deprecation notes: stderr holds one line, ours
            warnings.simplefilter("ignore")
            yield path
    except Exception as e:
        reason = (str(e).strip() or type(e).__name__).splitlines()[0]
        fix = "" if os.path.isdir(path) else "; offline? pass --base PATH to a local diffusers pipeline folder"
        raise yoso.UserError(f"{what}: cannot load a PixArt-α diffusers pipeline from {path!r} "
                             f"({reason[:200]}){fix}") from None
    finally:
        hub_log.setLevel(level)

def load_base(name: str, dtype=torch.float32):
    """The base's PixArtAlphaPipeline: T5 and VAE in `dtype`, the transformer (trained) in fp32."""
    from diffusers import PixArtAlphaPipeline, PixArtTransformer2DModel
    with loading(f"--base {name}", name) as path:
        tf = PixArtTransformer2DModel.from_pretrained(path, subfolder="transformer")
        pipe = PixArtAlphaPipeline.from_pretrained(path, transformer=tf, **{DTYPE_KW: dtype})
    pipe.set_progress_bar_config(disable=True)
    logging.getLogger(PixArtAlphaPipeline.__module__).setLevel(logging.ERROR)   # long captions: cut, unwarned
    return pipe

def text_cond(pipe, prompts, max_tokens: int) -> dict:
    """yoso's cond {"emb": (B, L, 4096), "mask": (B, L)}: T5 as the pipeline encodes prompts."""
    emb, mask, _, _ = pipe.encode_prompt(list(prompts), do_classifier_free_guidance=False, clean_caption=False,
                                         max_sequence_length=max_tokens)   # cleaning: bs4, ftfy
    return {"emb": emb, "mask": mask}

def schedule_config(yoso_cfg: yoso.YOSOConfig, sched: dict, adapted: bool) -> yoso.YOSOConfig:
    """The base's schedule; after adaption v-prediction on its zero-terminal-SNR rescaling (Sec. 4.3)."""
    return replace(yoso_cfg, T=sched["num_train_timesteps"], beta_schedule=sched["beta_schedule"],
                   beta_start=sched["beta_start"], beta_end=sched["beta_end"], zero_terminal_snr=adapted,
                   prediction_type="v_prediction" if adapted else sched.get("prediction_type", "epsilon"))

def added_cond(tf, x):
    """PixArt-α-1024's size conditioning (resolution, aspect ratio in pixels); the 512 model takes None."""
    if not tf.use_additional_conditions:
        return {"resolution": None, "aspect_ratio": None}
    B, _, h, w = x.shape
    size = torch.tensor([[h * 8.0, w * 8.0]], device=x.device).repeat(B, 1)     # PixArt's VAE downsamples 8x
    return {"resolution": size, "aspect_ratio": size[:, :1] / size[:, 1:]}

class PixArtDenoiser(nn.Module):
    """G(x_t, t, cond) for yoso: of PixArt-α's output [ε or v, learned variance] the first half."""

    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.transformer = transformer

    def forward(self, x_t, t, cond):
        out = self.transformer(x_t, encoder_hidden_states=cond["emb"], encoder_attention_mask=cond["mask"],
                               timestep=t, added_cond_kwargs=added_cond(self.transformer, x_t), return_dict=False)[0]
        return out[:, : x_t.shape[1]]                           # (B, 2C, H, W) -> (B, C, H, W): drop learned sigma

def pixart_trunk(tf, x, t, cond, blocks, checkpoint: bool = False, context=contextlib.nullcontext):
    """PixArt's forward up to the end of `blocks` (tokens B, N, C), each block in `context()`."""
    with context():
        h = tf.pos_embed(x)                                     # (B, N, C) patch tokens + position
        t_emb, _ = tf.adaln_single(t, added_cond(tf, x), batch_size=len(x), hidden_dtype=h.dtype)
        c = tf.caption_projection(cond["emb"]).view(len(x), -1, h.shape[-1])
    mask_bias = ((1 - cond["mask"].to(h.dtype)) * -10000.0).unsqueeze(1)   # (B, 1, L), diffusers' convention
    checkpoint = checkpoint and torch.is_grad_enabled()         # no graph: nothing to recompute
    for block in blocks:
        def run(h, block=block):
            with context():
                return block(h, encoder_hidden_states=c, encoder_attention_mask=mask_bias, timestep=t_emb)
        h = torch.utils.checkpoint.checkpoint(run, h, use_reentrant=False) if checkpoint else run(h)
    return h

class PixArtTrunk(nn.Module):
    """Trainable copy of PixArt-α's patch embed, timestep and caption embedders and first N blocks (Sec. 4.2)."""

    def __init__(self, tf, n_blocks: int, checkpoint: bool = False):
        super().__init__()
        self.pos_embed, self.adaln_single = copy.deepcopy(tf.pos_embed), copy.deepcopy(tf.adaln_single)
        self.caption_projection = copy.deepcopy(tf.caption_projection)
        self.blocks = copy.deepcopy(tf.transformer_blocks[:n_blocks])
        self.use_additional_conditions, self.checkpoint = tf.use_additional_conditions, checkpoint

    def forward(self, x, t, cond):
        return pixart_trunk(self, x, t, cond, self.blocks, self.checkpoint)

class FrozenBase:
    """The frozen pre-trained PixArt-α: with LoRA the trained model, adapters off, else a copy."""

    def __init__(self, model: nn.Module, dtype=torch.float32):
        self.lora = hasattr(model, "disable_adapter")           # LoRA: the base is already in `dtype` (build)
        self.model = model if self.lora else copy.deepcopy(model).requires_grad_(False).to(dtype)
        self.transformer = model.get_base_model() if self.lora else self.model
        self.denoiser = PixArtDenoiser(self.transformer)

    def __call__(self):
        return self.model.disable_adapter() if self.lora else contextlib.nullcontext()

def perceptual_features(base: FrozenBase, n_blocks: int, checkpoint: bool = False):
    """F(x, c) of Sec. 4.1: the frozen base's tokens after `n_blocks` blocks, run at t = 0 on the latent."""
    tf = base.transformer   # `context=base`, not `with base():`: checkpointed blocks rerun later
    return lambda x, cond: pixart_trunk(tf, x, x.new_zeros(len(x), dtype=torch.long), cond,
                                        tf.transformer_blocks[:n_blocks], checkpoint, context=base)

def adaption_loss(G, frozen: FrozenBase, x0, cond, teacher_sched, student_sched, teacher_pred: str, amp, noise):
    """Quick adaption (Sec. 4.3), Stage I or II: MSE(v_student, v_target); noise = (t, ε)."""
    t, eps = (v.to(x0.device) for v in noise)
    x_t_teacher, x_t_student = teacher_sched.add_noise(x0, eps, t), student_sched.add_noise(x0, eps, t)
    with torch.no_grad(), frozen(), amp():
        teacher_out = frozen.denoiser(x_t_teacher, t, cond).float()
    target = yoso.adaption_target(teacher_out, x_t_teacher, t, teacher_sched, student_sched, teacher_pred)
    with amp():
        v = G(x_t_student, t, cond)
    return yoso.weighted_mse(v, target).mean()


# ==== 3. Data: (latent x_0, T5 cond) per item — from images, the base's own samples, or a cache ===

def read_items(cfg: T2IConfig) -> tuple[list, int]:
    """(path, caption) of --data's metadata.jsonl, (None, prompt) of --prompts; corrupt count."""
    if cfg.prompts:
        if not os.path.isfile(cfg.prompts):
            raise yoso.UserError(f"--prompts {cfg.prompts}: no such file")
        items = [(None, line.strip()) for line in open(cfg.prompts) if line.strip()]
        if not items:
            raise yoso.UserError(f"--prompts {cfg.prompts}: no prompts")
        return items, 0
    meta, items, corrupt = os.path.join(cfg.data, "metadata.jsonl"), [], 0
    if not os.path.isdir(cfg.data):
        raise yoso.UserError(f"--data {cfg.data}: no such folder (an image folder with a metadata.jsonl)")
    if not os.path.isfile(meta):
        raise yoso.UserError(f"--data {cfg.data}: no metadata.jsonl (one {{\"file_name\": ..., \"text\": ...}} per line)")
    for n, line in enumerate(open(meta), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise yoso.UserError(f"{meta} line {n}: not valid JSON ({e.msg})") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("text"), str) or not rec["text"].strip():
            raise yoso.UserError(f"{meta} line {n}: no \"text\" caption")
        path = os.path.join(cfg.data, str(rec.get("file_name", "")))
        if not os.path.isfile(path):                            # also: no "file_name"
            raise yoso.UserError(f"{meta} line {n}: \"file_name\" {rec.get('file_name')!r} is not a file in {cfg.data}")
        try:
            Image.open(path).convert("RGB")              # decodes it all: truncated files fail here
            items.append((path, rec["text"]))
        except Exception:
            corrupt += 1
    if not items:
        raise yoso.UserError(f"--data {cfg.data}: all {corrupt} images are corrupt or unreadable" if corrupt
                             else f"{meta}: no items")
    return items, corrupt

class Items:
    """(x_0, text_cond) batches by index: T5 + VAE encoded (--prompts: base samples) or cached."""

    def __init__(self, items: list, pipe, frozen: FrozenBase, cfg: T2IConfig, device, amp):
        self.items, self.pipe, self.frozen, self.cfg, self.device, self.amp = items, pipe, frozen, cfg, device, amp
        self.cache = None                                       # a folder once build_cache has filled it
        down, patch = pipe.vae_scale_factor, pipe.transformer.config.patch_size     # VAE: 8x down for PixArt-α
        self.image_size = cfg.resolution or pipe.transformer.config.sample_size * down
        if self.image_size % (down * patch):
            raise yoso.UserError(f"resolution {self.image_size} is not divisible by {down * patch} = VAE "
                                 f"factor {down} x patch size {patch}; pick a multiple of it")
        self.latent_shape = (pipe.transformer.config.in_channels, self.image_size // down, self.image_size // down)

    def __len__(self):
        return len(self.items)

    def get(self, indices: list) -> tuple:
        if self.cache:
            rows = [load_file(os.path.join(self.cache, f"{i:08d}.safetensors")) for i in indices]
            x0, emb, mask = (torch.stack([r[k] for r in rows]).to(self.device) for k in ("latent", "emb", "mask"))
            return x0, {"emb": emb, "mask": mask}
        paths, captions = zip(*(self.items[i] for i in indices))
        cond = text_cond(self.pipe, captions, self.cfg.max_tokens)
        return (self.teacher_latents(cond, indices) if paths[0] is None else self.images(paths)), cond

    def batches(self, n: int) -> list:
        return [list(range(s, min(s + self.cfg.batch_size, n))) for s in range(0, n, self.cfg.batch_size)]

    def latents(self, n: int) -> torch.Tensor:
        """x_0 of the first n items: the informative prior's data, the collapse figures' real images."""
        return torch.cat([self.get(idx)[0] for idx in self.batches(n)])

    @torch.no_grad()
    def images(self, paths: list) -> torch.Tensor:
        pix = self.pipe.image_processor.preprocess([Image.open(p).convert("RGB") for p in paths], self.image_size,
                                                   self.image_size, resize_mode="crop")       # [-1, 1], centre crop
        vae = self.pipe.vae
        # deviation: the posterior mean, not a sample — deterministic, so cached and on-the-fly latents agree
        latents = vae.encode(pix.to(self.device, vae.dtype)).latent_dist.mode().float() * vae.config.scaling_factor
        return latents.contiguous()     # the VAE returns channels-last strides; randn_like(x_0) would follow them

    def teacher_latents(self, cond: dict, indices: list) -> torch.Tensor:
        """The frozen base's DPM-Solver++ samples with CFG (the pipeline's own loop), item i from noise seeded by i."""
        from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline
        dpm = DPMSolverMultistepScheduler.from_config(self.pipe.scheduler.config)
        teacher = PixArtAlphaPipeline(**dict(self.pipe.components, transformer=self.frozen.transformer, scheduler=dpm))
        teacher.set_progress_bar_config(disable=True)
        seeded = lambda i: torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + i)    # item i's own noise
        x = torch.stack([torch.randn(self.latent_shape, generator=seeded(i)) for i in indices])
        with self.frozen(), self.amp():
            return teacher(prompt_embeds=cond["emb"], prompt_attention_mask=cond["mask"], latents=x.to(self.device),
                           num_inference_steps=self.cfg.teacher_steps, guidance_scale=self.cfg.teacher_guidance,
                           height=self.image_size, width=self.image_size, use_resolution_binning=False,
                           clean_caption=False, output_type="latent").images.float()

    def build_cache(self, cache: str, dist) -> None:
        """Encode every item once (rank 0); meta.json, written last, marks a complete cache for these settings."""
        cfg = self.cfg
        key = dict(base=cfg.base, data=cfg.data, prompts=cfg.prompts, n=len(self), max_tokens=cfg.max_tokens,
                   teacher_steps=cfg.teacher_steps, teacher_guidance=cfg.teacher_guidance, seed=cfg.seed,
                   captions="lower-cased")                     # as PixArtAlphaPipeline.encode_prompt
        meta = os.path.join(cache, "meta.json")
        if dist.main and not (os.path.isfile(meta) and json.load(open(meta)) == key):
            os.makedirs(cache, exist_ok=True)
            for idx in tqdm(self.batches(len(self)), desc="cache"):
                x0, cond = self.get(idx)
                for j, i in enumerate(idx):
                    row = {k: v[j].cpu().contiguous() for k, v in dict(latent=x0, **cond).items()}
                    save_file(row, os.path.join(cache, f"{i:08d}.safetensors"))
            json.dump(key, open(meta, "w"))
        if dist.world > 1:
            torch.distributed.barrier()
        self.cache = cache


# ==== 4. Training: sample grids, export (diffusers / peft layout, model card), the loop ===========

@contextlib.contextmanager
def swapped(params: nn.ParameterList, ema: nn.ParameterList):
    """Temporarily put the EMA weights into the model (a pointer swap, no copy)."""
    for p, e in zip(params, ema):
        p.data, e.data = e.data, p.data
    try:
        yield
    finally:
        for p, e in zip(params, ema):
            p.data, e.data = e.data, p.data

@torch.no_grad()
def decode(vae, latents, chunk: int = 8) -> torch.Tensor:
    """Latents -> images in [-1, 1] (float32), `chunk` at a time (a 512 px VAE decode is memory-hungry)."""
    return torch.cat([vae.decode(z.to(vae.dtype) / vae.config.scaling_factor).sample.float()
                      for z in latents.split(chunk)])

@torch.no_grad()
def generate(G, vae, cond, noise, sched, ycfg, amp, steps: int = 1, chunk: int = 8) -> torch.Tensor:
    """Images of (noise, prompt) pairs in `steps` steps, `chunk` at a time; later noise seeded."""
    g = torch.Generator().manual_seed(0)
    with amp():
        x0 = [yoso.sample(G, noise[i:i + chunk], {k: v[i:i + chunk] for k, v in cond.items()}, sched=sched, cfg=ycfg,
                          steps=steps, generator=g) for i in range(0, len(noise), chunk)]
    return decode(vae, torch.cat(x0), chunk)

def sample_grid(path, G, vae, cond, noise, sched, ycfg, amp, steps=(1, 4)):
    """One row per step count, one column per prompt; the same noise every time so grids compare across steps."""
    rows = [generate(G, vae, cond, noise, sched, ycfg, amp, k) for k in steps]
    yoso.save_image_grid(torch.cat(rows), path, nrow=noise.shape[0])

def export(cfg: T2IConfig, model: nn.Module, ycfg, ipi, command: str, grid: str | None) -> None:
    """adapter/ (peft), transformer/ (merged, diffusers), scheduler/, ipi.safetensors, yoso_config.json, README.md."""
    from diffusers import LCMScheduler, PixArtTransformer2DModel
    out, kw = cfg.out, DTYPE_KW
    path = os.path.abspath(cfg.base) if os.path.isdir(cfg.base) else BASES.get(cfg.base, cfg.base)   # any cwd samples
    if cfg.lora_rank > 0:
        from peft import PeftModel
        model.save_pretrained(os.path.join(out, "adapter"))
        # merge into a fresh fp32 base: merging into bf16 weights would round the small delta away
        fresh = PixArtTransformer2DModel.from_pretrained(path, subfolder="transformer")
        model = PeftModel.from_pretrained(fresh, os.path.join(out, "adapter")).merge_and_unload()
    model.save_pretrained(os.path.join(out, "transformer"))
    # diffusers' sampler for the trained model: its prediction type and schedule; trailing: one step starts at T-1
    LCMScheduler(num_train_timesteps=ycfg.T, beta_schedule=ycfg.beta_schedule, beta_start=ycfg.beta_start,
                 beta_end=ycfg.beta_end, prediction_type=ycfg.prediction_type, timestep_spacing="trailing",
                 rescale_betas_zero_snr=ycfg.zero_terminal_snr).save_pretrained(os.path.join(out, "scheduler"))
    if ipi is not None:
        save_file(ipi.state_dict(), os.path.join(out, "ipi.safetensors"))
    run = dict(base=path, settings=dataclasses.asdict(cfg), yoso=dataclasses.asdict(ycfg))
    json.dump(run, open(os.path.join(out, "yoso_config.json"), "w"), indent=1, default=str)
    # the card's code: bf16 on a GPU, clean_caption off (it needs bs4, ftfy), no binning (a no-op at the model's size)
    use = f"""import torch
from diffusers import LCMScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = torch.bfloat16 if device == "cuda" else torch.float32     # T5-XXL alone: ~19 GB in fp32
pipe = PixArtAlphaPipeline.from_pretrained({path!r}, {kw}=dtype,
    transformer=PixArtTransformer2DModel.from_pretrained({os.path.join(out, 'transformer')!r}, {kw}=dtype),
    scheduler=LCMScheduler.from_pretrained({os.path.join(out, 'scheduler')!r})).to(device)
image = pipe("a photo of a red house", num_inference_steps=1, guidance_scale=1.0, clean_caption=False,
             use_resolution_binning=False).images[0]"""
    how = ("Starts from the informative prior (IPI, ipi.safetensors): pass its latents to the pipeline." if ipi
           else "Starts from pure noise: v-prediction on the zero-terminal-SNR schedule (after quick adaption).")
    card = [f"# YOSO one-step generator from {path}", "",
            "One-step text-to-image by YOSO (arXiv 2403.12931), fine-tuned with finetune_t2i.py.", "",
            f"![samples: rows 1 and 4 steps, a prompt a column]({os.path.relpath(grid, out)})" if grid else "", "",
            "## Use", "```python", use, "```", how, "", "## Command", "```", command, "```", "",
            "## Settings", "`yoso`: what the last stage trained with (the base's schedule, after adaption v-prediction "
            "on zero terminal SNR); `settings.yoso`: as configured, before the base's schedule was read.", "",
            "```json", json.dumps(run, indent=1, default=str), "```", ""]
    open(os.path.join(out, "README.md"), "w").write("\n".join(card))

def build(cfg: T2IConfig, device):
    """Base pipeline, G (LoRA or full), D, the frozen base and the trainable parameter list, in a fixed RNG order."""
    amp_dtype = None if cfg.precision == "fp32" else DTYPES[cfg.precision]
    pipe = load_base(cfg.base, dtype=amp_dtype or torch.float32)
    tf = pipe.transformer
    torch.manual_seed(cfg.seed)
    side = (cfg.resolution // pipe.vae_scale_factor if cfg.resolution else tf.config.sample_size) // tf.config.patch_size
    trunk = PixArtTrunk(tf, cfg.disc_blocks or len(tf.transformer_blocks) // 2, cfg.grad_checkpointing)
    D = yoso.FeatureDiscriminator(trunk, tf.inner_dim, grid=side * side).to(device)   # fp32
    if cfg.grad_checkpointing:
        tf.enable_gradient_checkpointing()
    if cfg.lora_rank > 0:
        from peft import LoraConfig, get_peft_model
        tf.requires_grad_(False).to(device, amp_dtype or torch.float32)   # the frozen base in the compute dtype
        # the official target list: every attention and feed-forward linear of the blocks; adapters stay fp32
        model = get_peft_model(tf, LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, init_lora_weights="gaussian",
                               target_modules=["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]))
    else:
        model = tf.to(device)
    pipe.vae.to(device).requires_grad_(False)
    pipe.text_encoder.to(device).requires_grad_(False)
    params = nn.ParameterList([p for p in model.parameters() if p.requires_grad])
    return pipe, model, D, FrozenBase(model, amp_dtype or torch.float32), params, amp_dtype

def train(cfg: T2IConfig, command: str) -> int:
    """Returns the exit code: 0 done or interrupted (checkpointed), 3 diverged."""
    from huggingface_hub import model_info, try_to_load_from_cache
    with loading(f"--base {cfg.base}", cfg.base) as path:       # an unreachable base first, before reading data:
        if not os.path.isdir(path) and not isinstance(try_to_load_from_cache(path, "model_index.json"), str):
            model_info(path, timeout=10)                        # a hub id must be cached or answer one quick request
    world = int(os.environ.get("WORLD_SIZE", 1))                # checked before any process group waits
    if cfg.batch_size % (world * cfg.grad_accum):
        raise yoso.UserError(f"batch_size {cfg.batch_size} is not divisible by {world} processes x grad_accum "
                             f"{cfg.grad_accum}; the global batch is split evenly (--set batch_size=N)")
    resume = yoso.open_run(cfg.out, cfg.resume, "--resume (the same command plus --resume)",
                           os.path.join("samples", "*.png"), "finetune_t2i.py", mark="phase")
    items, corrupt = read_items(cfg)
    if len(items) < cfg.batch_size:
        raise yoso.UserError(f"only {len(items)} usable items for a batch of {cfg.batch_size}; use more data "
                             "or --set batch_size=N")
    dist = yoso.init_distributed()
    device = dist.device
    pipe, model, D, frozen, params, amp_dtype = build(cfg, device)
    amp = lambda: torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None)
    data = Items(items, pipe, frozen, cfg, device, amp)
    os.makedirs(os.path.join(cfg.out, "samples"), exist_ok=True)
    if dist.main:
        print(f"{len(items)} items{f', {corrupt} corrupt images skipped' if corrupt else ''}; out {cfg.out}; "
              f"world {dist.world}")
    sample_cond = text_cond(pipe, cfg.sample_prompts, cfg.max_tokens)   # fixed prompts, encoded while T5 is loaded
    if cfg.cache:
        data.build_cache(cfg.cache, dist)
        pipe.text_encoder = None                                # training runs without the T5 in memory
    G = PixArtDenoiser(model)
    ddp = lambda m: torch.nn.parallel.DistributedDataParallel(m, [device.index] if device.type == "cuda" else None)
    G_ddp, D_ddp = (ddp(G), ddp(D)) if dist.world > 1 else (G, D)
    ema = copy.deepcopy(params).requires_grad_(False)
    weights = {"G": params, "G_ema": ema}              # in every checkpoint; the YOSO stage's add D
    distance = yoso.latent_perceptual_distance(perceptual_features(
        frozen, cfg.feature_block or len(frozen.transformer.transformer_blocks) // 2, cfg.grad_checkpointing))
    teacher_sched = yoso.NoiseSchedule.from_config(schedule_config(cfg.yoso, pipe.scheduler.config, False))
    teacher_pred = pipe.scheduler.config.get("prediction_type", "epsilon")
    log = yoso.MetricsLog(os.path.join(cfg.out, "metrics.jsonl"), dist.main)
    n_div = min(cfg.n_diversity, len(data)) if dist.main else 0      # collapse figures (rank 0)
    div_cond = {k: v[torch.arange(n_div) % len(cfg.sample_prompts)] for k, v in sample_cond.items()}
    block = pipe.vae_scale_factor * pipe.transformer.config.patch_size   # pixels per token: the tiling's tile
    collapse = yoso.CollapseMeter(decode(pipe.vae, data.latents(n_div)), device, block=block) if n_div > 1 else None
    stop = yoso.Stop()
    step, adapted = (resume["step"], resume["adapted"]) if resume else (0, False)   # global step
    ipi = grid = None
    skipped = 0                                                 # non-finite (skipped) steps, both phases
    first = PHASES.index(resume["phase"]) if resume else 0      # earlier: done in an earlier run

    for phase in [p for p in PHASES[first:] if cfg.stage in (p, "all")]:
        ycfg = schedule_config(cfg.yoso, pipe.scheduler.config, phase == "adapt" or adapted)
        sched = yoso.NoiseSchedule.from_config(ycfg)
        # rebinding frees the adaption's AdamW state (issue 15); the adaption trains G only
        optimizers = dict(zip("GD" if phase == "yoso" else "G", yoso.make_optimizers(G, D, ycfg)))
        scalers = {f"scaler_{k}": torch.amp.GradScaler(device.type) for k in optimizers if cfg.precision == "fp16"}
        optimizers |= scalers                        # fp16: the loss scales, checkpointed with them
        modules = weights | ({"D": D} if phase == "yoso" else {})
        same = resume is not None and resume["phase"] == phase
        start = resume["phase_step"] if same else 0
        if resume:                                              # this phase's full state, or an earlier phase's weights
            yoso.load_checkpoint(resume["path"], modules if same else weights, optimizers if same else {})
            if dist.main:
                print(f"resumed from {resume['path']} at step {step} ({phase} step {start})")
            resume = None
        if start == 0:
            ema.load_state_dict(params.state_dict())           # an EMA across the ε -> v switch would mix both
        if phase == "yoso" and ycfg.prediction_type == "epsilon" and not ycfg.zero_terminal_snr:
            ipi = yoso.IPI.estimate(data.latents(min(len(data), cfg.ipi_items)).cpu())   # Sec. 4.3: the sampling prior
        offset, total = step - start, getattr(cfg, f"{phase}_steps")
        student = lambda k: teacher_sched if phase == "adapt" and k < total // 2 else sched   # Stage I: old schedule

        def start_noise(n: int, seed: int) -> torch.Tensor:     # fixed x_{T-1}: N(0, I) or IPI
            g = torch.Generator().manual_seed(seed)
            return (ipi.prior(n, sched, g) if ipi else torch.randn((n, *data.latent_shape), generator=g)).to(device)

        def step_fn(k: int) -> dict:
            idx = yoso.batch_indices(len(data), offset + k, cfg.batch_size, cfg.seed)   # pure function of the step
            x0, cond = data.get(yoso.rank_slice(idx, dist).tolist())
            t, eps = yoso.step_noise(cfg.batch_size, x0.shape[1:], ycfg.T, offset + k, cfg.seed, dist,
                                     ycfg.one_step_share)
            if phase == "yoso":
                stats = yoso.train_step(G_ddp, D_ddp, optimizers["G"], optimizers["D"], x0, cond, sched=sched, cfg=ycfg,
                                        distance=distance, grad_accum=cfg.grad_accum, amp_dtype=amp_dtype,
                                        noise=(t, eps), **scalers)
            else:                                               # micro-batched as train_step is
                loss, n, scaler = 0.0, cfg.grad_accum, scalers.get("scaler_G")
                for x_mb, c_mb, noise in zip(x0.chunk(n), yoso.split_cond(cond, n), zip(t.chunk(n), eps.chunk(n))):
                    l_mb = adaption_loss(G_ddp, frozen, x_mb, c_mb, teacher_sched, student(k), teacher_pred, amp, noise)
                    (scaler.scale(l_mb) if scaler else l_mb).div(n).backward()
                    loss += l_mb.item() / n
                grad_norm = yoso.optimizer_step(optimizers["G"], params, scaler, ycfg.grad_clip)
                stats = dict(loss_adapt=loss, grad_norm_G=grad_norm, skipped=int(not math.isfinite(grad_norm)),
                             adapt_stage=1 if student(k) is teacher_sched else 2)
            if not stats["skipped"]:
                yoso.ema_update(ema, params, ycfg.ema_decay)    # EMA of the trained weights (adapters for LoRA)
            return stats

        def save(k: int) -> None:                  # rank 0's, as sample's: the others write nothing
            yoso.save_run_checkpoint(cfg.out, offset + k, modules, optimizers,
                                     extra=dict(phase=phase, phase_step=k, adapted=phase == "adapt" or adapted))

        def sample(k: int) -> None:
            nonlocal grid
            grid = os.path.join(cfg.out, "samples", f"{phase}-{offset + k:06d}.png")
            s_sched = student(k - 1)                      # the last step's schedule, and its config
            s_cfg = ycfg if s_sched is sched else replace(ycfg, zero_terminal_snr=False)
            with swapped(params, ema):
                noise = start_noise(len(cfg.sample_prompts), cfg.seed)
                sample_grid(grid, G, pipe.vae, sample_cond, noise, s_sched, s_cfg, amp)
                if collapse:                                 # collapse: diversity -> 0, tiling -> 1
                    images = generate(G, pipe.vae, div_cond, start_noise(n_div, cfg.seed + 1), s_sched, s_cfg, amp)
                    log(step=offset + k, phase=phase, **collapse(images))
            yoso.plot_metrics(log.path)                         # metrics.png beside metrics.jsonl

        if start < total:
            done, reason, n_skipped = yoso.run_loop(
                step_fn, start, total, every=[(cfg.ckpt_every, save), (cfg.sample_every, sample)] if dist.main else [],
                log=lambda step, **m: log(step=offset + step, phase=phase, **m), log_every=cfg.log_every,
                guard=(cfg.max_skipped, cfg.saturation_gap, cfg.saturation_steps), run_dir=cfg.out, stop=stop,
                world=dist.world, main=dist.main, desc=phase)
            skipped += n_skipped
            if dist.main and reason != "diverged":              # diverged: the last good checkpoint stays
                save(done)
                sample(done)
                if reason == "interrupted":
                    print(f"\ninterrupted at step {offset + done}; checkpoint saved. Resume with:\n  "
                          f"{command}{'' if cfg.resume else ' --resume'}")
            if reason != "done":
                return 3 if reason == "diverged" else 0
        step, adapted = offset + total, adapted or phase == "adapt"

    if dist.main:
        with (swapped(params, ema) if cfg.stage != "adapt" else contextlib.nullcontext()):   # adapt-only: as trained
            export(cfg, model, ycfg, ipi, command, grid)
        print(f"done: {step} steps, {skipped} skipped; out {cfg.out}")
    return 0


# ==== 5. Sampling with diffusers, the 1024 transplant (Sec. 4.4), the command line ================

def load_run(out: str) -> tuple[dict, yoso.IPI | None]:
    """A finished run's yoso_config.json, and its informative prior (ε-model without adaption) or None."""
    path, ipi = os.path.join(out, "yoso_config.json"), os.path.join(out, "ipi.safetensors")
    if not os.path.isfile(path):
        raise yoso.UserError(f"{out}: not a finetune_t2i.py output folder (no yoso_config.json)")
    return json.load(open(path)), yoso.IPI.from_state_dict(load_file(ipi)) if os.path.isfile(ipi) else None

def sample_cli(out: str, prompts: list, steps: int, n: int = 4, seed: int = 0, precision: str | None = None) -> str:
    """A one-step (or few-step) grid via diffusers' LCMScheduler; default weights bf16 on a GPU."""
    from diffusers import LCMScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel
    run, ipi = load_run(out)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {DTYPE_KW: DTYPES[precision or ("bf16" if device == "cuda" else "fp32")]}
    with loading(f"--sample {out}", run["base"]):
        tf = PixArtTransformer2DModel.from_pretrained(os.path.join(out, "transformer"), **dtype)
        scheduler = LCMScheduler.from_pretrained(os.path.join(out, "scheduler"))
        pipe = PixArtAlphaPipeline.from_pretrained(run["base"], transformer=tf, scheduler=scheduler, **dtype).to(device)
    pipe.set_progress_bar_config(disable=True)                          # stdout / stderr: the grid's path, or errors
    size = pipe.transformer.config.sample_size
    if ipi and tuple(ipi.mean.shape[-2:]) != (size, size):              # the pipeline would follow the latents' size
        raise yoso.UserError(f"{out}/ipi.safetensors holds a {'x'.join(map(str, ipi.mean.shape[-2:]))} prior but "
                             f"the transformer samples {size}x{size} latents; it belongs to another resolution")
    latents = ipi.prior(n * len(prompts), yoso.NoiseSchedule(pipe.scheduler.betas),
                        torch.Generator().manual_seed(seed)).to(device, pipe.transformer.dtype) if ipi else None
    images = pipe(prompts, num_images_per_prompt=n, num_inference_steps=steps, guidance_scale=1.0,
                  latents=latents, generator=torch.Generator(device).manual_seed(seed),
                  use_resolution_binning=False, clean_caption=False, output_type="pt",
                  max_sequence_length=run["settings"]["max_tokens"]).images   # the model's own size
    path = os.path.join(out, "samples", f"sample-{steps}step-{int(time.time())}.png")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    yoso.save_image_grid(images.float() * 2 - 1, path, nrow=n)
    return path

def transplant(out: str, target: str) -> str:
    """YOSO-target = target + (YOSO-512 − PixArt-512) per tensor (Sec. 4.4); LoRA: merged delta."""
    from diffusers import PixArtTransformer2DModel
    run, ipi = load_run(out)
    with loading(f"--base {target}", target) as target_path:
        tf = PixArtTransformer2DModel.from_pretrained(target_path, subfolder="transformer")
    dest = os.path.join(out, "transplant-" + os.path.basename(target_path.rstrip("/")))
    source = PixArtTransformer2DModel.from_pretrained(run["base"], subfolder="transformer").state_dict()
    tuned = load_file(os.path.join(out, "transformer", "diffusion_pytorch_model.safetensors"))
    sd, kept = yoso.transplant_delta(tf.state_dict(), source, tuned)
    tf.load_state_dict(sd)
    tf.save_pretrained(os.path.join(dest, "transformer"))
    shutil.copytree(os.path.join(out, "scheduler"), os.path.join(dest, "scheduler"), dirs_exist_ok=True)  # same schedule
    if ipi is not None:                                                 # ε-model without adaption: its prior
        size = tf.config.sample_size
        if (hw := list(ipi.mean.shape[-2:])) != [size, size]:
            # deviation: μ̂ upsampled, not estimated at the sampling size (no data here); ŝ kept
            ipi.mean = nn.functional.interpolate(ipi.mean[None], (size, size), mode="bilinear")[0]
            run["ipi_upsampled_from"] = hw
            print(f"ipi.safetensors: the {hw[0]}x{hw[1]} prior mean upsampled (bilinear) to the target's {size}x{size} latents")
        save_file(ipi.state_dict(), os.path.join(dest, "ipi.safetensors"))
    json.dump(dict(run, base=target_path, transplanted_from=out), open(os.path.join(dest, "yoso_config.json"), "w"), indent=1)
    if kept:
        print(f"kept from the target (no matching 512 tensor): {', '.join(kept)}")
    return dest

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0].split(" — ")[1], epilog=__doc__.split("\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", help=f"{', '.join(BASES)}, a hub id or a diffusers pipeline folder (default "
                                  f"{T2IConfig.base}); for --transplant the target (default PixArt-alpha-1024)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--data", help="folder of images + metadata.jsonl ({\"file_name\", \"text\"} per line)")
    src.add_argument("--prompts", help="prompt file, one per line; the base's own samples become the data")
    p.add_argument("--cache", help="precompute latents and T5 embeddings into this folder once (default: none)")
    p.add_argument("--out", help=f"run folder: checkpoints, metrics, samples, the result (default {T2IConfig.out})")
    p.add_argument("--stage", choices=("adapt", "yoso", "all"), help="quick adaption, the YOSO stage (alone on an "
                   "ε base: sampled from the informative prior) or adapt then yoso (default all)")
    rank = p.add_mutually_exclusive_group()
    rank.add_argument("--lora-rank", type=int, help=f"0 = full fine-tuning, as --full (default {T2IConfig.lora_rank})")
    rank.add_argument("--full", dest="lora_rank", action="store_const", const=0,
                      help="full fine-tuning, the paper's PixArt-α run (default: LoRA)")
    p.add_argument("--precision", choices=tuple(DTYPES), help=f"autocast dtype, fp16 with a GradScaler (default "
                   f"{T2IConfig.precision}); --sample's weights' dtype (default bf16 on a GPU, fp32 on CPU)")
    p.add_argument("--preset", choices=sorted(PRESETS), help="smoke: a few steps of everything on a tiny pipeline "
                   "(CPU); cifar-teacher: notebooks/teacher_cifar.py's, ~15 min on a CPU core (default: the paper's)")
    p.add_argument("--resume", nargs="?", const=True, metavar="RUN_DIR", help="continue from the newest checkpoint "
                   "in RUN_DIR (or --out), given the run's --data / --prompts again (default: a new run)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field, "
                   "repeatable (default: the preset's). KEY is one of: " + ", ".join(yoso.config_keys(T2IConfig())))
    p.add_argument("--sample", metavar="OUT", help="write a grid from a finished run's folder")
    p.add_argument("--prompt", action="append",
                   help=f"--sample's prompt, repeatable (default {T2IConfig.sample_prompts[0]!r})")
    p.add_argument("--steps", type=int, default=1, help="sampling steps for --sample (default 1: one step)")
    p.add_argument("--transplant", metavar="OUT", help="add the run's 512 delta to --base (Sec. 4.4)")
    return p.parse_args(argv)

def config_from_args(a) -> T2IConfig:
    """Preset deltas, then the flags, then --set overrides -> a validated T2IConfig (UserError if impossible)."""
    if isinstance(a.resume, str):                              # --resume RUN_DIR, as train_cifar.py's
        if a.out and os.path.abspath(a.out) != os.path.abspath(a.resume):
            raise yoso.UserError("--resume continues in the run's own folder; drop --out (or copy the run first)")
        a.out, a.resume = a.resume, True
    preset = dict(PRESETS.get(a.preset, {}))
    ydelta = preset.pop("yoso", {})
    flags = {f.name: getattr(a, f.name) for f in dataclasses.fields(T2IConfig) if getattr(a, f.name, None) is not None}
    try:
        cfg = T2IConfig(**preset | flags, yoso=replace(T2IConfig().yoso, **ydelta))
    except ValueError as e:
        raise yoso.UserError(f"impossible settings: {e}") from None
    return yoso.apply_overrides(cfg, a.set)

def main(argv=None) -> int:
    a = parse_args(argv)
    command = "python finetune_t2i.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    def body() -> int:
        if a.sample:
            print(sample_cli(a.sample, a.prompt or [T2IConfig.sample_prompts[0]], a.steps, precision=a.precision))
            return 0
        if a.transplant:
            print(transplant(a.transplant, a.base or "PixArt-alpha-1024"))
            return 0
        cfg = config_from_args(a)
        if not (cfg.data or cfg.prompts):
            raise yoso.UserError("give --data DIR or --prompts FILE")
        return train(cfg, command)
    return yoso.run_cli(body)

if __name__ == "__main__":
    sys.exit(main())
