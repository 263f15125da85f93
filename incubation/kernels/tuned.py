"""Autotuning choices kept on disk, for a kernel whose configs have a pre-hook: Triton keeps
no tuning result of such configs across processes (it cannot serialise the hook). One file
per kernel source, GPU and Triton version, under user_cache_dir(); a config no longer among
the kernel's is ignored, and a missing or unreadable file is no choice at all.
"""
from __future__ import annotations

import hashlib
import json
import os

import triton

from ..utils import atomic_write, user_cache_dir

__all__ = ["TunedConfigs"]


def _record(config: triton.Config) -> dict:
    return {"kwargs": config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}


class TunedConfigs:
    """The choices of `kernel` (a triton.autotune'd kernel over `configs`) on each GPU."""

    def __init__(self, name: str, kernel, configs: list[triton.Config]):
        self.name, self.kernel, self.configs = name, kernel, configs
        self.loaded: set[str] = set()   # the GPUs whose file this process has read

    def path(self, device_name: str) -> str:
        source = getattr(self.kernel.fn, "cache_key", "")   # (the interpreter's function has none)
        what = f"{source}|{device_name}|triton {triton.__version__}"
        return os.path.join(user_cache_dir(), f"{self.name}-{hashlib.sha256(what.encode()).hexdigest()[:16]}.json")

    def load(self, device_name: str) -> int:
        """Put the configs chosen by earlier processes on this GPU into the autotuner's cache
        (so they are not timed again); returns how many."""
        try:
            with open(self.path(device_name), encoding="utf-8") as f:
                records = json.load(f)
            known = {json.dumps(_record(c), sort_keys=True): c for c in self.configs}
            found = [(tuple(key), known.get(json.dumps(record, sort_keys=True))) for key, record in records]
        except (OSError, ValueError, TypeError):
            return 0
        for key, config in found:
            if config is not None:
                self.kernel.cache.setdefault(key, config)
        return sum(config is not None for _, config in found)

    def save(self, device_name: str) -> None:
        """Write this process's choices (best effort: a read-only cache directory only costs the
        next process the timing)."""
        records = [[list(key), _record(config)] for key, config in self.kernel.cache.items()]
        try:
            os.makedirs(user_cache_dir(), exist_ok=True)
            atomic_write(self.path(device_name), json.dumps(records).encode())
        except OSError:
            pass

    def launch(self, device_name: str, launch) -> None:
        """launch(), with this GPU's earlier choices loaded first and new ones saved after."""
        if device_name not in self.loaded:
            self.loaded.add(device_name)
            self.load(device_name)
        known = len(self.kernel.cache)
        launch()
        if len(self.kernel.cache) > known:
            self.save(device_name)
