import functools
import gzip
import hashlib
import http.server
import json
import os
import struct
import threading
import zlib
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
    monkeypatch.delenv("INCUBATION_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(fm, "DEBIAN_DIR", tmp_path / "no-debian")
    monkeypatch.setattr(fm, "beside_checkout", lambda: None)
    return src, arrays


_REAL_BESIDE_CHECKOUT = fm.beside_checkout   # the fixture below hides it from the other tests


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


def test_cache_dir_honours_incubation_cache_dir(fake_files, http_server, monkeypatch, tmp_path):
    """$INCUBATION_CACHE_DIR moves the data cache with the dispatch decisions (not $XDG_CACHE_HOME)."""
    src, _ = fake_files
    monkeypatch.setenv("INCUBATION_CACHE_DIR", str(tmp_path / "mine"))
    monkeypatch.setenv("INCUBATION_FASHION_MNIST_URL", http_server(src))
    assert fm.find_fashion_mnist() == tmp_path / "mine" / "fashion-mnist"
    assert not (tmp_path / "cache").exists()


def test_files_beside_the_checkout_are_found(fake_files, monkeypatch, tmp_path):
    """A source checkout finds ../shared/data/fashion-mnist beside it, as the Makefile does, so the
    Python API and `incubation run` find what `make demo` found."""
    src, _ = fake_files
    checkout = Path(__file__).resolve().parents[1]        # these tests run from a source checkout
    assert _REAL_BESIDE_CHECKOUT() == checkout.parent / "shared" / "data" / "fashion-mnist"
    monkeypatch.setattr(fm, "beside_checkout", lambda: src)
    monkeypatch.delenv("INCUBATION_DATA_DIR", raising=False)
    assert fm.find_fashion_mnist(download=False) == src


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


# --------------------------------------------------------------------------------------
# Fashion-MNIST: mirror, downloads, errors
# --------------------------------------------------------------------------------------
def test_default_mirror_is_https(fake_files, monkeypatch):
    """Without INCUBATION_FASHION_MNIST_URL the files come over https (served here from disk)."""
    src, _ = fake_files
    monkeypatch.delenv("INCUBATION_FASHION_MNIST_URL", raising=False)
    asked = []

    def fake_urlopen(url, timeout):
        asked.append(url)
        return open(src / url.rsplit("/", 1)[1], "rb")

    monkeypatch.setattr(fm.urllib.request, "urlopen", fake_urlopen)
    assert fm.find_fashion_mnist() == fm.cache_dir()
    assert sorted(asked) == sorted(fm.DEFAULT_URL + name for name in fm.FILES)
    assert all(url.startswith("https://") for url in asked)


def test_official_and_repacked_files_are_both_accepted():
    """Every file has two accepted sha256 sums: the official release and the re-gzipped copy."""
    assert all(len(fm._accepted(name)) == 2 for name in fm.FILES)
    assert fm.DEFAULT_URL.startswith("https://")


@pytest.mark.skipif(not os.environ.get("INCUBATION_DATA_DIR"), reason="real Fashion-MNIST not configured")
def test_official_digests_belong_to_the_published_files():
    """The re-gzipped copy plus the header gzip wrote in 2017 (file name and time) is byte for byte
    the official file: its md5 is the one the dataset's README publishes, and its sha256 is the
    first accepted sum, so a download from the default mirror verifies."""
    published_md5 = {"train-images-idx3-ubyte.gz": ("8d4fb7e6c68d591d4c3dfef9ec88bf0d", 1504176606),
                     "train-labels-idx1-ubyte.gz": ("25c81989df183df01b3e8a0aad5dffbe", 1504176606),
                     "t10k-images-idx3-ubyte.gz": ("bef4ecab320f06d8554ea6380940ec79", 1504176627),
                     "t10k-labels-idx1-ubyte.gz": ("bb300cfdad3c16e7a12a480ee83cd310", 1504176627)}
    for name, (md5, mtime) in published_md5.items():
        repacked = (Path(os.environ["INCUBATION_DATA_DIR"]) / name).read_bytes()
        assert repacked[:4] == b"\x1f\x8b\x08\x00"   # gzip, deflate, no file name
        official = (b"\x1f\x8b\x08\x08" + struct.pack("<I", mtime) + repacked[8:10]
                    + name[:-3].encode() + b"\x00" + repacked[10:])
        assert hashlib.md5(official).hexdigest() == md5
        assert fm._accepted(name) == (hashlib.sha256(official).hexdigest(), hashlib.sha256(repacked).hexdigest())


_CHILD = """
import json, os, pathlib
from incubation.data import fashion_mnist as fm
fm.FILES = json.loads(os.environ["TEST_FILES"])
fm.DEBIAN_DIR = pathlib.Path(os.environ["TEST_DEBIAN"])
fm.beside_checkout = lambda: None
fm.find_fashion_mnist()
"""


def test_killed_download_leaves_no_temporary_file_behind(fake_files, http_server, monkeypatch):
    """SIGKILL a download midway: the next search removes the dead download's temporary file."""
    import signal
    import subprocess
    import sys
    import time
    src, _ = fake_files
    release = threading.Event()

    class Stalling(http.server.BaseHTTPRequestHandler):
        def do_GET(self):   # half of the file, then nothing until the test ends
            blob = (src / self.path.lstrip("/")).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(blob)))
            self.end_headers()
            self.wfile.write(blob[: len(blob) // 2])
            self.wfile.flush()
            release.wait(60)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Stalling)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    cache = fm.cache_dir()
    repo = str(Path(fm.__file__).resolve().parents[2])
    env = dict(os.environ, PYTHONPATH=repo, TEST_FILES=json.dumps(fm.FILES), TEST_DEBIAN=str(fm.DEBIAN_DIR),
               INCUBATION_FASHION_MNIST_URL=f"http://127.0.0.1:{server.server_address[1]}/")
    child = subprocess.Popen([sys.executable, "-c", _CHILD], env=env)
    try:
        deadline = time.monotonic() + 120
        while not list(cache.glob(".*.part")) and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        parts = list(cache.glob(".*.part"))
        assert parts, f"the download never started (child exit code {child.poll()})"
        assert str(child.pid) in parts[0].name   # the temporary file names its writer
        child.send_signal(signal.SIGKILL)
        child.wait()
    finally:
        child.kill()
        release.set()
        server.shutdown()
        server.server_close()
    assert list(cache.glob(".*.part"))   # the kill left it behind
    monkeypatch.setenv("INCUBATION_FASHION_MNIST_URL", http_server(src))
    assert fm.find_fashion_mnist() == cache
    assert sorted(p.name for p in cache.iterdir()) == sorted(fm.FILES)


def test_stale_temporary_files_are_removed_and_live_ones_kept(fake_files, http_server, monkeypatch):
    import subprocess
    import sys
    import time
    src, _ = fake_files
    cache = fm.cache_dir()
    cache.mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = fm._host()
    name = "train-images-idx3-ubyte.gz"
    stale = [cache / f".{name}.{host}.{dead.pid}.ab12.part",          # its writer is dead
             cache / f".{name}.other-host.{os.getpid()}.cd34.part",   # another host, idle for 2 hours
             cache / f".{name}.x8Yz_1q2"]                              # an older version's name, idle
    live = [cache / f".{name}.{host}.{os.getpid()}.ef56.part",        # a download running now
            cache / ".unrelated", cache / "notes.txt"]
    for p in stale + live:
        p.write_bytes(b"partial")
    for p in stale[1:]:
        os.utime(p, (time.time() - 7200,) * 2)
    monkeypatch.setenv("INCUBATION_FASHION_MNIST_URL", http_server(src))
    fm.find_fashion_mnist()
    assert not [p for p in stale if p.exists()]
    assert all(p.exists() for p in live)


def test_not_found_lists_the_places_searched_and_the_ways_to_provide_the_files(fake_files, monkeypatch):
    monkeypatch.setenv("INCUBATION_FASHION_MNIST_URL", "http://127.0.0.1:9/")
    fm.cache_dir().mkdir(parents=True)
    (fm.cache_dir() / "train-images-idx3-ubyte.gz").write_bytes(b"")   # an incomplete cache
    for download in (True, False):
        with pytest.raises(data.DatasetError) as info:
            fm.find_fashion_mnist(download=download)
        msg = str(info.value)
        assert "\n" not in msg   # one line for the CLI
        for needle in (str(fm.cache_dir()), "lacks train-labels-idx1-ubyte.gz", str(fm.DEBIAN_DIR),
                       "does not exist", "--data-dir", "INCUBATION_DATA_DIR", "dataset-fashion-mnist"):
            assert needle in msg, (needle, msg)
        assert ("could not download http://127.0.0.1:9/" in msg) == download


def test_env_data_dir_is_named_and_corrupt_cache_is_downloaded_again(fake_files, http_server, monkeypatch):
    src, _ = fake_files
    monkeypatch.setenv("INCUBATION_DATA_DIR", str(src / "nowhere"))
    with pytest.raises(data.DatasetError, match="INCUBATION_DATA_DIR .*nowhere lacks"):
        fm.find_fashion_mnist()
    monkeypatch.delenv("INCUBATION_DATA_DIR")
    monkeypatch.setenv("INCUBATION_FASHION_MNIST_URL", http_server(src))
    fm.find_fashion_mnist()
    victim = fm.cache_dir() / "t10k-images-idx3-ubyte.gz"
    victim.write_bytes(victim.read_bytes()[:-5])   # e.g. a disk that filled up
    with pytest.raises(data.DatasetError, match="t10k-images-idx3-ubyte.gz is corrupt"):
        fm.find_fashion_mnist(download=False)
    assert fm.find_fashion_mnist() == fm.cache_dir()   # fetched again
    assert victim.read_bytes() == (src / victim.name).read_bytes()


# --------------------------------------------------------------------------------------
# read_idx: every corrupt input is a DatasetError
# --------------------------------------------------------------------------------------
def test_read_idx_corrupt_deflate_stream(tmp_path):
    blob = gzip.compress(_idx_bytes(np.arange(3000).reshape(3, 10, 100) % 7))
    for i in range(10, len(blob) - 8):   # find a flipped byte that breaks the deflate stream itself
        bad = bytearray(blob)
        bad[i] ^= 0xFF
        try:
            gzip.decompress(bytes(bad))
        except zlib.error:
            break
        except Exception:   # noqa: BLE001 - other corruptions are covered below
            continue
    else:
        pytest.fail("no corruption of the deflate stream found")
    with pytest.raises(data.DatasetError, match="x.gz is not a readable IDX file"):
        fm.read_idx(_write(tmp_path / "x.gz", bytes(bad)))


def test_read_idx_header_claiming_more_than_the_file_holds(tmp_path):
    huge = bytes([0, 0, 0x08, 3]) + struct.pack(">3I", 2 ** 32 - 1, 2 ** 32 - 1, 2 ** 32 - 1) + b"\x00" * 10
    for path in (tmp_path / "huge.idx", tmp_path / "huge.gz"):
        path.write_bytes(huge if path.suffix == ".idx" else gzip.compress(huge))
        with pytest.raises(data.DatasetError, match="needs .* bytes, more than the file can hold"):
            fm.read_idx(path)
    with pytest.raises(data.DatasetError, match="not a readable IDX"):
        fm.read_idx(tmp_path / "missing.idx")


def test_read_idx_fuzz(tmp_path):
    """Random corruptions (flips, cuts, insertions, deletions) of a small valid IDX file, plain
    and gzipped: read_idx returns an array or raises DatasetError, never anything else."""
    pytest.importorskip("hypothesis")
    from hypothesis import given, settings
    from hypothesis import strategies as st

    raw = _idx_bytes(np.arange(60).reshape(3, 4, 5))
    edits = st.lists(st.tuples(st.sampled_from(["flip", "cut", "insert", "delete"]), st.integers(0, 2 ** 16),
                               st.integers(1, 255)), min_size=1, max_size=3)

    @settings(max_examples=150, deadline=None, database=None)
    @given(gzipped=st.booleans(), edits=edits)
    def check(gzipped, edits):
        blob = bytearray(gzip.compress(raw) if gzipped else raw)
        for op, pos, value in edits:
            pos %= len(blob) + 1
            if op == "flip" and pos < len(blob):
                blob[pos] ^= value
            elif op == "cut":
                del blob[pos:]
            elif op == "insert":
                blob[pos:pos] = bytes([value]) * (value % 9 + 1)
            else:
                del blob[pos:pos + value % 9 + 1]
        path = _write(tmp_path / ("f.gz" if gzipped else "f.idx"), bytes(blob))
        try:
            out = fm.read_idx(path)
        except data.DatasetError as exc:
            assert str(path) in str(exc)
        else:
            assert isinstance(out, np.ndarray)

    check()


def test_load_rejects_wrong_dims_and_dtype(fake_files, monkeypatch):
    src, arrays = fake_files
    blob = gzip.compress(bytes([0, 0, 0x0C, 1]) + struct.pack(">I", 4) + np.arange(4, dtype=">i4").tobytes())
    (src / "t10k-labels-idx1-ubyte.gz").write_bytes(blob)   # int32 labels
    monkeypatch.setitem(fm.FILES, "t10k-labels-idx1-ubyte.gz", hashlib.sha256(blob).hexdigest())
    with pytest.raises(data.DatasetError, match="unexpected Fashion-MNIST test arrays.*int32"):
        fm.load_fashion_mnist_arrays("test", src)


# --------------------------------------------------------------------------------------
# ImageFolder: symlinks, class sets, bad images
# --------------------------------------------------------------------------------------
def _tree(root: Path, splits=("train", "val"), classes=("cat", "dog"), n=2) -> Path:
    from PIL import Image
    for split in splits:
        for i, cls in enumerate(classes):
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for j in range(n):
                Image.fromarray(np.full((40, 30, 3), 50 * i + j, np.uint8)).save(root / split / cls / f"{j}.png")
    return root


def _labels_follow_folders(ds) -> None:
    for path, target in ds.samples:
        assert Path(path).relative_to(ds.root).parts[0] == ds.classes[target], path


def test_image_folder_symlink_loop_and_links_into_other_classes_are_skipped(tmp_path):
    root = _tree(tmp_path)
    (root / "train" / "cat" / "loop").symlink_to("..")                 # back to the split: every class again
    (root / "train" / "cat" / "dogs").symlink_to("../dog")             # another class's images
    (root / "train" / "dog" / "sub").mkdir()
    (root / "train" / "dog" / "sub" / "again").symlink_to("..")        # a loop inside the class
    with pytest.warns(UserWarning, match="not following 3 symlinked folders.*cat/dogs, cat/loop, dog/sub/again"):
        ds = data.load_dataset(f"folder:{root}", "train", img_size=16)
    assert len(ds) == 4 and sorted(ds.targets) == [0, 0, 1, 1]
    _labels_follow_folders(ds)


def test_image_folder_class_folders_may_be_links_but_not_share_a_folder(tmp_path):
    root = _tree(tmp_path / "data")
    _tree(tmp_path / "elsewhere", splits=("birds",), classes=("all",), n=3)
    (root / "train" / "bird").symlink_to(tmp_path / "elsewhere" / "birds" / "all")   # a subset by links
    _tree(root, splits=("val",), classes=("bird",), n=1)
    _tree(root / "train" / "cat", splits=("more",), classes=("x",), n=1)
    (root / "train" / "cat" / "alias").symlink_to("more")    # a second name for a folder of the class
    with pytest.warns(UserWarning, match="not following 1 symlinked folder .*cat/alias"):
        ds = data.load_dataset(f"folder:{root}", "train", img_size=16)
    assert ds.classes == ["bird", "cat", "dog"]
    assert sorted(ds.targets) == [0, 0, 0, 1, 1, 1, 2, 2]   # cat/more/x/0.png once, not twice
    _labels_follow_folders(ds)
    (root / "train" / "emu").symlink_to(root / "train" / "cat" / "more")   # a class inside another
    _tree(root, splits=("val",), classes=("emu",), n=1)
    with pytest.raises(data.DatasetError, match="class folders emu and cat .* share the folder"):
        data.load_dataset(f"folder:{root}", "train", img_size=16)


def test_image_folder_class_sets_must_agree(tmp_path):
    root = _tree(tmp_path)
    _tree(root, splits=("train",), classes=("emu",), n=1)
    for split in ("train", "val"):
        with pytest.raises(data.DatasetError, match=r"only in train: \['emu'\]; only in val: \[\]"):
            data.load_dataset(f"folder:{root}", split)
    _tree(root, splits=("val",), classes=("emu",), n=1)
    assert data.load_dataset(f"folder:{root}", "val").classes == ["cat", "dog", "emu"]


def test_image_folder_eval_split_may_be_named_validation(tmp_path):
    root = _tree(tmp_path, splits=("train", "validation"))
    ds = data.load_dataset(f"folder:{root}", "test", img_size=16)
    assert ds.root == str(root / "validation") and len(ds) == 4
    _tree(root, splits=("val",))
    with pytest.raises(data.DatasetError, match="both .*val and .*validation"):
        data.load_dataset(f"folder:{root}", "val")


@pytest.mark.parametrize("damage", ["garbage", "truncated", "bomb"])
def test_image_folder_bad_image_names_the_file_or_is_skipped(tmp_path, monkeypatch, damage):
    from PIL import Image
    root = _tree(tmp_path)
    bad = root / "train" / "cat" / "1.png"
    if damage == "garbage":
        bad.write_bytes(b"not an image at all")
    elif damage == "truncated":
        bad.write_bytes(bad.read_bytes()[:60])
    else:
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)   # 40 x 30 images count as bombs
        for p in root.rglob("*.png"):
            if p != bad:
                Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(p)
    ds = data.load_dataset(f"folder:{root}", "train", img_size=16)
    i = [p for p, _ in ds.samples].index(str(bad))
    with pytest.raises(data.DatasetError, match=f"{bad} is not a readable image.*skip_bad_images"):
        ds[i]
    ds = data.load_dataset(f"folder:{root}", "train", img_size=16, skip_bad_images=True)
    with pytest.warns(UserWarning, match="skipped bad image"):
        batches = list(torch.utils.data.DataLoader(ds, batch_size=2))
    assert [len(b[1]) for b in batches] == [2, 2] and list(ds.bad_images) == [str(bad)]
    assert batches[0][0].shape == (2, 3, 16, 16)
