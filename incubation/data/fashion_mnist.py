"""Fashion-MNIST (70k 28x28 grayscale images, 10 classes) from its IDX files.

Where the files are looked for, in order:
  1. `data_dir` (the CLI's --data-dir)
  2. $INCUBATION_DATA_DIR
  3. beside a source checkout: ../shared/data/fashion-mnist next to it, as the Makefile looks
  4. the user cache: $INCUBATION_CACHE_DIR/fashion-mnist, else $XDG_CACHE_HOME/incubation/...
     (default ~/.cache/incubation/...)
  5. /usr/share/datasets/fashion-mnist (Debian package `dataset-fashion-mnist`)
  6. otherwise downloaded into the user cache over https from the dataset's GitHub repository
     (or $INCUBATION_FASHION_MNIST_URL) and verified against the sha256 sums below.
Every file is checked against its sha256 before use; a corrupt or truncated file raises
`DatasetError` naming it and is never used (a bad download is deleted, a bad file in the
user cache is downloaded again). A download is written to a temporary file named after the
host and pid and renamed into place once verified; temporary files of dead downloads are
removed by the next search.
"""
from __future__ import annotations

import gzip
import http.client
import math
import os
import re
import secrets
import shutil
import socket
import struct
import time
import urllib.request
import zlib
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..errors import IncubationError
from ..utils import file_sha256 as _sha256
from ..utils import user_cache_dir

__all__ = ["FILES", "CLASSES", "DatasetError", "find_fashion_mnist", "read_idx", "load_fashion_mnist_arrays"]

# the repository the dataset's README offers besides its plain-http S3 site
DEFAULT_URL = "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/"
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
# name -> sha256 of the accepted .gz files: the official release (md5 as published by the
# dataset's README), and the same deflate stream re-gzipped without the file name and time
# (the copy this project's CI uses). Both hold the same bytes once decompressed.
FILES = {
    "train-images-idx3-ubyte.gz": ("3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
                                   "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7"),
    "train-labels-idx1-ubyte.gz": ("a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
                                   "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056"),
    "t10k-images-idx3-ubyte.gz": ("346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
                                  "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa"),
    "t10k-labels-idx1-ubyte.gz": ("67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
                                  "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05"),
}
SPLITS = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", 60000),
          "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", 10000)}
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
           "Ankle boot")
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
# temporary download files: .<file>.<host>.<pid>.<random>.part
_PART = re.compile(r"^\.(?P<file>.+)\.(?P<host>[A-Za-z0-9_-]+)\.(?P<pid>\d+)\.[A-Za-z0-9_-]+\.part$")
_STALE_S = 3600      # a download that has not written for this long is dead (whatever its host)
_MAX_DEFLATE_RATIO = 1032   # deflate cannot expand more than this: bounds what a .gz can hold


class DatasetError(IncubationError, RuntimeError):
    """A data file is missing, corrupt or malformed."""


class _DownloadFailed(DatasetError):
    """The mirror could not be reached or the file not written (not: it sent wrong bytes)."""


def cache_dir() -> Path:
    return Path(user_cache_dir()) / "fashion-mnist"


def beside_checkout() -> Optional[Path]:
    """../shared/data/fashion-mnist next to the source checkout this package runs from (where
    `make demo` finds it), or None for an installed package."""
    checkout = Path(__file__).resolve().parents[2]
    return checkout.parent / "shared" / "data" / "fashion-mnist" if (checkout / "setup.py").is_file() else None


def _accepted(name: str) -> tuple[str, ...]:
    digests = FILES[name]
    return (digests,) if isinstance(digests, str) else tuple(digests)


def _missing(d: Path) -> list[str]:
    return [name for name in FILES if not (d / name).is_file()]


def _bad_file(path: Path) -> Optional[str]:
    """Why `path` is not one of the accepted files, or None."""
    try:
        got = _sha256(path)
    except OSError as exc:
        return f"{path} cannot be read: {exc}"
    if got not in _accepted(path.name):
        expected = " or ".join(_accepted(path.name))
        return f"{path} is corrupt or truncated: sha256 {got} is not the expected {expected}"
    return None


def _verify(d: Path) -> None:
    for name in FILES:
        reason = _bad_file(d / name)
        if reason:
            raise DatasetError(reason)


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname()) or "host"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):   # no such process (or not a pid at all)
        return False
    except PermissionError:
        pass   # another user's process
    return True


def _remove_stale_parts(dest: Path) -> None:
    """Delete temporary files of downloads that died (killed midway): from a dead pid on this
    host, or not written for an hour (another host, or an older version's name)."""
    try:
        entries = list(os.scandir(dest))
    except OSError:
        return
    now, host = time.time(), _host()
    for entry in entries:
        part = _PART.match(entry.name)
        legacy = not part and any(entry.name.startswith(f".{name}.") for name in FILES)
        if not (part or legacy):
            continue
        try:
            idle = now - entry.stat(follow_symlinks=False).st_mtime
            dead = part is not None and part["host"] == host and not _pid_alive(int(part["pid"]))
            if dead or idle > _STALE_S:
                os.unlink(entry.path)
        except OSError:
            pass   # gone already, or not ours to remove


def _download(base_url: str, dest: Path) -> None:
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _DownloadFailed(f"cannot create the download folder {dest}: {exc}") from exc
    _remove_stale_parts(dest)
    for name in FILES:
        target = dest / name
        if target.is_file() and _bad_file(target) is None:
            continue
        url = base_url.rstrip("/") + "/" + name
        tmp = dest / f".{name}.{_host()}.{os.getpid()}.{secrets.token_hex(4)}.part"
        try:
            with open(tmp, "xb") as out, urllib.request.urlopen(url, timeout=60) as resp:
                shutil.copyfileobj(resp, out)
                out.flush()
                os.fsync(out.fileno())   # never rename a file whose bytes are not on disk
            got = _sha256(tmp)
            if got not in _accepted(name):
                raise DatasetError(f"download of {url} is corrupt: sha256 {got} is not the expected "
                                   f"{' or '.join(_accepted(name))}")
            os.replace(tmp, target)
        except (OSError, ValueError, http.client.HTTPException) as exc:
            raise _DownloadFailed(f"could not download {url}: {exc}") from exc
        finally:
            if tmp.exists():
                tmp.unlink()


def _given_dir(d: Path, label: str) -> Path:
    missing = _missing(d)
    if missing:
        raise DatasetError(f"{label} {d} lacks Fashion-MNIST files: {missing}")
    _verify(d)
    return d


def _how_to_provide() -> str:
    return ("Provide the files (" + ", ".join(FILES) + ") with --data-dir DIR, or INCUBATION_DATA_DIR=DIR, or "
            f"Debian's package dataset-fashion-mnist (installs {DEBIAN_DIR}), or point "
            "INCUBATION_FASHION_MNIST_URL at a mirror")


def find_fashion_mnist(data_dir: Optional[str | os.PathLike] = None, download: bool = True) -> Path:
    """The directory holding the four verified Fashion-MNIST files (see module docstring)."""
    if data_dir is not None:
        return _given_dir(Path(data_dir), "--data-dir")
    env = os.environ.get("INCUBATION_DATA_DIR")
    if env:
        return _given_dir(Path(env), "INCUBATION_DATA_DIR")
    cache, searched = cache_dir(), []
    _remove_stale_parts(cache)
    places = [("the user cache", cache), ("Debian's dataset-fashion-mnist", DEBIAN_DIR)]
    if beside_checkout() is not None:
        places.insert(0, ("beside the checkout", beside_checkout()))
    for label, d in places:
        if not d.is_dir():
            searched.append(f"{label} {d} (does not exist)")
            continue
        missing = _missing(d)
        if missing:
            searched.append(f"{label} {d} (lacks {', '.join(missing)})")
            continue
        bad = [reason for reason in map(_bad_file, (d / n for n in FILES)) if reason]
        if not bad:
            return d
        if d != cache or not download:   # a bad file in the cache is downloaded again below
            raise DatasetError(bad[0])
        searched.append(f"{label} {d} (corrupt: {bad[0]})")
    where = "looked in " + " and ".join(searched)
    if not download:
        raise DatasetError(f"Fashion-MNIST not found: {where}; downloading is off. {_how_to_provide()}, "
                           f"or allow the download into {cache}")
    url = os.environ.get("INCUBATION_FASHION_MNIST_URL", DEFAULT_URL)
    try:
        _download(url, cache)
    except _DownloadFailed as exc:   # (wrong bytes from the mirror are reported as they are)
        raise DatasetError(f"Fashion-MNIST not found: {where}; {exc}. {_how_to_provide()}") from exc
    return cache


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (optionally gzipped) into a numpy array, validating its header and size.

    Any corrupt input (bad gzip header or deflate stream, truncation, wrong magic, a size
    that disagrees with the header) raises DatasetError naming the file."""
    path = Path(path)
    try:
        gzipped = path.suffix == ".gz"
        # the most bytes the file can hold: bounds what the header may claim before we allocate
        capacity = path.stat().st_size * (_MAX_DEFLATE_RATIO if gzipped else 1)
        with (gzip.open if gzipped else open)(path, "rb") as f:
            magic = f.read(4)
            if len(magic) < 4 or magic[0] != 0 or magic[1] != 0 or magic[2] not in _IDX_DTYPES:
                raise DatasetError(f"{path} has no IDX magic number")
            dtype, ndim = np.dtype(_IDX_DTYPES[magic[2]]), magic[3]
            dims = f.read(4 * ndim)
            if len(dims) < 4 * ndim:
                raise DatasetError(f"{path} is truncated inside its header")
            shape = struct.unpack(f">{ndim}I", dims)
            header, size = 4 + 4 * ndim, math.prod(shape) * dtype.itemsize
            if size > capacity:
                raise DatasetError(f"{path}: its header {shape} needs {header + size} bytes, more than the "
                                   "file can hold")
            payload = f.read(size)
            trailing = f.read(1)   # also reaches the end of a gzip stream, which checks its CRC
    except (OSError, EOFError, zlib.error) as exc:
        raise DatasetError(f"{path} is not a readable IDX file: {exc}") from exc
    if len(payload) != size or trailing:
        have = f"{header + len(payload)} bytes" if not trailing else "more bytes"
        raise DatasetError(f"{path} has {have} but its header {shape} needs {header + size}")
    return np.frombuffer(payload, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


def load_fashion_mnist_arrays(split: str, data_dir=None, download: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 (N, 1, 28, 28), labels int64 (N,)) of the 'train' or 'test' split."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {tuple(SPLITS)}, got {split!r}")
    d = find_fashion_mnist(data_dir, download)
    images_file, labels_file, n = SPLITS[split]
    images, labels = read_idx(d / images_file), read_idx(d / labels_file)
    if images.shape != (n, 28, 28) or labels.shape != (n,) or images.dtype != np.uint8 \
            or labels.dtype != np.uint8 or labels.max(initial=0) >= len(CLASSES):
        raise DatasetError(f"{d}: unexpected Fashion-MNIST {split} arrays: images {images.shape} {images.dtype}, "
                           f"labels {labels.shape} {labels.dtype} (expected ({n}, 28, 28) and ({n},) uint8, "
                           f"labels < {len(CLASSES)})")
    return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))
