"""Small helpers shared across the package."""
import hashlib
import json
import math
import os
import platform
import subprocess
from typing import Optional

from .errors import IncubationError


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cpu_name() -> str:
    """The CPU's model name, as /proc/cpuinfo gives it (else what platform knows)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def user_cache_dir() -> str:
    """Where downloads and measurements (dispatch decisions, tuned kernel configs) are kept:
    $INCUBATION_CACHE_DIR, else $XDG_CACHE_HOME/incubation (default ~/.cache/incubation)."""
    return os.environ.get("INCUBATION_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "incubation")



def _finite_or_none(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_none(v) for v in obj]
    return obj


def json_dumps(obj, **kwargs) -> str:
    """json.dumps for every JSON file the package writes: NaN and +-Infinity become null, because
    json.dumps would write them as the bare literals NaN / Infinity that strict parsers reject."""
    return json.dumps(_finite_or_none(obj), allow_nan=False, **kwargs)


def json_value(text: str, where: str):
    """json.loads of `text` (bare NaN / Infinity accepted, as files from before json_dumps hold
    them); invalid JSON is an IncubationError naming `where` (a file, a line of a file)."""
    try:
        return json.loads(text)
    except ValueError as exc:
        raise IncubationError(f"{where} is not valid JSON: {exc}") from None


def read_json_object(path: str | os.PathLike) -> dict:
    """The JSON object (a dict) in the file `path`: anything else (invalid JSON, a list, a
    number) is an IncubationError naming the file."""
    with open(path, encoding="utf-8", errors="replace") as f:
        value = json_value(f.read(), str(path))
    if not isinstance(value, dict):
        raise IncubationError(f"{path} holds a JSON {_json_kind(value)}, not an object")
    return value


def _json_kind(value) -> str:
    names = {list: "array", str: "string", bool: "boolean", int: "number", float: "number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def memory_bytes() -> Optional[int]:
    """This machine's physical memory in bytes (None where the OS does not tell)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):
        return None


def umask() -> int:
    """The process's umask, read without changing it: os.umask can only read it by setting it,
    which races with other threads creating files meanwhile. Linux reports it in /proc."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # no /proc (not Linux): the racy way
    os.umask(mask)
    return mask


def default_file_mode() -> int:
    """The mode open() gives a new file (0o666 less the umask), for files made by code that
    picks its own (safetensors writes 0o600)."""
    return 0o666 & ~umask()


TMP_SUFFIX = ".tmp"   # a file being written: renamed over its name when complete


def fsync_dir(path: str) -> None:
    """Make a rename or creation of `path` durable: fsync the directory holding it."""
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old or the new content, never a part."""
    tmp = path + TMP_SUFFIX
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path)


def same_file(outputs, inputs) -> Optional[tuple[str, str]]:
    """The first (output, input) of the paths `outputs` and `inputs` that name one existing file
    (through a symlink, a relative path or a hard link), else None: a command must never write
    over what it reads."""
    for output in outputs:
        for given in inputs:
            try:
                if os.path.samefile(output, given):
                    return output, given
            except OSError:   # one of them does not exist: no file to lose
                continue
    return None


def is_inside(path: str, directory: str) -> bool:
    """Whether `path` is in `directory` or below it, symlinks resolved."""
    real, top = os.path.realpath(path), os.path.realpath(directory)
    return os.path.commonpath([real, top]) == top


PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def git(*args: str) -> Optional[str]:
    """Output of a read-only git query about the checkout this package runs from (None when it
    is installed from a wheel, or git is absent)."""
    try:  # --no-optional-locks: never touch the index
        out = subprocess.run(["git", "--no-optional-locks", *args], cwd=PACKAGE_DIR, capture_output=True,
                             text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _version(module: str) -> Optional[str]:
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001 - absent or broken: recorded as missing
        return None


def versions() -> dict:
    """The code a run used: commit (and whether the checkout had changes) and library versions."""
    import torch
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "--short=12", "HEAD"), "dirty": None if status is None else bool(status),
            "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "triton": _version("triton"), "timm": _version("timm"), "incubation": _version("incubation")}
