"""benchmarks/realsize.py — finetune_t2i.py on a pipeline of PixArt-α-512's real size, with random weights (issue 15).

    python benchmarks/realsize.py                    # LoRA (rank 64): ~20 min and ~15 GB RAM on a CPU, ~1 min on a GPU
    python benchmarks/realsize.py --full             # full fine-tuning
    python benchmarks/realsize.py --log benchmarks/realsize-cpu.log

Opt-in, not collected by pytest. Builds, offline, the pipeline the hub's PixArt-alpha/PixArt-XL-2-512x512 would
give (no download):
  transformer  PixArtTransformer2DModel with diffusers' conversion-script arguments for 512: 28 blocks, 16 heads
               x 72, caption_channels 4096, sample_size 64, patch 2, in 4 / out 8 (learned sigma), no size
               conditioning (interpolation scale 1)
  vae          AutoencoderKL shaped like stabilityai/sd-vae-ft-ema (128-256-512-512, 2 layers per block)
  text encoder T5EncoderModel with T5-XXL's layer shapes (d_model 4096, d_ff 10240, 64 heads x 64, gated-gelu)
               but ONE layer instead of 24: the T5 is frozen and runs without grad, so its size only adds its
               weights (the real one: 4.76B parameters, ~9.5 GB in bf16, ~19 GB in fp32)
  tokenizer    a 20-piece T5TokenizerFast built in-process (T5's SentencePiece model is a download)
  scheduler    DPMSolverMultistepScheduler defaults: linear betas 1e-4..0.02, ε-prediction (PixArt-α's)
then runs both stages of finetune_t2i.py for ONE step each (batch 1, bf16, gradient checkpointing on: a real
run's settings) on CIFAR-10 images upscaled to 512 px, and prints each phase's peak memory: CPU peak RSS
(/proc/self/status VmHWM, reset per phase through /proc/self/clear_refs) and, on CUDA, the peak of
torch.cuda.max_memory_allocated.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import subprocess
import tempfile
import time
import zipfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import finetune_t2i as ft  # noqa: E402
import yoso  # noqa: E402

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
GB = 2 ** 30


# ----------------------------------------------------------------------------------------------------
# The real-size pipeline, random weights
# ----------------------------------------------------------------------------------------------------

def make_tokenizer():
    """T5's tokenizer type (Unigram, pad=0, eos=1, unk=2) with one piece per caption word."""
    from transformers import T5TokenizerFast
    words = sorted({"a", "photo", "of", *CLASSES})
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)] + [("▁" + w, -1.0) for w in words]
    return T5TokenizerFast(vocab=vocab, extra_ids=0)


def save_realsize_pipeline(path: str) -> None:
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel
    torch.manual_seed(0)
    transformer = PixArtTransformer2DModel(
        num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
        cross_attention_dim=1152, caption_channels=4096, sample_size=64, patch_size=2, attention_bias=True,
        activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
        norm_elementwise_affine=False, norm_eps=1e-6, interpolation_scale=1, use_additional_conditions=False)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=2, norm_num_groups=32, sample_size=256, scaling_factor=0.18215)
    text_encoder = T5EncoderModel(T5Config(
        vocab_size=32128, d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=1,
        feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, layer_norm_epsilon=1e-6,
        tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    pipe = PixArtAlphaPipeline(tokenizer=make_tokenizer(), text_encoder=text_encoder, vae=vae,
                               transformer=transformer, scheduler=DPMSolverMultistepScheduler())
    n = lambda m: sum(p.numel() for p in m.parameters()) / 1e6
    print(f"pipeline: transformer {n(transformer):.2f}M, VAE {n(vae):.2f}M, T5 (1 of 24 layers) {n(text_encoder):.2f}M "
          "parameters", flush=True)
    pipe.save_pretrained(path)


def write_images(zip_path: str, folder: str, n: int) -> None:
    """n CIFAR-10 training images (32 px; finetune_t2i.py resizes them to 512) and their captions."""
    os.makedirs(folder, exist_ok=True)
    with zipfile.ZipFile(zip_path) as zf:
        names = sorted(m for m in zf.namelist() if m.startswith("train/") and m.endswith((".jpg", ".png")))
        picked = names[:: max(1, len(names) // n)][:n]
        lines = []
        for i, name in enumerate(picked):
            label = name.split("/")[1]
            with open(os.path.join(folder, f"{i}.jpg"), "wb") as f:
                f.write(zf.read(name))
            lines.append(json.dumps({"file_name": f"{i}.jpg", "text": f"a photo of a {label}"}))
    with open(os.path.join(folder, "metadata.jsonl"), "w") as f:
        f.write("\n".join(lines) + "\n")


# ----------------------------------------------------------------------------------------------------
# Per-phase peak memory
# ----------------------------------------------------------------------------------------------------

def rss_peak() -> float:
    """This process's peak resident memory since the last reset (VmHWM), in GiB."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / GB
    return float("nan")


def rss_now() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024 / GB
    return float("nan")


def reset_peaks() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                                            # "5": reset the peak RSS to the current RSS
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


class Meter:
    """Phases may nest (a data fetch inside a step): a phase's peak includes the peaks of those inside it."""

    def __init__(self):
        self.rows, self.stack = [], []

    def _read(self) -> tuple[float, float]:
        cuda = torch.cuda.max_memory_allocated() / GB if torch.cuda.is_available() else float("nan")
        return rss_peak(), cuda

    @contextlib.contextmanager
    def phase(self, name: str):
        if self.stack:                                          # the enclosing phase's peak so far
            outer = self.stack[-1]
            outer["peak"] = [max(a, b) for a, b in zip(outer["peak"], self._read())]
        cuda_now = torch.cuda.memory_allocated() / GB if torch.cuda.is_available() else float("nan")
        entry = dict(name=name, depth=len(self.stack), start=(rss_now(), cuda_now), peak=[0.0, 0.0], t0=time.time())
        self.stack.append(entry)
        self.rows.append(entry)
        reset_peaks()
        try:
            yield
        finally:
            self.stack.pop()
            entry["peak"] = [max(a, b) for a, b in zip(entry["peak"], self._read())]
            entry["seconds"] = time.time() - entry["t0"]
            if self.stack:
                outer = self.stack[-1]
                outer["peak"] = [max(a, b) for a, b in zip(outer["peak"], entry["peak"])]
            print(f"  [{name}: {entry['seconds']:.0f} s, peak RSS {entry['peak'][0]:.2f} GiB]", file=sys.stderr,
                  flush=True)

    def wrap(self, fn, name):
        def wrapped(*args, **kwargs):
            with self.phase(name if isinstance(name, str) else name()):
                return fn(*args, **kwargs)
        return wrapped

    def table(self) -> str:
        cuda = torch.cuda.is_available()
        head = f"{'phase':<34} {'time s':>7} {'RSS start':>10} {'RSS peak':>9}" + \
               (f" {'GPU start':>10} {'GPU peak':>9}" if cuda else "")
        lines = [head, "-" * len(head)]
        for r in self.rows:
            line = f"{'  ' * r['depth'] + r['name']:<34} {r['seconds']:>7.0f} {r['start'][0]:>10.2f} {r['peak'][0]:>9.2f}"
            if cuda:
                line += f" {r['start'][1]:>10.2f} {r['peak'][1]:>9.2f}"
            lines.append(line)
        return "\n".join(lines)


def instrument(meter: Meter) -> None:
    """Wrap finetune_t2i's phases, so its own code runs unchanged (the functions are looked up at call time)."""
    current = {"stage": "setup"}
    ft.build = meter.wrap(ft.build, "load base + build G, D, LoRA")
    ft.Items.get = meter.wrap(ft.Items.get, "T5 + VAE encode of the batch")
    ft.sample_grid = meter.wrap(ft.sample_grid, lambda: f"{current['stage']}: sample grid")
    ft.export = meter.wrap(ft.export, "export (merge LoRA, save)")
    yoso.save_run_checkpoint = meter.wrap(yoso.save_run_checkpoint, lambda: f"{current['stage']}: checkpoint write")
    run_loop = yoso.run_loop

    def measured_run_loop(step_fn, *args, desc="train", **kwargs):
        current["stage"] = desc
        return run_loop(meter.wrap(step_fn, f"{desc}: one training step"), *args, desc=desc, **kwargs)
    yoso.run_loop = measured_run_loop


# ----------------------------------------------------------------------------------------------------

def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA rank 64")
    p.add_argument("--batch", type=int, default=1, help="batch size (one micro-batch)")
    p.add_argument("--data", default=os.path.join(ROOT, "..", "shared", "data", "cifar10-jpeg.zip"), help="CIFAR-10 JPEG zip (train/<class>/*)")
    p.add_argument("--base", help="an existing diffusers PixArt-α pipeline (e.g. the real PixArt-alpha) instead of "
                                  "the random one")
    p.add_argument("--build-only", metavar="DIR", help=argparse.SUPPRESS)    # the child process that builds it
    p.add_argument("--work", help="folder for the pipeline, data and run (default: a temp folder, removed after)")
    p.add_argument("--log", help="append the figures to this file")
    a = p.parse_args()
    if a.build_only:
        save_realsize_pipeline(a.build_only)
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    meter = Meter()
    with (contextlib.nullcontext(a.work) if a.work else tempfile.TemporaryDirectory()) as work:
        os.makedirs(work, exist_ok=True)
        pipe, data, out = (os.path.join(work, n) for n in ("pipeline", "data", "run"))
        if a.base:
            pipe = a.base
        elif not os.path.isfile(os.path.join(pipe, "model_index.json")):
            # in a child process: memory this process freed may stay in its heap and count in later phases
            print("building the random-weight pipeline ...", flush=True)
            subprocess.run([sys.executable, os.path.abspath(__file__), "--build-only", pipe], check=True)
        write_images(a.data, data, max(2, a.batch))
        instrument(meter)
        argv = ["--base", pipe, "--data", data, "--out", out, "--set", "adapt_steps=1", "--set", "yoso_steps=1",
                "--set", f"batch_size={a.batch}", "--set", "grad_accum=1", "--set", "ipi_items=2",
                "--set", "sample_prompts=('a photo of a cat',)"] + (["--full"] if a.full else [])
        t0 = time.time()
        with meter.phase("finetune_t2i.py, both stages"):
            code = ft.main(argv)
        total = time.time() - t0
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores visible)"
    what = a.base or "PixArt-alpha-512 shapes, random weights"
    header = (f"realsize.py {'--full' if a.full else '(LoRA rank 64)'}: {what}; "
              f"batch {a.batch}, bf16 autocast, gradient checkpointing on; 1 adapt + 1 YOSO step; "
              f"exit {code}, {total:.0f} s; {device}; torch {torch.__version__}; {time.strftime('%Y-%m-%d %H:%M')}\n"
              "peak = the highest memory while the phase ran (GiB; RSS: whole process, GPU: allocated tensors)")
    report = header + "\n" + meter.table() + "\n"
    print("\n" + report)
    if a.log:
        with open(a.log, "a") as f:
            f.write(report + "\n")
    return code


if __name__ == "__main__":
    sys.exit(main())
