"""The "triton" backend of `incubation.ops`: fused Triton kernels with their backward passes.

    attention.py   FlashAttention-2 style forward/backward, any sequence length, head dim <= 128
    norm.py        (x + residual) -> LayerNorm in one pass; backward with partial weight sums
    linear.py      GEMM with a bias / exact GELU / layer-scale / residual epilogue; fused dGELU

`BACKENDS` exports the implementations and capability checks; `incubation.dispatch` reads it
(this package never imports the dispatcher).

Testing without a GPU: with TRITON_INTERPRET=1 in the environment *before this module is
imported*, Triton builds interpreted kernels that run on CPU tensors. Whether a kernel is
interpreted is fixed when it is decorated, so `INTERPRET` below records what this import got.
The interpreter gets one autotune config, and since its `tl.dot` on bf16 operands is wrong,
dot operands are cast to fp32 there (the `UPCAST` constexpr of the kernels).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
from triton import knobs

__all__ = ["BACKENDS", "INTERPRET", "DTYPES", "autotune", "dense", "dot_precision", "upcast_dots", "unsupported"]

INTERPRET: bool = bool(knobs.runtime.interpret)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MAX_ELEMENTS = 2 ** 31  # the kernels index with 32-bit offsets inside one (batch, head) or row block


def autotune(gpu: list[triton.Config], interpreter: triton.Config, key: list[str], fp32_tile: int):
    """triton.autotune over the `gpu` configs, or the one `interpreter` config (the interpreter
    cannot benchmark). The key adds the tensors' dtypes itself. fp32 calls in ieee PRECISION
    only try tiles of at most `fp32_tile` outputs: those dots run on the FMA units and spill
    registers with larger tiles."""
    def prune(configs, named_args, **meta):
        if meta.get("PRECISION") == "ieee":
            return [c for c in configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= fp32_tile] or configs
        return configs

    return triton.autotune(configs=[interpreter] if INTERPRET else gpu, key=key,
                           prune_configs_by={"early_config_prune": prune})


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


# the submodules import the helpers above from this partly initialised package
from . import attention, linear, norm  # noqa: E402

BACKENDS = {"triton": {
    "attention": (attention.attention, attention.check),
    "layer_norm": (norm.layer_norm, norm.check_layer_norm),
    "add_layer_norm": (norm.add_layer_norm, norm.check_add_layer_norm),
    "linear": (linear.linear, linear.check),
}}
