"""finetune_t2i.py on a tiny PixArt-α pipeline built from configs (CPU, offline).

The session fixtures save the tiny pipeline and a 6-image caption folder once, and run the script once
with LoRA through both stages; the tests read that run's outputs, or build the same objects in-process.
"""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import finetune_t2i as ft  # noqa: E402
import tiny_pixart  # noqa: E402
import yoso  # noqa: E402


# One thread: the tiny models' ops take microseconds, and on a shared 2-core machine multi-threaded
# ops spend milliseconds each waiting for the other thread (measured: 1.3 ms vs 18 us per linear).
torch.set_num_threads(1)


def run_script(*args):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, os.path.join(ROOT, "finetune_t2i.py"), *args],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)


def metrics(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


@pytest.fixture(scope="session")
def base(tmp_path_factory):
    return tiny_pixart.save_pipeline(str(tmp_path_factory.mktemp("tiny_pixart")))


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    return tiny_pixart.make_image_folder(str(tmp_path_factory.mktemp("captions")))


@pytest.fixture(scope="session")
def lora_run(base, data, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("lora_run"))
    r = run_script("--base", base, "--data", data, "--preset", "smoke", "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def smoke_config(base, **kw):
    cfg = ft.config_from_args(ft.parse_args(["--base", base, "--preset", "smoke"]))
    return ft.replace(cfg, **kw)


def tiny_inputs(build_out, B=2, seed=0):
    base = build_out[0]
    enc = ft.Encoder(base, build_out[3], smoke_config("x"), torch.device("cpu"), lambda: torch.autocast("cpu", enabled=False))
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 4, 8, 8, generator=g), enc.text(["a red house", "a blue car"][:B])


# --- a full run ------------------------------------------------------------------------------------

def test_both_stages_finish_with_finite_losses(lora_run):
    rows = metrics(lora_run)
    assert {r["phase"] for r in rows} == {"adapt", "yoso"}
    assert {r["adapt_stage"] for r in rows if r["phase"] == "adapt"} == {1, 2}      # Stage I then Stage II
    for r in rows:
        for k, v in r.items():
            if isinstance(v, float):
                assert math.isfinite(v), (k, r)
    yoso_rows = [r for r in rows if r["phase"] == "yoso"]
    assert len(yoso_rows) == 3 and all(r["skipped"] == 0 for r in rows)
    for name in ("adapter/adapter_config.json", "transformer/config.json", "scheduler/scheduler_config.json",
                 "README.md", "yoso_config.json"):
        assert os.path.isfile(os.path.join(lora_run, name)), name
    card = open(os.path.join(lora_run, "README.md")).read()
    assert "--preset smoke" in card and "![samples](samples/yoso-" in card
    assert not os.path.exists(os.path.join(lora_run, "ipi.safetensors"))               # adapted: pure noise


def test_adapted_schedule_has_zero_terminal_snr(lora_run):
    from diffusers import LCMScheduler
    s = LCMScheduler.from_pretrained(os.path.join(lora_run, "scheduler"))
    assert s.config.prediction_type == "v_prediction" and s.config.rescale_betas_zero_snr
    assert s.config.timestep_spacing == "trailing"
    assert s.alphas_cumprod[-1].item() == 0.0
    ours = yoso.NoiseSchedule.from_config(yoso.YOSOConfig(beta_schedule="scaled_linear", beta_start=0.00085,
                                                          beta_end=0.012, zero_terminal_snr=True))
    torch.testing.assert_close(s.alphas_cumprod.double(), ours.alphas_cumprod, atol=1e-6, rtol=1e-5)


def test_saved_transformer_runs_one_step_in_diffusers(lora_run, base):
    from diffusers import LCMScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel
    pipe = PixArtAlphaPipeline.from_pretrained(
        base, transformer=PixArtTransformer2DModel.from_pretrained(os.path.join(lora_run, "transformer")),
        scheduler=LCMScheduler.from_pretrained(os.path.join(lora_run, "scheduler")))
    img = pipe("a red house", num_inference_steps=1, guidance_scale=1.0, use_resolution_binning=False,
               clean_caption=False, output_type="pt", generator=torch.Generator().manual_seed(0)).images
    assert img.shape == (1, 3, 16, 16) and torch.isfinite(img).all()
    assert list(pipe.scheduler.timesteps) == [999]                                     # one step, from t = T-1


def test_sample_cli_writes_a_grid(lora_run):
    r = run_script("--sample", lora_run, "--prompt", "a red house", "--prompt", "a blue car", "--steps", "1")
    assert r.returncode == 0, r.stderr[-2000:]
    from PIL import Image
    path = r.stdout.strip().splitlines()[-1]
    assert Image.open(path).size == (4 * 16 + 5 * 2, 2 * 16 + 3 * 2)                  # 2 prompts x 4 images, padded


def test_reloaded_lora_reproduces_merged_model(lora_run, base):
    from diffusers import PixArtTransformer2DModel
    from peft import PeftModel
    fresh = PixArtTransformer2DModel.from_pretrained(base, subfolder="transformer")
    plain_out = lambda m, x, t, c: ft.PixArtDenoiser(m)(x, t, c)
    reloaded = PeftModel.from_pretrained(PixArtTransformer2DModel.from_pretrained(base, subfolder="transformer"),
                                         os.path.join(lora_run, "adapter"))
    merged = PixArtTransformer2DModel.from_pretrained(os.path.join(lora_run, "transformer"))
    x = torch.randn(2, 4, 8, 8)
    t = torch.tensor([999, 400])
    cond = {"emb": torch.randn(2, 16, 32), "mask": torch.ones(2, 16, dtype=torch.long)}
    with torch.no_grad():
        a, b, base_out = plain_out(reloaded, x, t, cond), plain_out(merged, x, t, cond), plain_out(fresh, x, t, cond)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert (a - base_out).abs().max() > 1e-4                                          # the adapter did something


# --- in-process: what a step trains, the perceptual loss ---------------------------------------------

def snapshot(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def test_lora_step_updates_only_adapter_and_discriminator(base):
    cfg = smoke_config(base)
    out = ft.build(cfg, torch.device("cpu"))
    _, model, D, frozen, params, _ = out
    x0, cond = tiny_inputs(out)
    ycfg = ft.schedule_config(cfg.yoso, out[0].scheduler_config, adapted=True)
    G = ft.PixArtDenoiser(model)
    opt_G, opt_D = yoso.make_optimizers(G, D, ycfg)
    before_G, before_D = snapshot(model), snapshot(D)
    distance = yoso.latent_perceptual_distance(ft.perceptual_features(frozen, 2))
    torch.manual_seed(0)
    stats = yoso.train_step(G, D, opt_G, opt_D, x0, cond, sched=yoso.NoiseSchedule.from_config(ycfg), cfg=ycfg,
                            distance=distance)
    assert stats["skipped"] == 0
    changed_G = {n for n, p in model.named_parameters() if not torch.equal(p, before_G[n])}
    assert changed_G and all("lora_" in n for n in changed_G)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {n for n in before_G if "lora_" in n}
    assert any(not torch.equal(p, before_D[n]) for n, p in D.named_parameters())
    assert len(list(params)) == sum("lora_" in n for n in before_G)                     # EMA covers the adapters


def test_full_fine_tuning_keeps_a_frozen_copy(base):
    cfg = smoke_config(base, lora_rank=0)
    out = ft.build(cfg, torch.device("cpu"))
    _, model, D, frozen, params, _ = out
    assert frozen.transformer is not model and len(list(params)) == len(list(model.parameters()))
    before = snapshot(frozen.transformer)
    x0, cond = tiny_inputs(out)
    ycfg = ft.schedule_config(cfg.yoso, out[0].scheduler_config, adapted=True)
    G = ft.PixArtDenoiser(model)
    opt_G, opt_D = yoso.make_optimizers(G, D, ycfg)
    base_w = model.proj_out.weight.detach().clone()
    yoso.train_step(G, D, opt_G, opt_D, x0, cond, sched=yoso.NoiseSchedule.from_config(ycfg), cfg=ycfg,
                    distance=yoso.latent_perceptual_distance(ft.perceptual_features(frozen, 2)))
    assert not torch.equal(model.proj_out.weight, base_w)
    assert all(torch.equal(p, before[n]) for n, p in frozen.transformer.named_parameters())


def test_latent_perceptual_loss_zero_for_identical_and_grad_to_first_argument_only(base):
    out = ft.build(smoke_config(base), torch.device("cpu"))
    _, model, _, frozen, params, _ = out
    for p in params:                                         # make the adapters non-trivial: F must ignore them
        p.data.normal_(0, 0.5)
    _, cond = tiny_inputs(out)
    features = ft.perceptual_features(frozen, 2)
    d = yoso.latent_perceptual_distance(features)
    a = torch.randn(2, 4, 8, 8, requires_grad=True)
    b = torch.randn(2, 4, 8, 8, requires_grad=True)
    assert torch.equal(d(a, a.detach().clone(), cond), torch.zeros(2))
    loss = d(a, b, cond)
    assert (loss > 0).all()
    loss.sum().backward()
    assert a.grad is not None and a.grad.abs().sum() > 0
    assert b.grad is None
    assert all(p.grad is None for p in params)               # the frozen base: adapters disabled
    # F is the base model itself (adapters off), not the adapted one
    with torch.no_grad():
        t0 = torch.zeros(2, dtype=torch.long)
        plain = ft.load_base(base).transformer
        ref = ft.pixart_trunk(plain, a, t0, cond, plain.transformer_blocks[:2])
    torch.testing.assert_close(features(a.detach(), cond), ref)


# --- transplant -------------------------------------------------------------------------------------

def test_transplant_delta_is_exact_on_small_state_dicts():
    g = torch.Generator().manual_seed(0)
    src = {"w": torch.randn(3, 4, generator=g), "pos": torch.randn(1, 4, 8, generator=g)}
    tuned = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in src.items()}
    target = {"w": torch.randn(3, 4, generator=g), "pos": torch.randn(1, 16, 8, generator=g),
              "extra": torch.randn(2, generator=g)}
    out, kept = yoso.transplant_delta(target, src, tuned)
    assert torch.equal(out["w"], (target["w"].double() + tuned["w"].double() - src["w"].double()).float())
    assert sorted(kept) == ["extra", "pos"] and torch.equal(out["pos"], target["pos"])


def test_lora_transplant_adds_the_adapter_delta(lora_run, base, tmp_path):
    from diffusers import PixArtTransformer2DModel
    target = tiny_pixart.save_pipeline(str(tmp_path / "other_base"), seed=1)      # stands in for PixArt-α-1024
    dest = ft.transplant(lora_run, target)
    load = lambda p, sub=None: PixArtTransformer2DModel.from_pretrained(p, subfolder=sub).state_dict()
    src, tuned, tgt, out = load(base, "transformer"), load(os.path.join(lora_run, "transformer")), \
        load(target, "transformer"), load(os.path.join(dest, "transformer"))
    for name in tgt:
        torch.testing.assert_close(out[name] - tgt[name], tuned[name] - src[name], atol=1e-6, rtol=0)
    assert any((tuned[n] - src[n]).abs().max() > 0 for n in src)
    assert json.load(open(os.path.join(dest, "yoso_config.json")))["base"] == target
    assert os.path.isfile(os.path.join(dest, "scheduler", "scheduler_config.json"))


# --- errors: one line, exit code 2 -------------------------------------------------------------------

def assert_clean_error(r, *words):
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    err = r.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    for w in words:
        assert w in err, err


def test_metadata_line_without_text_is_rejected(base, data, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    os.symlink(os.path.join(data, "0.png"), bad / "0.png")
    (bad / "metadata.jsonl").write_text('{"file_name": "0.png", "text": "a red house"}\n{"file_name": "0.png"}\n')
    assert_clean_error(run_script("--base", base, "--data", str(bad), "--preset", "smoke", "--out", str(tmp_path / "o")),
                       "metadata.jsonl line 2", "text")
    (bad / "metadata.jsonl").write_text('{"file_name": "0.png", "text": "a red house"}\n{"file_name": "0.png", \n')
    assert_clean_error(run_script("--base", base, "--data", str(bad), "--preset", "smoke", "--out", str(tmp_path / "o")),
                       "metadata.jsonl line 2", "JSON")


def test_unknown_base_is_one_clear_error(data, tmp_path):
    r = run_script("--base", str(tmp_path / "no-such-model"), "--data", data, "--preset", "smoke", "--out", str(tmp_path / "o"))
    assert_clean_error(r, "--base", "no-such-model")
    assert_clean_error(run_script("--base", data, "--data", data, "--preset", "smoke", "--out", str(tmp_path / "o")),
                       "not a diffusers pipeline")


# --- cache, and the ε base without adaption (IPI) -----------------------------------------------------

def test_cache_gives_the_same_first_step_losses(base, data, tmp_path):
    runs = {}
    for name, extra in (("plain", []), ("cached", ["--cache", str(tmp_path / "cache")])):
        out = str(tmp_path / name)
        r = run_script("--base", base, "--data", data, "--preset", "smoke", "--stage", "yoso", "--out", out, *extra)
        assert r.returncode == 0, r.stderr[-3000:]
        runs[name] = out
    first = {k: metrics(v)[0] for k, v in runs.items()}
    for key in ("loss_D", "D_real", "D_fake", "L_adv", "L_con", "L_rec", "loss_G", "grad_norm_G", "grad_norm_D"):
        assert first["plain"][key] == pytest.approx(first["cached"][key], rel=1e-4, abs=1e-7), key
    assert len(os.listdir(tmp_path / "cache")) == 6 + 1                               # 6 items + meta.json
    # --stage yoso on an ε-prediction base: no adaption, so the informative prior is saved and used
    out = runs["cached"]
    from diffusers import LCMScheduler
    from safetensors.torch import load_file
    assert LCMScheduler.from_pretrained(os.path.join(out, "scheduler")).config.prediction_type == "epsilon"
    ipi = yoso.IPI.from_state_dict(load_file(os.path.join(out, "ipi.safetensors")))
    assert ipi.mean.shape == (4, 8, 8) and ipi.std > 0
    r = run_script("--sample", out, "--prompt", "a red house", "--steps", "1")
    assert r.returncode == 0, r.stderr[-2000:]


# --- prompts as data, and resuming into the next stage -----------------------------------------------

def test_prompts_adapt_then_resume_into_yoso(base, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red house\n\na blue car on the hill\na small green bird\n")
    out = str(tmp_path / "run")
    args = ("--base", base, "--prompts", str(prompts), "--preset", "smoke", "--out", out, "--cache", str(tmp_path / "c"))
    r = run_script(*args, "--stage", "adapt")
    assert r.returncode == 0, r.stderr[-3000:]
    assert {m["phase"] for m in metrics(out)} == {"adapt"}
    from safetensors.torch import load_file
    cached = load_file(str(tmp_path / "c" / "00000001.safetensors"))
    assert cached["latent"].shape == (4, 8, 8) and torch.isfinite(cached["latent"]).all()   # the teacher's sample
    r = run_script(*args, "--stage", "yoso", "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = metrics(out)
    assert [m["step"] for m in rows if m["phase"] == "yoso"] == [4, 5, 6]          # continues the global step
    from diffusers import LCMScheduler
    assert LCMScheduler.from_pretrained(os.path.join(out, "scheduler")).config.prediction_type == "v_prediction"
    assert not os.path.exists(os.path.join(out, "ipi.safetensors"))                  # adapted weights: no IPI
