"""Fashion-MNIST (70k 28x28 grayscale images, 10 classes) from its IDX files.

Where the files are looked for, in order:
  1. `data_dir` (the CLI's --data-dir)
  2. $INCUBATION_DATA_DIR
  3. the user cache: $XDG_CACHE_HOME/incubation/fashion-mnist (default ~/.cache/...)
  4. /usr/share/datasets/fashion-mnist (Debian package `dataset-fashion-mnist`)
  5. otherwise downloaded into the user cache from the official mirror (or
     $INCUBATION_FASHION_MNIST_URL) and verified against the sha256 sums below.
Every file is checked against its sha256 before use; a corrupt or truncated file raises
`DatasetError` naming it and is never used (a bad download is deleted).
"""
from __future__ import annotations

import gzip
import os
import shutil
import struct
import tempfile
import urllib.request
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..errors import IncubationError
from ..utils import file_sha256 as _sha256

__all__ = ["FILES", "CLASSES", "DatasetError", "find_fashion_mnist", "read_idx", "load_fashion_mnist_arrays"]

DEFAULT_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
FILES = {  # name -> sha256 of the .gz file
    "train-images-idx3-ubyte.gz": "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
    "train-labels-idx1-ubyte.gz": "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
    "t10k-images-idx3-ubyte.gz": "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
    "t10k-labels-idx1-ubyte.gz": "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
}
SPLITS = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", 60000),
          "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", 10000)}
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
           "Ankle boot")
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


class DatasetError(IncubationError, RuntimeError):
    """A data file is missing, corrupt or malformed."""


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "incubation" / "fashion-mnist"




def _complete(d: Path) -> bool:
    return all((d / name).is_file() for name in FILES)


def _verify(d: Path) -> None:
    for name, digest in FILES.items():
        got = _sha256(d / name)
        if got != digest:
            raise DatasetError(f"{d / name} is corrupt or truncated: sha256 {got} != expected {digest}")


def _download(base_url: str, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for name, digest in FILES.items():
        target = dest / name
        if target.is_file() and _sha256(target) == digest:
            continue
        url = base_url.rstrip("/") + "/" + name
        fd, tmp = tempfile.mkstemp(dir=dest, prefix=f".{name}.")
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as resp:
                shutil.copyfileobj(resp, out)
            got = _sha256(Path(tmp))
            if got != digest:
                raise DatasetError(f"download of {url} is corrupt: sha256 {got} != expected {digest}")
            os.replace(tmp, target)
        except (OSError, ValueError) as exc:
            raise DatasetError(f"could not download {url}: {exc}") from exc
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


def find_fashion_mnist(data_dir: Optional[str | os.PathLike] = None, download: bool = True) -> Path:
    """The directory holding the four verified Fashion-MNIST files (see module docstring)."""
    if data_dir is not None:
        d = Path(data_dir)
        if not _complete(d):
            missing = [n for n in FILES if not (d / n).is_file()]
            raise DatasetError(f"--data-dir {d} lacks Fashion-MNIST files: {missing}")
        _verify(d)
        return d
    env = os.environ.get("INCUBATION_DATA_DIR")
    if env:
        return find_fashion_mnist(env, download=False)
    for d in (cache_dir(), DEBIAN_DIR):
        if _complete(d):
            _verify(d)
            return d
    if not download:
        raise DatasetError("Fashion-MNIST not found: pass --data-dir, set INCUBATION_DATA_DIR, install "
                           f"Debian's dataset-fashion-mnist, or allow the download into {cache_dir()}")
    _download(os.environ.get("INCUBATION_FASHION_MNIST_URL", DEFAULT_URL), cache_dir())
    return cache_dir()


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (optionally gzipped) into a numpy array, validating its header and size."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as exc:
        raise DatasetError(f"{path} is not a readable IDX file: {exc}") from exc
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DatasetError(f"{path} has no IDX magic number")
    dtype, ndim = np.dtype(_IDX_DTYPES[data[2]]), data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetError(f"{path} is truncated inside its header")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(data) != expected:
        raise DatasetError(f"{path} has {len(data)} bytes but its header {shape} needs {expected}")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def load_fashion_mnist_arrays(split: str, data_dir=None, download: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 (N, 1, 28, 28), labels int64 (N,)) of the 'train' or 'test' split."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {tuple(SPLITS)}, got {split!r}")
    d = find_fashion_mnist(data_dir, download)
    images_file, labels_file, n = SPLITS[split]
    images, labels = read_idx(d / images_file), read_idx(d / labels_file)
    if images.shape != (n, 28, 28) or labels.shape != (n,) or labels.max() >= len(CLASSES):
        raise DatasetError(f"{d}: unexpected Fashion-MNIST {split} arrays {images.shape}, {labels.shape}")
    return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))
