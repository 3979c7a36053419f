"""The floor of the README's small-sample FID: held-out test images scored like generated ones.

    python benchmarks/fid_floor.py
"""
# FID floor of the estimator used in the README: 1,000 held-out CIFAR-10 TEST images scored exactly like
# 1,000 generated ones (same 2,000-image training reference, same detector, same code path).
import io, os, sys, zipfile

import numpy as np
import torch
from PIL import Image
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_cifar as tc  # noqa: E402

ZIP = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "cifar10-jpeg.zip")
with zipfile.ZipFile(ZIP) as z:
    names = sorted(n for n in z.namelist() if n.startswith("test/") and n.endswith(".jpg"))
    names = [names[int(i)] for i in torch.linspace(0, len(names) - 1, 1000).long()]
    test = torch.stack([torch.from_numpy(np.array(Image.open(io.BytesIO(z.read(n))).convert("RGB"))).permute(2, 0, 1)
                        for n in names])


class Replay(torch.nn.Module):
    i = 0
    def forward(self, x_t, t, cond=None):
        out = test[self.i:self.i + len(x_t)].float() / 127.5 - 1
        self.i += len(x_t)
        return out


cfg = tc.make_config("cpu", overrides=("prediction_type='sample'", f"data='{ZIP}'"))
ref = tc.reference_subset(tc.load_images(ZIP, 32)[0], 2000)
print(f"FID (1000 CIFAR-10 test images vs 2000 training images): {tc.fid_of(Replay(), 1000, cfg, ref, None, 'cpu'):.3f}")
