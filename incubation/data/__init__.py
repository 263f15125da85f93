"""Data sets for every stage: Fashion-MNIST (the embedded default) and ImageFolder trees.

`load_dataset(name, split)` returns a torch Dataset of (float image (C, H, W), int label) with
the attributes `num_classes`, `in_chans` and `img_size` that the model configs need.
    name = "fashion-mnist"          28x28 grayscale, 10 classes (see fashion_mnist.py)
    name = "folder:/path/to/root"   root/{train,val}/<class>/<image>, RGB
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .fashion_mnist import CLASSES, DatasetError, find_fashion_mnist, load_fashion_mnist_arrays, read_idx

__all__ = ["load_dataset", "TensorImageDataset", "DatasetError", "find_fashion_mnist", "read_idx",
           "FASHION_MNIST_CLASSES"]

FASHION_MNIST_CLASSES = CLASSES
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


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


def _image_folder(root: str, split: str, img_size: Optional[int]):
    try:
        from torchvision import datasets, transforms
    except ImportError as exc:  # pragma: no cover - torchvision comes with timm
        raise ImportError(f"ImageFolder data needs torchvision: {exc}") from exc
    path = os.path.join(root, "train" if split == "train" else "val")
    if not os.path.isdir(path):
        raise DatasetError(f"ImageFolder data: {path} does not exist (expected <root>/train and <root>/val)")
    size = img_size or 224
    if split == "train":
        tf = [transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip()]
    else:
        tf = [transforms.Resize(int(size / 0.875)), transforms.CenterCrop(size)]
    tf += [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    ds = datasets.ImageFolder(path, transform=transforms.Compose(tf))
    ds.num_classes, ds.in_chans, ds.img_size = len(ds.classes), 3, size
    return ds


def load_dataset(name: str = "fashion-mnist", split: str = "train", data_dir: Optional[str] = None,
                 img_size: Optional[int] = None, download: bool = True) -> Dataset:
    """The `split` ('train' or 'test'/'val') of data set `name` (see the module docstring)."""
    if split not in ("train", "test", "val"):
        raise ValueError(f"split must be 'train', 'test' or 'val', got {split!r}")
    if name == "fashion-mnist":
        images, labels = load_fashion_mnist_arrays("train" if split == "train" else "test", data_dir, download)
        return TensorImageDataset(images, labels, len(CLASSES), (FASHION_MNIST_MEAN,), (FASHION_MNIST_STD,),
                                  img_size)
    if name.startswith("folder:"):
        return _image_folder(name[len("folder:"):], split, img_size)
    raise ValueError(f"unknown data set {name!r}: use 'fashion-mnist' or 'folder:<path>'")
