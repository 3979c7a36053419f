"""Shared fixtures: small generated image sets for the training-script tests (offline, CPU)."""
import os
import sys
import zipfile

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):         # parallel workers (pytest.ini): share the cores, not fight
    import torch
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


def write_image_folder(root, n_train=24, n_test=4, corrupt=1, size=32, seed=0):
    """ImageFolder layout: train/<class>/*.png (+ `corrupt` broken .jpg files) and test/<class>/*.png."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        for i in range(n):
            d = os.path.join(root, split, "ab"[i % 2])
            os.makedirs(d, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(os.path.join(d, f"{i:04d}.png"))
    for i in range(corrupt):
        with open(os.path.join(root, "train", "a", f"broken{i}.jpg"), "wb") as f:
            f.write(b"\xff\xd8 this is not a jpeg")
    return str(root)


@pytest.fixture
def cifar_like_folder(tmp_path):
    """24 random 32x32 training images in two class folders, 4 test images, 1 corrupt file."""
    return write_image_folder(tmp_path / "imgs")


@pytest.fixture
def cifar_like_zip(tmp_path):
    """The same layout as cifar_like_folder, zipped like shared/data/cifar10-jpeg.zip."""
    folder = write_image_folder(tmp_path / "imgs_for_zip", seed=1)
    path = str(tmp_path / "imgs.zip")
    with zipfile.ZipFile(path, "w") as zf:
        for d, _, names in os.walk(folder):
            for n in names:
                zf.write(os.path.join(d, n), os.path.relpath(os.path.join(d, n), folder))
    return path


def pytest_configure(config):
    config.addinivalue_line("markers", "distributed: multi-process (torchrun, gloo on CPU) test; runs by default")


def pytest_collection_modifyitems(items):
    """The 2-D study (~170 s on one core) first: under pytest-xdist the other tests then fill the other cores
    beside it, instead of one core running it alone at the end."""
    items.sort(key=lambda item: "test_toy2d.py" not in item.nodeid)


def checkpoint_tensors(path) -> dict:
    """A yoso checkpoint flattened to {"modules/G/w": tensor, "optimizers/G/state/0/exp_avg": ..., "step": ...}, every
    value a tensor, so two checkpoints compare entry by entry with torch.equal."""
    import torch
    import yoso
    flat = {}

    def walk(prefix, v):
        if isinstance(v, dict):
            for k, x in v.items():
                walk(f"{prefix}/{k}", x)
        elif isinstance(v, (list, tuple)) and not all(isinstance(x, (int, float)) for x in v):
            for i, x in enumerate(v):
                walk(f"{prefix}/{i}", x)
        else:
            flat[prefix.lstrip("/")] = v if torch.is_tensor(v) else torch.tensor(v if v is not None else [])
    ckpt = yoso.read_checkpoint(str(path))
    walk("", {k: ckpt[k] for k in ("step", "modules", "optimizers")})
    return flat
