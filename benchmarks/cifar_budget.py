"""Equal-wall-clock comparison on real CIFAR-10 (issue 16): same G, D, seed and data order, four objectives.

    python benchmarks/cifar_budget.py OUTDIR [--with-paper]   # GPU: train A-D (+ paper) at once, dump, pack
    python benchmarks/cifar_budget.py OUTDIR --dry             # the same on CPU, tiny nets and budgets (~4 min)
    python benchmarks/cifar_budget.py --eval OUTDIR            # here: one-step FID of every dump -> notebooks/results

Train stage: every configuration runs `train_cifar.py --preset cpu` networks with `minutes` of wall-clock
budget and a kept checkpoint every `ckpt_minutes` (elapsed time counts the training loop only, not imports
or decoding). Dump stage: 1,000 one-step EMA samples per kept checkpoint (the same noise for all), 5,000 for
the paper preset's last. Pack stage (runs whatever failed before): at most two files OUTDIR/cifar_budget-{1,2}.tar
(four with --cpu), each <= 16 MiB; samples travel as lossless WebP mosaics, most important first (the metrics, plots and grids,
the paper's 5k, each configuration's last mark, then earlier marks), and manifest.json lists what did not fit.
Data: $YOSO_CIFAR_ZIP (ImageFolder zip with train/ and test/), default ../shared/data/cifar10-jpeg.zip.
"""
from __future__ import annotations

import argparse, glob, io, json, os, shutil, signal, subprocess, sys, tarfile, time, zipfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_ZIP = os.path.join(ROOT, "..", "shared", "data", "cifar10-jpeg.zip")
RESULTS = os.path.join(ROOT, "notebooks", "results")
CAP = 16 * 2 ** 20 - 256 * 2 ** 10                             # per packed file, with room for tar headers

# The four configurations: `--set` items on top of the `cpu` preset (identical networks and seed, so identical
# initial weights and data order). (C) is what the 2-D study (tests/toy2d.py, toy_config) needed to be sharp;
# its lr 1e-3 and EMA 0.99 were for small MLPs and are not carried over. (D) is its baseline (a): fake
# G(z, T-1) from pure noise, real = data, both scored at T-1, no L_con / L_rec. yoso.train_step gives it with
# fixed_t = k_D = T-1 and boundary_scaling: t_D = 0 and G(x, 0) = x, so "real" = x_0 + σ_0·ε (σ_0 = 0.01,
# about 1.3 of 255 grey levels; checked in tests/test_train_cifar.py). train_step still runs G on x_{t_D} and
# x_{t_C} (as the other configurations do), so (D) costs about as much per step as YOSO, more than a bare GAN.
# The rows ran on the cpu preset of 2026-12-03 (the paper's k_D and uniform t, fp32); today's preset departs from
# it (k_D 999, half of each batch at t = T-1, precision auto: notebook 02 §5h), so those settings are pinned here.
AS_RUN = ["k_D=250", "one_step_share=0.0", "precision=fp32"]
CONFIGS = {
    "A_cpu_preset": [],
    "B_rec_released": ["rec_weight=released"],
    "C_toy2d_settings": ["zero_terminal_snr=True", "prediction_type=v_prediction", "k_C=100", "lambda_rec=0.01"],
    "D_gan_real_data": ["zero_terminal_snr=True", "fixed_t=999", "k_D=999", "boundary_scaling=True",
                        "lambda_con=0.0", "lambda_rec=0.0"],
}
GPU = dict(minutes=5.0, ckpt_minutes=1.0, n=1000, n_paper=5000, net=["batch_size=128", "sample_every=500", "log_every=20"],
           paper_net=["sample_every=1000", "log_every=20"], grace=240, dump_timeout=300, limit=570)
# The CPU hour: the cpu preset as it is (batch 32), one thread per run, all four at once so they share the
# machine's load alike (2 cores: each run gets about half a core), a kept mark every 15 minutes.
CPU = dict(minutes=60.0, ckpt_minutes=15.0, n=1000, n_paper=1000, net=["sample_every=250", "log_every=10"],
           paper_net=[], grace=300, dump_timeout=900, limit=6000)
DRY = dict(minutes=0.33, ckpt_minutes=0.1, n=50, n_paper=50, grace=240, dump_timeout=300, limit=720,
           net=["unet_channels=(16,32)", "d_channels=(16,32)", "batch_size=8", "sample_every=10", "log_every=5"],
           paper_net=["unet_channels=(16,32)", "attn_resolutions=()", "d_channels=(16,32)", "batch_size=8",
                      "sample_every=10", "log_every=5"])


def log(msg: str) -> None:
    print(f"[cifar_budget {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def data_zip(dry: bool, work: str) -> str:
    path = os.environ.get("YOSO_CIFAR_ZIP") or SHARED_ZIP
    if not os.path.isfile(path):
        sys.exit(f"error: no CIFAR-10 zip at {path}; set YOSO_CIFAR_ZIP")
    if not dry:
        return path
    small = os.path.join(work, "cifar-dry.zip")                # 1 in 50 training images: quick to decode 5 times
    with zipfile.ZipFile(path) as z, zipfile.ZipFile(small + ".tmp", "w") as o:
        for n in sorted(n for n in z.namelist() if n.startswith("train/") and n.endswith(".jpg"))[::50]:
            o.writestr(n, z.read(n))
    os.replace(small + ".tmp", small)
    return small


# ----------------------------------------------------------------------------------------------------
# Train and dump (the GPU machine)
# ----------------------------------------------------------------------------------------------------

CHILDREN = []                                                  # every process started, ended before packing


def train_all(runs: dict, work: str, data: str, s: dict, device_env: dict, end: float) -> None:
    """All runs at once, each in its own process; a run past its budget + grace (or `end`) gets SIGTERM and
    checkpoints (train_cifar's graceful stop)."""
    procs = {}
    for name, (preset, sets) in runs.items():
        cmd = [sys.executable, os.path.join(ROOT, "train_cifar.py"), "--preset", preset, "--data", data,
               "--out", os.path.join(work, name), "--set", "steps=100000000", "--set", f"minutes={s['minutes']}",
               "--set", f"ckpt_minutes={s['ckpt_minutes']}", "--set", "ckpt_every=100000000", "--set", "keep=1"]
        cmd += [a for item in sets for a in ("--set", item)]
        logf = open(os.path.join(work, f"{name}.log"), "w")
        procs[name] = (subprocess.Popen(cmd, cwd=ROOT, stdout=logf, stderr=subprocess.STDOUT, env=device_env), logf)
        CHILDREN.append(procs[name][0])
        log(f"started {name}: {' '.join(cmd[1:])}")
    deadline = min(time.time() + s["minutes"] * 60 + s["grace"], end)
    for name, (p, logf) in procs.items():
        try:
            p.wait(timeout=max(1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            log(f"{name}: past budget + {s['grace']} s or the --limit; SIGTERM (checkpoint and stop)")
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        logf.close()
        log(f"{name}: exit {p.returncode}")


def dump(run_dir: str, n: int, last_only: bool) -> None:
    """n one-step EMA samples per kept checkpoint, all from the same seeded noise (train_cifar.write_samples)."""
    import torch
    sys.path.insert(0, ROOT)
    import train_cifar as tc
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ckpts = sorted(glob.glob(os.path.join(run_dir, "wall-*.pt")))
    for ckpt in ckpts[-1:] if last_only else ckpts[::-1]:      # the last mark first: it matters most
        G, cfg, meta = tc.load_generator(ckpt, device=device)
        tc.write_samples(G, cfg, meta, n, os.path.join(run_dir, "samples", os.path.basename(ckpt)[:-12]), device)
        log(f"dumped {n} samples of {ckpt} (step {meta['step']}, {meta['extra']['elapsed']:.0f} s)")


# ----------------------------------------------------------------------------------------------------
# Pack: at most `files` files (2 for a GPU machine's return; the CPU hour: 4), each <= 16 MiB
# ----------------------------------------------------------------------------------------------------

def mosaic_bytes(x: np.ndarray) -> tuple[bytes, str]:
    """(N, 32, 32, 3) uint8 -> one lossless WebP (about 2x smaller than zlib on CIFAR-like images), else PNG."""
    from PIL import Image
    n, h, w, c = x.shape
    cols = 40
    rows = -(-n // cols)
    pad = np.zeros((rows * cols - n, h, w, c), np.uint8)
    m = np.concatenate([x, pad]).reshape(rows, cols, h, w, c).transpose(0, 2, 1, 3, 4).reshape(rows * h, cols * w, c)
    buf = io.BytesIO()
    try:
        Image.fromarray(m).save(buf, "WEBP", lossless=True, quality=100, method=4)
        return buf.getvalue(), "webp"
    except Exception:                                           # Pillow without WebP
        buf = io.BytesIO()
        Image.fromarray(m).save(buf, "PNG", optimize=True)
        return buf.getvalue(), "png"


def pack(work: str, outdir: str, files: int = 2) -> list:
    """Greedy by priority into at most `files` tars (2 come back from a GPU machine; the CPU hour keeps all);
    returns their paths. Never raises on a missing piece."""
    items = []                                                  # (priority, arcname, bytes)
    for run in sorted(d for d in os.listdir(work) if os.path.isdir(os.path.join(work, d))):
        rd = os.path.join(work, run)
        for f in ["metrics.jsonl", "metrics.png", "config.json", f"../{run}.log"] + \
                 sorted(n for n in os.listdir(rd) if n.startswith("samples-") and n.endswith(".png"))[-1:]:
            if os.path.isfile(os.path.join(rd, f)):
                items.append((0, f"{run}/{os.path.basename(f)}", open(os.path.join(rd, f), "rb").read()))
        npzs = sorted(glob.glob(os.path.join(rd, "samples", "*.npz")))
        for i, path in enumerate(npzs):
            try:
                f = np.load(path)
                data, ext = mosaic_bytes(f["samples"])
            except Exception as e:
                log(f"pack: skipping unreadable {path} ({e})")
                continue
            head = json.dumps(dict(n=len(f["samples"]), step=int(f["step"]), elapsed=float(f["elapsed"]))).encode()
            # last mark first (paper's 5k with it), then the first, then the others latest first
            prio = 1 if i == len(npzs) - 1 else 2 if i == 0 else 3 + (len(npzs) - i)
            stem = f"{run}/samples/{os.path.basename(path)[:-4]}"
            items += [(prio, f"{stem}.{ext}", data), (prio, f"{stem}.json", head)]
    bins, left_out = [[] for _ in range(files)], []
    for prio, name, data in sorted(items, key=lambda it: it[0]):
        room = [CAP - sum(len(d) + 1024 for _, d in b) for b in bins]
        k = next((k for k, r in enumerate(room) if r >= len(data) + 1024), None)
        if k is None:
            left_out.append(name)
        else:
            bins[k].append((name, data))
    os.makedirs(outdir, exist_ok=True)
    paths = []
    for k, b in enumerate(bins):
        if not b and k:
            continue
        manifest = dict(files=[n for n, _ in b], left_out=left_out, made=time.strftime("%Y-%m-%d %H:%M:%S"))
        b = [("manifest.json", json.dumps(manifest, indent=1).encode())] + b
        path = os.path.join(outdir, f"cifar_budget-{k + 1}.tar")
        with tarfile.open(path + ".tmp", "w") as tar:
            for name, data in b:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        os.replace(path + ".tmp", path)
        paths.append(path)
        log(f"packed {path}: {len(b)} files, {os.path.getsize(path) / 2 ** 20:.2f} MiB")
    if left_out:
        log(f"left out (no room): {left_out}")
    return paths


def _terminated(signum, frame):
    raise SystemExit(f"signal {signum}")                       # unwinds into run()'s finally: pack what exists


def run(outdir: str, dry: bool, with_paper: bool, work: str, minutes=None, ckpt_minutes=None, limit=None,
        cpu: bool = False) -> int:
    """Train, dump, pack; the whole within `limit` seconds (dumps get what training leaves, packing the last 20 s)."""
    t0 = time.time()
    s = {**(DRY if dry else CPU if cpu else GPU), **({"minutes": minutes} if minutes else {}),
         **({"ckpt_minutes": ckpt_minutes} if ckpt_minutes else {})}
    end = t0 + (limit or s["limit"]) - 20
    signal.signal(signal.SIGTERM, _terminated)
    os.makedirs(work, exist_ok=True)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    if dry or cpu:
        env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    status = {}
    try:
        data = data_zip(dry, work)
        runs = {name: ("cpu", s["net"] + AS_RUN + sets) for name, sets in CONFIGS.items()}
        if with_paper:
            runs["P_paper_preset"] = ("paper", s["paper_net"])
        train_all(runs, work, data, s, env, end - 60)           # a minute for the dumps at least
        dumps = {}                                              # one process per run, all at once
        for name in runs:
            paper = name.startswith("P_")
            cmd = [sys.executable, os.path.abspath(__file__), "--dump", os.path.join(work, name),
                   "--n", str(s["n_paper"] if paper else s["n"])] + (["--last-only"] if paper else [])
            dumps[name] = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            CHILDREN.append(dumps[name])
        deadline = min(time.time() + s["dump_timeout"], end)
        for name, p in dumps.items():
            try:
                out, _ = p.communicate(timeout=max(1, deadline - time.time()))
                status[name] = p.returncode
                print(out[-3000:], flush=True)
            except subprocess.TimeoutExpired:
                p.kill()
                p.communicate()
                status[name] = "timeout"
                log(f"dump {name}: stopped at its timeout ({s['dump_timeout']} s) or the --limit")
    finally:
        for p in CHILDREN:                                      # nothing may still write while we pack
            if p.poll() is None:
                p.kill()
                p.wait()
        with open(os.path.join(work, "status.json"), "w") as f:
            json.dump(status, f)
        paths = pack(work, outdir, 4 if cpu else 2)
    log(f"done; dump exit codes {status}; files: {paths}")
    return 0 if paths and all(v == 0 for v in status.values()) else 1


# ----------------------------------------------------------------------------------------------------
# Eval (here, on CPU): FID of every dump against one reference, the estimator's floor, table and curves
# ----------------------------------------------------------------------------------------------------

def unpack(outdir: str) -> dict:
    """{run: [(arcname stem, samples uint8 (N,32,32,3), info)]} and the small files written under OUTDIR/unpacked."""
    from PIL import Image
    dest, found = os.path.join(outdir, "unpacked"), {}
    for path in sorted(glob.glob(os.path.join(outdir, "cifar_budget-*.tar"))):
        with tarfile.open(path) as tar:
            tar.extractall(dest, filter="data")
    for info_path in sorted(glob.glob(os.path.join(dest, "*", "samples", "*.json"))):
        stem = info_path[:-5]
        info = json.load(open(info_path))
        img = next((stem + e for e in (".webp", ".png") if os.path.isfile(stem + e)), None)
        if img is None:                                         # left out of the pack (no room)
            continue
        m = np.asarray(Image.open(img).convert("RGB"))
        tiles = m.reshape(m.shape[0] // 32, 32, m.shape[1] // 32, 32, 3).transpose(0, 2, 1, 3, 4).reshape(-1, 32, 32, 3)
        run = os.path.basename(os.path.dirname(os.path.dirname(stem)))
        found.setdefault(run, []).append((os.path.basename(stem), tiles[:info["n"]], info))
    return found


def evaluate(outdir: str, ref_n: int, zip_path: str, results: str, floor_n: int = 1000, last_only: bool = False) -> str:
    import torch
    sys.path.insert(0, ROOT)
    import train_cifar as tc
    import yoso
    found = unpack(outdir)
    os.makedirs(results, exist_ok=True)
    if not found:
        sys.exit(f"error: no cifar_budget-*.tar with samples under {outdir}")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    path = yoso.resolve_inception(None)
    features = yoso.inception_features(path, "cpu")
    train = tc.reference_subset(tc.load_images(zip_path, 32)[0], ref_n)
    key = f"{os.path.abspath(zip_path)}|{os.path.getsize(zip_path)}|subset{ref_n}|{len(train)}|{os.path.getsize(path)}"
    mu_r, sig_r = tc.reference_stats(train, features, key, os.path.expanduser("~/.cache/yoso"))

    def fid(x: np.ndarray, cache: str) -> float:                # x: (N, 32, 32, 3) uint8; stats cached per dump
        if os.path.isfile(cache):                               # (Inception on 2 CPU cores is the slow part)
            f = np.load(cache)
            return tc.frechet_distance(f["mu"], f["sigma"], mu_r, sig_r)
        t = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2)
        mu, sig = tc.feature_stats((t[i:i + 100] for i in range(0, len(t), 100)), features)
        np.savez(cache + ".tmp.npz", mu=mu, sigma=sig)
        os.replace(cache + ".tmp.npz", cache)
        return tc.frechet_distance(mu, sig, mu_r, sig_r)

    with zipfile.ZipFile(zip_path) as z:                        # the floor: 1,000 held-out test images, spread
        names = sorted(n for n in z.namelist() if n.startswith("test/") and n.lower().endswith((".jpg", ".png")))
        names = [names[i] for i in np.linspace(0, len(names) - 1, floor_n).round().astype(int)]
        test = np.stack([tc._decode(z.read(n), 32) for n in names])
    table = dict(reference=f"{len(train)} CIFAR-10 training images spread evenly over the train split of "
                           f"{os.path.basename(zip_path)}", detector=os.path.basename(path), runs={},
                 floor=dict(n=len(test), fid=fid(test, os.path.join(outdir, "unpacked", f"floor-{floor_n}.stats.npz"))))
    log(f"floor ({floor_n} test images): {table['floor']['fid']:.2f}")
    for run, dumps in sorted(found.items()):
        rows = []
        for stem, x, info in dumps[-1:] if last_only else dumps:
            cache = os.path.join(outdir, "unpacked", run, "samples", f"{stem}.stats.npz")
            rows.append(dict(checkpoint=stem, mark_s=int(stem.split("-")[1][:-1]), elapsed_s=info["elapsed"],
                             step=info["step"], n=info["n"], fid=fid(x, cache)))
            log(f"{run} {stem}: FID {rows[-1]['fid']:.2f} ({info['n']} samples, step {info['step']})")
        table["runs"][run] = sorted(rows, key=lambda r: r["mark_s"])
        src = os.path.join(outdir, "unpacked", run)            # the last grid and the metrics plot, for notebook 02
        for f in glob.glob(os.path.join(src, "samples-*.png"))[-1:] + glob.glob(os.path.join(src, "metrics.png")):
            shutil.copy(f, os.path.join(results, f"cifar_budget_{run}_{'grid' if 'samples' in f else 'metrics'}.png"))
    out = os.path.join(results, "cifar_budget.json")
    with open(out, "w") as f:
        json.dump(table, f, indent=1)
    plot_curves(table, os.path.join(results, "cifar_budget_curves.png"))
    log(f"wrote {out} and cifar_budget_curves.png")
    return out


def plot_curves(table: dict, png: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for run, rows in table["runs"].items():
        ax.plot([r["elapsed_s"] / 60 for r in rows], [r["fid"] for r in rows], "o-", label=f"{run} (n={rows[-1]['n']})")
    ax.axhline(table["floor"]["fid"], color="grey", ls="--", label=f"floor: {table['floor']['n']} test images")
    ax.set(xlabel="training wall-clock (min)", ylabel="one-step FID (EMA)", yscale="log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n", 1)[1])
    p.add_argument("outdir", nargs="?", help="where the (at most 2; --cpu 4) packed files go / are read from")
    p.add_argument("--dry", action="store_true", help="CPU, tiny nets, ~20 s budgets, 50 samples")
    p.add_argument("--cpu", action="store_true", help="the CPU hour: cpu preset, 1 thread per run, all 4 at once, 60 min, marks every 15")
    p.add_argument("--with-paper", action="store_true", help="also train the paper preset for the budget (5k samples)")
    p.add_argument("--minutes", type=float, help="wall-clock budget per run (default 5; --dry 0.33)")
    p.add_argument("--ckpt-minutes", type=float, help="a kept checkpoint (and a dump) every this many minutes (default 1)")
    p.add_argument("--limit", type=float, help="seconds for the whole call, packing included (default 570; --dry 720)")
    p.add_argument("--work", default=None, help="run folders (default: /tmp/cifar_budget-work)")
    p.add_argument("--eval", action="store_true", help="FID of every packed dump, here on CPU")
    p.add_argument("--ref", type=int, default=10000, help="--eval: FID reference size (training images, spread)")
    p.add_argument("--floor", type=int, default=1000, help="--eval: held-out test images for the estimator's floor")
    p.add_argument("--eval-last", action="store_true", help="--eval: only each run's last mark (the quick table)")
    p.add_argument("--results", default=RESULTS, help="--eval: where the JSON and PNGs go")
    p.add_argument("--dump", metavar="RUN_DIR", help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, default=1000, help=argparse.SUPPRESS)
    p.add_argument("--last-only", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.dump:
        dump(a.dump, a.n, a.last_only)
        return 0
    if not a.outdir:
        p.error("OUTDIR is required")
    if a.eval:
        evaluate(a.outdir, a.ref, os.environ.get("YOSO_CIFAR_ZIP") or SHARED_ZIP, a.results, a.floor, a.eval_last)
        return 0
    work = a.work or ("/tmp/cifar_budget-work-dry" if a.dry else "/tmp/cifar_budget-work")
    if os.path.isdir(work):
        shutil.rmtree(work)                                    # a fresh comparison every time
    return run(a.outdir, a.dry, a.with_paper, work, a.minutes, a.ckpt_minutes, a.limit, a.cpu)


if __name__ == "__main__":
    sys.exit(main())
