"""fp32 against bf16 autocast for train_cifar's `cpu` preset on this CPU (issue 22): the same networks, batch and
step, timed alternately in one process so load changes hit both.

    python benchmarks/cpu_amp.py [--threads 1] [--iters 15] [--set KEY=VALUE ...]
"""
import argparse, os, sys, time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_cifar as tc  # noqa: E402
import yoso  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--threads", type=int, default=1)
p.add_argument("--iters", type=int, default=3)
p.add_argument("--set", action="append", default=[])
a = p.parse_args()
torch.set_num_threads(a.threads)
cfg = tc.make_config("cpu", overrides=tuple(a.set))
sched = yoso.NoiseSchedule.from_config(cfg)
runs = {}
for amp in ("none", "bf16"):
    torch.manual_seed(0)
    G, D, G_ema = tc.build_models(cfg)
    runs[amp] = (G, D, G_ema, *yoso.make_optimizers(G, D, cfg))
x0 = torch.rand(cfg.batch_size, 3, 32, 32) * 2 - 1
times = {k: [] for k in runs}
for i in range(a.iters + 1):
    for amp, (G, D, G_ema, oG, oD) in runs.items():
        t0 = time.perf_counter()
        yoso.train_step(G, D, oG, oD, x0, sched=sched, cfg=cfg, G_ema=G_ema,
                        amp_dtype=torch.bfloat16 if amp == "bf16" else None, step=i)
        if i >= 1:                                              # 1 warm-up step each
            times[amp].append(time.perf_counter() - t0)
med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
print(f"cpu preset, batch {cfg.batch_size}, {a.threads} thread(s), median of {a.iters} steps "
      f"({torch.__version__}, {os.cpu_count()} cores): fp32 {med['none']:.3f} s/step, bf16 {med['bf16']:.3f} s/step, "
      f"bf16/fp32 = {med['bf16'] / med['none']:.2f}")
