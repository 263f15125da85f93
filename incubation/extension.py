"""The "cpp" (CPU tensors) and "cuda" (CUDA tensors) backends of `incubation.ops`, on the
compiled extension `incubation._C`.

The operators live in `torch.ops.incubation` (schemas in csrc/ops.cpp, kernels in csrc/cpu/
and csrc/cuda/; the dispatcher picks the kernel by device). This module gives them what
autograd and torch.compile need, through `torch.library`: fake (meta) kernels and autograd
formulas. `incubation.ops` declares these functions as its cpp and cuda backends (this module
never imports the dispatcher):

    layer_norm, add_layer_norm -> incubation::layer_norm_fwd / add_layer_norm_fwd
                                  (backward: incubation::layer_norm_bwd)
    linear                     -> the GEMM by F.linear, then incubation::linear_epilogue_fwd
                                  for bias + GELU / layer scale / residual
                                  (backward: incubation::linear_epilogue_bwd, fused dGELU)
    attention (CPU only)       -> incubation::attention_fwd, softmax(q k^T * scale) v one head
                                  and one query row at a time (backward: incubation::attention_bwd,
                                  from the saved log-sum-exp)
    check_*                    -> None when the kernels can serve a call, else why not

Importing this module raises ImportError when incubation._C is missing or cannot run on
this machine; `incubation.ops.backends()` reports the reason.
"""
from __future__ import annotations

import importlib
import platform
from typing import Optional

import torch
import torch.nn.functional as F

from . import double_backward

__all__ = ["DTYPES", "CUDA_MAX_FEATURES", "with_cuda", "layer_norm", "add_layer_norm", "linear", "attention",
           "check_layer_norm", "check_add_layer_norm", "check_linear", "check_attention"]

# dtypes the kernels are compiled for, per device type (float64 on CPU: exact reference tests)
DTYPES = {
    "cpu": (torch.float32, torch.float64, torch.bfloat16, torch.float16),
    "cuda": (torch.float32, torch.bfloat16, torch.float16),
}
# the CUDA LayerNorm backward keeps each warp's column sums (2 x features fp32) in 48 KiB
# of shared memory
CUDA_MAX_FEATURES = 6144


def _cpu_has_avx2() -> bool:
    probe = getattr(torch.cpu, "_is_avx2_supported", None)
    if probe is not None:
        return bool(probe())
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def _import_compiled():
    if platform.machine().lower() in ("x86_64", "amd64") and not _cpu_has_avx2():
        raise ImportError("incubation._C is compiled for x86-64 CPUs with AVX2 and this CPU has no AVX2")
    try:
        return importlib.import_module("incubation._C")
    except ImportError as exc:
        raise ImportError(f"the compiled extension incubation._C is not built or cannot be loaded ({exc}); "
                          "build it with `pip install --no-build-isolation -e .` (see setup.py)") from exc


_C = _import_compiled()
with_cuda: bool = bool(_C.with_cuda)
_lib = torch.ops.incubation


def _stats_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _optional_output(like: torch.Tensor, size: int, wanted: bool) -> torch.Tensor:
    return like.new_empty((size if wanted else 0,))


# --------------------------------------------------------------------------------------
# fake kernels: output shapes and dtypes, for FakeTensor / torch.compile
# --------------------------------------------------------------------------------------
@torch.library.register_fake("incubation::layer_norm_fwd")
def _layer_norm_fwd_fake(x, weight, bias, eps):
    stats = x.new_empty(x.shape[:-1], dtype=_stats_dtype(x))
    return x.new_empty(x.shape), stats, torch.empty_like(stats)


def _mixed(x: torch.Tensor, residual: Optional[torch.Tensor]) -> bool:
    """A float32 residual onto a bfloat16 / float16 x (autocast's residual stream and branch):
    the kernels take it and give float32 outputs, as eager's type promotion does."""
    return (residual is not None and residual.dtype == torch.float32
            and x.dtype in (torch.float16, torch.bfloat16))


@torch.library.register_fake("incubation::add_layer_norm_fwd")
def _add_layer_norm_fwd_fake(x, residual, weight, bias, eps):
    like = residual if _mixed(x, residual) else x
    stats = x.new_empty(x.shape[:-1], dtype=_stats_dtype(like))
    return like.new_empty(x.shape), like.new_empty(x.shape), stats, torch.empty_like(stats)


@torch.library.register_fake("incubation::layer_norm_bwd")
def _layer_norm_bwd_fake(grad_out, grad_input_extra, input, mean, rstd, weight, weight_grad, bias_grad):
    n = input.shape[-1]
    return (input.new_empty(input.shape), _optional_output(input, n, weight_grad),
            _optional_output(input, n, bias_grad))


@torch.library.register_fake("incubation::linear_epilogue_fwd")
def _linear_epilogue_fwd_fake(y, bias, layer_scale, residual, gelu):
    return (residual if _mixed(y, residual) else y).new_empty(y.shape)


@torch.library.register_fake("incubation::linear_epilogue_bwd")
def _linear_epilogue_bwd_fake(grad, y, bias, layer_scale, gelu, bias_grad, scale_grad):
    n = y.shape[-1]
    return y.new_empty(y.shape), _optional_output(y, n, bias_grad), _optional_output(y, n, scale_grad)


def _heads_last(like: torch.Tensor) -> torch.Tensor:
    """A tensor of like's (B, H, N, D) shape with (B, N, H, D) memory, as the attention kernels return."""
    b, h, n, d = like.shape
    return like.new_empty((b, n, h, d)).transpose(1, 2)


@torch.library.register_fake("incubation::attention_fwd")
def _attention_fwd_fake(q, k, v, scale):
    return _heads_last(q), q.new_empty(q.shape[:3], dtype=_stats_dtype(q))


@torch.library.register_fake("incubation::attention_bwd")
def _attention_bwd_fake(grad_out, q, k, v, out, lse, scale):
    return _heads_last(q), _heads_last(k), _heads_last(v)


# --------------------------------------------------------------------------------------
# autograd formulas
# --------------------------------------------------------------------------------------
def _layer_norm_grads(grad_out, grad_extra, input, mean, rstd, weight, need_weight, need_bias):
    """(d input, d weight, d bias) of LayerNorm(input); grad_extra reached `input` directly."""
    if grad_out is None:
        return grad_extra, None, None
    dx, dw, db = _lib.layer_norm_bwd(grad_out.contiguous(), None if grad_extra is None else grad_extra.contiguous(),
                                     input, mean, rstd, weight, need_weight, need_bias)
    return dx, (dw if need_weight else None), (db if need_bias else None)


def _eager_epilogue(y, bias, layer_scale, gelu):
    out = y if bias is None else y + bias
    out = F.gelu(out) if gelu else out
    return out if layer_scale is None else out * layer_scale


# With create_graph=True (double_backward.needed()) each backward below recomputes the op's
# eager math from the saved inputs, so that the gradients it returns are differentiable: the
# backward kernels are not, and their results would silently drop the second-order terms.
def _layer_norm_setup(ctx, inputs, output):
    x, weight, bias, eps = inputs
    _, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)
    ctx.eps = eps
    ctx.save_for_backward(x, mean, rstd, weight, bias)


def _layer_norm_backward(ctx, grad_out, _grad_mean, _grad_rstd):
    x, mean, rstd, weight, bias = ctx.saved_tensors
    need_x, need_weight, need_bias, _ = ctx.needs_input_grad
    if double_backward.needed():
        dx, dw, db = double_backward.layer_norm_grads(x, weight, bias, ctx.eps, (need_x, need_weight, need_bias),
                                                      grad_out)
    else:
        dx, dw, db = _layer_norm_grads(grad_out, None, x, mean, rstd, weight, need_weight, need_bias)
    return dx, dw, db, None


def _add_layer_norm_setup(ctx, inputs, output):
    x, residual, weight, bias, eps = inputs
    _, summed, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)
    ctx.eps = eps
    ctx.dtypes = (x.dtype, residual.dtype)   # summed's may be wider (a mixed residual)
    ctx.save_for_backward(summed, mean, rstd, weight, bias)


def _add_layer_norm_backward(ctx, grad_out, grad_summed, _grad_mean, _grad_rstd):
    summed, mean, rstd, weight, bias = ctx.saved_tensors
    need_x, need_residual, need_weight, need_bias, _ = ctx.needs_input_grad
    if double_backward.needed():
        d_sum, dw, db = double_backward.layer_norm_grads(
            summed, weight, bias, ctx.eps, (need_x or need_residual, need_weight, need_bias), grad_out, grad_summed)
    else:
        d_sum, dw, db = _layer_norm_grads(grad_out, grad_summed, summed, mean, rstd, weight, need_weight,
                                          need_bias)
    # summed = x + residual: both get d_sum, each in its own dtype
    d_x, d_residual = (None, None) if d_sum is None else (d_sum.to(ctx.dtypes[0]), d_sum.to(ctx.dtypes[1]))
    return d_x, d_residual, dw, db, None


def _linear_epilogue_setup(ctx, inputs, output):
    y, bias, layer_scale, _, gelu = inputs
    ctx.gelu = gelu
    ctx.y_dtype = y.dtype   # grad has the output's dtype: the residual's when it is a mixed one
    ctx.fused_backward = gelu or layer_scale is not None   # else d y = grad
    ctx.save_for_backward(y if ctx.fused_backward else None, bias, layer_scale)


def _linear_epilogue_backward(ctx, grad):
    y, bias, layer_scale = ctx.saved_tensors
    need_y, need_bias, need_scale, need_residual, _ = ctx.needs_input_grad
    residual_grad = grad
    grad = grad.to(ctx.y_dtype).contiguous()   # as eager's residual + out casts out's gradient
    if ctx.fused_backward and double_backward.needed():
        dy, dbias, dscale = double_backward.eager_grads(
            lambda y, b, s: _eager_epilogue(y, b, s, ctx.gelu), (y, bias, layer_scale),
            (need_y, need_bias, need_scale), (grad,))
    elif ctx.fused_backward:
        dy, dbias, dscale = _lib.linear_epilogue_bwd(grad, y, bias, layer_scale, ctx.gelu, need_bias, need_scale)
    else:   # linear in grad: these torch ops are differentiable as they stand
        dy, dscale = grad, None
        dbias = grad.reshape(-1, grad.shape[-1]).sum(0) if need_bias else None
    return (dy if need_y else None, dbias if need_bias else None, dscale if need_scale else None,
            residual_grad if need_residual else None, None)


def _attention_setup(ctx, inputs, output):
    q, k, v, scale = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)
    ctx.scale = scale
    ctx.save_for_backward(q, k, v, out, lse)


def _attention_backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    if grad_out is None:
        return None, None, None, None
    if double_backward.needed():
        # (the math itself: SDPA's CPU kernel has no second derivative)
        dq, dk, dv = double_backward.eager_grads(
            lambda q, k, v: torch.softmax((q * ctx.scale) @ k.transpose(-2, -1), -1) @ v, (q, k, v),
            ctx.needs_input_grad[:3], (grad_out,))
    else:
        dq, dk, dv = _lib.attention_bwd(_rows_contiguous(grad_out), q, k, v, out, lse, ctx.scale)
    return dq, dk, dv, None


torch.library.register_autograd("incubation::layer_norm_fwd", _layer_norm_backward,
                                setup_context=_layer_norm_setup)
torch.library.register_autograd("incubation::add_layer_norm_fwd", _add_layer_norm_backward,
                                setup_context=_add_layer_norm_setup)
torch.library.register_autograd("incubation::linear_epilogue_fwd", _linear_epilogue_backward,
                                setup_context=_linear_epilogue_setup)
torch.library.register_autograd("incubation::attention_fwd", _attention_backward, setup_context=_attention_setup)


# --------------------------------------------------------------------------------------
# incubation.ops backends
# --------------------------------------------------------------------------------------
def _prepared(t: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """An optional parameter in the kernels' dtype, contiguous (differentiable casts)."""
    return None if t is None else t.to(dtype).contiguous()


def layer_norm(x, weight, bias, eps):
    return _lib.layer_norm_fwd(x.contiguous(), _prepared(weight, x.dtype), _prepared(bias, x.dtype), eps)[0]


def add_layer_norm(x, residual, weight, bias, eps):
    if residual is None:
        return layer_norm(x, weight, bias, eps), x
    if _mixed(residual, x):   # x + residual commutes: the kernels take the float32 one as residual
        x, residual = residual, x
    dtype = residual.dtype if _mixed(x, residual) else x.dtype   # the outputs', as eager's promotion
    out, summed, _, _ = _lib.add_layer_norm_fwd(x.contiguous(), residual.contiguous(), _prepared(weight, dtype),
                                                _prepared(bias, dtype), eps)
    return out, summed


def linear(x, weight, bias, activation, layer_scale, residual):
    gelu = activation == "gelu"
    if not gelu and layer_scale is None and residual is None:
        return F.linear(x, weight, bias)   # nothing to fuse beyond the GEMM's own bias add
    y = F.linear(x, weight).contiguous()
    return _lib.linear_epilogue_fwd(y, _prepared(bias, y.dtype), _prepared(layer_scale, y.dtype),
                                    None if residual is None else residual.contiguous(), gelu)


def _rows_contiguous(t: torch.Tensor) -> torch.Tensor:
    """t, or a contiguous copy where its last dimension is strided (the attention kernels read
    rows of D contiguous values through the other strides)."""
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def attention(q, k, v, scale):
    return _lib.attention_fwd(_rows_contiguous(q), _rows_contiguous(k), _rows_contiguous(v), scale)[0]


def _unsupported(x: torch.Tensor, residual: Optional[torch.Tensor], features: int,
                 norm: bool = False) -> Optional[str]:
    """Why the kernels cannot take x (and residual), or None."""
    allowed = DTYPES.get(x.device.type, ())
    if x.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed) or "none"
        return f"dtype {x.dtype} is not supported on {x.device.type} (supported: {names})"
    if residual is not None and residual.dtype != x.dtype and not _mixed(x, residual):
        return (f"residual dtype {residual.dtype} differs from x dtype {x.dtype} (the kernels take a float32 "
                "residual onto a bfloat16 / float16 x, or the same dtype)")
    if features == 0:
        return "the feature dimension is empty"
    if norm and x.device.type == "cuda" and features > CUDA_MAX_FEATURES:
        return f"{features} features exceed the CUDA LayerNorm kernels' limit of {CUDA_MAX_FEATURES}"
    return None


def check_layer_norm(x, weight, bias, eps):
    return _unsupported(x, None, x.shape[-1], norm=True)


def check_add_layer_norm(x, residual, weight, bias, eps):
    if residual is not None and _mixed(residual, x):   # served swapped (x + residual commutes)
        x, residual = residual, x
    return _unsupported(x, residual, x.shape[-1], norm=True)


def check_linear(x, weight, bias, activation, layer_scale, residual):
    return _unsupported(x, residual, weight.shape[0])


def check_attention(q, k, v, scale):
    if not q.is_cpu:
        return "the attention kernel runs on the CPU only (Triton serves CUDA tensors)"
    if k.shape[2] == 0:
        return "there are no keys (k and v have N = 0)"
    return _unsupported(q, None, q.shape[-1])
