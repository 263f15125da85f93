"""Data sets for every stage: Fashion-MNIST (the embedded default) and ImageFolder trees.

`load_dataset(name, split)` returns a torch Dataset of (float image (C, H, W), int label) with
the attributes `num_classes`, `in_chans` and `img_size` that the model configs need.
    name = "fashion-mnist"          28x28 grayscale, 10 classes (see fashion_mnist.py)
    name = "folder:/path/to/root"   root/{train,val|validation}/<class>/<image>, RGB (image_folder.py)
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .fashion_mnist import CLASSES, DatasetError, find_fashion_mnist, load_fashion_mnist_arrays, read_idx
from .image_folder import ImageFolder, find_classes, split_dir

__all__ = ["load_dataset", "TensorImageDataset", "ImageFolder", "DatasetError", "find_fashion_mnist", "read_idx",
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


def _image_folder(root: str, split: str, img_size: Optional[int], skip_bad_images: bool = False) -> ImageFolder:
    try:
        from torchvision import transforms
    except ImportError as exc:  # pragma: no cover - torchvision comes with timm
        raise ImportError(f"ImageFolder data needs torchvision: {exc}") from exc
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
    size = img_size or 224
    if split == "train":
        tf = [transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip()]
    else:
        tf = [transforms.Resize(int(size / 0.875)), transforms.CenterCrop(size)]
    tf += [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    ds = ImageFolder(path, transforms.Compose(tf), classes, skip_bad_images=skip_bad_images)
    ds.num_classes, ds.in_chans, ds.img_size = len(ds.classes), 3, size
    return ds


def load_dataset(name: str = "fashion-mnist", split: str = "train", data_dir: Optional[str] = None,
                 img_size: Optional[int] = None, download: bool = True, skip_bad_images: bool = False) -> Dataset:
    """The `split` ('train' or 'test'/'val') of data set `name` (see the module docstring).

    skip_bad_images (ImageFolder only): skip unreadable images, counting them in the dataset's
    `bad_images`, instead of raising DatasetError naming the file."""
    if split not in ("train", "test", "val"):
        raise ValueError(f"split must be 'train', 'test' or 'val', got {split!r}")
    if name == "fashion-mnist":
        images, labels = load_fashion_mnist_arrays("train" if split == "train" else "test", data_dir, download)
        return TensorImageDataset(images, labels, len(CLASSES), (FASHION_MNIST_MEAN,), (FASHION_MNIST_STD,),
                                  img_size)
    if name.startswith("folder:"):
        return _image_folder(name[len("folder:"):], split, img_size, skip_bad_images)
    raise ValueError(f"unknown data set {name!r}: use 'fashion-mnist' or 'folder:<path>'")
