"""finetune_t2i.py on a tiny PixArt-α pipeline built from configs (CPU, offline).

The session fixtures save the tiny pipeline and a 6-image caption folder once, and run the script once
with LoRA through both stages; the tests read that run's outputs, or build the same objects in-process.
"""
import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import finetune_t2i as ft  # noqa: E402
import tiny_pixart  # noqa: E402
import warm  # noqa: E402
import yoso  # noqa: E402
from conftest import checkpoint_tensors  # noqa: E402


# One thread: the tiny models' ops take microseconds, and on a shared 2-core machine multi-threaded
# ops spend milliseconds each waiting for the other thread (measured: 1.3 ms vs 18 us per linear).
torch.set_num_threads(1)


ENV = {**os.environ, **warm.IMPORT_TIME_ENV}         # offline, one thread, quiet
SCRIPT = os.path.join(ROOT, "finetune_t2i.py")


def run_script(*args, env=None, torchrun=False):
    """`python finetune_t2i.py *args` in its own process (tests/warm.py: forked, its imports done once)."""
    if not torchrun:
        return warm.run(SCRIPT, args, {**ENV, **(env or {})}, ROOT, timeout=300)
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}"]
    return subprocess.run([sys.executable, *launcher, SCRIPT, *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, env={**ENV, **(env or {})}, timeout=300)


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metrics(out, training: bool = True):
    """metrics.jsonl's training lines (or, training=False, every line: the collapse figures of each grid too)."""
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    return [r for r in rows if "skipped" in r] if training else rows


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
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 4, 8, 8, generator=g), ft.text_cond(build_out[0], ["a red house", "a blue car"][:B], 16)


# --- a full run ------------------------------------------------------------------------------------

def test_both_stages_finish_with_finite_losses(lora_run):
    rows = metrics(lora_run, training=False)
    collapse = [r for r in rows if "diversity" in r]            # logged with every grid: the collapse figures
    assert {r["phase"] for r in collapse} == {"adapt", "yoso"} and os.path.isfile(os.path.join(lora_run, "metrics.png"))
    assert all(r["diversity"] >= 0 and -1 <= r["tiling"] <= 1 for r in collapse)
    rows = [r for r in rows if "skipped" in r]                  # the training lines
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
    assert "--preset smoke" in card and "](samples/yoso-" in card
    assert f"{ft.DTYPE_KW}=dtype" in card and ".to(device)" in card and "clean_caption=False" in card
    # a real run's setting: the recompute of checkpointed blocks in backward (issue 15: it crashed with LoRA)
    assert json.load(open(os.path.join(lora_run, "yoso_config.json")))["settings"]["grad_checkpointing"] is True
    assert not os.path.exists(os.path.join(lora_run, "ipi.safetensors"))               # adapted: pure noise


def test_collapse_probe_reads_a_t2i_run(lora_run, base, data):
    # notebooks/collapse_probe.py --t2i: the figures per noise level of a YOSO-stage checkpoint, the run rebuilt
    # from its own flags; at t = 0 boundary scaling pins G(x_0, 0) = x_0, so no term has a gradient there
    sys.path.insert(0, os.path.join(ROOT, "notebooks"))
    import collapse_probe
    rows = collapse_probe.probe_t2i(os.path.join(lora_run, "ckpt-00000007.pt"), 4,
                                    ["--base", base, "--data", data, "--preset", "smoke"])
    assert [r["t"] for r in rows] == list(collapse_probe.LADDER) and all(r["step"] == 7 for r in rows)
    assert all(math.isfinite(r[k]) for r in rows for k in ("D_gap", "grad_adv", "grad_con", "grad_rec", "tiling"))
    assert rows[0]["grad_adv"] == rows[0]["grad_con"] == rows[0]["grad_rec"] == 0
    assert all(r["grad_adv"] > 0 and r["grad_con"] > 0 for r in rows[1:-1])


def test_collapse_probe_reads_an_adaption_checkpoint(lora_run, base, data):
    # the same probe on the adaption stage's last checkpoint: per t, the adapted student's x̂_0 and the x̂_0 its
    # v-target implies; the target's error grows as α_t -> 0 (the teacher's ε error times σ_t / α_t)
    sys.path.insert(0, os.path.join(ROOT, "notebooks"))
    import collapse_probe
    ckpt = os.path.join(lora_run, "ckpt-00000004.pt")
    assert yoso.read_checkpoint(ckpt)["extra"]["phase"] == "adapt"
    rows = collapse_probe.probe_t2i(ckpt, 4, ["--base", base, "--data", data, "--preset", "smoke"])
    assert rows[0]["what"] == "real" and rows[0]["tiling"] < 1
    assert [(r["t"], r["what"]) for r in rows[1:]] == [(t, w) for t in collapse_probe.LADDER
                                                        for w in ("student", "target")]
    assert all(math.isfinite(r[k]) for r in rows for k in ("mse", "tiling"))
    target = {r["t"]: r["mse"] for r in rows if r["what"] == "target"}
    assert target[0] < 0.05 < target[999] and target[999] > 10 * target[250]


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
    assert "bs4" not in r.stderr and "ftfy" not in r.stderr and "deprecated" not in r.stderr   # clean_caption off
    from PIL import Image
    path = r.stdout.strip().splitlines()[-1]
    assert Image.open(path).size == (4 * 16, 2 * 16)                                  # 2 prompts x 4 images


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


def one_yoso_step(cfg):
    """ft.build, then one yoso.train_step with the latent perceptual loss: the built objects, the weights of
    G, D and the frozen base before the step, and the step's figures."""
    out = ft.build(cfg, torch.device("cpu"))
    _, model, D, frozen, _, _ = out
    before = {"G": snapshot(model), "D": snapshot(D), "frozen": snapshot(frozen.transformer)}
    x0, cond = tiny_inputs(out)
    ycfg = ft.schedule_config(cfg.yoso, out[0].scheduler.config, adapted=True)
    G = ft.PixArtDenoiser(model)
    opt_G, opt_D = yoso.make_optimizers(G, D, ycfg)
    torch.manual_seed(0)
    stats = yoso.train_step(G, D, opt_G, opt_D, x0, cond, sched=yoso.NoiseSchedule.from_config(ycfg), cfg=ycfg,
                            distance=yoso.latent_perceptual_distance(ft.perceptual_features(frozen, 2)))
    return out, before, stats


def test_lora_step_updates_only_adapter_and_discriminator(base):
    (_, model, D, _, params, _), before, stats = one_yoso_step(smoke_config(base))
    assert stats["skipped"] == 0
    changed_G = {n for n, p in model.named_parameters() if not torch.equal(p, before["G"][n])}
    assert changed_G and all("lora_" in n for n in changed_G)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {n for n in before["G"] if "lora_" in n}
    assert any(not torch.equal(p, before["D"][n]) for n, p in D.named_parameters())
    assert len(list(params)) == sum("lora_" in n for n in before["G"])                  # EMA covers the adapters


def test_r1_on_the_latent_discriminator_runs_with_gradient_checkpointing(base):
    # R1 differentiates D's input gradient through attention: the fused CPU / GPU kernels have no double
    # backward ("derivative for aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented")
    cfg = smoke_config(base, grad_checkpointing=True)               # the users' default
    cfg = ft.replace(cfg, yoso=ft.replace(cfg.yoso, r1_gamma=0.1, r1_every=1, k_D=999))
    (_, model, D, _, _, _), before, stats = one_yoso_step(cfg)
    assert stats["skipped"] == 0 and stats["R1"] > 0 and math.isfinite(stats["R1"])
    assert any(not torch.equal(p, before["D"][n]) for n, p in D.named_parameters())


def test_full_fine_tuning_keeps_a_frozen_copy(base):
    (_, model, _, frozen, params, _), before, stats = one_yoso_step(smoke_config(base, lora_rank=0))
    assert frozen.transformer is not model and len(list(params)) == len(list(model.parameters()))
    assert stats["skipped"] == 0
    assert not torch.equal(model.proj_out.weight, before["G"]["proj_out.weight"])
    assert all(torch.equal(p, before["frozen"][n]) for n, p in frozen.transformer.named_parameters())


def test_full_fine_tuning_with_gradient_checkpointing_runs_both_stages(base, data, tmp_path):
    r = run_script("--base", base, "--data", data, "--preset", "smoke", "--full", "--out", tmp_path / "full")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = metrics(tmp_path / "full")
    assert {m["phase"] for m in rows} == {"adapt", "yoso"} and all(m["skipped"] == 0 for m in rows)
    assert json.load(open(tmp_path / "full" / "yoso_config.json"))["settings"]["grad_checkpointing"] is True


def test_checkpointed_features_match_plain_ones_with_adapters_on(base):
    # the frozen trunk's checkpointed blocks are recomputed in backward, outside the caller's scope; they must
    # see the adapters off there too (issue 15: they saw them on and the recompute had other shapes)
    out = ft.build(smoke_config(base), torch.device("cpu"))
    frozen, params = out[3], out[4]
    for p in params:
        p.data.normal_(0, 0.5)
    _, cond = tiny_inputs(out)
    grads = []
    for checkpoint in (False, True):
        x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1), requires_grad=True)
        f = ft.perceptual_features(frozen, 3, checkpoint)(x, cond)
        f.square().sum().backward()
        grads.append((f.detach(), x.grad))
    torch.testing.assert_close(grads[0], grads[1])
    assert frozen.model.get_model_status().enabled is True                  # adapters back on afterwards


def test_real_pixart_block_width_runs_both_stages(data, tmp_path):
    # PixArt-α's per-block layout: width 1152 = 16 heads x 72, cross-attention 1152, T5 width 4096; 2 blocks
    wide = tiny_pixart.save_pipeline(str(tmp_path / "wide"), num_layers=2, heads=16, head_dim=72,
                                     caption_channels=4096)
    r = run_script("--base", wide, "--data", data, "--preset", "smoke", "--out", tmp_path / "run",
                   "--set", "adapt_steps=2", "--set", "yoso_steps=1", "--set", "ckpt_every=100")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = metrics(tmp_path / "run")
    assert [m["phase"] for m in rows] == ["adapt", "adapt", "yoso"] and all(m["skipped"] == 0 for m in rows)
    ckpt = checkpoint_tensors(yoso.list_checkpoints(str(tmp_path / "run"))[-1])
    assert ckpt["modules/D/features.blocks.0.attn1.to_q.weight"].shape == (1152, 1152)
    assert ckpt["modules/D/features.caption_projection.linear_1.weight"].shape == (1152, 4096)


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


def test_prompts_data_are_the_frozen_bases_own_samples(base):
    # --prompts: x_0 of item i is the base's DPM-Solver++ sample with CFG from noise seeded by i, adapters off
    cfg = smoke_config(base, teacher_guidance=3.0)
    pipe, _, _, frozen, params, _ = ft.build(cfg, torch.device("cpu"))
    for p in params:                                         # adapters that would change every sample if on
        p.data.normal_(0, 0.5)
    prompts = ["a red house", "a blue car", "a small green bird"]
    data = ft.Items([(None, p) for p in prompts], pipe, frozen, cfg, torch.device("cpu"),
                    lambda: torch.autocast("cpu", enabled=False))
    x0, _ = data.get([0, 1, 2])
    # the same sample in any batch (batched matmuls round differently: seen 1.1e-5 apart; another seed is O(1))
    torch.testing.assert_close(data.get([2])[0][0], x0[2], rtol=1e-4, atol=1e-4)
    from diffusers import DPMSolverMultistepScheduler
    plain = ft.load_base(base)
    plain.scheduler = DPMSolverMultistepScheduler.from_config(plain.scheduler.config)
    noise = torch.stack([torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(3)])
    ref = plain(prompts, latents=noise, num_inference_steps=cfg.teacher_steps, guidance_scale=3.0, height=16, width=16,
                use_resolution_binning=False, clean_caption=False, max_sequence_length=cfg.max_tokens,
                output_type="latent").images
    torch.testing.assert_close(x0, ref)


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


def test_transplant_of_an_ipi_run_samples_at_the_target_size(data, tmp_path):
    # no adaption: the run keeps an informative prior at its own latent size (8x8 here, 64x64 for PixArt-α-512);
    # width 3 x 8: PixArt-α-1024's size embedding takes a third of the width (1152 = 3 x 384)
    base = tiny_pixart.save_pipeline(str(tmp_path / "base"), heads=3)
    out = str(tmp_path / "ipi_run")
    r = run_script("--base", base, "--data", data, "--preset", "smoke", "--stage", "yoso", "--out", out,
                   "--set", "yoso_steps=1")
    assert r.returncode == 0, r.stderr[-3000:]
    # the 1024 stand-in: PixArt-α-1024's latent size 128 (diffusers' pipeline keys its size conditioning on it)
    target = tiny_pixart.save_pipeline(str(tmp_path / "target"), seed=1, heads=3, sample_size=128,
                                     use_additional_conditions=True)
    dest = ft.transplant(out, target)
    ipi = yoso.IPI.from_state_dict(load_file(os.path.join(dest, "ipi.safetensors")))
    assert ipi.mean.shape == (4, 128, 128)
    assert json.load(open(os.path.join(dest, "yoso_config.json")))["ipi_upsampled_from"] == [8, 8]
    r = run_script("--sample", dest, "--prompt", "a red house", "--steps", "1")
    assert r.returncode == 0, r.stderr[-2000:]
    from PIL import Image
    assert Image.open(r.stdout.strip().splitlines()[-1]).size == (4 * 256, 256)       # 4 images of 256 px, not 16
    # a prior of the wrong size is refused, never sampled at its own size
    shutil.copy(os.path.join(out, "ipi.safetensors"), os.path.join(dest, "ipi.safetensors"))
    assert_clean_error(run_script("--sample", dest, "--prompt", "a red house"), "8x8 prior", "128x128")


# --- errors: one line, exit code 2 -------------------------------------------------------------------

def test_every_option_has_a_help_text_with_its_default(monkeypatch, capsys):
    parsers = []
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", lambda self, argv=None: parsers.append(self))
    ft.parse_args([])
    no_default = ("-h", "--data", "--prompts", "--resume", "--sample", "--transplant")     # modes and inputs
    for action in parsers[0]._actions:
        assert action.help, action.option_strings
        assert action.option_strings[0] in no_default or "default" in action.help, action.option_strings
    monkeypatch.undo()
    with pytest.raises(SystemExit):
        ft.parse_args(["--help"])
    text = capsys.readouterr().out
    assert "(arXiv 2403.12931; README.md)" in text and "method doc" not in text



def assert_clean_error(r, *words):
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    err = r.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1 and err.startswith("error: "), err
    for w in words:
        assert w in err, err


def assert_main_error(capsys, argv, *words):
    """The same check in-process, for errors raised before any training starts (no import cost)."""
    assert ft.main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
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
    cached = load_file(str(tmp_path / "c" / "00000001.safetensors"))
    assert cached["latent"].shape == (4, 8, 8) and torch.isfinite(cached["latent"]).all()   # the teacher's sample
    r = run_script(*args, "--stage", "yoso", "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = metrics(out)
    assert [m["step"] for m in rows if m["phase"] == "yoso"] == [5, 6, 7]          # continues the global step
    from diffusers import LCMScheduler
    assert LCMScheduler.from_pretrained(os.path.join(out, "scheduler")).config.prediction_type == "v_prediction"
    assert not os.path.exists(os.path.join(out, "ipi.safetensors"))                  # adapted weights: no IPI


# --- reliability: exact resume, 1 vs 2 processes, SIGINT, divergence, bad input (yoso stage, smoke) ----

YOSO_RUN = ("--preset", "smoke", "--stage", "yoso", "--set", "ckpt_every=100")
FIGURES = ("loss_D", "D_real", "D_fake", "L_adv", "L_con", "L_rec", "loss_G", "grad_norm_G", "grad_norm_D")


@pytest.fixture(scope="session")
def data_with_corrupt(data, tmp_path_factory):
    """The 6 caption images plus a 7th listed item that is not an image: skipped and counted."""
    d = tmp_path_factory.mktemp("captions_corrupt")
    for name in os.listdir(data):
        if name.endswith(".png"):
            os.symlink(os.path.join(data, name), d / name)
    (d / "broken.png").write_bytes(b"\x89PNG this is not a png")
    (d / "metadata.jsonl").write_text(open(os.path.join(data, "metadata.jsonl")).read()
                                      + '{"file_name": "broken.png", "text": "a photo of a red house"}\n')
    return str(d)


@pytest.fixture(scope="session")
def straight_run(base, data_with_corrupt, tmp_path_factory):
    """4 YOSO steps in one go: the reference for the resume and the 2-process tests."""
    out = tmp_path_factory.mktemp("straight")
    r = run_script("--base", base, "--data", data_with_corrupt, *YOSO_RUN, "--out", out, "--set", "yoso_steps=4")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "6 items, 1 corrupt images skipped" in r.stdout
    return str(out)


def assert_same_checkpoints(a, b):
    ta, tb = (checkpoint_tensors(os.path.join(d, "ckpt-00000004.pt")) for d in (a, b))
    assert ta.keys() == tb.keys()
    for prefix in ("modules/G/", "modules/G_ema/", "modules/D/", "optimizers/G/state", "optimizers/D/state"):
        assert any(k.startswith(prefix) for k in ta), prefix                        # adapters, EMA, D, optimisers
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


def test_resume_is_bit_identical_to_an_uninterrupted_run(base, data_with_corrupt, straight_run, tmp_path):
    # fp32, one thread, data order and (t, ε) functions of (seed, step): 2 steps + --resume 2 = 4 steps, bit for bit
    args = ("--base", base, "--data", data_with_corrupt, *YOSO_RUN, "--out", tmp_path)
    assert run_script(*args, "--set", "yoso_steps=2").returncode == 0
    # --resume RUN_DIR (train_cifar.py's form); the torchrun test below resumes with --out DIR --resume
    r = run_script("--base", base, "--data", data_with_corrupt, *YOSO_RUN, "--set", "yoso_steps=4", "--resume", tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "at step 2" in r.stdout
    assert [m["step"] for m in metrics(tmp_path)] == [1, 2, 3, 4]
    assert_same_checkpoints(straight_run, tmp_path)


@pytest.mark.distributed          # runs in the default `pytest -q` too: gloo on CPU, offline
def test_two_processes_match_one_and_resume_under_torchrun(base, data_with_corrupt, straight_run, tmp_path):
    # global batch 2 = 1 per rank; each rank takes its slice of the global batch's data, t and ε
    args = ("--base", base, "--data", data_with_corrupt, *YOSO_RUN, "--out", tmp_path)
    r = run_script(*args, "--set", "yoso_steps=2", torchrun=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "world 2" in r.stdout
    r = run_script(*args, "--set", "yoso_steps=4", "--resume", torchrun=True)
    assert r.returncode == 0, r.stderr[-3000:]
    one, two = metrics(straight_run), metrics(tmp_path)
    assert [m["step"] for m in two] == [1, 2, 3, 4]                                    # rank 0 writes, once
    # losses and gradient norms to 1e-4 relative (a wrong rank slice changes them by far more). D_real / D_fake
    # are means of ~1e-3 logits that nearly cancel: summation order (one process vs two) moved D_real by 1.4e-6
    # after one update and 1.2e-5 after three on CI's CPU, so they get an absolute 1e-4 instead
    for a, b in zip(one, two):
        for k in FIGURES:
            tol = dict(abs=1e-4) if k in ("D_real", "D_fake") else dict(rel=1e-4, abs=1e-5)
            assert b[k] == pytest.approx(a[k], **tol), (a["step"], k)


def test_sigint_checkpoints_and_says_how_to_resume(base, data, tmp_path):
    p = subprocess.Popen([sys.executable, SCRIPT, "--base", base, "--data", data, *YOSO_RUN, "--out", str(tmp_path),
                          "--set", "yoso_steps=100000", "--set", "sample_every=100000"],
                         cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log, deadline = tmp_path / "metrics.jsonl", time.time() + 180
    while not (log.exists() and log.read_text().count("\n") >= 1) and time.time() < deadline:
        time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err[-3000:]
    assert "interrupted" in out and "--resume" in out and "Traceback" not in err
    ckpts = yoso.list_checkpoints(str(tmp_path))
    assert len(ckpts) == 1 and yoso.read_checkpoint(ckpts[0])["step"] == metrics(tmp_path)[-1]["step"] >= 1


def test_divergence_stops_with_exit_3_and_keeps_the_last_good_checkpoint(base, data_with_corrupt, straight_run, tmp_path):
    good_path = os.path.join(tmp_path, "ckpt-00000004.pt")
    shutil.copy(os.path.join(straight_run, "ckpt-00000004.pt"), good_path)   # a run that stopped at step 4
    good = checkpoint_tensors(good_path)
    # lr = inf: D's first update is non-finite, so is G's gradient through it, and every one after -> skipped;
    # saturation_gap = -inf: any finite D gap counts as saturated, so the warning fires on the first step
    r = run_script("--base", base, "--data", data_with_corrupt, *YOSO_RUN, "--out", tmp_path, "--resume",
                   "--set", "yoso_steps=50", "--set", "yoso.lr=inf", "--set", "max_skipped=3",
                   "--set", "saturation_gap=-inf", "--set", "saturation_steps=1")
    assert r.returncode == 3, r.stderr[-3000:]
    assert "diverged" in r.stderr and "ckpt-00000004.pt" in r.stderr and "saturated" in r.stderr
    assert yoso.list_checkpoints(str(tmp_path)) == [good_path]
    assert all(torch.equal(v, good[k]) for k, v in checkpoint_tensors(good_path).items())
    rows = metrics(tmp_path)
    assert [r["skipped_total"] for r in rows] == [1, 2, 3] and rows[-1]["step"] == 7


def test_a_new_run_never_overwrites_an_earlier_one(base, data, straight_run, capsys):
    before = {n: os.path.getmtime(os.path.join(straight_run, n)) for n in os.listdir(straight_run)}
    assert_main_error(capsys, ["--base", base, "--data", data, *YOSO_RUN, "--out", straight_run],
                      "already holds a run", "--resume", "another --out")
    assert {n: os.path.getmtime(os.path.join(straight_run, n)) for n in os.listdir(straight_run)} == before


def test_resume_skips_a_truncated_newest_checkpoint(base, data_with_corrupt, straight_run, tmp_path):
    good = os.path.join(tmp_path, "ckpt-00000004.pt")
    shutil.copy(os.path.join(straight_run, "ckpt-00000004.pt"), good)
    data = open(good, "rb").read()
    open(os.path.join(tmp_path, "ckpt-00000005.pt"), "wb").write(data[: len(data) // 2])   # a cut-off copy
    r = run_script("--base", base, "--data", data_with_corrupt, *YOSO_RUN, "--out", tmp_path, "--resume",
                   "--set", "yoso_steps=5")
    assert r.returncode == 0, r.stderr[-3000:]
    warnings = [line for line in r.stderr.splitlines() if "ckpt-00000005" in line]
    assert len(warnings) == 1 and "skipping unreadable checkpoint" in warnings[0]
    assert "at step 4" in r.stdout and [m["step"] for m in metrics(tmp_path)] == [5]
    assert os.path.isfile(os.path.join(tmp_path, "ckpt-00000005.pt.corrupt"))   # kept aside for a look
    assert yoso.read_checkpoint(os.path.join(tmp_path, "ckpt-00000005.pt"))["step"] == 5


def test_resume_with_another_architecture_is_one_clear_error(base, data, straight_run, capsys, monkeypatch):
    monkeypatch.setattr(signal, "signal", lambda *a: None)      # in-process: keep pytest's own SIGINT handler
    assert_main_error(capsys, ["--base", base, "--data", data, *YOSO_RUN, "--out", straight_run, "--resume",
                               "--lora-rank", "8"], "does not match this model", "size mismatch")


def test_bad_settings_and_inputs_are_one_clear_error(base, data, tmp_path, capsys, monkeypatch):
    run = ("--base", base, "--data", data, "--preset", "smoke", "--out", tmp_path / "o")
    assert_main_error(capsys, [*run, "--resume"], "not a finetune_t2i.py run folder")
    assert_main_error(capsys, [*run, "--set", "yoso.k_D=1000"], "k_D=1000")
    assert_main_error(capsys, [*run, "--set", "yoso_steps=0"], "yoso_steps must be positive")
    assert_main_error(capsys, [*run, "--set", "adapt_steps=-1"], "adapt_steps must be positive")
    assert_main_error(capsys, [*run, "--set", "nonsense=1"], "nonsense=1")
    assert_main_error(capsys, [*run, "--set", "resolution=18"], "not divisible by 4", "patch size 2")
    assert_main_error(capsys, [*run, "--set", "batch_size=7"], "only 6 usable items")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "0.png").write_bytes(b"\x89PNG garbage")
    (corrupt / "metadata.jsonl").write_text('{"file_name": "0.png", "text": "a red house"}\n')
    assert_main_error(capsys, ["--base", base, "--data", corrupt, "--preset", "smoke"], "all 1 images are corrupt")
    assert_main_error(capsys, ["--base", base, "--data", tmp_path / "none", "--preset", "smoke"], "no such folder")
    assert_main_error(capsys, ["--base", base, "--data", tmp_path, "--preset", "smoke"], "no metadata.jsonl")
    # a 2-process launch with batch 3: caught before any process group is set up
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert_main_error(capsys, [*run, "--set", "batch_size=3"], "not divisible by 2 processes")
    assert not (tmp_path / "o").exists()                                               # nothing written for a failed start


def test_the_adaption_optimiser_is_gone_before_the_yoso_stage(base, data, tmp_path, monkeypatch):
    # issue 15: the adaption stage's AdamW (with LoRA 2x the adapters, with full fine-tuning 2x the model) used
    # to stay alive through the whole YOSO stage. In the YOSO stage only G's and D's optimisers may exist.
    import gc

    def optimisers() -> int:
        gc.collect()
        return sum(isinstance(o, torch.optim.Optimizer) for o in gc.get_objects())

    alive, step, before = [], yoso.train_step, optimisers()             # other tests' may still be alive

    def counting_step(*args, **kwargs):
        alive.append(optimisers() - before)
        return step(*args, **kwargs)

    monkeypatch.setattr(yoso, "train_step", counting_step)
    argv = ["--base", base, "--data", data, "--preset", "smoke", "--out", str(tmp_path / "run"),
            "--set", "adapt_steps=2", "--set", "yoso_steps=2", "--set", "ckpt_every=100", "--set", "sample_every=100"]
    assert ft.main(argv) == 0
    assert alive == [2, 2]


def test_a_base_the_hub_cannot_give_is_one_line_on_stderr(data, tmp_path):
    # a real user's first run offline: huggingface_hub's retry warnings and deprecation notes must not come
    # before (or instead of) our one line; the warnings filter is the user's default, not the suite's "ignore"
    env = {k: v for k, v in ENV.items() if k != "PYTHONWARNINGS"}
    r = subprocess.run([sys.executable, SCRIPT, "--base", "PixArt-alpha", "--data", data, "--preset", "smoke",
                        "--out", tmp_path / "o"],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [r.stderr.strip()], r.stderr
    assert r.stderr.startswith("error: --base PixArt-alpha: cannot load a PixArt-α diffusers pipeline")
    assert not (tmp_path / "o").exists()


# --- first contact (issue 24) -------------------------------------------------------------------------

def test_an_out_that_cannot_be_a_run_folder_is_one_line_before_any_work(base, data, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(ft, "read_items", lambda cfg: pytest.fail("read the data before checking --out"))
    a_file = tmp_path / "a_file.txt"
    a_file.write_text("x")
    for out, words in ((a_file, ("is a file, not a folder",)), (a_file / "sub", ("is a file, so no folder",)),
                       ("/proc/no/such/run", ("cannot write in /proc",))):
        assert_main_error(capsys, ["--base", base, "--data", data, "--preset", "smoke", "--out", out], str(out), *words)


def test_lora_rank_is_checked_and_full_excludes_it(base, data, tmp_path, capsys):
    run = ["--base", base, "--data", data, "--preset", "smoke", "--out", tmp_path / "o"]
    assert_main_error(capsys, [*run, "--lora-rank", "-1"], "lora_rank must be >= 0")
    with pytest.raises(SystemExit) as e:                         # argparse: one usage line and exit 2
        ft.parse_args([*map(str, run), "--full", "--lora-rank", "8"])
    assert e.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
    assert "0 = full fine-tuning" in subprocess.run([sys.executable, SCRIPT, "--help"], capture_output=True,
                                                    text=True, env=ENV).stdout


def test_the_model_cards_code_runs_on_the_base_it_was_trained_from(lora_run, tmp_path):
    # the tiny base has no aspect-ratio bins (8x8 latents): the card must say use_resolution_binning=False
    card = open(os.path.join(lora_run, "README.md")).read()
    code = card.split("```python\n")[1].split("```")[0]
    assert "use_resolution_binning=False" in code
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["image"].size == (16, 16)
    assert "`yoso`: what the last stage trained with" in card


def test_an_unreachable_base_is_said_before_any_data_problem(data, tmp_path):
    # offline, a default base and too few items for its batch: the base is the real problem, said first
    r = run_script("--data", data, "--out", tmp_path / "o")
    assert r.returncode == 2 and r.stderr.startswith("error: --base PixArt-alpha: cannot load"), r.stderr


def test_a_resume_past_a_damaged_checkpoint_reads_as_one_run(base, data, tmp_path):
    run = ["--base", base, "--data", data, "--preset", "smoke", "--out", tmp_path, "--set", "adapt_steps=2",
           "--set", "yoso_steps=4", "--set", "ckpt_every=2", "--set", "sample_every=2"]
    assert run_script(*run).returncode == 0
    newest = sorted((tmp_path).glob("ckpt-*.pt"))[-1]
    newest.write_bytes(newest.read_bytes()[:1000])               # the step-6 checkpoint cut off
    r = run_script(*run, "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    steps = [m["step"] for m in metrics(tmp_path)]
    assert steps == sorted(steps) and len(steps) == len(set(steps)) == 6, steps   # no step twice
    grids = sorted(p.name for p in (tmp_path / "samples").glob("*.png"))
    assert grids == ["adapt-000002.png", "yoso-000004.png", "yoso-000006.png"], grids
