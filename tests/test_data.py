import functools
import gzip
import hashlib
import http.server
import os
import struct
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from incubation import data
from incubation.data import fashion_mnist as fm


def _idx_bytes(arr: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.astype(np.uint8).tobytes()


@pytest.fixture
def fake_files(tmp_path, monkeypatch):
    """A tiny synthetic Fashion-MNIST (12 train / 4 test images) with its own sha256 table."""
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte.gz": rng.integers(0, 256, (12, 28, 28)),
        "train-labels-idx1-ubyte.gz": rng.integers(0, 10, (12,)),
        "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (4, 28, 28)),
        "t10k-labels-idx1-ubyte.gz": rng.integers(0, 10, (4,)),
    }
    src = tmp_path / "served"
    src.mkdir()
    sums = {}
    for name, arr in arrays.items():
        blob = gzip.compress(_idx_bytes(arr))
        (src / name).write_bytes(blob)
        sums[name] = hashlib.sha256(blob).hexdigest()
    monkeypatch.setattr(fm, "FILES", sums)
    monkeypatch.setattr(fm, "SPLITS", {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", 12),
                                       "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", 4)})
    monkeypatch.delenv("INCUBATION_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(fm, "DEBIAN_DIR", tmp_path / "no-debian")
    return src, arrays


@pytest.fixture
def http_server():
    """Serve a directory on 127.0.0.1 (loopback only) for the download path."""
    servers = []

    def start(directory: Path) -> str:
        handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(directory))
        handler.log_message = lambda *a, **k: None
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/"

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


def test_download_verifies_and_caches(fake_files, http_server, monkeypatch):
    src, arrays = fake_files
    monkeypatch.setenv("INCUBATION_FASHION_MNIST_URL", http_server(src))
    found = fm.find_fashion_mnist()
    assert found == fm.cache_dir()
    images, labels = fm.load_fashion_mnist_arrays("train")
    assert images.shape == (12, 1, 28, 28) and images.dtype == torch.uint8
    assert torch.equal(images[:, 0], torch.from_numpy(arrays["train-images-idx3-ubyte.gz"].astype(np.uint8)))
    assert torch.equal(labels, torch.from_numpy(arrays["train-labels-idx1-ubyte.gz"]).long())
    # second call: served from the cache, the server is not needed any more
    monkeypatch.setenv("INCUBATION_FASHION_MNIST_URL", "http://127.0.0.1:9/")
    assert fm.find_fashion_mnist() == fm.cache_dir()


def test_corrupt_download_is_rejected_and_removed(fake_files, http_server, monkeypatch):
    src, _ = fake_files
    victim = src / "t10k-labels-idx1-ubyte.gz"
    victim.write_bytes(victim.read_bytes()[:-3])  # truncated on the server
    monkeypatch.setenv("INCUBATION_FASHION_MNIST_URL", http_server(src))
    with pytest.raises(data.DatasetError, match="t10k-labels-idx1-ubyte.gz.*sha256"):
        fm.find_fashion_mnist()
    assert not (fm.cache_dir() / "t10k-labels-idx1-ubyte.gz").exists()
    assert not [p for p in fm.cache_dir().iterdir() if p.name.startswith(".")]  # no temp files left


def test_unreachable_mirror_raises(fake_files, monkeypatch):
    monkeypatch.setenv("INCUBATION_FASHION_MNIST_URL", "http://127.0.0.1:9/")
    with pytest.raises(data.DatasetError, match="could not download"):
        fm.find_fashion_mnist()
    with pytest.raises(data.DatasetError, match="not found"):
        fm.find_fashion_mnist(download=False)


def test_corrupt_local_file_names_it(fake_files):
    src, _ = fake_files
    bad = src / "train-images-idx3-ubyte.gz"
    bad.write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(data.DatasetError, match="train-images-idx3-ubyte.gz is corrupt"):
        fm.find_fashion_mnist(src)
    (src / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(data.DatasetError, match="lacks Fashion-MNIST files.*t10k-images"):
        fm.find_fashion_mnist(src)


@pytest.mark.parametrize("mutate, message", [
    (lambda b: b[:-1], "needs"),                        # truncated payload
    (lambda b: b[:6], "truncated inside its header"),
    (lambda b: b"\x01" + b[1:], "no IDX magic"),
    (lambda b: b + b"\x00", "needs"),                   # trailing bytes
])
def test_read_idx_rejects_malformed(tmp_path, mutate, message):
    raw = _idx_bytes(np.arange(24).reshape(2, 3, 4))
    assert fm.read_idx(_write(tmp_path / "ok.idx", raw)).tolist() == np.arange(24).reshape(2, 3, 4).tolist()
    with pytest.raises(data.DatasetError, match=message):
        fm.read_idx(_write(tmp_path / "bad.idx", mutate(raw)))


def test_read_idx_rejects_broken_gzip(tmp_path):
    blob = gzip.compress(_idx_bytes(np.zeros((2, 2))))
    with pytest.raises(data.DatasetError, match="not a readable IDX"):
        fm.read_idx(_write(tmp_path / "x.gz", blob[: len(blob) // 2]))


def _write(path: Path, blob: bytes) -> Path:
    path.write_bytes(blob)
    return path


def test_dataset_items_are_normalised(fake_files):
    src, arrays = fake_files
    ds = data.load_dataset("fashion-mnist", "test", data_dir=src)
    assert (len(ds), ds.num_classes, ds.in_chans, ds.img_size) == (4, 10, 1, 28)
    x, y = ds[2]
    raw = torch.from_numpy(arrays["t10k-images-idx3-ubyte.gz"][2].astype(np.float32)) / 255
    torch.testing.assert_close(x[0], (raw - data.FASHION_MNIST_MEAN) / data.FASHION_MNIST_STD)
    assert y == int(arrays["t10k-labels-idx1-ubyte.gz"][2])
    assert data.load_dataset("fashion-mnist", "test", data_dir=src, img_size=32)[0][0].shape == (1, 32, 32)


def test_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        data.load_dataset("fashion-mnist", "dev")
    with pytest.raises(ValueError, match="unknown data set"):
        data.load_dataset("cifar", "train")


def test_image_folder(tmp_path):
    from PIL import Image
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(np.full((40, 30, 3), 60 * i, np.uint8)).save(tmp_path / split / cls / f"{i}.png")
    ds = data.load_dataset(f"folder:{tmp_path}", "val", img_size=32)
    assert (len(ds), ds.num_classes, ds.in_chans) == (4, 2, 3)
    x, y = ds[3]
    assert x.shape == (3, 32, 32) and y == 1
    with pytest.raises(data.DatasetError, match="does not exist"):
        data.load_dataset(f"folder:{tmp_path / 'nope'}", "train")


@pytest.mark.skipif(not os.environ.get("INCUBATION_DATA_DIR"), reason="real Fashion-MNIST not configured "
                    "(make test points INCUBATION_DATA_DIR at ../shared/data/fashion-mnist)")
def test_real_fashion_mnist():
    train, test = data.load_dataset("fashion-mnist", "train"), data.load_dataset("fashion-mnist", "test")
    assert (len(train), len(test)) == (60000, 10000)
    assert torch.bincount(train.labels).tolist() == [6000] * 10
    assert torch.bincount(test.labels).tolist() == [1000] * 10
    x = torch.stack([train[i][0] for i in range(2000)])
    assert abs(x.mean().item()) < 0.1 and abs(x.std().item() - 1) < 0.1  # normalisation constants fit
