"""The "triton" backend of `incubation.ops`: fused Triton kernels with their backward passes,
each a torch custom op (incubation::triton_*) with a fake kernel and register_autograd.

    attention.py   FlashAttention-2 style forward/backward, any sequence length, head dim <= 128
    norm.py        (x + residual) -> LayerNorm in one pass; backward with partial weight sums
    linear.py      GEMM with a bias / exact GELU / layer-scale / residual epilogue; fused dGELU
    common.py      what they share: the interpreter flag, autotune with its sm_90 prune, checks
    tuned.py       autotuning choices kept on disk for configs Triton cannot cache (pre-hooks)
    usage.py       which kernel served each call, and why, for `incubation backends`

`incubation.ops` declares each module's op function and capability check (`check*`) as the
triton backend of its op (this package never imports the dispatcher).
"""
from .common import DTYPES, INTERPRET, dot_precision, unsupported

__all__ = ["DTYPES", "INTERPRET", "dot_precision", "unsupported"]
