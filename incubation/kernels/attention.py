"""Non-causal attention softmax(q k^T * scale) v, FlashAttention-2 style.

Forward: one program per (query block, batch*head) streams over key blocks with an online
softmax in fp32 and saves the log-sum-exp (base 2) of every row. The softmax scale is folded
into the exponent: scores stay unscaled and exp2(s * scale * log2(e) - m) is one fused
multiply-add per element. The output has shape (B, H, N, D) and (B, N, H, D) memory, so the
ViT's `o.transpose(1, 2).reshape(B, N, C)` is free.

Backward, two launches: a pre-pass computes Delta = rowsum(o * do), then one kernel does the
rest, in the transposed form of Triton's fused-attention tutorial. Its programs own a block of
rows: the first cdiv(N_KV, BLOCK_OWN) of each (batch, head) a key block, for which they
accumulate dK and dV over every query block (with k q^T and v do^T, so the key block is the M
side of every product); the others a query block, for which they accumulate dQ over every key
block. No atomics: deterministic. Transposed tiles are loaded transposed (pointer arithmetic),
so no register tile is transposed; every product has BLOCK_OWN (>= 64 on the GPU) rows, which
Hopper's wgmma needs.

Any sequence length: ragged tails are masked (q and k/v lengths may differ). Head dims up to
128 are padded to a power of two (at least 16, tl.dot's minimum) inside the kernels and masked.
q, k, v, and the incoming gradient are read through their strides, so the views a qkv
reshape/permute produces are used without copies; the gradients are written contiguous.
With create_graph=True the backward is eager PyTorch math instead (see double_backward.py):
the attention matrix is materialised then, as eager's math attention does.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from .. import double_backward
from .common import autotune, device_guard, dot_precision, fma_dots, unsupported, upcast_dots
from .common import tile_registers as _regs

MAX_HEAD_DIM = 128
MAX_GRID_BLOCKS = 65535  # CUDA's limit on the second grid axis (the row blocks of one batch*head)
_LOG2E = 1.4426950408889634
# Hopper's wgmma multiplies 64-row tiles (per warp group): a 16-bit or tf32 dot with fewer rows
# falls back to mma.sync, so those configs are pruned; ieee fp32 dots run on the FMA units instead.
_WGMMA_ROWS = 64

# Short ViT sequences (N = 50..257) waste much of a 128-row tile, so smaller tiles are offered
# too; the autotuner picks per (sequence lengths, head dim, dtype) among those the footprints
# below let through (benchmarks/compile_check.py shows what each compiles to on sm_90).
_FORWARD_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bm, bn, w, s in [(128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3),
                         (128, 128, 8, 2), (32, 32, 4, 2)]   # 32 rows: ieee fp32 only (FMA dots)
]
# BLOCK_OWN: the rows a backward program owns (its key block for dK/dV, its query block for dQ),
# the M side of every product; BLOCK_STEP: the rows of the other side per loop iteration.
_BACKWARD_CONFIGS = [
    triton.Config({"BLOCK_OWN": own, "BLOCK_STEP": step}, num_warps=w, num_stages=s)
    for own, step, w, s in [(64, 32, 4, 2), (64, 64, 4, 2), (128, 32, 8, 2), (128, 64, 8, 2),
                            (64, 16, 4, 2), (128, 16, 8, 2),
                            (32, 32, 4, 2), (32, 16, 4, 2)]   # 32 rows: ieee fp32 only (FMA dots)
]
_INTERPRETER_CONFIG = triton.Config({"BLOCK_M": 32, "BLOCK_N": 32})
_INTERPRETER_BACKWARD_CONFIG = triton.Config({"BLOCK_OWN": 32, "BLOCK_STEP": 16})
# Every constexpr that changes the kernel is in the key. Sequence lengths stay exact: they do not
# vary with the batch (B x H is only the grid), and the tile that wastes least depends on them.
_KEY = ["N_Q", "N_KV", "HEAD_DIM", "BLOCK_D", "UPCAST", "PRECISION"]
_TOO_BIG = (float("inf"), float("inf"))


# Footprints for the prune (see incubation.kernels.autotune): shared memory holds the dot operand
# tiles, those loaded in the loop once per pipeline stage, plus the probabilities cast for the
# next dot; registers hold the fp32 accumulators and score tiles (and, for FMA dots, the operands).
def _forward_footprint(config, meta, elt):
    M, N, D = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], meta["BLOCK_D"]
    w, s = config.num_warps, config.num_stages
    if M < _WGMMA_ROWS and not fma_dots(meta, elt):
        return _TOO_BIG
    smem = elt * (M * D + s * 2 * N * D + M * N)                            # q; k, v per stage; p
    regs = _regs(M, D, w) + 2 * _regs(M, N, w) + _regs(M, N, w, elt)      # acc; s, p; p cast
    if fma_dots(meta, elt):
        regs += _regs(M, D, w) + _regs(D, N, w) + _regs(N, D, w)           # q, k, v
    return smem, regs


def _backward_footprint(config, meta, elt):
    """The larger of the two roles (one kernel: ptxas allocates for both branches). The score
    tiles' count was fitted to the compiled kernels (benchmarks/compile_check.py --compile-pruned,
    sm_90, triton 3.6.0 and 3.7.1): for bf16/fp16 it keeps exactly the configs that spill nothing;
    for tf32 it prunes every one that spills, and two at head dim 64 that would not."""
    own, step, D = config.kwargs["BLOCK_OWN"], config.kwargs["BLOCK_STEP"], meta["BLOCK_D"]
    w, s = config.num_warps, config.num_stages
    fma = fma_dots(meta, elt)
    if own < _WGMMA_ROWS and not fma:
        return _TOO_BIG
    if elt == 2:   # s -> p and dp -> ds reuse their registers: two fp32 tiles and one cast live at once
        scores = 2 * _regs(own, step, w) + _regs(own, step, w, elt)
    else:          # fp32 operands (tf32 wgmma / FMA) keep more: s, p, dp, ds and their operand copies
        scores = 4 * _regs(own, step, w) + 2 * _regs(own, step, w, elt)
    # dK/dV: k, v; q^T, q, do^T, do per stage | dQ: q, do; k^T, k, v^T per stage
    smem = elt * max(2 * own * D + s * 4 * step * D, 2 * own * D + s * 3 * step * D)
    regs = max(2 * _regs(own, D, w), _regs(own, D, w)) + scores            # dk, dv | dq
    if fma:
        regs += 2 * _regs(own, D, w) + 2 * _regs(step, D, w) + 2 * _regs(D, step, w)
    return smem, regs


@triton.jit
def _tile(ptr, stride_row, stride_col, rows, cols, n_rows, n_cols):
    """Load a 2-D tile, zeros outside [0, n_rows) x [0, n_cols)."""
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    return tl.load(ptr + rows[:, None] * stride_row + cols[None, :] * stride_col, mask=mask, other=0.0)


@autotune(_FORWARD_CONFIGS, _INTERPRETER_CONFIG, _KEY, _forward_footprint)
@triton.jit
def _forward_kernel(Q, K, V, O, LSE, qk_scale,
                    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, son, sod,
                    H, N_Q, N_KV, HEAD_DIM,
                    BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
                    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_bh, pid_m = tl.program_id(0), tl.program_id(1)
    b, h = (pid_bh // H).to(tl.int64), (pid_bh % H).to(tl.int64)
    Q += b * sqb + h * sqh
    K += b * skb + h * skh
    V += b * svb + h * svh
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    q = _tile(Q, sqn, sqd, rows, dims, N_Q, HEAD_DIM)
    if UPCAST:
        q = q.to(tl.float32)

    # m_i, the lse and the exponents are in scaled base-2 units: score * qk_scale (> 0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max of the scaled scores
    l_i = tl.zeros([BLOCK_M], tl.float32)                # running sum of exp2(scaled score - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, N_KV, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        k_t = _tile(K, skd, skn, dims, cols, HEAD_DIM, N_KV)  # (BLOCK_D, BLOCK_N): k transposed
        v = _tile(V, svn, svd, cols, dims, N_KV, HEAD_DIM)
        if UPCAST:
            k_t, v = k_t.to(tl.float32), v.to(tl.float32)
        s = tl.dot(q, k_t, input_precision=PRECISION)        # unscaled scores
        s = tl.where(cols[None, :] < N_KV, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)     # finite: every key block has a valid column
        p = tl.exp2(s * qk_scale - m_new[:, None])           # the scale folded in: one FMA
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    acc = acc / l_i[:, None]
    out_mask = (rows[:, None] < N_Q) & (dims[None, :] < HEAD_DIM)
    O += b * sob + h * soh
    tl.store(O + rows[:, None] * son + dims[None, :] * sod, acc.to(O.dtype.element_ty), mask=out_mask)
    tl.store(LSE + pid_bh.to(tl.int64) * N_Q + rows, m_i + tl.log2(l_i), mask=rows < N_Q)


@triton.jit
def _delta_kernel(O, DO, DELTA, sob, soh, son, sod, sdb, sdh, sdn, sdd, H, N_Q, HEAD_DIM,
                  BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """Delta = rowsum(o * do) in fp32 (o and do strided)."""
    pid_bh, pid_m = tl.program_id(0), tl.program_id(1)
    b, h = (pid_bh // H).to(tl.int64), (pid_bh % H).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    o = _tile(O + b * sob + h * soh, son, sod, rows, dims, N_Q, HEAD_DIM)
    do = _tile(DO + b * sdb + h * sdh, sdn, sdd, rows, dims, N_Q, HEAD_DIM)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + pid_bh.to(tl.int64) * N_Q + rows, delta, mask=rows < N_Q)


@triton.jit
def _dkdv_block(Q, K, V, DO, LSE, DELTA, DK, DV, qk_scale, scale,
                sqn, sqd, skn, skd, svn, svd, sdn, sdd, start_n, N_Q, N_KV, HEAD_DIM,
                BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                BLOCK_OWN: tl.constexpr, BLOCK_STEP: tl.constexpr):
    """dV = P^T dO and dK = scale * dS^T Q for the key rows [start_n, start_n + BLOCK_OWN),
    summed over every query block; the pointers are at this (batch, head)."""
    cols = start_n + tl.arange(0, BLOCK_OWN)   # the keys this program owns: rows of every product
    dims = tl.arange(0, BLOCK_D)
    k = _tile(K, skn, skd, cols, dims, N_KV, HEAD_DIM)   # (BLOCK_OWN, BLOCK_D)
    v = _tile(V, svn, svd, cols, dims, N_KV, HEAD_DIM)
    if UPCAST:
        k, v = k.to(tl.float32), v.to(tl.float32)
    dk = tl.zeros([BLOCK_OWN, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_OWN, BLOCK_D], tl.float32)
    for start in range(0, N_Q, BLOCK_STEP):
        rows = start + tl.arange(0, BLOCK_STEP)
        q_t = _tile(Q, sqd, sqn, dims, rows, HEAD_DIM, N_Q)    # (BLOCK_D, BLOCK_STEP)
        do_t = _tile(DO, sdd, sdn, dims, rows, HEAD_DIM, N_Q)
        q = _tile(Q, sqn, sqd, rows, dims, N_Q, HEAD_DIM)      # (BLOCK_STEP, BLOCK_D)
        do = _tile(DO, sdn, sdd, rows, dims, N_Q, HEAD_DIM)
        if UPCAST:
            q_t, do_t, q, do = q_t.to(tl.float32), do_t.to(tl.float32), q.to(tl.float32), do.to(tl.float32)
        # past N_Q: lse = +inf makes p exactly 0 (the scores there are 0, q being masked to 0),
        # and do = 0 makes ds 0; key rows past N_KV are never stored, so they need no mask
        row_ok = rows < N_Q
        lse = tl.load(LSE + rows, mask=row_ok, other=float("inf"))
        delta = tl.load(DELTA + rows, mask=row_ok, other=0.0)
        s_t = tl.dot(k, q_t, input_precision=PRECISION)                 # (BLOCK_OWN, BLOCK_STEP)
        p_t = tl.exp2(s_t * qk_scale - lse[None, :])
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
        dp_t = tl.dot(v, do_t, input_precision=PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)

    out_mask = (cols[:, None] < N_KV) & (dims[None, :] < HEAD_DIM)
    offsets = cols[:, None] * HEAD_DIM + dims[None, :]
    tl.store(DK + offsets, (dk * scale).to(DK.dtype.element_ty), mask=out_mask)
    tl.store(DV + offsets, dv.to(DV.dtype.element_ty), mask=out_mask)


@triton.jit
def _dq_block(Q, K, V, DO, LSE, DELTA, DQ, qk_scale, scale,
              sqn, sqd, skn, skd, svn, svd, sdn, sdd, start_m, N_Q, N_KV, HEAD_DIM,
              BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
              BLOCK_OWN: tl.constexpr, BLOCK_STEP: tl.constexpr):
    """dQ = scale * dS K for the query rows [start_m, start_m + BLOCK_OWN), summed over every
    key block; the pointers are at this (batch, head)."""
    rows = start_m + tl.arange(0, BLOCK_OWN)   # the queries this program owns
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < N_Q
    q = _tile(Q, sqn, sqd, rows, dims, N_Q, HEAD_DIM)    # (BLOCK_OWN, BLOCK_D)
    do = _tile(DO, sdn, sdd, rows, dims, N_Q, HEAD_DIM)
    if UPCAST:
        q, do = q.to(tl.float32), do.to(tl.float32)
    lse = tl.load(LSE + rows, mask=row_ok, other=float("inf"))   # p = 0 on rows past N_Q
    delta = tl.load(DELTA + rows, mask=row_ok, other=0.0)

    dq = tl.zeros([BLOCK_OWN, BLOCK_D], tl.float32)
    for start in range(0, N_KV, BLOCK_STEP):
        cols = start + tl.arange(0, BLOCK_STEP)
        k_t = _tile(K, skd, skn, dims, cols, HEAD_DIM, N_KV)   # (BLOCK_D, BLOCK_STEP)
        v_t = _tile(V, svd, svn, dims, cols, HEAD_DIM, N_KV)
        k = _tile(K, skn, skd, cols, dims, N_KV, HEAD_DIM)     # (BLOCK_STEP, BLOCK_D)
        if UPCAST:
            k_t, v_t, k = k_t.to(tl.float32), v_t.to(tl.float32), k.to(tl.float32)
        s = tl.dot(q, k_t, input_precision=PRECISION)           # (BLOCK_OWN, BLOCK_STEP)
        # keys past N_KV score 0, where exp2(-lse) may overflow: masked, so that 0 * inf never meets k's zeros
        p = tl.where(cols[None, :] < N_KV, tl.exp2(s * qk_scale - lse[:, None]), 0.0)
        dp = tl.dot(do, v_t, input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)

    out_mask = row_ok[:, None] & (dims[None, :] < HEAD_DIM)
    tl.store(DQ + rows[:, None] * HEAD_DIM + dims[None, :], (dq * scale).to(DQ.dtype.element_ty), mask=out_mask)


@autotune(_BACKWARD_CONFIGS, _INTERPRETER_BACKWARD_CONFIG, _KEY, _backward_footprint)
@triton.jit
def _backward_kernel(Q, K, V, DO, LSE, DELTA, DQ, DK, DV, qk_scale, scale,
                     sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdb, sdh, sdn, sdd,
                     H, N_Q, N_KV, HEAD_DIM,
                     BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                     BLOCK_OWN: tl.constexpr, BLOCK_STEP: tl.constexpr):
    """dQ, dK, dV in one launch (after the Delta pre-pass). Grid (B*H, key blocks + query
    blocks): a program owns one key block (dK, dV) or, past the key blocks, one query block (dQ).
    dQ, dK and dV are contiguous (B, H, N, D)."""
    pid_bh, pid = tl.program_id(0), tl.program_id(1)
    b, h = (pid_bh // H).to(tl.int64), (pid_bh % H).to(tl.int64)
    bh = pid_bh.to(tl.int64)
    Q += b * sqb + h * sqh
    K += b * skb + h * skh
    V += b * svb + h * svh
    DO += b * sdb + h * sdh
    LSE += bh * N_Q
    DELTA += bh * N_Q
    kv_blocks = tl.cdiv(N_KV, BLOCK_OWN)
    if pid < kv_blocks:
        _dkdv_block(Q, K, V, DO, LSE, DELTA, DK + bh * N_KV * HEAD_DIM, DV + bh * N_KV * HEAD_DIM, qk_scale, scale,
                    sqn, sqd, skn, skd, svn, svd, sdn, sdd, pid * BLOCK_OWN, N_Q, N_KV, HEAD_DIM,
                    BLOCK_D, UPCAST, PRECISION, BLOCK_OWN, BLOCK_STEP)
    else:
        _dq_block(Q, K, V, DO, LSE, DELTA, DQ + bh * N_Q * HEAD_DIM, qk_scale, scale,
                  sqn, sqd, skn, skd, svn, svd, sdn, sdd, (pid - kv_blocks) * BLOCK_OWN, N_Q, N_KV, HEAD_DIM,
                  BLOCK_D, UPCAST, PRECISION, BLOCK_OWN, BLOCK_STEP)


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _meta(q: torch.Tensor) -> dict:
    return dict(BLOCK_D=_block_d(q.shape[3]), UPCAST=upcast_dots(q.dtype), PRECISION=dot_precision(q.dtype))


# The kernels as torch custom ops (incubation::triton_attention and its backward): one node each
# in a torch.compile / torch.export graph, with fake kernels for shapes and register_autograd.
@torch.library.custom_op("incubation::triton_attention", mutates_args=())
def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse): out has shape (B, H, N, D) and (B, N, H, D) memory, so o.transpose(1, 2).reshape(B,
    N, H * D) is a view; lse (B, H, N) fp32 is the backward's."""
    B, H, n_q, D = q.shape
    n_kv = k.shape[2]
    o, lse = _forward_fake(q, k, v, scale)
    grid = lambda meta: (B * H, triton.cdiv(n_q, meta["BLOCK_M"]))  # noqa: E731
    with device_guard(q):
        _forward_kernel[grid](q, k, v, o, lse, scale * _LOG2E, *q.stride(), *k.stride(), *v.stride(), *o.stride(),
                              H, n_q, n_kv, D, **_meta(q))
    return o, lse


@_forward.register_fake
def _forward_fake(q, k, v, scale):
    B, H, n_q, D = q.shape
    o = torch.empty_strided((B, H, n_q, D), (n_q * H * D, D, H * D, 1), dtype=q.dtype, device=q.device)
    return o, torch.empty((B, H, n_q), dtype=torch.float32, device=q.device)


@torch.library.custom_op("incubation::triton_attention_backward", mutates_args=())
def _backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
              lse: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv), contiguous (B, H, N, D)."""
    B, H, n_q, D = q.shape
    n_kv = k.shape[2]
    meta = _meta(q)
    delta = torch.empty_like(lse)
    delta_rows = 64
    dq, dk, dv = _backward_fake(do, q, k, v, o, lse, scale)
    grid = lambda m: (B * H, triton.cdiv(n_kv, m["BLOCK_OWN"]) + triton.cdiv(n_q, m["BLOCK_OWN"]))  # noqa: E731
    with device_guard(q):
        _delta_kernel[(B * H, triton.cdiv(n_q, delta_rows))](
            o, do, delta, *o.stride(), *do.stride(), H, n_q, D, BLOCK_D=meta["BLOCK_D"], BLOCK_M=delta_rows)
        _backward_kernel[grid](q, k, v, do, lse, delta, dq, dk, dv, scale * _LOG2E, scale,
                               *q.stride(), *k.stride(), *v.stride(), *do.stride(), H, n_q, n_kv, D, **meta)
    return dq, dk, dv


@_backward.register_fake
def _backward_fake(do, q, k, v, o, lse, scale):
    return (torch.empty(q.shape, dtype=q.dtype, device=q.device), torch.empty(k.shape, dtype=k.dtype, device=k.device),
            torch.empty(v.shape, dtype=v.dtype, device=v.device))


def _setup_context(ctx, inputs, output):
    q, k, v, scale = inputs
    o, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.scale = scale


def _gradients(ctx, do, _dlse):
    q, k, v, o, lse = ctx.saved_tensors
    if double_backward.needed():   # differentiable eager math (create_graph=True)
        return (*double_backward.eager_grads(lambda q, k, v: _math_attention(q, k, v, ctx.scale), (q, k, v),
                                             ctx.needs_input_grad[:3], (do,)), None)
    return (*_backward(do, q, k, v, o, lse, ctx.scale), None)


_forward.register_autograd(_gradients, setup_context=_setup_context)


def _math_attention(q, k, v, scale):
    """softmax(q k^T * scale) v in eager ops, twice differentiable (SDPA's fused CPU / flash
    backward is not), in fp32 for fp16 / bf16 inputs."""
    dtype = q.dtype
    scores = (q.float() @ k.float().transpose(-2, -1)) * scale
    return (scores.softmax(-1) @ v.float()).to(dtype)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale) v for (B, H, N, D) tensors of any strides (validated by
    incubation.ops); the result has shape (B, H, N, D) and (B, N, H, D) memory (strides
    (N*H*D, D, H*D, 1)): its transpose(1, 2) is contiguous."""
    return _forward(q, k, v, scale)[0]


def check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> Optional[str]:
    reason = unsupported(q=q, k=k, v=v)
    if reason:
        return reason
    if min(q.numel(), k.numel()) == 0:
        return f"empty attention (q {tuple(q.shape)}, k {tuple(k.shape)})"
    if q.shape[3] > MAX_HEAD_DIM:
        return f"head dim {q.shape[3]} exceeds the Triton attention's limit of {MAX_HEAD_DIM}"
    if not (math.isfinite(scale) and scale > 0):   # the kernels take the row max of unscaled scores
        return f"scale {scale} is not a positive finite number"
    blocks = triton.cdiv(q.shape[2], 32) + triton.cdiv(k.shape[2], 32)   # the smallest tiles' grid
    if blocks > MAX_GRID_BLOCKS:
        return (f"sequence lengths {q.shape[2]} + {k.shape[2]} need {blocks} row blocks on one grid axis "
                f"(at most {MAX_GRID_BLOCKS})")
    return None
