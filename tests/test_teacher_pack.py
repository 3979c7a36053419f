"""notebooks/teacher_cifar.py's pack / unpack: a GPU run's eval images come back bit-exact, in at most N capped files;
and its tiling measure of the students' one-pattern-per-token failure."""
import argparse
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "notebooks"))
import teacher_cifar  # noqa: E402


def _row(out, name, seed):
    images = np.random.default_rng(seed).integers(0, 256, (50, 3, 32, 32), dtype=np.uint8)   # incompressible
    np.savez(os.path.join(out, "samples", f"{name}-n50.npz"), images=images, labels=np.arange(50) % 10,
             row=json.dumps(dict(steps=1)))
    return images


def test_pack_round_trip_caps_files_and_keeps_priority(tmp_path, monkeypatch):
    out, back, packed = tmp_path / "work", tmp_path / "back", tmp_path / "packed"
    os.makedirs(out / "samples"), os.makedirs(out / "logs"), os.makedirs(out / "students" / "paper_s0" / "transformer")
    (out / "logs" / "status.txt").write_text("done\n")
    (out / "students" / "paper_s0" / "metrics.jsonl").write_text('{"step": 1}\n')
    (out / "students" / "paper_s0" / "transformer" / "config.json").write_text("{}")   # weights' folder: not packed
    names = ["abl-x_1step", "paper_s0_2step", "paper_s0_1step", "teacher_20step", "teacher_1step"]
    images = {n: _row(str(out), n, i) for i, n in enumerate(names)}
    # room for two rows (~155 KB each after xz) per file, two files: one row must be left out, an ablation's
    monkeypatch.setattr(teacher_cifar, "PACK_LIMIT", 64 * 1024 + 330_000)
    a = argparse.Namespace(out=str(out), pack_dir=str(packed), pack_files=2)
    teacher_cifar.pack(a)
    assert sorted(os.listdir(packed)) == ["teacher-1.tar", "teacher-2.tar"]
    teacher_cifar.unpack(argparse.Namespace(out=str(back), pack_dir=str(packed)))
    manifest = json.load(open(back / "MANIFEST.json"))
    assert manifest["left_out"] == ["samples/abl-x_1step-n50.npz.xz"]
    for n in names[1:]:
        f = np.load(back / "samples" / f"{n}-n50.npz")
        assert np.array_equal(f["images"], images[n]) and json.loads(str(f["row"])) == dict(steps=1)
    assert (back / "logs" / "status.txt").read_text() == "done\n"
    assert (back / "students" / "paper_s0" / "metrics.jsonl").is_file()
    assert not (back / "students" / "paper_s0" / "transformer").exists()


def test_tiling_is_one_for_a_pattern_repeated_in_every_token_and_near_zero_for_noise():
    g = torch.Generator().manual_seed(0)
    block = torch.randint(0, 256, (8, 3, 8, 8), generator=g, dtype=torch.uint8)      # one 8x8 pattern per image
    tiled = block.repeat(1, 1, 4, 4)                                                  # ... in all 16 token blocks
    tiled = (tiled.int() + torch.randint(0, 256, (8, 3, 1, 1), generator=g)).clamp(0, 255)   # per-image shift: same
    noise = torch.randint(0, 256, (8, 3, 32, 32), generator=g, dtype=torch.uint8)
    assert abs(teacher_cifar.tiling(tiled.to(torch.uint8)) - 1) < 0.05
    assert abs(teacher_cifar.tiling(noise)) < 0.05
