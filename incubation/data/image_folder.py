"""ImageFolder trees: root/{train,val|validation}/<class>/**/<image>, labelled by class folder.

Like torchvision's ImageFolder (same sorted classes, image extensions and RGB loading), with
three differences that keep a bad tree from training silently on wrong labels:
- symlinked directories below a class folder are not followed (with a warning): a loop
  (`train/a/loop -> ..`) or a link into another class would copy other images under this
  label; a class folder itself may be a link, but two classes may not share a folder;
- the train and eval splits must have the same class folders, or loading fails naming the
  difference (a missing class would shift every later label);
- an unreadable image (corrupt, truncated, a decompression bomb) raises DatasetError naming
  the file, or with `skip_bad_images=True` is counted in `bad_images` and replaced by the
  next readable image, so batches keep their size.
"""
from __future__ import annotations

import os
import warnings
from typing import Callable, Optional

from torch.utils.data import Dataset

from .fashion_mnist import DatasetError

__all__ = ["ImageFolder", "IMG_EXTENSIONS", "split_dir", "find_classes", "own_size"]

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
EVAL_SPLITS = ("val", "validation")


def split_dir(root: str, split: str) -> Optional[str]:
    """root/train for 'train'; root/val or root/validation for 'val'/'test'; None if absent."""
    if split == "train":
        path = os.path.join(root, "train")
        return path if os.path.isdir(path) else None
    found = [os.path.join(root, name) for name in EVAL_SPLITS if os.path.isdir(os.path.join(root, name))]
    if len(found) > 1:
        raise DatasetError(f"ImageFolder data {root} has both {found[0]} and {found[1]}: keep one eval split")
    return found[0] if found else None


def find_classes(path: str) -> list[str]:
    """The class folders of a split, sorted (torchvision's order and labels)."""
    try:
        return sorted(entry.name for entry in os.scandir(path) if entry.is_dir())
    except OSError as exc:
        raise DatasetError(f"cannot list the class folders of {path}: {exc}") from exc


def _raise(exc: OSError):
    raise DatasetError(f"cannot list {exc.filename}: {exc.strerror or exc}") from exc


def _scan(path: str, classes: list[str]) -> list[tuple[str, int]]:
    """(image path, class index) under each class folder, in sorted order, without following
    symlinked directories below a class folder: inside the class they would read a folder
    twice (or loop), outside it they would label other images as this class."""
    samples, owner, skipped = [], {}, []
    for index, name in enumerate(classes):
        top = os.path.join(path, name)
        real_top = os.path.realpath(top)   # a class folder itself may be a link (subsets of ImageNet)
        count = 0
        for dirpath, dirnames, filenames in os.walk(top, followlinks=False, onerror=_raise):
            real = os.path.normpath(os.path.join(real_top, os.path.relpath(dirpath, top)))
            if owner.setdefault(real, name) != name:
                raise DatasetError(f"class folders {name} and {owner[real]} of {path} share the folder {real}: "
                                   "its images cannot have both labels")
            dirnames.sort()
            skipped += [os.path.relpath(os.path.join(dirpath, d), path) for d in dirnames
                        if os.path.islink(os.path.join(dirpath, d))]
            for f in sorted(filenames):
                if f.lower().endswith(IMG_EXTENSIONS):   # no stat per file: ImageNet has 1.3M
                    samples.append((os.path.join(dirpath, f), index))
                    count += 1
        if count == 0:
            raise DatasetError(f"class folder {top} holds no images ({', '.join(IMG_EXTENSIONS)})")
    if skipped:
        warnings.warn(f"ImageFolder {path}: not following {len(skipped)} symlinked folder"
                      f"{'' if len(skipped) == 1 else 's'} inside class folders (a loop, a second way into "
                      f"a folder, or other images): {', '.join(skipped[:5])}{' ...' if len(skipped) > 5 else ''}",
                      stacklevel=3)
    return samples


def own_size(path: str, skip_bad_images: bool = False) -> int:
    """The size of the images of split `path` when none is asked for: the shorter side of its first
    (readable, with `skip_bad_images`) image in ImageFolder's order. Reads one image header."""
    from PIL import Image
    for name in find_classes(path):
        for dirpath, dirnames, filenames in os.walk(os.path.join(path, name), followlinks=False):
            dirnames.sort()
            for file in (os.path.join(dirpath, f) for f in sorted(filenames) if f.lower().endswith(IMG_EXTENSIONS)):
                try:
                    with Image.open(file) as image:
                        return min(image.size)
                except _bad_image_errors() as exc:
                    if not skip_bad_images:
                        raise DatasetError(f"{file} is not a readable image ({type(exc).__name__}: {exc}); skip "
                                           "such files with --skip-bad-images, or give --img-size") from exc
    raise DatasetError(f"ImageFolder split {path} holds no readable image to take the image size from")


def _load_rgb(path: str):
    from PIL import Image
    with open(path, "rb") as f:
        image = Image.open(f)
        return image.convert("RGB")   # decodes the whole image: truncation shows here


def _bad_image_errors() -> tuple:
    from PIL import Image
    # what PIL raises for a corrupt or truncated file (UnidentifiedImageError is an OSError)
    return (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


class ImageFolder(Dataset):
    """One split of an ImageFolder tree (see the module docstring)."""

    def __init__(self, path: str, transform: Optional[Callable] = None, classes: Optional[list[str]] = None,
                 skip_bad_images: bool = False):
        self.root, self.transform, self.skip_bad_images = path, transform, skip_bad_images
        self.classes = list(classes) if classes is not None else find_classes(path)
        if not self.classes:
            raise DatasetError(f"ImageFolder split {path} has no class folders")
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        self.samples = _scan(path, self.classes)
        self.targets = [target for _, target in self.samples]
        self.bad_images: dict[str, str] = {}   # path -> why (per process: each loader worker counts its own)

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, i: int):
        """(PIL RGB image, class index) of sample i; DatasetError naming the file if unreadable."""
        path, target = self.samples[i]
        try:
            return _load_rgb(path), target
        except _bad_image_errors() as exc:
            raise DatasetError(f"{path} is not a readable image ({type(exc).__name__}: {exc}); skip such "
                               "files with skip_bad_images=True (--skip-bad-images)") from exc

    def __getitem__(self, i: int):
        for j in range(len(self.samples)):
            try:
                image, target = self.load((i + j) % len(self.samples))
            except DatasetError as exc:
                if not self.skip_bad_images:
                    raise
                path = self.samples[(i + j) % len(self.samples)][0]
                if path not in self.bad_images:
                    self.bad_images[path] = str(exc.__cause__)
                    warnings.warn(f"skipped bad image {path} ({len(self.bad_images)} so far): {exc.__cause__}",
                                  stacklevel=2)
                continue   # the next image stands in, so the batch keeps its size
            return (self.transform(image) if self.transform is not None else image), target
        raise DatasetError(f"no image in {self.root} is readable ({len(self.bad_images)} bad)")
