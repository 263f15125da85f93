"""What the Triton kernels of incubation/kernels share: the interpreter flag, the autotune
wrapper with its sm_90 resource prune, dot precision, capability checks and layout helpers.

Testing without a GPU: with TRITON_INTERPRET=1 in the environment *before this module is
imported*, Triton builds interpreted kernels that run on CPU tensors. Whether a kernel is
interpreted is fixed when it is decorated, so `INTERPRET` below records what this import got.
The interpreter gets one autotune config, and since its `tl.dot` on bf16 operands is wrong,
dot operands are cast to fp32 there (the `UPCAST` constexpr of the kernels).
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Optional

import torch
import triton
from triton import knobs

__all__ = ["INTERPRET", "DTYPES", "SMEM_BYTES", "REGISTERS", "FMA_REGISTERS", "autotune", "bucket",
           "dense", "device_guard", "dot_precision", "fma_dots", "tile_registers", "upcast_dots", "unsupported"]

INTERPRET: bool = bool(knobs.runtime.interpret)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MAX_ELEMENTS = 2 ** 31  # the kernels index with 32-bit offsets inside one (batch, head) or row block


# sm_90 (H100/H200) limits the prune keeps every config within. benchmarks/compile_check.py compiles
# each config for sm_90 without a GPU and CI checks that what the prune keeps fits.
SMEM_BYTES = 232448 - 1024  # shared memory a block may opt in to, less the 1 KiB Triton's kernels take statically
# Registers per thread for tile data: ptxas has 255 a thread, the rest goes to addresses, masks and
# loop state. Dots in ieee fp32 run on the FMA units, where every thread re-reads whole operand rows
# and columns, so their tiles get a smaller share. Both were set from the registers and spills of the
# compiled kernels (triton 3.6.0 and 3.7.1): a tile count cannot predict ptxas exactly, so the numbers
# err on the side of pruning.
REGISTERS = 192
FMA_REGISTERS = 88


def tile_registers(rows: int, cols: int, num_warps: int, element_bytes: int = 4) -> float:
    """32-bit registers per thread that a rows x cols tile takes, spread over the block's threads."""
    return rows * cols * element_bytes / 4 / (32 * num_warps)


def fma_dots(meta: dict, element_bytes: int) -> bool:
    """fp32 dots in ieee precision run on the FMA units, with both operands in registers."""
    return element_bytes == 4 and meta.get("PRECISION") == "ieee"


# Tuning results kept on disk across runs (Triton's cache dir), where this Triton has the option
# (3.6.0 and 3.7.1 both do; Triton itself turns it off under the interpreter).
_CACHE_RESULTS = {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}


def bucket(n: int) -> int:
    """An autotune key for a size that varies with the batch: the next power of two, so that a
    partial last batch or an evaluation batch reuses the tuned config instead of re-tuning."""
    return triton.next_power_of_2(max(1, n))


def device_guard(t: torch.Tensor):
    """Launch on t's GPU, not the current one; nothing for CPU tensors (the interpreter)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _element_bytes(named_args: dict) -> int:
    """The element size of a kernel's first tensor argument (a tensor descriptor's tensor)."""
    return next(t.element_size() for t in (getattr(v, "base", v) for v in named_args.values())
                if isinstance(t, torch.Tensor))


def autotune(gpu: list[triton.Config], interpreter: triton.Config, key: list[str], footprint):
    """triton.autotune over the `gpu` configs, or the one `interpreter` config (the interpreter
    cannot benchmark). The key adds the tensors' dtypes itself; it must name every constexpr that
    changes the kernel, and sizes that vary with the batch only through a `bucket` argument.

    `footprint(config, meta, element_bytes)` -> (shared memory bytes, registers per thread) of one
    config at this call's constexprs (`meta`: BLOCK_D, PRECISION, ...) and element size: it counts
    every tile, BLOCK_D and the fp32 accumulators included, each staged tile num_stages times.
    Configs over SMEM_BYTES or REGISTERS (FMA_REGISTERS for ieee fp32) are pruned before the
    autotuner compiles or times them (too much shared memory fails at launch, too many registers
    spill); if none fits, the smallest one is kept."""
    def prune(configs, named_args, **meta):
        element_bytes = _element_bytes(named_args)
        sizes = {id(c): footprint(c, meta, element_bytes) for c in configs}
        registers = FMA_REGISTERS if fma_dots(meta, element_bytes) else REGISTERS
        fits = [c for c in configs if sizes[id(c)][0] <= SMEM_BYTES and sizes[id(c)][1] <= registers]
        return fits or [min(configs, key=lambda c: (sizes[id(c)][1], sizes[id(c)][0]))]

    return triton.autotune(configs=[interpreter] if INTERPRET else gpu, key=key,
                           prune_configs_by={"early_config_prune": prune}, **_CACHE_RESULTS)


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision for fp32 operands, following torch's matmul setting (ieee unless
    the user allowed TF32 with torch.set_float32_matmul_precision / allow_tf32)."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def upcast_dots(dtype: torch.dtype) -> bool:
    """Cast dot operands to fp32: the interpreter's bf16 tl.dot returns garbage."""
    return INTERPRET and dtype == torch.bfloat16


def unsupported(**tensors: Optional[torch.Tensor]) -> Optional[str]:
    """The reason the kernels cannot take these tensors (device, dtype, size), or None."""
    for name, t in tensors.items():
        if t is None:
            continue
        if t.device.type == "cpu" and not INTERPRET:
            return ("the Triton kernels were built for the GPU: TRITON_INTERPRET=1 was not set when "
                    "incubation.kernels was imported")
        if t.device.type not in ("cpu", "cuda"):
            return f"{name} is on {t.device.type}; Triton serves CUDA tensors"
        if t.dtype not in DTYPES:
            return f"{name} has dtype {t.dtype}; the Triton kernels take float32, float16 and bfloat16"
        if t.numel() >= _MAX_ELEMENTS:
            return f"{name} has {t.numel()} elements; the kernels index with 32-bit offsets (< 2**31)"
        # a view is read through its strides: a slice of a wider tensor reaches past its numel
        reach = sum((n - 1) * s for n, s in zip(t.shape, t.stride())) if t.numel() else 0
        if reach >= _MAX_ELEMENTS:
            return (f"{name} reaches {reach} elements past its start through its strides {t.stride()}; "
                    "the kernels index with 32-bit offsets (< 2**31)")
    return None


def dense(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A 1-D parameter (weight, bias, layer scale) as the kernels read it, with unit stride: a
    sliced (w[::2]) or expanded (stride 0) one is copied. .contiguous() is differentiable, so
    the gradient reaches the original (summed over an expanded one, as eager's), and it is
    free for a contiguous one."""
    return None if t is None else t.contiguous()
