"""Data sets for every stage: Fashion-MNIST (the embedded default) and ImageFolder trees.

`load_dataset(name, split)` returns a torch Dataset of (float image (C, H, W), int label) with
the attributes `num_classes`, `in_chans` and `img_size` that the model configs need.
    name = "fashion-mnist"          28x28 grayscale, 10 classes (see fashion_mnist.py)
    name = "folder:/path/to/root"   root/{train,val|validation}/<class>/<image>, RGB (image_folder.py),
                                    augmented by timm.data.create_transform (see `Augment`)
"""
from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import Dataset, Subset

from .fashion_mnist import CLASSES, DatasetError, find_fashion_mnist, load_fashion_mnist_arrays, read_idx
from .image_folder import ImageFolder, find_classes, own_size, split_dir

__all__ = ["load_dataset", "holdout", "base_dataset", "Augment", "TensorImageDataset", "ImageFolder", "DatasetError", "find_fashion_mnist",
           "read_idx", "default_workers", "FASHION_MNIST_CLASSES"]

FASHION_MNIST_CLASSES = CLASSES
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530


class TensorImageDataset(Dataset):
    """uint8 images (N, C, H, W) kept in memory, normalised (and resized) per item."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, num_classes: int, mean, std,
                 img_size: Optional[int] = None):
        if images.dtype != torch.uint8 or images.ndim != 4 or labels.shape != images.shape[:1]:
            raise ValueError(f"images must be uint8 (N, C, H, W) with one label each, got "
                             f"{tuple(images.shape)} {images.dtype} and labels {tuple(labels.shape)}")
        self.images, self.labels, self.num_classes = images, labels.long(), num_classes
        self.in_chans = images.shape[1]
        self.img_size = img_size or images.shape[-1]
        self.mean = torch.tensor(mean, dtype=torch.float32).reshape(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).reshape(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        x = self.images[i].float().div_(255)
        if x.shape[-1] != self.img_size or x.shape[-2] != self.img_size:
            x = F.interpolate(x[None], size=(self.img_size, self.img_size), mode="bilinear",
                              align_corners=False)[0]
        return (x - self.mean) / self.std, int(self.labels[i])


@dataclass(frozen=True)
class Augment:
    """How ImageFolder images become tensors: the arguments of timm.data.create_transform
    (train: random-resized crop, flip, then these; eval: resize to img_size / crop_pct and
    centre-crop). The defaults add nothing beyond crop and flip; the vit-* presets carry the
    official recipe. Fashion-MNIST (in memory, 28 px) is not augmented."""
    auto_augment: Optional[str] = None   # timm --aa, e.g. "rand-m9-mstd0.5-inc1"
    re_prob: float = 0.0                 # random erasing probability (--reprob)
    re_mode: str = "pixel"
    re_count: int = 1
    color_jitter: float = 0.0            # timm applies it only without auto_augment
    interpolation: str = "bilinear"      # train and eval resizing
    crop_pct: float = 0.875              # eval: resize to img_size / crop_pct, centre crop
    mean: tuple = IMAGENET_DEFAULT_MEAN
    std: tuple = IMAGENET_DEFAULT_STD

    def __post_init__(self):
        if not 0.0 <= self.re_prob <= 1.0:
            raise ValueError(f"re_prob must be in [0, 1], got {self.re_prob}")
        if not 0.0 < self.crop_pct <= 1.0:
            raise ValueError(f"crop_pct must be in (0, 1], got {self.crop_pct}")
        if self.interpolation not in ("bilinear", "bicubic", "nearest", "random"):
            raise ValueError(f"interpolation must be bilinear, bicubic, nearest or random, got {self.interpolation!r}")
        ignored = _sections_timm_ignores(self.auto_augment or "")
        if ignored:
            raise ValueError(f"auto-augment policy {self.auto_augment!r}: section(s) {', '.join(map(repr, ignored))} "
                             "hold no number, and timm would ignore them without a word (each section is a key "
                             "and a number, e.g. rand-m9-mstd0.5-inc1)")

    def transform(self, img_size: int, training: bool):
        """The timm transform of this recipe for images of `img_size`."""
        from timm.data import create_transform
        if not training:
            return create_transform(img_size, is_training=False, interpolation=self.interpolation,
                                    crop_pct=self.crop_pct, mean=self.mean, std=self.std)
        try:
            return create_transform(img_size, is_training=True, auto_augment=self.auto_augment,
                                    color_jitter=self.color_jitter or None, interpolation=self.interpolation,
                                    re_prob=self.re_prob, re_mode=self.re_mode, re_count=self.re_count,
                                    mean=self.mean, std=self.std)
        except AssertionError as exc:   # timm's way of refusing an unknown --aa policy
            reason = str(exc) or "timm knows no such policy"
            raise ValueError(f"auto-augment policy {self.auto_augment!r}: {reason} (timm's --aa, e.g. "
                             "rand-m9-mstd0.5-inc1, augmix-m5-w4-d2, original)") from None

    def to_dict(self) -> dict:
        return asdict(self)


def _sections_timm_ignores(policy: str) -> list[str]:
    """The sections of a timm auto-augment policy that timm's parsers skip silently: those with
    no number (but rand's t<transforms>). An unknown policy name is timm's to refuse."""
    name, *sections = policy.split("-")
    if name not in ("rand", "augmix", "original", "originalr", "v0", "v0r", "3a"):
        return []
    return [s for s in sections if not re.search(r"\d", s) and not (name == "rand" and s.startswith("t"))]


def base_dataset(dataset: Dataset) -> Dataset:
    """The data set under its Subsets (holdout, --limit-train / --limit-eval)."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return dataset


def default_workers(dataset) -> int:
    """Loader worker processes per rank: none for the in-memory data sets (workers would only
    copy them), else up to 8, sharing this machine's cores among its ranks (torchrun)."""
    if isinstance(base_dataset(dataset), TensorImageDataset):
        return 0
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, min(8, (os.cpu_count() or 1) // ranks_here))


def _image_folder(root: str, split: str, img_size: Optional[int], skip_bad_images: bool = False,
                  augment: Optional[Augment] = None, augmented: Optional[bool] = None) -> ImageFolder:
    train, evaluation = split_dir(root, "train"), split_dir(root, "val")
    path = train if split == "train" else evaluation
    if path is None:
        wanted = os.path.join(root, "train") if split == "train" else os.path.join(root, "val")
        raise DatasetError(f"ImageFolder data: {wanted} does not exist (expected <root>/train and "
                           "<root>/val or <root>/validation)")
    classes = find_classes(path)
    other = evaluation if split == "train" else train
    if other is not None:   # labels are indices into the sorted class list: both splits need the same
        other_classes = find_classes(other)
        train_classes, eval_classes = (classes, other_classes) if path == train else (other_classes, classes)
        if train_classes != eval_classes:
            raise DatasetError(
                f"ImageFolder data {root}: the class folders of {train} and {evaluation} differ (only in train: "
                f"{sorted(set(train_classes) - set(eval_classes))}; only in {os.path.basename(evaluation)}: "
                f"{sorted(set(eval_classes) - set(train_classes))}): every later label would shift")
    size = img_size or own_size(train or path, skip_bad_images)   # both splits: the training images' size
    transform = (augment or Augment()).transform(size, training=split == "train" if augmented is None else augmented)
    ds = ImageFolder(path, transform, classes, skip_bad_images=skip_bad_images)
    ds.num_classes, ds.in_chans, ds.img_size = len(ds.classes), 3, size
    ds.split = os.path.basename(path)   # what was used: train, val or validation
    return ds


def load_dataset(name: str = "fashion-mnist", split: str = "train", data_dir: Optional[str] = None,
                 img_size: Optional[int] = None, download: bool = True, skip_bad_images: bool = False,
                 augment: Optional[Augment] = None, augmented: Optional[bool] = None) -> Dataset:
    """The `split` ('train' or 'test'/'val': the data set's test images) of data set `name` (see
    the module docstring), its `split` attribute the one used (train, test; ImageFolder: its folder's
    name). For a validation split carved from the training images see `holdout`.

    img_size: resize to this; default the data's own (Fashion-MNIST 28; an ImageFolder the shorter
    side of its first training image, `own_size`).

    augment (ImageFolder only): the transforms' recipe (default `Augment()`: crop and flip);
    augmented: training (True) or evaluation (False) transforms, default by the split.
    skip_bad_images (ImageFolder only): skip unreadable images, counting them in the dataset's
    `bad_images`, instead of raising DatasetError naming the file."""
    if split not in ("train", "test", "val"):
        raise ValueError(f"split must be 'train', 'test' or 'val', got {split!r}")
    if name == "fashion-mnist":
        images, labels = load_fashion_mnist_arrays("train" if split == "train" else "test", data_dir, download)
        ds = TensorImageDataset(images, labels, len(CLASSES), (FASHION_MNIST_MEAN,), (FASHION_MNIST_STD,), img_size)
        ds.classes, ds.split = list(CLASSES), "train" if split == "train" else "test"
        return ds
    if name.startswith("folder:"):
        return _image_folder(name[len("folder:"):], split, img_size, skip_bad_images, augment, augmented)
    raise ValueError(f"unknown data set {name!r}: use 'fashion-mnist' or 'folder:<path>'")


HOLDOUT_SEED = 0   # one fixed draw: every run and every method validates on the same images


def holdout(name: str, size: int, **load_kwargs) -> tuple[Dataset, Dataset]:
    """(train, validation): `size` images of the training split held out to validate on (with
    the evaluation transforms), the rest to train on. Recipes and defaults are chosen on this
    validation split; the test split is kept for final numbers. `load_kwargs`: load_dataset's."""
    train = load_dataset(name, "train", **load_kwargs)
    if not 0 < size < len(train):
        raise ValueError(f"a validation split of {size} images needs 0 < size < {len(train)}, the training images")
    view = train if name == "fashion-mnist" else load_dataset(name, "train", augmented=False, **load_kwargs)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(HOLDOUT_SEED)).tolist()
    return Subset(train, order[size:]), Subset(view, order[:size])
