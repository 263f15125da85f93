"""Shared helpers of the benchmarks: ViT shapes, timing, the device's measured ceilings, the
run's environment, and the report (table on stdout, JSON, a markdown section, a PNG plot).

Timing: `triton.testing.do_bench` on CUDA (median, L2 flushed between repeats) and
`torch.utils.benchmark` on CPU (median of blocks, all of torch's threads), after warm-up.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import gc
import json
import math
import os
import threading
import time
from typing import Callable, Optional, Sequence

import torch

from incubation.train.distributed import auto_device
from incubation.utils import cpu_name, versions

# why the benchmarks never time the Triton backend on CPU tensors
TRITON_ON_CPU = "Triton runs on CPU tensors only under its interpreter, which is for testing, not timing"

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# The ViT family at 224 px: width, heads (head dim = width / heads: 64, except 80 for H),
# depth and patch (H/14 gives N = 257 tokens, the others N = 197).
MODELS = {
    "Ti": dict(width=192, heads=3, depth=12, patch=16),
    "S": dict(width=384, heads=6, depth=12, patch=16),
    "B": dict(width=768, heads=12, depth=12, patch=16),
    "L": dict(width=1024, heads=16, depth=24, patch=16),
    "H": dict(width=1280, heads=16, depth=32, patch=14),
    # `make demo`'s target (the tiny preset): 28 px Fashion-MNIST, 1 channel, 10 classes
    "demo": dict(width=64, heads=4, depth=8, patch=7, img=28, chans=1, classes=10),
}


def parse_list(text: str, choices: Optional[Sequence[str]] = None, what: str = "value") -> list[str]:
    """'a,b' -> ['a', 'b'], each checked against `choices` (a clear error otherwise)."""
    items = list(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))  # unique, in order
    if not items:
        raise ValueError(f"empty {what} list {text!r}")
    if choices is not None:
        check_choices(what, items, choices)
    return items


def parse_ints(text: str, what: str) -> list[int]:
    try:
        values = [int(t) for t in parse_list(text, what=what)]
    except ValueError as exc:
        raise ValueError(f"{what} must be comma-separated positive integers, got {text!r}") from exc
    if any(v < 1 for v in values):
        raise ValueError(f"{what} must be positive, got {text!r}")
    return values


def resolve_device(name: Optional[str]) -> torch.device:
    """'cuda' / 'cpu' / None (cuda when available)."""
    device = torch.device(auto_device(name))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but torch sees no CUDA device")
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"--device must be cuda or cpu, got {name!r}")
    return device


def set_threads(threads: Optional[int]) -> None:
    """torch's CPU threads (None keeps torch's choice); fewer threads than busy cores give
    steadier numbers on a shared machine."""
    if threads is None:
        return
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------
def median_ms(fn: Callable[[], object], device: torch.device, *, quick: bool = False,
              grad_to_none: Sequence[torch.Tensor] = (), rep_ms: Optional[float] = None, warm: int = 2) -> float:
    """Median milliseconds of one `fn()` after warm-up; `grad_to_none` tensors get .grad = None
    before every call (outside the timed region on CUDA) so gradients never accumulate.
    rep_ms: how long to measure; warm: untimed calls first on CPU (do_bench warms up itself)."""
    if device.type == "cuda":
        import triton.testing

        rep = rep_ms if rep_ms is not None else (40 if quick else 100)
        return float(triton.testing.do_bench(fn, warmup=10 if quick else 25, rep=rep,
                                             grad_to_none=list(grad_to_none) or None,
                                             return_mode="median"))
    from torch.utils import benchmark

    def call():
        for t in grad_to_none:
            t.grad = None
        fn()

    for _ in range(warm):  # lazy initialisation, first-touch allocation
        call()
    timer = benchmark.Timer(stmt="call()", globals={"call": call}, num_threads=torch.get_num_threads())
    min_run_time = (rep_ms / 1e3) if rep_ms is not None else (0.1 if quick else 0.5)
    return timer.blocked_autorange(min_run_time=min_run_time).median * 1e3


def measure_ceilings(device: torch.device, dtypes: Sequence[str], quick: bool = False) -> dict:
    """The device's measured ceilings: a device-to-device copy (GB/s, read + write counted) and
    a large square matmul per dtype (TFLOP/s)."""
    gpu = device.type == "cuda"
    nbytes = (1 << 30 if gpu else 128 << 20) // (4 if quick else 1)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    copy_ms = median_ms(functools.partial(dst.copy_, src), device, quick=quick)
    del src, dst
    n = (8192 if gpu else 1024) // (2 if quick else 1)
    matmul = {}
    for name in dtypes:
        a = torch.randn(n, n, device=device, dtype=DTYPES[name])
        b = torch.randn(n, n, device=device, dtype=DTYPES[name])
        matmul[name] = 2 * n ** 3 / (median_ms(lambda: a @ b, device, quick=quick) * 1e-3) / 1e12
    return {"copy_gbps": 2 * nbytes / (copy_ms * 1e-3) / 1e9, "copy_bytes": nbytes,
            "matmul_tflops": matmul, "matmul_size": n}


def describe_error(exc: BaseException) -> str:
    """One line for a provider that did not run: the exception type and its message."""
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"


def free_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


class PeakRSS:
    """CPU peak memory: the largest growth of this process's resident set while inside the
    block, sampled every 2 ms from /proc. Freed memory is handed back to the OS first (glibc
    malloc_trim) so that memory kept from earlier work does not hide the growth; indicative."""

    def __init__(self):
        self.peak_bytes: Optional[int] = None

    @staticmethod
    def _rss() -> Optional[int]:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            return None

    def _sample(self):
        while not self._stop.is_set():
            rss = self._rss()
            if rss is not None:
                self._max = max(self._max, rss)
            time.sleep(0.002)

    @staticmethod
    def _trim() -> None:
        try:
            import ctypes
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass  # not glibc: the growth may be under-counted

    def __enter__(self):
        gc.collect()
        self._trim()
        self._base = self._rss()
        self._max = self._base or 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        if self._base is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._base is not None:
            self._thread.join()
            self.peak_bytes = max(0, self._max - self._base)


# --------------------------------------------------------------------------------------
# environment
# --------------------------------------------------------------------------------------
def environment(device: torch.device) -> dict:
    """Machine, date, commit and versions of the run (recorded in the JSON and RESULTS.md)."""
    from incubation import ops

    code = versions()
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": code["commit"],
        "dirty": code["dirty"],
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_avg": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        **{k: code[k] for k in ("python", "torch", "cuda", "triton", "timm", "incubation")},
        "allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "backends": {op: entry["backend"] for op, entry in ops.backends(device).items()},
    }
    return env


def describe_environment(env: dict) -> str:
    kind = "GPU" if env["device"] == "cuda" else "CPU"
    commit = f"{env['commit']}{' (+ uncommitted changes)' if env['dirty'] else ''}"
    return (f"{kind}: {env['device_name']} ({env['cpu_count']} CPU cores, {env['torch_threads']} torch threads, "
            f"load average {fmt(env['load_avg'], '.1f')} at start); {env['date']}; commit {commit}; "
            f"python {env['python']}, "
            f"torch {env['torch']} (CUDA {env['cuda']}), triton {env['triton']}, timm {env['timm']}; "
            f"auto backends: {', '.join(f'{k}={v}' for k, v in env['backends'].items())}")


# --------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------
def fmt(value, spec: str = ".3g") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec) if isinstance(value, (int, float)) else str(value)


def table(rows: list[dict], columns: Sequence[tuple[str, str, str]], markdown: bool = False) -> str:
    """rows as a text (or markdown) table; columns are (key, header, format spec)."""
    cells = [[h for _, h, _ in columns]] + [[fmt(r.get(k), spec) for k, _, spec in columns] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(cells[0]) + " |", "|" + "---|" * len(columns)]
        return "\n".join(lines + ["| " + " | ".join(c) + " |" for c in cells[1:]])
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    return "\n".join("  ".join(c[i].ljust(widths[i]) for i in range(len(columns))).rstrip() for c in cells)


def target(name: str, value: Optional[float], threshold: float, unit: str, detail: str) -> dict:
    """One target of the issue, measured: met / missed / not measured (with the reason)."""
    status = "not measured" if value is None else ("met" if value >= threshold else "missed")
    return {"name": name, "status": status, "value": value, "threshold": threshold, "unit": unit,
            "detail": detail}


def _measured(t: dict) -> str:
    return "-" if t["value"] is None else f"{t['value']:.3f}{t['unit']}"


def targets_markdown(targets: list[dict]) -> str:
    rows = [dict(t, measured=_measured(t), wanted=f">= {t['threshold']:g}{t['unit']}") for t in targets]
    return table(rows, [("name", "target", ""), ("wanted", "wanted", ""), ("measured", "measured", ""),
                        ("status", "status", ""), ("detail", "detail", "")], markdown=True)


def targets_text(targets: list[dict]) -> str:
    return "targets:\n" + "\n".join(f"  {t['status']:<12} {t['name']}: {_measured(t)} (wanted >= "
                                     f"{t['threshold']:g}{t['unit']}) {t['detail']}" for t in targets)


def pyplot():
    """matplotlib.pyplot with the Agg backend, or None (and a note) when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        print(f"note: no plot ({exc})")
        return None
    return plt


def check_choices(what: str, values: Sequence[str], choices) -> None:
    """A clear error for a value of `what` (model, dtype, ...) that is not among `choices`."""
    bad = [v for v in values if v not in choices]
    if bad:
        raise ValueError(f"unknown {what} {bad}; choose from {list(choices)}")


def write_outputs(out_dir: str, name: str, payload: dict, markdown: str, append_results: Optional[str] = None,
                  plot: Optional[Callable[[str], Optional[str]]] = None, log: Callable = print) -> dict:
    """Write <name>.json, <name>.md and, with `plot(path)`, <name>.png into out_dir (and append
    the markdown to a RESULTS file); payload["outputs"] names them."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, f"{name}.json"), "markdown": os.path.join(out_dir, f"{name}.md")}
    with open(paths["json"], "w") as f:
        json.dump(payload, f, indent=1, default=str)
    with open(paths["markdown"], "w") as f:
        f.write(markdown + "\n")
    if append_results:
        with open(append_results, "a") as f:
            f.write("\n" + markdown + "\n")
        paths["results"] = append_results
    png = plot and plot(os.path.join(out_dir, f"{name}.png"))
    if png:
        paths["plot"] = png
    payload["outputs"] = paths
    log("wrote " + ", ".join(paths.values()))
    return payload


def benchmark_parser(prog: str, doc: str, quick: str, default_out: str) -> argparse.ArgumentParser:
    """The options every benchmark takes: device, --quick (`quick` says what it runs), outputs, threads."""
    p = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda if available")
    p.add_argument("--quick", action="store_true", help=quick)
    p.add_argument("--out", help=f"output folder (default {default_out})")
    p.add_argument("--append-results", metavar="MD", help="also append the markdown section to this file")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-plot", action="store_true")
    return p
