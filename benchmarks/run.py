"""Benchmarks: the YOSO train step, the sampler, the fused ops and the input pipeline, side by side.

    python benchmarks/run.py                       # everything, CPU, float32
    python benchmarks/run.py --device cuda --dtype bf16 --channels-last
    python benchmarks/run.py --only step,fused     # a subset: step, roofline, sampling, fused, loader
    python benchmarks/run.py --shapes pixart-tiny   # shapes: cifar, pixart-small, cifar-tiny, pixart-tiny
    python benchmarks/run.py --device cuda --dtype bf16 --only measures   # GPU measures, one at a time
    python benchmarks/run.py --device cuda --dtype bf16 --profile          # where the CIFAR step's time goes

Every figure is measured in this run, and every ratio is between two figures of this run. Nothing
here is pass/fail; the targets (issue 6) are printed beside the ratios.
"""
import argparse
import copy
import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
import yoso  # noqa: E402
from reference import naive_train_step  # noqa: E402

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


# ------------------------------------------------------------------------------------------ timing

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_it(fn, device, warmup=1, iters=3, best=False):
    """Median (or, with best=True, shortest) wall time of fn() in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return min(times) if best else sorted(times)[len(times) // 2]


def time_pair(fn_a, fn_b, device, warmup=1, iters=3):
    """Median wall times of fn_a and fn_b, alternated so a change in machine load hits both alike."""
    for _ in range(warmup):
        fn_a(), fn_b()
    times = ([], [])
    for _ in range(iters):
        for fn, out in ((fn_a, times[0]), (fn_b, times[1])):
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            out.append(time.perf_counter() - t0)
    return tuple(sorted(t)[len(t) // 2] for t in times)


def peak_step_memory(fn, device):
    """CUDA: bytes one step allocates above what was allocated before it (the caching allocator's peak)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


class SavedBytes:
    """Peak bytes autograd holds saved for backward while a step runs: exact, and the same on any machine.

    Counts each storage once (two saved views of one tensor are one buffer), from the moment an op saves
    it until its graph is freed; storages that existed before (parameters, buffers, the batch) are not
    counted, as a GPU allocator's peak above the step's start would not count them either. This is the
    part of a step's memory that its structure decides: which graphs are alive at the same time.
        with SavedBytes(G, D, x0) as m: step()
        m.peak                                            # bytes
    """

    def __init__(self, *existing):
        tensors = [t for obj in existing if obj is not None for t in
                   (list(obj.parameters()) + list(obj.buffers()) if isinstance(obj, torch.nn.Module) else
                    list(obj.values()) if isinstance(obj, dict) else [obj])]
        self.skip = {t.untyped_storage().data_ptr() for t in tensors}
        self.live, self.now, self.peak = {}, 0, 0               # storage -> [bytes, times saved]

    def _pack(self, t):
        key = t.untyped_storage().data_ptr()
        if key in self.skip:
            return t
        entry = self.live.setdefault(key, [t.untyped_storage().nbytes(), 0])
        if entry[1] == 0:
            self.now += entry[0]
            self.peak = max(self.peak, self.now)
        entry[1] += 1
        return _Saved(t, key, self)

    def _release(self, key):
        entry = self.live[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.now -= entry[0]
            del self.live[key]

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda p: p.t if isinstance(p, _Saved) else p)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)


class _Saved:
    """One saved tensor; tells its SavedBytes when autograd lets go of it (graph freed after backward)."""
    __slots__ = ("t", "key", "owner")

    def __init__(self, t, key, owner):
        self.t, self.key, self.owner = t, key, owner

    def __del__(self):
        self.owner._release(self.key)


# ------------------------------------------------------------------------------------------ workloads

def workload(name, device, batch, channels_last=False):
    """(G, D, x0, cond, cfg, sched) for a named shape: 'cifar' (the paper preset), 'pixart-small', 'cifar-tiny',
    'pixart-tiny'."""
    if name in ("cifar", "cifar-tiny"):                     # cifar-tiny: the smoke preset's nets + one attention level
        import dataclasses
        import train_cifar
        cfg = train_cifar.make_config("paper") if name == "cifar" else \
            dataclasses.replace(train_cifar.make_config("smoke"), attn_resolutions=(16,))
        G, D, _ = train_cifar.build_models(cfg)
        x0, cond = torch.randn(batch, 3, 32, 32), None
    elif name == "pixart-small":
        G, D, x0, cond, cfg = pixart_small(batch)
    elif name == "pixart-tiny":
        G, D, x0, cond, cfg = pixart_tiny(batch)
    else:
        raise ValueError(name)
    G, D = G.to(device), D.to(device)
    if channels_last and x0.ndim == 4:
        G, D = G.to(memory_format=torch.channels_last), D.to(memory_format=torch.channels_last)
    x0 = x0.to(device)
    if cond is not None:
        cond = {k: v.to(device) for k, v in cond.items()}
    return G, D, x0, cond, cfg, yoso.NoiseSchedule.from_config(cfg)


def pixart_tiny(batch):
    """The tests' tiny PixArt-α (tests/tiny_pixart.py: 4 blocks of width 16 on 8x8 latents); D = first 2 blocks."""
    import finetune_t2i
    import tiny_pixart
    tf = tiny_pixart.make_pipeline().transformer
    G = finetune_t2i.PixArtDenoiser(tf)
    D = yoso.FeatureDiscriminator(finetune_t2i.PixArtTrunk(tf, 2), tf.inner_dim, grid=16)
    cfg = yoso.YOSOConfig(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, zero_terminal_snr=True)
    cond = {"emb": torch.randn(batch, 16, 32), "mask": torch.ones(batch, 16, dtype=torch.long)}
    return G, D, torch.randn(batch, 4, 8, 8), cond, cfg


def pixart_small(batch):
    """PixArt-α's architecture at a benchmark size: 12 blocks of width 384 on 32x32 latents (256 tokens),
    120 text tokens of width 1024; D = a copy of the first 6 blocks + yoso's head (Sec. 4.2). Full fine-tune."""
    from diffusers import PixArtTransformer2DModel
    import finetune_t2i
    tf = PixArtTransformer2DModel(num_attention_heads=6, attention_head_dim=64, in_channels=4, out_channels=8,
                                  num_layers=12, cross_attention_dim=384, caption_channels=1024, sample_size=32,
                                  patch_size=2, use_additional_conditions=False)
    G = finetune_t2i.PixArtDenoiser(tf)
    D = yoso.FeatureDiscriminator(finetune_t2i.PixArtTrunk(tf, 6), 384, grid=256)
    cfg = yoso.YOSOConfig(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, zero_terminal_snr=True)
    cond = {"emb": torch.randn(batch, 120, 1024), "mask": torch.ones(batch, 120, dtype=torch.long)}
    return G, D, torch.randn(batch, 4, 32, 32), cond, cfg


def make_step(variant, w, amp, fused_adamw=None):
    """(closure running one train step of `variant` ('ours' or 'naive') on workload w, the tensors it owns).

    Each closure trains its own copies of G and D. fused_adamw: None = yoso.make_optimizers' choice."""
    G, D, x0, cond, cfg, sched = w
    G, D = copy.deepcopy(G), copy.deepcopy(D)
    E = copy.deepcopy(G).requires_grad_(False)
    opt_G, opt_D = yoso.make_optimizers(G, D, cfg, **({} if fused_adamw is None else dict(fused=fused_adamw)))
    device, owned = x0.device, (G, D, E, x0, cond)
    if variant == "ours":
        return lambda: yoso.train_step(G, D, opt_G, opt_D, x0, cond, sched=sched, cfg=cfg, G_ema=E, amp_dtype=amp), owned

    def naive():
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            naive_train_step(G, D, opt_G, opt_D, x0, cond, sched, cfg, G_ema=E)
    return naive, owned


def saved_peak(step, owned):
    """SavedBytes' peak over one call of step (the tensors it owns are not counted)."""
    with SavedBytes(*owned) as m:
        step()
    return m.peak


# ------------------------------------------------------------------------------------------ 1. step

def bench_step(args, device, amp):
    rows = []
    for shape in args.shapes:
        w = workload(shape, device, args.batch, args.channels_last)
        steps = {v: make_step(v, w, amp) for v in ("naive", "ours")}
        t = dict(zip(("naive", "ours"), time_pair(steps["naive"][0], steps["ours"][0], device, iters=args.iters)))
        saved = {v: saved_peak(*steps[v]) for v in steps}       # exact; the same figure on any machine
        B = w[2].shape[0]
        row = dict(shape=shape, batch=B, naive_s=t["naive"], ours_s=t["ours"], time_ratio=t["ours"] / t["naive"],
                   naive_saved_mb=saved["naive"] / 2**20, ours_saved_mb=saved["ours"] / 2**20,
                   saved_ratio=saved["ours"] / saved["naive"], ours_img_per_s=B / t["ours"])
        line = (f"[step] {shape:13s} batch {B:4d}  naive {t['naive']:.3f}s  ours {t['ours']:.3f}s  "
                f"ratio {row['time_ratio']:.2f} (target <= 0.75)  saved MB ours / literal {row['ours_saved_mb']:.1f} / "
                f"{row['naive_saved_mb']:.1f}  ratio {row['saved_ratio']:.2f} (target <= 1.05)")
        if device.type == "cuda":                              # the allocator's peak: everything, not only saved
            mem = {v: peak_step_memory(make_step(v, w, amp)[0], device) for v in ("naive", "ours")}
            row.update(naive_mem_mb=mem["naive"] / 2**20, ours_mem_mb=mem["ours"] / 2**20,
                       mem_ratio=mem["ours"] / mem["naive"])
            line += (f"  peak mem naive {row['naive_mem_mb']:.0f} MB  ours {row['ours_mem_mb']:.0f} MB  "
                     f"ratio {row['mem_ratio']:.2f}")
        rows.append(row)
        print(line, flush=True)
    return rows


# ------------------------------------------------------------------------------------------ 1b. GPU measures

def set_sdpa(G, on):
    """diffusers' attention: the fused scaled_dot_product_attention processor (its default) or the eager one."""
    from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
    for m in G.modules():
        if isinstance(m, Attention):
            m.set_processor(AttnProcessor2_0() if on else AttnProcessor())


def bench_measures(args, device, amp):
    """The standard measures on the first shape's step, switched on one at a time (cumulative): before/after
    in one run. On CPU they run too (cudnn.benchmark is then a no-op)."""
    shape = args.shapes[0]
    w = workload(shape, device, args.batch)
    has_attn = any(type(m).__name__ == "Attention" for m in w[0].modules())
    ladder = [("eager attention, all off", dict(sdpa=False, cudnn=False, cl=False, fused=False)),
              ("+ SDPA attention", dict(sdpa=True, cudnn=False, cl=False, fused=False)),
              ("+ cudnn.benchmark", dict(sdpa=True, cudnn=True, cl=False, fused=False)),
              ("+ channels_last", dict(sdpa=True, cudnn=True, cl=True, fused=False)),
              ("+ fused AdamW", dict(sdpa=True, cudnn=True, cl=True, fused=True))]
    rows, base = [], None
    for name, m in ladder:
        if not has_attn and not m["sdpa"]:
            continue
        G, D = copy.deepcopy(w[0]), copy.deepcopy(w[1])
        if has_attn:
            set_sdpa(G, m["sdpa"])
        if m["cl"]:
            G, D = G.to(memory_format=torch.channels_last), D.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = m["cudnn"]
        step, _ = make_step("ours", (G, D) + w[2:], amp, fused_adamw=m["fused"])
        s = time_it(step, device, warmup=2, iters=args.iters)
        base = base or s
        rows.append(dict(shape=shape, measure=name, step_s=s, ratio_to_first=s / base, img_per_s=w[2].shape[0] / s))
        print(f"[measures] {shape:13s} {name:26s} step {s:.4f}s  {w[2].shape[0] / s:8.1f} img/s  "
              f"ratio to first {s / base:.2f}", flush=True)
    torch.backends.cudnn.benchmark = False
    return rows


def profile_step(args, device, amp):
    """torch.profiler over a few train steps of the first shape: the top kernels, and kernel time vs wall time."""
    from torch.profiler import ProfilerActivity, profile
    shape = args.shapes[0]
    w = workload(shape, device, args.batch, args.channels_last)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    step, _ = make_step("ours", w, amp)
    for _ in range(2):                                         # warm-up outside: autotuning, allocator, optimiser state
        step()
    active, cuda = 3, device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        sync(device)
        t0 = time.perf_counter()
        for _ in range(active):
            step()
        sync(device)
        wall = (time.perf_counter() - t0) / active
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    events = prof.key_averages()
    print(f"[profile] {shape}, batch {w[2].shape[0]}, {args.dtype}, {active} steps; top ops by {key}:")
    print(events.table(sort_by=key, row_limit=args.profile_rows, max_name_column_width=70), flush=True)
    if cuda:
        from torch.autograd import DeviceType                  # the kernel rows only (ops' rows repeat them)
        kernel_s = sum(e.self_device_time_total for e in events if e.device_type == DeviceType.CUDA) / 1e6 / active
        print(f"[profile] per step: CUDA kernel time {kernel_s * 1e3:.1f} ms, wall {wall * 1e3:.1f} ms, "
              f"GPU idle (launch gaps, syncs, host work) {(1 - kernel_s / wall):.0%}", flush=True)
    else:
        print(f"[profile] per step: wall {wall * 1e3:.1f} ms (CPU: no kernel timeline)", flush=True)
    return [dict(shape=shape, wall_s=wall)]


# ------------------------------------------------------------------------------------------ 2. roofline

def bench_roofline(args, device, amp):
    from torch.utils.flop_counter import FlopCounterMode
    dtype = amp or torch.float32
    n = 8192 if device.type == "cuda" else 2048
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    peak = 2 * n ** 3 / time_it(lambda: a @ b, device, warmup=2, iters=10, best=True)   # reachable: the best run
    rows = []
    for shape in args.shapes:
        w = workload(shape, device, args.batch, args.channels_last)
        step, _ = make_step("ours", w, amp)
        with FlopCounterMode(display=False) as fc:
            step()
        flops = fc.get_total_flops()
        achieved = flops / time_it(step, device, iters=args.iters)
        rows.append(dict(shape=shape, step_gflop=flops / 1e9, achieved_tflops=achieved / 1e12,
                         matmul_tflops=peak / 1e12, fraction=achieved / peak))
        print(f"[roofline] {shape:13s} {flops / 1e9:.1f} GFLOP/step  {achieved / 1e12:.3f} TFLOP/s  "
              f"matmul {n}x{n} {dtype}: {peak / 1e12:.3f} TFLOP/s  fraction {achieved / peak:.0%} (target >= 50% on GPU)",
              flush=True)
    return rows


# ------------------------------------------------------------------------------------------ 3. sampling

def diffusers_sampler(scheduler, G, cfg, steps):
    """Sample with a diffusers scheduler driving the same network (v- or ε-prediction output)."""
    @torch.no_grad()
    def run(noise):
        scheduler.set_timesteps(steps)                          # resets the solver's step index and history
        x = noise * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            tt = torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long)
            x = scheduler.step(G(scheduler.scale_model_input(x, t), tt, None), t, x).prev_sample
        return x
    return run


def bench_sampling(args, device, amp):
    from diffusers import DPMSolverMultistepScheduler, LCMScheduler
    rows = []
    for shape in args.shapes:
        G, _, x0, cond, cfg, sched = workload(shape, device, args.batch, args.channels_last)
        if cond is not None:
            print(f"[sampling] {shape}: conditional workload, skipped")
            continue
        G.eval()
        sched_kw = dict(num_train_timesteps=cfg.T, beta_schedule=cfg.beta_schedule, beta_start=cfg.beta_start,
                        beta_end=cfg.beta_end, prediction_type=cfg.prediction_type,
                        rescale_betas_zero_snr=cfg.zero_terminal_snr)
        runs = {
            "yoso 1 step": lambda n: yoso.sample(G, n, sched=sched, cfg=cfg, steps=1),
            "LCM 4 steps": diffusers_sampler(LCMScheduler(**sched_kw, timestep_spacing="trailing"), G, cfg, 4),
            "DPM-Solver++ 20 steps": diffusers_sampler(
                DPMSolverMultistepScheduler(**sched_kw, algorithm_type="dpmsolver++"), G, cfg, 20),
        }
        noise = torch.randn_like(x0)
        res = {}
        for name, fn in runs.items():
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                res[name] = x0.shape[0] / time_it(lambda: fn(noise), device, iters=args.iters)
        base = res["yoso 1 step"]
        for name, ips in res.items():
            rows.append(dict(shape=shape, sampler=name, images_per_s=ips, speedup_of_yoso=base / ips))
            print(f"[sampling] {shape:13s} {name:22s} {ips:9.1f} img/s   YOSO is {base / ips:.1f}x faster", flush=True)
    return rows


# ------------------------------------------------------------------------------------------ 4. fused ops

def saved_bytes(fn):
    """Bytes of tensors autograd saves for backward while fn() builds its graph."""
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, total[0]


def bench_fused(args, device, amp):
    rows = []
    # EMA over a 35M-parameter model: one foreach op against a per-parameter loop
    import train_cifar
    G, _, E = (m.to(device) for m in train_cifar.build_models(train_cifar.make_config("paper")))
    n_params = sum(p.numel() for p in G.parameters())

    def loop():
        with torch.no_grad():
            for pe, p in zip(E.parameters(), G.parameters()):
                pe.copy_(0.999 * pe + 0.001 * p)
    t_loop = time_it(loop, device, iters=5)
    t_each = time_it(lambda: yoso.ema_update(E, G, 0.999), device, iters=5)
    rows.append(dict(op=f"EMA {n_params / 1e6:.1f}M params", eager_ms=t_loop * 1e3, fused_ms=t_each * 1e3,
                     time_ratio=t_each / t_loop))
    # losses: the autograd.Functions against their eager composition (forward + backward, saved memory)
    B = 256 if device.type == "cuda" else 64
    a = torch.randn(B, 4, 64, 64, device=device)
    b, w = torch.randn_like(a), torch.rand(B, device=device)

    def eager_mse():
        x = a.clone().requires_grad_()
        return x, w * ((x - b) ** 2).flatten(1).mean(1)

    def fused_mse():
        x = a.clone().requires_grad_()
        return x, yoso.weighted_mse(x, b, w)

    for name, eager, fused in [("weighted MSE (B,4,64,64)", eager_mse, fused_mse)]:   # the logistic loss is plain
        fwd_bwd = lambda f: f()[1].sum().backward()
        t_e, t_f = time_it(lambda: fwd_bwd(eager), device, iters=5), time_it(lambda: fwd_bwd(fused), device, iters=5)
        (_, _), m_e = saved_bytes(eager)
        (_, _), m_f = saved_bytes(fused)
        rows.append(dict(op=name, eager_ms=t_e * 1e3, fused_ms=t_f * 1e3, time_ratio=t_f / t_e,
                         eager_saved_mb=m_e / 2**20, fused_saved_mb=m_f / 2**20))
    for r in rows:
        extra = f"  saved for backward: eager {r['eager_saved_mb']:.1f} MB, fused {r['fused_saved_mb']:.1f} MB" \
            if "eager_saved_mb" in r else ""
        print(f"[fused] {r['op']:26s} eager {r['eager_ms']:8.2f} ms  fused {r['fused_ms']:8.2f} ms  "
              f"ratio {r['time_ratio']:.2f}{extra}", flush=True)
    return rows


# ------------------------------------------------------------------------------------------ 5. loader

def bench_loader(args, device, amp):
    """train_cifar decodes the dataset once into memory, then indexes batches: time both against the step."""
    import train_cifar
    if not os.path.exists(args.data):
        print(f"[loader] {args.data} not found, skipped")
        return []
    t0 = time.perf_counter()
    images, _ = train_cifar.load_images(args.data, 32)
    decode_ips = len(images) / (time.perf_counter() - t0)
    cfg = train_cifar.make_config("paper", overrides=(f"batch_size={args.batch}",))
    batch_s = time_it(lambda: train_cifar.get_batch(images, 123, cfg, yoso.Dist()).to(device), device, iters=20)
    w = workload("cifar", device, args.batch, args.channels_last)
    step_s = time_it(make_step("ours", w, amp)[0], device, iters=args.iters)
    print(f"[loader] decode {len(images)} images once: {decode_ips:.0f} img/s ({len(images) / decode_ips:.1f} s); "
          f"batch assembly {args.batch / batch_s:.0f} img/s; train step {args.batch / step_s:.1f} img/s; "
          f"batch assembly is {step_s / batch_s:.0f}x faster than the step (must be > 1)", flush=True)
    return [dict(decode_img_per_s=decode_ips, batch_img_per_s=args.batch / batch_s, step_img_per_s=args.batch / step_s)]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="fp32", choices=DTYPES)
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--only", default="step,roofline,sampling,fused,loader",
                   help="any of step,measures,roofline,sampling,fused,loader")
    p.add_argument("--shapes", default="cifar,pixart-small")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--batch", type=int, help="per-step batch (default: 128 on GPU, 8 on CPU)")
    p.add_argument("--data", default=os.path.join(ROOT, "..", "shared", "data", "cifar10-jpeg.zip"))
    p.add_argument("--json", help="also write the rows to this file")
    p.add_argument("--profile", action="store_true", help="profile the first shape's step instead (torch.profiler)")
    p.add_argument("--profile-rows", type=int, default=25)
    args = p.parse_args()
    torch.manual_seed(0)
    amp = DTYPES[args.dtype]
    args.shapes = args.shapes.split(",")
    device = torch.device(args.device)
    args.batch = args.batch or (128 if device.type == "cuda" else 8)
    print(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else f'{os.cpu_count()} CPU cores'}), "
          f"dtype {args.dtype}, torch {torch.__version__}, threads {torch.get_num_threads()}", flush=True)
    if args.profile:
        return profile_step(args, device, amp)
    benches = dict(step=bench_step, measures=bench_measures, roofline=bench_roofline, sampling=bench_sampling, fused=bench_fused, loader=bench_loader)
    results = {name: benches[name](args, device, amp) for name in args.only.split(",")}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
