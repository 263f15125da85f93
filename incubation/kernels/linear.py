"""out = residual + layer_scale * act(x @ weight^T + bias): one GEMM with a fused epilogue.

Forward: a tiled GEMM (fp32 accumulation, grouped tile order for L2 reuse) whose epilogue adds
the bias, applies exact erf GELU, multiplies by the layer scale and adds the residual, all in
fp32, then rounds once to the output dtype. The pre-activation is stored (x's dtype) only when
the backward needs it: for GELU's derivative, or for the layer scale's gradient. Two kernels:
  _forward_tma_kernel  (linear_fwd_tma) sm_90: persistent (one program per SM walks the tiles),
                       every tile through TMA tensor descriptors, wgmma, the epilogue on column
                       slices; for inputs TMA can address (16-byte aligned starts and row strides)
  _forward_kernel      (linear_fwd) one program per tile, pointers through any strides: other
                       GPUs, other inputs, fp32 in ieee precision, and the interpreter by default
forward_kernel() names the kernel a call gets and why (FORWARD_KERNEL forces one; usage.last
records the latest call's); the dispatcher measures the Triton backend against eager either way.

Backward: one elementwise kernel turns the output gradient into the pre-activation gradient
(g * layer_scale * gelu'(pre)) and keeps per-program column sums for dbias and dlayer_scale
(a second reduction adds them up); dx and dweight are then two matmuls (cuBLAS).

x, weight and residual are read through their strides (x and residual viewed as rows); bias
and layer_scale are read densely, so the wrapper makes them contiguous first. With
create_graph=True the backward is eager PyTorch math instead (see double_backward.py). The
output dtype follows PyTorch's promotion of x and residual (an fp32 residual stream stays fp32
under autocast), as the eager `residual + out` does.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from .. import double_backward
from . import usage
from .common import INTERPRET, autotune, bucket, dense, device_guard, dot_precision, fma_dots, unsupported, upcast_dots
from .common import tile_registers as _regs
from .tuned import TunedConfigs

_SQRT1_2 = tl.constexpr(0.7071067811865476)       # (kernels read globals only as constexpr)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)

# (larger tiles, 128x256 or 128x128 with 4 warps, spill registers with the full epilogue on sm_90)
_GPU_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
    for bm, bn, bk, w, s in [(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 64, 64, 4, 4),
                             (64, 128, 64, 4, 4), (64, 64, 64, 4, 4), (64, 64, 32, 4, 5)]
]
_INTERPRETER_CONFIG = triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2})


def _forward_footprint(config, meta, elt):
    """(shared memory, registers per thread) for the prune: the x and weight tiles per pipeline
    stage; the fp32 accumulator and one epilogue tile (residual or pre-activation) in registers,
    and for FMA dots the operand tiles too."""
    M, N, K = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.kwargs["BLOCK_K"]
    w = config.num_warps
    smem = elt * config.num_stages * (M + N) * K
    regs = 2 * _regs(M, N, w)
    if fma_dots(meta, elt):
        regs += _regs(M, K, w) + _regs(K, N, w)
    return smem, regs


@triton.jit
def _tile(tile, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row tile, column tile) of output tile number `tile` in grouped order: GROUP_M consecutive
    row tiles walk the column tiles together, so the weight tiles they share stay in L2."""
    tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (tile // per_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    return first_m + (tile % per_group) % group_rows, (tile % per_group) // group_rows


# The epilogue's math, shared by the pointer kernel's _epilogue and the TMA kernel's
# _epilogue_tma (they differ only in how residual, pre and out move): on an fp32 tile, the
# bias, then (after the pre-activation is stored) exact GELU and the layer scale.
@triton.jit
def _with_bias(acc, cols, col_ok, BIAS, HAS_BIAS: tl.constexpr):
    if HAS_BIAS:
        acc += tl.load(BIAS + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _activated_scaled(acc, cols, col_ok, LS, GELU: tl.constexpr, HAS_LS: tl.constexpr):
    if GELU:
        acc = 0.5 * acc * (1.0 + tl.erf(acc * _SQRT1_2))
    if HAS_LS:
        acc *= tl.load(LS + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _epilogue(acc, row0, cols, M, N, BIAS, LS, RES, OUT, PRE, srm, srn,
              HAS_BIAS: tl.constexpr, GELU: tl.constexpr, HAS_LS: tl.constexpr,
              HAS_RESIDUAL: tl.constexpr, STORE_PRE: tl.constexpr):
    """Bias, pre-activation store, exact GELU, layer scale, residual on an fp32 tile of
    x @ weight^T whose first row is row0 (int64), then the store of out. The tile's first row
    moves the base pointers in 64 bits (row0 x stride may pass 2**31); offsets inside the tile
    (fewer than BLOCK_M rows x stride, within the checked reach) stay 32-bit, as do the
    per-element addresses' registers."""
    rows = tl.arange(0, acc.shape[0])
    row_ok, col_ok = rows < M - row0, cols < N
    mask = row_ok[:, None] & col_ok[None, :]
    dense = rows[:, None] * N + cols[None, :]
    acc = _with_bias(acc, cols, col_ok, BIAS, HAS_BIAS)
    if STORE_PRE:
        tl.store(PRE + row0 * N + dense, acc.to(PRE.dtype.element_ty), mask=mask)
    acc = _activated_scaled(acc, cols, col_ok, LS, GELU, HAS_LS)
    if HAS_RESIDUAL:
        acc += tl.load(RES + row0 * srm + rows[:, None] * srm + cols[None, :] * srn, mask=mask,
                       other=0.0).to(tl.float32)
    tl.store(OUT + row0 * N + dense, acc.to(OUT.dtype.element_ty), mask=mask)


# M (rows = batch x tokens) enters the key only as M_BUCKET, its next power of two
@autotune(_GPU_CONFIGS, _INTERPRETER_CONFIG, ["M_BUCKET", "N", "K", "HAS_BIAS", "GELU", "HAS_LS", "HAS_RESIDUAL",
                                              "STORE_PRE", "UPCAST", "PRECISION"],
          _forward_footprint)
@triton.jit
def _forward_kernel(X, W, BIAS, LS, RES, OUT, PRE, M, N, K, sxm, sxk, swn, swk, srm, srn, M_BUCKET,
                    HAS_BIAS: tl.constexpr, GELU: tl.constexpr, HAS_LS: tl.constexpr,
                    HAS_RESIDUAL: tl.constexpr, STORE_PRE: tl.constexpr,
                    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """The pointer kernel: one program per output tile, x and weight read through any strides
    (every GPU; the fallback of the TMA kernel below)."""
    pid_m, pid_n = _tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    row0 = pid_m.to(tl.int64) * BLOCK_M  # (64-bit tile bases, 32-bit offsets inside the tile)
    rows = tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok, col_ok = rows < M - row0, cols < N
    ks = tl.arange(0, BLOCK_K)
    x_ptrs = X + row0 * sxm + rows[:, None] * sxm + ks[None, :] * sxk
    w_ptrs = W + ks[:, None] * swk + cols[None, :] * swn
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for start in range(0, K, BLOCK_K):
        k_ok = start + ks < K
        a = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        x_ptrs += BLOCK_K * sxk
        w_ptrs += BLOCK_K * swk
    _epilogue(acc, row0, cols, M, N, BIAS, LS, RES, OUT, PRE, srm, srn,
              HAS_BIAS, GELU, HAS_LS, HAS_RESIDUAL, STORE_PRE)


# --- the persistent TMA kernel (sm_90) ---------------------------------------------------
# One program per SM loops over the output tiles (grouped order). x and weight tiles come in
# through tensor descriptors (TMA on sm_90: no address arithmetic, no masks, zero fill past the
# edges) and the dots run on wgmma. The epilogue runs on column slices (BLOCK_N / EPILOGUE_SPLIT
# wide) and moves its tiles through descriptors too: the residual slice comes in and out and pre
# go out by TMA, clipped at the edges by the hardware, so no per-element 64-bit addresses take
# registers beside the fp32 accumulator (with pointer loads and stores, 128x256 tiles spilled).
# Host-side descriptors (triton.tools.tensor_descriptor, in triton 3.6 and 3.7) need no global
# scratch allocator (device-side tl.make_tensor_descriptor would need triton.set_allocator, a
# context-local setting that autograd's backward threads would not see); their block shapes are
# set per config by a pre-hook (Triton keeps no tuning result of such configs: see save_tuned).
def _set_block_shapes(nargs):
    bm, bn, bk = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
    nargs["X"].block_shape = [bm, bk]
    nargs["W"].block_shape = [bn, bk]
    for name in ("RES", "OUT", "PRE"):
        if nargs[name] is not None:
            nargs[name].block_shape = [bm, bn // nargs["EPILOGUE_SPLIT"]]


def _tma_config(bm, bn, bk, warps, stages, group=8, split=2):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group, "EPILOGUE_SPLIT": split},
                         num_warps=warps, num_stages=stages, pre_hook=_set_block_shapes)


# (two warpgroups for the 128-row tiles: wgmma gives each warpgroup 64 rows)
_TMA_GPU_CONFIGS = [_tma_config(*c) for c in [(128, 256, 64, 8, 3), (128, 256, 64, 8, 4), (128, 128, 64, 8, 4),
                                              (128, 128, 64, 4, 4), (64, 256, 64, 4, 4), (128, 64, 64, 4, 4),
                                              (64, 128, 64, 4, 4), (64, 64, 64, 4, 4)]]
_TMA_INTERPRETER_CONFIG = _tma_config(32, 32, 32, 4, 1, group=2)


def _tma_footprint(config, meta, elt):
    """(shared memory, registers per thread): the x and weight tiles per pipeline stage and one
    epilogue slice staged for TMA (the compiled kernels reuse one buffer for residual, pre and
    out; counted at 4 bytes an element, as an fp32 out may need); the fp32 accumulator and one
    epilogue slice in registers, for FMA dots the operand tiles too."""
    M, N, K = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.kwargs["BLOCK_K"]
    n = N // config.kwargs["EPILOGUE_SPLIT"]
    w = config.num_warps
    smem = elt * config.num_stages * (M + N) * K + 4 * M * n
    regs = _regs(M, N, w) + _regs(M, n, w)
    if fma_dots(meta, elt):
        regs += _regs(M, K, w) + _regs(K, N, w)
    return smem, regs


@triton.jit
def _epilogue_tma(acc, off_m, off_n, N, BIAS, LS, RES, OUT, PRE, HAS_BIAS: tl.constexpr, GELU: tl.constexpr,
                  HAS_LS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, STORE_PRE: tl.constexpr):
    """_epilogue on a slice whose residual, out and pre are tensor descriptors."""
    cols = off_n + tl.arange(0, acc.shape[1])
    col_ok = cols < N
    acc = _with_bias(acc, cols, col_ok, BIAS, HAS_BIAS)
    if STORE_PRE:
        PRE.store([off_m, off_n], acc.to(PRE.dtype))
    acc = _activated_scaled(acc, cols, col_ok, LS, GELU, HAS_LS)
    if HAS_RESIDUAL:
        acc += RES.load([off_m, off_n]).to(tl.float32)
    OUT.store([off_m, off_n], acc.to(OUT.dtype))


@autotune(_TMA_GPU_CONFIGS, _TMA_INTERPRETER_CONFIG, ["M_BUCKET", "N", "K", "HAS_BIAS", "GELU", "HAS_LS",
                                                      "HAS_RESIDUAL", "STORE_PRE", "UPCAST", "PRECISION",
                                                      "DTYPE"],
          _tma_footprint)
@triton.jit
def _forward_tma_kernel(X, W, BIAS, LS, RES, OUT, PRE, M, N, K, M_BUCKET,
                        HAS_BIAS: tl.constexpr, GELU: tl.constexpr, HAS_LS: tl.constexpr,
                        HAS_RESIDUAL: tl.constexpr, STORE_PRE: tl.constexpr,
                        UPCAST: tl.constexpr, PRECISION: tl.constexpr, DTYPE: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        GROUP_M: tl.constexpr, EPILOGUE_SPLIT: tl.constexpr):
    """Descriptors: X of x (M, K), W of weight (N, K), RES of the residual (M, N), OUT and PRE
    of out and pre (M, N); BIAS and LS pointers. DTYPE (x's dtype name) is only an autotune
    key: descriptors carry no dtype the autotuner could key on."""
    tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    SLICE: tl.constexpr = BLOCK_N // EPILOGUE_SPLIT
    for tile in tl.range(tl.program_id(0), tiles, tl.num_programs(0)):
        pid_m, pid_n = _tile(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        off_m, off_n = pid_m * BLOCK_M, pid_n * BLOCK_N
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for start in range(0, K, BLOCK_K):
            a = X.load([off_m, start])
            b = W.load([off_n, start])
            if UPCAST:
                a, b = a.to(tl.float32), b.to(tl.float32)
            acc = tl.dot(a, b.T, acc, input_precision=PRECISION)
        if EPILOGUE_SPLIT == 2:
            first, second = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, SLICE)), (0, 2, 1)))
            _epilogue_tma(first, off_m, off_n, N, BIAS, LS, RES, OUT, PRE,
                          HAS_BIAS, GELU, HAS_LS, HAS_RESIDUAL, STORE_PRE)
            _epilogue_tma(second, off_m, off_n + SLICE, N, BIAS, LS, RES, OUT, PRE,
                          HAS_BIAS, GELU, HAS_LS, HAS_RESIDUAL, STORE_PRE)
        else:
            _epilogue_tma(acc, off_m, off_n, N, BIAS, LS, RES, OUT, PRE,
                          HAS_BIAS, GELU, HAS_LS, HAS_RESIDUAL, STORE_PRE)


# its autotuning choices, kept across processes (its configs' pre-hooks keep Triton from it)
TUNED = TunedConfigs("linear_fwd_tma", _forward_tma_kernel, _TMA_GPU_CONFIGS)


# Which forward kernel serves: "auto" (the TMA kernel on sm_90 for inputs it can take, else the
# pointer kernel), "tma" (the TMA kernel for every input it can take, on any device: tests set this
# to run it under the interpreter) or "pointer" (never TMA). forward_kernel() says which and why.
FORWARD_KERNEL = "auto"
INTERPRETER_SMS = 3  # programs of the persistent kernel under the interpreter: several tiles each


def _tma_layout(name: str, t: torch.Tensor) -> Optional[str]:
    """Why TMA cannot read the 2-D tensor t, or None: a 16-byte aligned start, unit stride along
    the last dimension, the other stride a multiple of 16 bytes (and not overlapping rows)."""
    elt = t.element_size()
    if t.stride(1) != 1:
        return f"{name} has strides {t.stride()}: TMA reads rows with unit stride"
    if t.data_ptr() % 16:
        return f"{name} starts at an address that is not 16-byte aligned"
    if (t.stride(0) * elt) % 16 or t.stride(0) < t.shape[1]:
        return (f"{name}'s row stride is {t.stride(0)} elements of {elt} bytes: TMA needs a multiple of 16 bytes "
                "(K a multiple of 16 / element size)")
    return None


def forward_kernel(x2: torch.Tensor, weight: torch.Tensor, residual: Optional[torch.Tensor] = None,
                   out_dtype: Optional[torch.dtype] = None) -> tuple[str, Optional[str]]:
    """("linear_fwd_tma", None) when the persistent TMA kernel serves residual + epilogue(x2 @
    weight^T) (x2 and residual as rows), else ("linear_fwd", why not) for the pointer kernel."""
    if FORWARD_KERNEL == "pointer":
        return "linear_fwd", "FORWARD_KERNEL is 'pointer'"
    if FORWARD_KERNEL != "tma":
        if x2.device.type != "cuda":
            return "linear_fwd", "the TMA kernel runs on CUDA devices (FORWARD_KERNEL = 'tma' forces it)"
        major, minor = torch.cuda.get_device_capability(x2.device)
        if major != 9:
            return "linear_fwd", f"the TMA kernel is built and checked for sm_90; this GPU is sm_{major}{minor}"
        if fma_dots({"PRECISION": dot_precision(x2.dtype)}, x2.element_size()):
            return "linear_fwd", "float32 dots in ieee precision run on the FMA units, not on wgmma"
    if x2.shape[0] == 0:
        return "linear_fwd", "an empty batch"
    N = weight.shape[0]
    for dtype in (x2.dtype, out_dtype or x2.dtype):  # (pre has x's dtype)
        if (N * dtype.itemsize) % 16:
            return "linear_fwd", (f"the output's rows are {N} x {dtype.itemsize} bytes: TMA stores need a "
                                  "multiple of 16 bytes")
    reason = (_tma_layout("x", x2) or _tma_layout("weight", weight)
              or (residual is not None and _tma_layout("residual", residual)))
    return ("linear_fwd", reason) if reason else ("linear_fwd_tma", None)


@triton.jit
def _epilogue_backward_kernel(G, PRE, LS, DPRE, DB_PART, DLS_PART, M, N, sgm, sgn, rows_per_program,
                              GELU: tl.constexpr, HAS_LS: tl.constexpr, WANT_DB: tl.constexpr,
                              WANT_DLS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dpre = g * layer_scale * gelu'(pre); column partial sums of dpre (dbias) and g * act(pre)."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    if HAS_LS:
        ls = tl.load(LS + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    # column sums per row tile into [BLOCK_N] vectors: full-tile fp32 accumulators would hold two
    # more [BLOCK_M, BLOCK_N] tiles of registers through the loop
    db = tl.zeros([BLOCK_N], tl.float32)
    dls = tl.zeros([BLOCK_N], tl.float32)
    first = pid_m * rows_per_program
    for offset in range(0, rows_per_program, BLOCK_M):  # rows_per_program is a multiple of BLOCK_M
        rows = first + offset + tl.arange(0, BLOCK_M)
        mask = (rows < M)[:, None] & col_ok[None, :]
        rows64 = rows.to(tl.int64)[:, None]
        g = tl.load(G + rows64 * sgm + cols[None, :] * sgn, mask=mask, other=0.0).to(tl.float32)
        dpre = g
        if HAS_LS:
            dpre = g * ls
        if GELU or WANT_DLS:
            pre = tl.load(PRE + rows64 * N + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            act = pre
            if GELU:
                cdf = 0.5 * (1.0 + tl.erf(pre * _SQRT1_2))
                act = pre * cdf
                dpre *= cdf + pre * tl.exp(-0.5 * pre * pre) * _INV_SQRT_2PI
            if WANT_DLS:
                dls += tl.sum(g * act, 0)
        tl.store(DPRE + rows64 * N + cols[None, :], dpre.to(DPRE.dtype.element_ty), mask=mask)
        if WANT_DB:
            db += tl.sum(dpre, 0)
    if WANT_DB:
        tl.store(DB_PART + pid_m * N + cols, db, mask=col_ok)
    if WANT_DLS:
        tl.store(DLS_PART + pid_m * N + cols, dls, mask=col_ok)


def _rows(t: torch.Tensor, features: int) -> torch.Tensor:
    """t as (rows, features) (a view when the strides allow it)."""
    return t.reshape(-1, features)


def _epilogue_backward(g2, pre, layer_scale, gelu, want_db, want_dls, dtype):
    """(dpre, dbias or None, dlayer_scale or None), the sums in fp32."""
    M, N = g2.shape
    block_m, block_n = 32, min(128, max(16, triton.next_power_of_2(N)))
    tiles_n = triton.cdiv(N, block_n)
    if INTERPRET or g2.device.type != "cuda":
        programs_m = min(triton.cdiv(M, block_m), 2)
    else:
        sms = torch.cuda.get_device_properties(g2.device).multi_processor_count
        programs_m = min(triton.cdiv(M, block_m), 4 * sms // tiles_n)
    programs_m = max(1, programs_m)  # one program row writes zero sums when M == 0
    rows_per_program = max(block_m, triton.cdiv(triton.cdiv(M, programs_m), block_m) * block_m)
    programs_m = max(1, triton.cdiv(M, rows_per_program))
    dpre = torch.empty((M, N), dtype=dtype, device=g2.device)
    part = lambda want: torch.empty((programs_m, N), dtype=torch.float32, device=g2.device) if want else None  # noqa: E731
    db_part, dls_part = part(want_db), part(want_dls)
    with device_guard(g2):
        _epilogue_backward_kernel[(programs_m, tiles_n)](
            g2, pre, layer_scale, dpre, db_part, dls_part, M, N, g2.stride(0), g2.stride(1), rows_per_program,
            GELU=gelu, HAS_LS=layer_scale is not None, WANT_DB=want_db, WANT_DLS=want_dls,
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4)
    return dpre, None if db_part is None else db_part.sum(0), None if dls_part is None else dls_part.sum(0)


def _forward(x2, weight, bias, layer_scale, r2, out, pre, gelu):
    """Launch the forward kernel forward_kernel() picks (recorded in usage)."""
    M, K = x2.shape
    N = weight.shape[0]
    kernel, reason = forward_kernel(x2, weight, r2, out.dtype)
    usage.record("linear", x2.device.type, kernel, reason)
    flags = dict(HAS_BIAS=bias is not None, GELU=gelu, HAS_LS=layer_scale is not None, HAS_RESIDUAL=r2 is not None,
                 STORE_PRE=pre is not None, UPCAST=upcast_dots(x2.dtype), PRECISION=dot_precision(x2.dtype))
    tiles = lambda meta: triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"])  # noqa: E731
    with device_guard(x2):
        if kernel == "linear_fwd":
            _forward_kernel[lambda meta: (tiles(meta),)](
                x2, weight, bias, layer_scale, r2, out, pre, M, N, K, *x2.stride(), *weight.stride(),
                *(r2.stride() if r2 is not None else (0, 0)), bucket(M), **flags)
            return
        if x2.device.type == "cuda":
            props = torch.cuda.get_device_properties(x2.device)
            sms, gpu = props.multi_processor_count, props.name
        else:   # the interpreter: no GPU, nothing tuned
            sms, gpu = INTERPRETER_SMS, None
        # (the block shapes are placeholders: each config's pre-hook sets its own)
        desc = lambda t: None if t is None else TensorDescriptor.from_tensor(t, [16, 16])  # noqa: E731
        launch = lambda: _forward_tma_kernel[lambda meta: (min(sms, tiles(meta)),)](  # noqa: E731
            desc(x2), desc(weight), bias, layer_scale, desc(r2), desc(out), desc(pre), M, N, K, bucket(M),
            DTYPE=str(x2.dtype), **flags)
        if gpu is None:
            launch()
        else:
            TUNED.launch(gpu, launch)


# The kernels as torch custom ops (incubation::triton_linear and its backward): one node each in a
# torch.compile / torch.export graph, with fake kernels for shapes and register_autograd.
@torch.library.custom_op("incubation::triton_linear", mutates_args=())
def _linear_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], gelu: bool,
               layer_scale: Optional[torch.Tensor], residual: Optional[torch.Tensor], store_pre: bool
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, pre): out = residual + layer_scale * act(x @ weight^T + bias), in the dtype eager's
    residual + out has; pre (x's dtype, rows x out features) is the pre-activation the backward
    needs (for GELU's derivative or the layer scale's gradient), empty unless store_pre."""
    N, K = weight.shape
    x2 = _rows(x, K)
    M = x2.shape[0]
    out, pre = _linear_fake(x, weight, bias, gelu, layer_scale, residual, store_pre)
    if M > 0:  # (an empty batch would only key a needless autotuning run)
        r2 = None if residual is None else _rows(residual, N)
        _forward(x2, weight, bias, layer_scale, r2, out.view(M, N), pre if store_pre else None, gelu)
    return out, pre


@_linear_op.register_fake
def _linear_fake(x, weight, bias, gelu, layer_scale, residual, store_pre):
    N = weight.shape[0]
    out_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    rows = x.numel() // max(x.shape[-1], 1)
    out = torch.empty((*x.shape[:-1], N), dtype=out_dtype, device=x.device)
    return out, torch.empty((rows, N) if store_pre else (0, N), dtype=x.dtype, device=x.device)


@torch.library.custom_op("incubation::triton_linear_backward", mutates_args=())
def _backward_op(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, pre: torch.Tensor,
                 layer_scale: Optional[torch.Tensor], gelu: bool, want_dx: bool, want_dw: bool, want_db: bool,
                 want_dls: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dweight, dbias, dlayer_scale), each empty unless wanted; dbias and dlayer_scale fp32."""
    N, K = weight.shape
    x2, g2 = _rows(x, K), _rows(grad, N)
    dpre = db = dls = None
    if (want_dx or want_dw or want_db or want_dls) and (gelu or layer_scale is not None):
        dpre, db, dls = _epilogue_backward(g2, pre, layer_scale, gelu, want_db, want_dls, x2.dtype)
    elif want_dx or want_dw or want_db:
        dpre = g2.to(x2.dtype)
        db = g2.sum(0, dtype=torch.float32) if want_db else None
    empty = lambda dtype: torch.empty(0, dtype=dtype, device=x.device)  # noqa: E731
    dx = (dpre @ weight).view(x.shape) if want_dx else empty(x.dtype)
    dw = dpre.t() @ x2 if want_dw else empty(weight.dtype)
    return dx, dw, empty(torch.float32) if db is None else db, empty(torch.float32) if dls is None else dls


@_backward_op.register_fake
def _backward_fake(grad, x, weight, pre, layer_scale, gelu, want_dx, want_dw, want_db, want_dls):
    N = weight.shape[0]
    like = lambda want, shape, dtype: torch.empty(shape if want else (0,), dtype=dtype, device=x.device)  # noqa: E731
    return (like(want_dx, x.shape, x.dtype), like(want_dw, weight.shape, weight.dtype),
            like(want_db, (N,), torch.float32), like(want_dls, (N,), torch.float32))


def _setup_context(ctx, inputs, output):
    x, weight, bias, gelu, layer_scale, residual, _ = inputs
    _, pre = output
    ctx.mark_non_differentiable(pre)
    # x itself and bias stay connected to the graph for a differentiable backward (bias for that only)
    ctx.save_for_backward(x, weight, bias, layer_scale, pre)
    ctx.gelu = gelu
    ctx.residual_dtype = None if residual is None else residual.dtype


def _gradients(ctx, grad, _dpre):
    x, weight, bias, layer_scale, pre = ctx.saved_tensors
    if double_backward.needed():
        return _eager_gradients(ctx, x, weight, bias, layer_scale, grad)
    want_dx, want_dw, want_db, _, want_dls, want_dres, _ = ctx.needs_input_grad
    want_db, want_dls = want_db and bias is not None, want_dls and layer_scale is not None
    dx, dw, db, dls = _backward_op(grad, x, weight, pre, layer_scale, ctx.gelu, want_dx, want_dw, want_db, want_dls)
    return (dx if want_dx else None, dw if want_dw else None, db.to(weight.dtype) if want_db else None, None,
            dls.to(layer_scale.dtype) if want_dls else None, grad.to(ctx.residual_dtype) if want_dres else None, None)


def _eager_gradients(ctx, x, weight, bias, layer_scale, grad):
    """The backward as differentiable eager math (for create_graph=True)."""
    def epilogue(x, weight, bias, layer_scale):
        out = F.linear(x, weight, bias)
        out = F.gelu(out) if ctx.gelu else out
        return out if layer_scale is None else out * layer_scale

    need_x, need_w, need_b, _, need_ls, need_res, _ = ctx.needs_input_grad
    dx, dw, db, dls = double_backward.eager_grads(
        epilogue, (x, weight, bias, layer_scale), (need_x, need_w, need_b, need_ls), (grad.to(x.dtype),))
    return dx, dw, db, None, dls, grad.to(ctx.residual_dtype) if need_res else None, None


_linear_op.register_autograd(_gradients, setup_context=_setup_context)


def linear(x, weight, bias, activation, layer_scale, residual):
    gelu = activation == "gelu"
    # the pre-activation is stored only when the backward needs it
    needs = torch.is_grad_enabled() and (x.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad,
                                         layer_scale is not None and layer_scale.requires_grad)
    store_pre = bool(needs) and ((gelu and any(needs[:3])) or (layer_scale is not None and needs[3]))
    return _linear_op(x, weight, dense(bias), gelu, dense(layer_scale), residual, store_pre)[0]


def check(x, weight, bias, activation, layer_scale, residual) -> Optional[str]:
    reason = unsupported(x=x, weight=weight, bias=bias, layer_scale=layer_scale, residual=residual)
    if reason:
        return reason
    for name, t in (("weight", weight), ("bias", bias), ("layer_scale", layer_scale)):
        if t is not None and t.dtype != x.dtype:
            return f"{name} dtype {t.dtype} differs from x dtype {x.dtype}"
    if x.shape[-1] == 0 or weight.shape[0] == 0:
        return f"empty GEMM dimension (x {tuple(x.shape)}, weight {tuple(weight.shape)})"
    rows = x.numel() // x.shape[-1]
    if rows * weight.shape[0] >= 2 ** 31:
        return f"the output has {rows * weight.shape[0]} elements; the kernels index with 32-bit offsets"
    return None
