"""Checkpoints: safetensors weights + JSON metadata (+ an optional torch side file), written
atomically as one set.

A checkpoint `<prefix>` is
    <prefix>.safetensors   the tensors; tensors shared by several keys (tied weights) stored once
    <prefix>.json          {"metadata": ..., "sha256": <of .safetensors>, "files": {suffix: sha256},
                            "aliases": {key: key it shares storage with}}
    <prefix>.state.pt      optional side file (optimizer, RNG, step, EMA), torch.save format

Commit protocol (a crash at any instant leaves the old or the new set, never a mix): every file
is written to `<file>.tmp` and fsynced; then `<prefix>.json.pending`, which names the files and
their hashes, appears atomically (this is the commit point); then the temporaries are renamed
into place and the pending record becomes `<prefix>.json`. `recover_checkpoint` finishes a
commit whose pending record exists and drops the temporaries of one that never reached it.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
from typing import Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import IncubationError
from ..utils import TMP_SUFFIX as TMP
from ..utils import atomic_write, default_file_mode, json_dumps
from ..utils import file_sha256 as _sha256
from ..utils import fsync_dir as _fsync_dir

__all__ = ["save_checkpoint", "load_checkpoint", "load_checkpoint_state", "recover_checkpoint",
           "CheckpointError", "first_nonfinite", "refuse_non_float", "torch_load"]

FORMAT = "incubation-checkpoint/1"
WEIGHTS, META, STATE = ".safetensors", ".json", ".state.pt"
PENDING = ".json.pending"


class CheckpointError(IncubationError, RuntimeError):
    """A checkpoint file is missing, corrupt, or does not match what was expected."""


def _prefix(path: str) -> str:
    path = os.fspath(path)
    for suffix in (WEIGHTS, META, STATE):
        if path.endswith(suffix):
            return path[: -len(suffix)]
    return path


def _fsync_file(path: str) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def first_nonfinite(tensors: dict) -> Optional[str]:
    """The first key (sorted) whose tensor holds a NaN or an infinity, else None; one device
    sync when the tensors share a device."""
    keys = [k for k in sorted(tensors) if (tensors[k].is_floating_point() or tensors[k].is_complex())
            and tensors[k].numel()]
    flags = [torch.isfinite(tensors[k]).all() for k in keys]
    if not flags:
        return None
    if len({f.device for f in flags}) == 1:
        flags = torch.stack(flags)
        if bool(flags.all()):
            return None
        return keys[int((~flags).nonzero()[0, 0])]
    return next((k for k, f in zip(keys, flags) if not bool(f)), None)


# the integer tensors a checkpoint may hold: buffers our models register as integers (Apollo's
# map of sampled block slots); every other tensor is a weight and must be floating point
INTEGER_BUFFERS = frozenset({"unique_slots"})


def refuse_non_float(tensors: dict, path: str) -> None:
    """CheckpointError naming `path`, the first key (sorted) and its dtype when a tensor is not
    floating point (int64 or bool weights would be cast into the model without a word)."""
    for key in sorted(tensors):
        t = tensors[key]
        integer_buffer = key.rsplit(".", 1)[-1] in INTEGER_BUFFERS and not (t.is_complex() or t.dtype == torch.bool)
        if not (t.is_floating_point() or integer_buffer):
            raise CheckpointError(f"{path}: tensor {key!r} is {str(t.dtype).replace('torch.', '')}, not floating "
                                  f"point: weights must be float32, bfloat16, float16 or float64; refusing to load it")


def _unique_tensors(state_dict: dict) -> tuple[dict, dict]:
    """(tensors to store, {alias key: stored key}). Keys naming the very same tensor view are
    stored once; a partial overlap of one storage (rare) is stored as a copy."""
    tensors, aliases, seen, storages = {}, {}, {}, set()
    for key, t in state_dict.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"state_dict[{key!r}] is a {type(t).__name__}, not a tensor")
        t = t.detach()
        if t.numel() == 0:
            tensors[key] = t.cpu().clone()
            continue
        ptr = t.untyped_storage().data_ptr()
        view = (ptr, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, t.device)
        if view in seen:
            aliases[key] = seen[view]
            continue
        seen[view] = key
        t = t.cpu()
        tensors[key] = t.clone() if ptr in storages or not t.is_contiguous() else t
        storages.add(ptr)
    return tensors, aliases


def _tmp_files(prefix: str) -> list[str]:
    return [prefix + s + TMP for s in (WEIGHTS, STATE, META)] + [prefix + PENDING + TMP]


def _finish_commit(prefix: str) -> None:
    with open(prefix + PENDING) as f:
        record = json.load(f)
    for suffix in record["files"]:
        if os.path.exists(prefix + suffix + TMP):
            os.replace(prefix + suffix + TMP, prefix + suffix)
    _fsync_dir(prefix)
    os.replace(prefix + PENDING, prefix + META)
    _fsync_dir(prefix)


def recover_checkpoint(path_prefix: str) -> None:
    """Finish or discard a write of checkpoint `path_prefix` that a crash interrupted.
    Call it from one process only (it renames files)."""
    prefix = _prefix(path_prefix)
    if os.path.exists(prefix + PENDING):
        try:
            _finish_commit(prefix)
        except (OSError, ValueError, KeyError):  # unreadable record: the commit never happened
            os.remove(prefix + PENDING)
    for tmp in _tmp_files(prefix):
        if os.path.exists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def _disk_full_named(path: str, needed: Optional[int]):
    """Turn a write that failed for lack of space into OSError(ENOSPC) naming the file (torch.save
    reports it as "[enforce fail at inline_container.cc] unexpected pos", safetensors as its own
    error); the bytes needed go along when known."""
    try:
        yield
    except (OSError, RuntimeError, SafetensorError) as exc:
        if isinstance(exc, OSError) and exc.errno != errno.ENOSPC:
            raise
        free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
        if not (isinstance(exc, OSError) or free < max(needed or 0, 1 << 20)):
            raise   # not a full disk: a bug or another fault, keep it as it is
        error = OSError(errno.ENOSPC, "No space left on device", path)
        error.bytes_needed = needed
        raise error from exc


def save_checkpoint(path_prefix: str, state_dict: dict, metadata: Optional[dict] = None, *,
                    state: Optional[dict] = None) -> str:
    """Write `<prefix>.safetensors` and `<prefix>.json` (and `<prefix>.state.pt` from `state`)
    atomically as one set; returns the .safetensors path. `metadata` must be JSON-able (non-finite
    floats are written as null); tensors holding NaN or infinity are refused (CheckpointError).
    Every file gets the mode open() gives under the umask."""
    prefix = _prefix(path_prefix)
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    try:
        json_dumps(metadata)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"checkpoint metadata for {prefix} must be JSON-serialisable: {exc}") from exc
    tensors, aliases = _unique_tensors(state_dict)
    bad = first_nonfinite(tensors)
    if bad is not None:  # load_checkpoint would refuse it: never write it
        raise CheckpointError(f"refusing to write checkpoint {prefix + WEIGHTS}: tensor {bad!r} holds NaN or "
                              f"infinite values")
    recover_checkpoint(prefix)
    weight_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    with _disk_full_named(prefix + WEIGHTS + TMP, weight_bytes):
        save_file(tensors, prefix + WEIGHTS + TMP)
    os.chmod(prefix + WEIGHTS + TMP, default_file_mode())  # safetensors makes it 0600, ignoring the umask
    _fsync_file(prefix + WEIGHTS + TMP)
    files = {WEIGHTS: _sha256(prefix + WEIGHTS + TMP)}
    if state is not None:
        with _disk_full_named(prefix + STATE + TMP, None), open(prefix + STATE + TMP, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        files[STATE] = _sha256(prefix + STATE + TMP)
    record = {"format": FORMAT, "metadata": metadata or {}, "sha256": files[WEIGHTS], "files": files,
              "aliases": aliases}
    atomic_write(prefix + PENDING, json_dumps(record, indent=1, sort_keys=True).encode())  # commit point
    _finish_commit(prefix)
    return prefix + WEIGHTS


def _read_record(prefix: str) -> dict:
    path = prefix + META
    if not os.path.exists(path):
        hint = " (an interrupted write is pending: see recover_checkpoint)" if os.path.exists(prefix + PENDING) else ""
        raise CheckpointError(f"checkpoint metadata {path} does not exist{hint}")
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint metadata {path} is unreadable: {exc}") from exc
    if not isinstance(record, dict) or record.get("format") != FORMAT or not isinstance(record.get("files"), dict) \
            or WEIGHTS not in record["files"]:
        raise CheckpointError(f"{path} is not an incubation checkpoint record (format {FORMAT})")
    for field, kind in (("metadata", dict), ("aliases", dict)):   # an edited record: say so, by name
        if not isinstance(record.setdefault(field, {}), kind):
            raise CheckpointError(f"{path}: {field!r} must be a JSON object, got {type(record[field]).__name__}")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in record["aliases"].items()):
        raise CheckpointError(f"{path}: 'aliases' must map tensor names to tensor names")
    return record


def _verified(prefix: str, suffix: str, record: dict) -> str:
    path = prefix + suffix
    expected = record["files"].get(suffix)
    if expected is None:
        raise CheckpointError(f"checkpoint {prefix + META} lists no {suffix} file")
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint file {path} does not exist")
    if _sha256(path) != expected:
        raise CheckpointError(f"checkpoint file {path} is corrupt: its sha256 does not match {prefix + META}")
    return path


def load_checkpoint(path_prefix: str, expect: Optional[dict] = None) -> tuple[dict, dict]:
    """(state_dict on CPU, metadata) of checkpoint `path_prefix` (prefix, .safetensors or .json).
    Verifies the sha256, that every tensor is finite (CheckpointError naming the file and the
    first bad key otherwise) and that metadata[k] == v for every item of `expect`."""
    prefix = _prefix(path_prefix)
    record = _read_record(prefix)
    metadata = record["metadata"]
    for key, value in (expect or {}).items():
        if key not in metadata:
            raise CheckpointError(f"checkpoint {prefix + META} has no metadata {key!r} (expected {value!r})")
        if metadata[key] != value:
            raise CheckpointError(f"checkpoint {prefix + META} has {key}={metadata[key]!r}, expected {value!r}")
    path = _verified(prefix, WEIGHTS, record)
    try:
        state_dict = load_file(path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint file {path} is unreadable: {exc}") from exc
    refuse_non_float(state_dict, path)  # every stage load, assembly, expansion and resume comes here
    bad = first_nonfinite(state_dict)
    if bad is not None:
        raise CheckpointError(f"checkpoint file {path} holds NaN or infinite values (first: {bad!r}): refusing "
                              f"to load it")
    for alias, key in record["aliases"].items():
        if key not in state_dict:
            raise CheckpointError(f"checkpoint {prefix + META}: alias {alias!r} names missing key {key!r}")
        state_dict[alias] = state_dict[key]
    return state_dict, metadata


def torch_load(path: str, unreadable: str, remedy: str = "", **kwargs):
    """torch.load(path, weights_only=True) onto the CPU. A failure is a one-line CheckpointError
    naming the file: `{path} {unreadable}: {torch's reason}`, or that it holds a pickled class
    (then `remedy` follows), never torch's advice to load with weights_only=False (which runs
    any code the file holds)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, **kwargs)
    except Exception as exc:  # noqa: BLE001 - any failure to unpickle means an unusable file
        text = str(exc)
        found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        if found:   # a pickled class or function: never unpickled here
            raise CheckpointError(f"{path} holds a {found.group(1)}, which is not loaded: torch files are read "
                                  f"with torch.load(weights_only=True) only (tensors and plain containers){remedy}") from None
        if "WeightsUnpickler error:" in text:   # torch's reason, without its advice
            text = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation", 1)[0]
        text = " ".join(text.split())
        raise CheckpointError(f"{path} {unreadable}: {type(exc).__name__}{': ' + text if text else ''}") from None


def load_checkpoint_state(path_prefix: str) -> dict:
    """The side file `<prefix>.state.pt`, verified against `<prefix>.json`."""
    prefix = _prefix(path_prefix)
    path = _verified(prefix, STATE, _read_record(prefix))
    return torch_load(path, "is not a readable checkpoint state file")
