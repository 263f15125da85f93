"""Non-causal attention softmax(q k^T * scale) v, FlashAttention-2 style.

Forward: one program per (query block, batch*head) streams over key blocks with an online
softmax in fp32 and saves the log-sum-exp (base 2) of every row. Backward: a preprocess
computes Delta = rowsum(o * do); one kernel per key block accumulates dK and dV over all
query blocks, another per query block accumulates dQ (no atomics, deterministic).

Any sequence length: ragged tails are masked (q and k/v lengths may differ). Head dims up to
128 are padded to a power of two (at least 16, tl.dot's minimum) inside the kernels and masked.
q, k, v, and the incoming gradient are read through their strides, so the views a qkv
reshape/permute produces are used without copies; o and the gradients are written contiguous.
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
from . import autotune, device_guard, dot_precision, fma_dots, unsupported, upcast_dots
from . import tile_registers as _regs

MAX_HEAD_DIM = 128
_LOG2E = 1.4426950408889634

# Short ViT sequences (N = 50..257) waste much of a 128-row tile, so smaller tiles are offered
# too; the autotuner picks per (sequence lengths, head dim, dtype) among those the footprints
# below let through (benchmarks/compile_check.py shows what each compiles to on sm_90).
_FORWARD_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bm, bn, w, s in [(128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3),
                         (32, 32, 4, 2), (128, 128, 8, 2)]
]
_BACKWARD_CONFIGS = [  # dK/dV accumulate BLOCK_N rows, dQ BLOCK_M rows: smaller tiles than forward
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bm, bn, w, s in [(32, 64, 4, 2), (64, 64, 8, 2), (32, 128, 8, 2), (16, 64, 4, 2),
                         (32, 32, 4, 2), (64, 32, 4, 2), (16, 128, 8, 2)]
]
_INTERPRETER_CONFIG = triton.Config({"BLOCK_M": 32, "BLOCK_N": 32})
# Every constexpr that changes the kernel is in the key. Sequence lengths stay exact: they do not
# vary with the batch (B x H is only the grid), and the tile that wastes least depends on them.
_KEY = ["N_Q", "N_KV", "HEAD_DIM", "BLOCK_D", "UPCAST", "PRECISION"]


# Footprints for the prune (see incubation.kernels.autotune): shared memory holds the dot operand
# tiles, those loaded in the loop once per pipeline stage, plus the probabilities cast for the
# next dot; registers hold the fp32 accumulators and score tiles (and, for FMA dots, the operands).
def _forward_footprint(config, meta, elt):
    M, N, D = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], meta["BLOCK_D"]
    w, s = config.num_warps, config.num_stages
    smem = elt * (M * D + s * 2 * N * D + M * N)                            # q; k, v per stage; p
    regs = _regs(M, D, w) + 2 * _regs(M, N, w) + _regs(M, N, w, elt)      # acc; s, p; p cast
    if fma_dots(meta, elt):
        regs += _regs(M, D, w) + _regs(D, N, w) + _regs(N, D, w)           # q, k, v
    return smem, regs


def _dkdv_footprint(config, meta, elt):
    M, N, D = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], meta["BLOCK_D"]
    w, s = config.num_warps, config.num_stages
    smem = elt * (2 * N * D + s * 2 * M * D + 2 * M * N)                    # k, v; q, do per stage; p, ds
    regs = 2 * _regs(N, D, w) + 4 * _regs(M, N, w) + 2 * _regs(N, M, w, elt)  # dk, dv; s, p, dp, ds; casts
    if fma_dots(meta, elt):
        regs += 2 * _regs(M, D, w) + 2 * _regs(D, N, w)                    # q, do, k, v
    return smem, regs


def _dq_footprint(config, meta, elt):
    M, N, D = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], meta["BLOCK_D"]
    w, s = config.num_warps, config.num_stages
    smem = elt * (2 * M * D + s * 2 * N * D + M * N)                        # q, do; k, v per stage; ds
    regs = _regs(M, D, w) + 4 * _regs(M, N, w) + _regs(M, N, w, elt)      # dq; s, p, dp, ds; ds cast
    if fma_dots(meta, elt):
        regs += 2 * _regs(M, D, w) + 2 * _regs(N, D, w)                    # q, do, k, v
    return smem, regs


@triton.jit
def _tile(ptr, stride_row, stride_col, rows, cols, n_rows, n_cols):
    """Load a 2-D tile, zeros outside [0, n_rows) x [0, n_cols)."""
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    return tl.load(ptr + rows[:, None] * stride_row + cols[None, :] * stride_col, mask=mask, other=0.0)


@autotune(_FORWARD_CONFIGS, _INTERPRETER_CONFIG, _KEY, _forward_footprint)
@triton.jit
def _forward_kernel(Q, K, V, O, LSE, qk_scale,
                    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
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

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max of the scaled scores (base 2)
    l_i = tl.zeros([BLOCK_M], tl.float32)                # running sum of exp2(score - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, N_KV, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        k_t = _tile(K, skd, skn, dims, cols, HEAD_DIM, N_KV)  # (BLOCK_D, BLOCK_N): k transposed
        v = _tile(V, svn, svd, cols, dims, N_KV, HEAD_DIM)
        if UPCAST:
            k_t, v = k_t.to(tl.float32), v.to(tl.float32)
        s = tl.dot(q, k_t, input_precision=PRECISION) * qk_scale
        s = tl.where(cols[None, :] < N_KV, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))   # finite: every key block has a valid column
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    acc = acc / l_i[:, None]
    out_mask = (rows[:, None] < N_Q) & (dims[None, :] < HEAD_DIM)
    O += pid_bh.to(tl.int64) * N_Q * HEAD_DIM
    tl.store(O + rows[:, None] * HEAD_DIM + dims[None, :], acc.to(O.dtype.element_ty), mask=out_mask)
    tl.store(LSE + pid_bh.to(tl.int64) * N_Q + rows, m_i + tl.log2(l_i), mask=rows < N_Q)


@triton.jit
def _delta_kernel(O, DO, DELTA, sdb, sdh, sdn, sdd, H, N_Q, HEAD_DIM,
                  BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """Delta = rowsum(o * do) in fp32 (o contiguous, do strided)."""
    pid_bh, pid_m = tl.program_id(0), tl.program_id(1)
    b, h = (pid_bh // H).to(tl.int64), (pid_bh % H).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    o = _tile(O + pid_bh.to(tl.int64) * N_Q * HEAD_DIM, HEAD_DIM, 1, rows, dims, N_Q, HEAD_DIM)
    do = _tile(DO + b * sdb + h * sdh, sdn, sdd, rows, dims, N_Q, HEAD_DIM)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + pid_bh.to(tl.int64) * N_Q + rows, delta, mask=rows < N_Q)


@autotune(_BACKWARD_CONFIGS, _INTERPRETER_CONFIG, _KEY, _dkdv_footprint)
@triton.jit
def _dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, qk_scale, scale,
                 sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdb, sdh, sdn, sdd,
                 H, N_Q, N_KV, HEAD_DIM,
                 BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
                 PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dV = P^T dO and dK = scale * dS^T Q for one key block, summed over every query block."""
    pid_bh, pid_n = tl.program_id(0), tl.program_id(1)
    b, h = (pid_bh // H).to(tl.int64), (pid_bh % H).to(tl.int64)
    Q += b * sqb + h * sqh
    DO += b * sdb + h * sdh
    LSE += pid_bh.to(tl.int64) * N_Q
    DELTA += pid_bh.to(tl.int64) * N_Q
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    k_t = _tile(K + b * skb + h * skh, skd, skn, dims, cols, HEAD_DIM, N_KV)  # (BLOCK_D, BLOCK_N)
    v_t = _tile(V + b * svb + h * svh, svd, svn, dims, cols, HEAD_DIM, N_KV)
    if UPCAST:
        k_t, v_t = k_t.to(tl.float32), v_t.to(tl.float32)

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start in range(0, N_Q, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        q = _tile(Q, sqn, sqd, rows, dims, N_Q, HEAD_DIM)
        do = _tile(DO, sdn, sdd, rows, dims, N_Q, HEAD_DIM)
        if UPCAST:
            q, do = q.to(tl.float32), do.to(tl.float32)
        row_ok = rows < N_Q
        lse = tl.load(LSE + rows, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + rows, mask=row_ok, other=0.0)
        s = tl.dot(q, k_t, input_precision=PRECISION) * qk_scale
        p = tl.exp2(s - lse[:, None])
        p = tl.where(row_ok[:, None] & (cols[None, :] < N_KV), p, 0.0)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
        dp = tl.dot(do, v_t, input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)

    out_mask = (cols[:, None] < N_KV) & (dims[None, :] < HEAD_DIM)
    offsets = pid_bh.to(tl.int64) * N_KV * HEAD_DIM + cols[:, None] * HEAD_DIM + dims[None, :]
    tl.store(DK + offsets, (dk * scale).to(DK.dtype.element_ty), mask=out_mask)
    tl.store(DV + offsets, dv.to(DV.dtype.element_ty), mask=out_mask)


@autotune(_BACKWARD_CONFIGS, _INTERPRETER_CONFIG, _KEY, _dq_footprint)
@triton.jit
def _dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, qk_scale, scale,
               sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdb, sdh, sdn, sdd,
               H, N_Q, N_KV, HEAD_DIM,
               BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
               PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dQ = scale * dS K for one query block, summed over every key block."""
    pid_bh, pid_m = tl.program_id(0), tl.program_id(1)
    b, h = (pid_bh // H).to(tl.int64), (pid_bh % H).to(tl.int64)
    K += b * skb + h * skh
    V += b * svb + h * svh
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < N_Q
    q = _tile(Q + b * sqb + h * sqh, sqn, sqd, rows, dims, N_Q, HEAD_DIM)
    do = _tile(DO + b * sdb + h * sdh, sdn, sdd, rows, dims, N_Q, HEAD_DIM)
    if UPCAST:
        q, do = q.to(tl.float32), do.to(tl.float32)
    lse = tl.load(LSE + pid_bh.to(tl.int64) * N_Q + rows, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + pid_bh.to(tl.int64) * N_Q + rows, mask=row_ok, other=0.0)

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, N_KV, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        k = _tile(K, skn, skd, cols, dims, N_KV, HEAD_DIM)
        v_t = _tile(V, svd, svn, dims, cols, HEAD_DIM, N_KV)
        if UPCAST:
            k, v_t = k.to(tl.float32), v_t.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        p = tl.exp2(s - lse[:, None])
        p = tl.where(row_ok[:, None] & (cols[None, :] < N_KV), p, 0.0)
        dp = tl.dot(do, v_t, input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)

    out_mask = row_ok[:, None] & (dims[None, :] < HEAD_DIM)
    offsets = pid_bh.to(tl.int64) * N_Q * HEAD_DIM + rows[:, None] * HEAD_DIM + dims[None, :]
    tl.store(DQ + offsets, (dq * scale).to(DQ.dtype.element_ty), mask=out_mask)


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _meta(q: torch.Tensor) -> dict:
    return dict(BLOCK_D=_block_d(q.shape[3]), UPCAST=upcast_dots(q.dtype), PRECISION=dot_precision(q.dtype))


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale):
        B, H, n_q, D = q.shape
        n_kv = k.shape[2]
        o = torch.empty((B, H, n_q, D), dtype=q.dtype, device=q.device)
        lse = torch.empty((B, H, n_q), dtype=torch.float32, device=q.device)
        qk_scale = scale * _LOG2E
        grid = lambda meta: (B * H, triton.cdiv(n_q, meta["BLOCK_M"]))  # noqa: E731
        with device_guard(q):
            _forward_kernel[grid](q, k, v, o, lse, qk_scale, *q.stride(), *k.stride(), *v.stride(),
                                  H, n_q, n_kv, D, **_meta(q))
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.scale = scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        if double_backward.needed():
            return (*double_backward.eager_grads(lambda q, k, v: _math_attention(q, k, v, ctx.scale), (q, k, v),
                                                 ctx.needs_input_grad[:3], (do,)), None)
        B, H, n_q, D = q.shape
        n_kv = k.shape[2]
        meta = _meta(q)
        delta = torch.empty_like(lse)
        delta_rows = 64
        dq = torch.empty((B, H, n_q, D), dtype=q.dtype, device=q.device)
        dk = torch.empty((B, H, n_kv, D), dtype=k.dtype, device=k.device)
        dv = torch.empty_like(dk)
        strides = (*q.stride(), *k.stride(), *v.stride(), *do.stride())
        qk_scale = ctx.scale * _LOG2E
        with device_guard(q):
            _delta_kernel[(B * H, triton.cdiv(n_q, delta_rows))](
                o, do, delta, *do.stride(), H, n_q, D, BLOCK_D=meta["BLOCK_D"], BLOCK_M=delta_rows)
            _dkdv_kernel[lambda m: (B * H, triton.cdiv(n_kv, m["BLOCK_N"]))](
                q, k, v, do, lse, delta, dk, dv, qk_scale, ctx.scale, *strides, H, n_q, n_kv, D, **meta)
            _dq_kernel[lambda m: (B * H, triton.cdiv(n_q, m["BLOCK_M"]))](
                q, k, v, do, lse, delta, dq, qk_scale, ctx.scale, *strides, H, n_q, n_kv, D, **meta)
        return dq, dk, dv, None


def _math_attention(q, k, v, scale):
    """softmax(q k^T * scale) v in eager ops, twice differentiable (SDPA's fused CPU / flash
    backward is not), in fp32 for fp16 / bf16 inputs."""
    dtype = q.dtype
    scores = (q.float() @ k.float().transpose(-2, -1)) * scale
    return (scores.softmax(-1) @ v.float()).to(dtype)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale) v for (B, H, N, D) tensors (validated by incubation.ops)."""
    return _Attention.apply(q, k, v, scale)


def check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> Optional[str]:
    reason = unsupported(q=q, k=k, v=v)
    if reason:
        return reason
    if min(q.numel(), k.numel()) == 0:
        return f"empty attention (q {tuple(q.shape)}, k {tuple(k.shape)})"
    if q.shape[3] > MAX_HEAD_DIM:
        return f"head dim {q.shape[3]} exceeds the Triton attention's limit of {MAX_HEAD_DIM}"
    if not math.isfinite(scale):
        return f"scale {scale} is not finite"
    return None
