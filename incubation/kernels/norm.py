"""LayerNorm over the last dimension, optionally fused with the residual add before it.

Forward, one pass per tile of rows: summed = x + residual (fp32), stored in the dtype eager's
x + residual has (x's, or the promoted one: an fp32 residual stream with a bf16 / fp16 branch
under autocast gives fp32), then its mean / rstd (fp32, saved) and the normalised, affine output
in that same dtype. Backward: each program walks its own range of rows, writes dx (+ the gradient
of `summed`; x and residual get it each in their own dtype) and keeps fp32 column sums of
dy * xhat and dy; a second reduction over the
programs' partial sums gives dweight and dbias, so no atomics and any width is cheap.

Inputs are viewed as rows (reshape) and copied only when their last dimension is strided;
weight and bias are read densely, so the wrappers make them contiguous first (a no-op when
they are). weight and bias may have another float dtype than x (they are read in fp32).
With create_graph=True the backward is eager PyTorch math instead (see double_backward.py).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .. import double_backward
from .common import INTERPRET, dense, device_guard, unsupported

MAX_FEATURES = 8192  # one row per tile; wider rows would spill registers in the backward


@triton.jit
def _overflow_scale(top):
    """The power of two 2^-k that brings `top` (a row's largest magnitude, fp32) below 4, with
    k >= 0: 1 for rows of ordinary values."""
    exponent = ((top.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127   # top = 1.f x 2^exponent
    k = tl.minimum(tl.maximum(exponent, 0), 126)
    return ((127 - k) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _forward_kernel(X, R, W, B, Y, S, MEAN, RSTD, M, C, sx, sr, eps,
                    HAS_RESIDUAL: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_C)
    row_ok, col_ok = rows < M, cols < C
    mask = row_ok[:, None] & col_ok[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    s = tl.load(X + rows64 * sx + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        s += tl.load(R + rows64 * sr + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(S + rows64 * C + cols[None, :], s.to(S.dtype.element_ty), mask=mask)
    # the statistics of v = s * scale - shift (both exact): shifted by the row's first value, so
    # that data far from zero (1000 + 0.01 N) keeps its digits, and scaled by a power of two so
    # that the squares of huge rows (1e20) stay finite; as csrc/include/incubation_math.h
    first = tl.load(X + rows.to(tl.int64) * sx, mask=row_ok, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        first += tl.load(R + rows.to(tl.int64) * sr, mask=row_ok, other=0.0).to(tl.float32)
    scale = _overflow_scale(tl.max(tl.abs(s), 1))
    shift = first * scale
    v = s * scale[:, None] - shift[:, None]
    mean_v = tl.sum(tl.where(mask, v, 0.0), 1) / C
    centred = tl.where(mask, v - mean_v[:, None], 0.0)
    rstd_v = tl.rsqrt(tl.sum(centred * centred, 1) / C + eps * scale * scale)
    y = centred * rstd_v[:, None]
    mean = (shift + mean_v) / scale
    rstd = rstd_v * scale
    if HAS_W:
        y *= tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_B:
        y += tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rows64 * C + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(MEAN + rows, mean, mask=row_ok)
    tl.store(RSTD + rows, rstd, mask=row_ok)


@triton.jit
def _backward_kernel(DY, DS, S, W, MEAN, RSTD, DX, DW_PART, DB_PART, M, C, sdy, sds, ss, rows_per_program,
                     HAS_DS: tl.constexpr, HAS_W: tl.constexpr, WANT_DW: tl.constexpr, WANT_DB: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    col_ok = cols < C
    if HAS_W:
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    dw = tl.zeros([BLOCK_M, BLOCK_C], tl.float32)
    db = tl.zeros([BLOCK_M, BLOCK_C], tl.float32)
    first = pid * rows_per_program
    for offset in range(0, rows_per_program, BLOCK_M):  # rows_per_program is a multiple of BLOCK_M
        rows = first + offset + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        mask = row_ok[:, None] & col_ok[None, :]
        rows64 = rows.to(tl.int64)[:, None]
        s = tl.load(S + rows64 * ss + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows64 * sdy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + rows, mask=row_ok, other=0.0)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
        xhat = tl.where(mask, (s - mean[:, None]) * rstd[:, None], 0.0)
        wdy = dy
        if HAS_W:
            wdy = dy * w
        # dx = rstd * (wdy - mean(wdy) - xhat * mean(wdy * xhat))
        mean_wdy = tl.sum(wdy, 1) / C
        mean_wdy_xhat = tl.sum(wdy * xhat, 1) / C
        dx = (wdy - mean_wdy[:, None] - xhat * mean_wdy_xhat[:, None]) * rstd[:, None]
        if HAS_DS:
            dx += tl.load(DS + rows64 * sds + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + rows64 * C + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        if WANT_DW:
            dw += dy * xhat
        if WANT_DB:
            db += dy
    if WANT_DW:
        tl.store(DW_PART + pid * C + cols, tl.sum(dw, 0), mask=col_ok)
    if WANT_DB:
        tl.store(DB_PART + pid * C + cols, tl.sum(db, 0), mask=col_ok)


def _rows(t: torch.Tensor, features: int) -> torch.Tensor:
    """t as (rows, features) with unit column stride (a view when possible)."""
    t = t.reshape(-1, features)
    return t if t.stride(1) == 1 else t.contiguous()


def _tiling(features: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_C, forward warps, backward warps): whole rows per tile, several when
    they are narrow; the backward holds about twice the live values, so gets twice the warps
    (sm_90: <= ~130 registers a thread, no spills, up to 8192 features)."""
    block_c = triton.next_power_of_2(features)
    block_m = max(1, min(16, 4096 // block_c))
    tile = block_m * block_c
    return block_m, block_c, min(16, max(4, tile // 1024)), min(16, max(8, tile // 512))


def _programs(rows: int, block_m: int, device: torch.device) -> int:
    """Backward programs: enough to fill the GPU, each with many rows to sum over."""
    if INTERPRET or device.type != "cuda":
        return min(triton.cdiv(rows, block_m), 4)
    return min(triton.cdiv(rows, block_m), 4 * torch.cuda.get_device_properties(device).multi_processor_count)


# The kernels as torch custom ops (incubation::triton_add_layer_norm and its backward): one node
# each in a torch.compile / torch.export graph, with fake kernels for shapes and register_autograd.
@torch.library.custom_op("incubation::triton_add_layer_norm", mutates_args=())
def _forward(x: torch.Tensor, residual: Optional[torch.Tensor], weight: Optional[torch.Tensor],
             bias: Optional[torch.Tensor], eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(normed, summed, mean, rstd) of x (+ residual); summed is empty without a residual."""
    C = x.shape[-1]
    x2 = _rows(x, C)
    M = x2.shape[0]
    r2 = None if residual is None else _rows(residual, C)
    y, summed, mean, rstd = _forward_fake(x, residual, weight, bias, eps)
    block_m, block_c, warps, _ = _tiling(C)
    with device_guard(x):
        _forward_kernel[(triton.cdiv(M, block_m),)](
            x2, r2, weight, bias, y, None if r2 is None else summed, mean, rstd, M, C, x2.stride(0),
            0 if r2 is None else r2.stride(0), eps,
            HAS_RESIDUAL=r2 is not None, HAS_W=weight is not None, HAS_B=bias is not None,
            BLOCK_M=block_m, BLOCK_C=block_c, num_warps=warps)
    return y, summed, mean, rstd


@_forward.register_fake
def _forward_fake(x, residual, weight, bias, eps):
    # as eager's x + residual: an fp32 residual stream with a half-precision branch (autocast)
    # sums in fp32, and the LayerNorm of that sum is fp32 too
    dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    rows = x.numel() // max(x.shape[-1], 1)
    y = torch.empty(x.shape, dtype=dtype, device=x.device)
    summed = torch.empty(x.shape if residual is not None else (0,), dtype=dtype, device=x.device)
    mean = torch.empty(rows, dtype=torch.float32, device=x.device)
    return y, summed, mean, torch.empty_like(mean)


@torch.library.custom_op("incubation::triton_add_layer_norm_backward", mutates_args=())
def _backward(dy: torch.Tensor, dsummed: Optional[torch.Tensor], s: torch.Tensor, weight: Optional[torch.Tensor],
              mean: torch.Tensor, rstd: torch.Tensor, want_dw: bool, want_db: bool
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d summed, d weight, d bias) of LayerNorm(s) (dsummed reached s directly); dweight / dbias
    are fp32 and empty unless wanted."""
    M, C = mean.shape[0], s.shape[-1]
    s2, dy2 = _rows(s, C), _rows(dy, C)
    ds2 = None if dsummed is None else _rows(dsummed, C)
    block_m, block_c, _, warps = _tiling(C)
    programs = max(1, _programs(M, block_m, s.device))  # one program writes zero sums when M == 0
    rows_per_program = max(block_m, triton.cdiv(triton.cdiv(M, programs), block_m) * block_m)
    programs = max(1, triton.cdiv(M, rows_per_program))
    dx = torch.empty(s.shape, dtype=s.dtype, device=s.device)
    part = lambda want: torch.empty((programs, C), dtype=torch.float32, device=s.device) if want else None  # noqa: E731
    dw_part, db_part = part(want_dw), part(want_db)
    with device_guard(s):
        _backward_kernel[(programs,)](
            dy2, ds2, s2, weight, mean, rstd, dx, dw_part, db_part, M, C,
            dy2.stride(0), 0 if ds2 is None else ds2.stride(0), s2.stride(0), rows_per_program,
            HAS_DS=ds2 is not None, HAS_W=weight is not None, WANT_DW=want_dw, WANT_DB=want_db,
            BLOCK_M=block_m, BLOCK_C=block_c, num_warps=warps)
    sums = lambda part: torch.empty(0, dtype=torch.float32, device=s.device) if part is None else part.sum(0)  # noqa: E731
    return dx, sums(dw_part), sums(db_part)


@_backward.register_fake
def _backward_fake(dy, dsummed, s, weight, mean, rstd, want_dw, want_db):
    C = s.shape[-1]
    sums = lambda want: torch.empty((C if want else 0,), dtype=torch.float32, device=s.device)  # noqa: E731
    return torch.empty(s.shape, dtype=s.dtype, device=s.device), sums(want_dw), sums(want_db)


def _setup_context(ctx, inputs, output):
    x, residual, weight, bias, eps = inputs
    _, summed, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)
    # x or summed (an input or an output) and the parameters stay connected to the graph for a
    # differentiable backward; bias is kept for that only
    ctx.save_for_backward(x if residual is None else summed, weight, bias, mean, rstd)
    ctx.dtypes = (x.dtype, None if residual is None else residual.dtype)
    ctx.eps = eps


def _gradients(ctx, dy, dsummed, _dmean, _drstd):
    s, weight, bias, mean, rstd = ctx.saved_tensors
    need_x, need_residual, need_w, need_b, _ = ctx.needs_input_grad
    if ctx.dtypes[1] is None:
        dsummed = None   # (the empty placeholder output)
    if double_backward.needed():   # differentiable eager math (create_graph=True)
        ds, dw, db = double_backward.layer_norm_grads(s, weight, bias, ctx.eps, (need_x or need_residual, need_w, need_b),
                                                      dy, dsummed)
        return (*_split(ds, ctx), dw, db, None)
    if dy is None:
        dy = torch.zeros(s.shape, dtype=s.dtype, device=s.device)
    want_dw, want_db = weight is not None and need_w, bias is not None and need_b
    ds, dw, db = _backward(dy, dsummed, s, weight, mean, rstd, want_dw, want_db)
    return (*_split(ds, ctx), dw.to(weight.dtype) if want_dw else None, db.to(bias.dtype) if want_db else None, None)


_forward.register_autograd(_gradients, setup_context=_setup_context)


def _split(ds, ctx):
    """(dx, dresidual) from the gradient of summed, each in its input's dtype (summed's may be wider)."""
    x_dtype, residual_dtype = ctx.dtypes
    if ds is None:
        return None, None
    return ds.to(x_dtype), None if residual_dtype is None else ds.to(residual_dtype)


def layer_norm(x, weight, bias, eps):
    return _forward(x, None, dense(weight), dense(bias), eps)[0]


def add_layer_norm(x, residual, weight, bias, eps):
    if residual is None:
        return layer_norm(x, weight, bias, eps), x
    normed, summed, _, _ = _forward(x, residual, dense(weight), dense(bias), eps)
    return normed, summed


def check_add_layer_norm(x, residual, weight, bias, eps) -> Optional[str]:
    reason = unsupported(x=x, residual=residual, weight=weight, bias=bias)
    if reason:
        return reason
    if x.shape[-1] == 0:
        return "the feature dimension is empty"
    if x.shape[-1] > MAX_FEATURES:
        return f"{x.shape[-1]} features exceed the Triton LayerNorm's limit of {MAX_FEATURES}"
    return None


def check_layer_norm(x, weight, bias, eps) -> Optional[str]:
    return check_add_layer_norm(x, None, weight, bias, eps)
