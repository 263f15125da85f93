"""A tiny ViT and an easy data set for the training engine's tests (test_engine.py,
test_reliability_engine.py, test_dispatch.py), and for the scripts those tests run in
subprocesses (they put tests/ on sys.path and import this module, which is not a test file)."""
import torch
from torch.utils.data import Dataset, TensorDataset

import incubation

TINY = dict(img_size=8, patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=2, num_classes=4)
QUIET = dict(progress=False, label_smoothing=0.0)


def tiny_vit(seed=0, dtype=torch.float64, **kw):
    torch.manual_seed(seed)
    return incubation.VisionTransformer(**{**TINY, **kw}).to(dtype)


def easy_data(n=128, seed=1, dtype=torch.float64):
    """Class c lights up patch c of the 2x2 patch grid: easy, but only if the model learns."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    x = torch.randn(n, 1, 8, 8, generator=g) * 0.5
    for i, c in enumerate(y.tolist()):
        r, col = divmod(c, 2)
        x[i, 0, 4 * r:4 * r + 4, 4 * col:4 * col + 4] += 1.5
    return TensorDataset(x.to(dtype), y)


class Recording(Dataset):
    """`data`, noting the index of every read in `reads`, in order (what the engine read when)."""

    def __init__(self, data):
        self.data, self.reads = data, []

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        self.reads.append(i)
        return self.data[i]
