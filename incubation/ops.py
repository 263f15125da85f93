"""The public fused ops of the ViT block and the meta model, and their eager reference.

Public ops (all differentiable):

    attention(q, k, v, scale=None)                       -> (B, H, N, D) ((B, N, H, D) memory on Triton, cpp)
    layer_norm(x, weight, bias, eps=1e-6)                -> normed
    add_layer_norm(x, residual, weight, bias, eps=1e-6)  -> (normed, summed)
    linear(x, weight, bias=None, activation=None, *, layer_scale=None, residual=None)
        -> residual + layer_scale * activation(x @ weight.T + bias)

Each call is validated here (errors name the argument), then `incubation.dispatch` picks the
backend that serves it: triton / cuda (CUDA tensors), cpp (CPU tensors) or eager. In `auto`
mode the choice is measured per call signature, eager included, and a fused kernel serves
only where it is faster; `INCUBATION_BACKEND=eager|triton|cuda|cpp|auto` or
`use_backend(name)` forces one. `backends()` / `format_backends()` report every choice, its
timings and every refusal; `tune(model, inputs)` measures a model's calls ahead of training.

The eager backend is the reference: exactly timm's math (exact erf GELU, SDPA attention).
"""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
import torch.nn.functional as F

from . import dispatch
from .dispatch import BACKENDS, DISPATCH, BackendError, Op

try:
    from . import extension  # the cpp (CPU) and cuda backends: incubation._C
except ImportError as exc:
    extension = None
    for _backend in ("cpp", "cuda"):
        DISPATCH.unavailable[_backend] = f"compiled extension incubation._C unavailable (ImportError: {exc})"
else:
    if not extension.with_cuda:
        DISPATCH.unavailable["cuda"] = ("incubation._C was built without its CUDA kernels (no nvcc or CUDA torch "
                                        "at build time, or INCUBATION_SKIP_CUDA_BUILD=1)")
try:   # the triton backend
    from .kernels import attention as triton_attention
    from .kernels import linear as triton_linear
    from .kernels import norm as triton_norm
    from .kernels import usage as triton_usage
except Exception as exc:  # noqa: BLE001 - any import failure means "not available"
    triton_attention = triton_linear = triton_norm = triton_usage = None
    DISPATCH.unavailable["triton"] = f"Triton kernels unavailable ({type(exc).__name__}: {exc})"

__all__ = [
    "attention", "layer_norm", "add_layer_norm", "linear",
    "backends", "format_backends", "implements", "use_backend", "current_backend", "register", "BackendError",
    "tune", "share_decisions", "OPS", "BACKENDS", "DISPATCH",
]

# the dispatcher's entry points (one object owns the state: incubation.dispatch.DISPATCH)
backends, format_backends, implements = DISPATCH.backends, DISPATCH.format_backends, DISPATCH.implements
use_backend, current_backend, register = DISPATCH.use_backend, DISPATCH.current_backend, DISPATCH.register
tune, share_decisions = DISPATCH.tune, DISPATCH.share_decisions
cache_path = dispatch.cache_path

ACTIVATIONS = (None, "gelu")


# --------------------------------------------------------------------------------------
# input validation (clear errors naming the argument)
# --------------------------------------------------------------------------------------
def _tensor(name: str, t, *, ndim: Optional[int] = None, min_ndim: int = 0) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if ndim is not None and t.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if t.ndim < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimension(s), got shape {tuple(t.shape)}")
    return t


def _same_device(ref_name: str, ref: torch.Tensor, **others) -> torch.device:
    """The device of every tensor given (None: absent), or ValueError naming the odd one."""
    device = ref.device   # (each .device builds a torch.device: read it once)
    for name, t in others.items():
        if t is not None and t.device != device:
            raise ValueError(f"{name} is on {t.device} but {ref_name} is on {device}")
    return device


def _vector(name: str, t, size: int, what: str) -> None:
    if t is None:
        return
    _tensor(name, t, ndim=1)
    if t.shape[0] != size:
        raise ValueError(f"{name} must have shape ({size},) to match {what}, got {tuple(t.shape)}")


def _positive(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, numbers.Real) and 0 < value < math.inf


def _eps(eps) -> float:
    if not _positive(eps):
        raise ValueError(f"eps must be a positive finite number, got {eps!r}")
    return float(eps)


# --------------------------------------------------------------------------------------
# eager backend: the reference (timm's math)
# --------------------------------------------------------------------------------------
def _overlapping(t: torch.Tensor) -> bool:
    """Whether two elements of t may share memory (e.g. an as_strided view): each stride, in
    increasing order, must reach past every element the smaller ones span."""
    if t.is_contiguous():
        return False
    span, strides, sizes = 0, t.stride(), t.shape
    for d in sorted(range(t.ndim), key=strides.__getitem__):   # dims by stride (int keys: dynamo traces it)
        if sizes[d] > 1:
            if strides[d] <= span:
                return True
            span += (sizes[d] - 1) * strides[d]
    return False


def _eager_attention(q, k, v, scale):
    # SDPA on CPU reads overlapping q / k / v wrongly: they get their own memory
    q, k, v = (t.contiguous() if _overlapping(t) else t for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, scale=scale)
    # SDPA's CPU kernel returns 0 for a query row holding NaN or inf: such a row must be NaN. The
    # fix-up (exactly 0 for a finite row) costs ~10 % of the attention with its backward, so it runs
    # only when q holds a non-finite value (one read of q), or unconditionally in a compiled graph.
    if q.is_cpu and (torch.compiler.is_compiling() or not math.isfinite(q.detach().sum().item())):
        out = out + (q * 0).sum(-1, keepdim=True)
    return out


# the device types autocast knows, read once: torch.is_autocast_enabled raises for the others
# (meta), and torch 2.11's dynamo cannot trace torch.amp.is_autocast_available (a graph break)
_AUTOCAST_DEVICES = frozenset(d for d in ("cpu", "cuda", "xpu", "mps", "hpu") if torch.amp.is_autocast_available(d))


def _autocast_on(t: torch.Tensor) -> bool:
    """torch.is_autocast_enabled for t's device type, whatever it is."""
    # (t.device.type builds a string, 0.3 us a call: is_cuda / is_cpu answer the common two)
    device_type = "cuda" if t.is_cuda else "cpu" if t.is_cpu else t.device.type
    return device_type in _AUTOCAST_DEVICES and torch.is_autocast_enabled(device_type)


def _without_autocast(device_type: str):
    return torch.autocast(device_type, enabled=False)


def _eager_layer_norm(x, weight, bias, eps):
    # (.to only where the dtype differs: each call of it costs a dispatch even when it returns self)
    w = weight if weight is None or weight.dtype == x.dtype else weight.to(x.dtype)
    b = bias if bias is None or bias.dtype == x.dtype else bias.to(x.dtype)
    if _autocast_on(x):   # autocast would return fp32: keep x's dtype
        with _without_autocast(x.device.type):
            return F.layer_norm(x, (x.shape[-1],), w, b, eps)
    return F.layer_norm(x, (x.shape[-1],), w, b, eps)


def _eager_add_layer_norm(x, residual, weight, bias, eps):
    summed = x if residual is None else x + residual
    return _eager_layer_norm(summed, weight, bias, eps), summed


def _eager_linear(x, weight, bias, activation, layer_scale, residual):
    out = F.linear(x, weight, bias)
    if activation == "gelu":
        out = F.gelu(out)
    if layer_scale is not None:
        out = out * layer_scale
    if residual is not None:
        out = residual + out
    return out


# --------------------------------------------------------------------------------------
# public ops. Each has its validation (`_*_call`: errors naming the argument, else the device,
# the backends' arguments and the call's facts, each read once: what the dispatcher's memo is
# keyed by), its signature for the decisions (`rows`, `key`), its backends, its public function.
# --------------------------------------------------------------------------------------

def _attention_call(q, k, v, scale):
    for name, t in (("q", q), ("k", k), ("v", v)):
        _tensor(name, t, ndim=4)
    q_shape, k_shape, dtype = q.shape, k.shape, q.dtype
    if k_shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k_shape)} and {tuple(v.shape)}")
    if q_shape[:2] != k_shape[:2] or q_shape[3] != k_shape[3]:
        raise ValueError(f"q {tuple(q_shape)} and k {tuple(k_shape)} must agree in batch, heads "
                         "and head dim (shapes are (B, H, N, D))")
    if not (dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {dtype}, {k.dtype}, {v.dtype}")
    device = _same_device("q", q, k=k, v=v)
    if q_shape[3] == 0:   # empty batches, heads or sequences are fine; an empty head is a mistake
        raise ValueError(f"q, k and v have head dim 0 (shapes {tuple(q_shape)}, {tuple(k_shape)}, "
                         "(B, H, N, D)): attention needs D >= 1")
    if scale is None:   # SDPA's default bit for bit (timm calls SDPA): D ** -0.5 is 1 ulp off at D=32
        scale = 1.0 / math.sqrt(q_shape[3])
    elif not _positive(scale):
        raise ValueError(f"scale must be a positive finite number or None, got {scale!r}")
    return device, (q, k, v, float(scale)), (dtype, q_shape, k_shape)


ATTENTION = DISPATCH.add(Op(
    "attention", _eager_attention, validate=_attention_call,
    rows=lambda q, k, v, scale: q.shape[0] * q.shape[1],
    key=lambda q, k, v, scale: (q.dtype, q.shape[2], k.shape[2], q.shape[3]), fields=("n", "nk", "d"),
    rows_field="bh", impls={"triton": triton_attention and (triton_attention.attention, triton_attention.check),
                            "cpp": extension and (extension.attention, extension.check_attention)}))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float] = None) -> torch.Tensor:
    """softmax(q @ k^T * scale) @ v for (B, H, N, D) tensors; scale defaults to 1 / sqrt(D).

    Layouts: q, k, v may have any strides. The Triton and cpp backends read them through their
    strides, so the views the ViT takes of its qkv projection (qkv.reshape(B, N, 3, H, D).permute(
    2, 0, 3, 1, 4)) are read without copies, as are transposed or expanded (stride 0) ones (cpp
    copies a last dimension whose stride is not 1); eager accepts them too. The result has shape
    (B, H, N, D) on every backend; its memory layout is the backend's: Triton and cpp return
    (B, N, H, D) memory, strides (N*H*D, D, H*D, 1), so that
    `out.transpose(1, 2).reshape(B, N, H * D)` (the heads merged for the output projection) is a
    view, not a copy; eager (SDPA) returns what SDPA returns. Code must rely on the shape and
    values only, never on out.is_contiguous(). The gradient arriving in the backward may have
    any strides."""
    device, args, call = _attention_call(q, k, v, scale)
    return DISPATCH.select(ATTENTION, device, args, call)(*args)


def _rows(x, *_) -> int:
    """The rows of a (..., features) input: the size that varies with the batch."""
    return x.numel() // max(x.shape[-1], 1)


def _dtype(t: Optional[torch.Tensor]) -> Optional[torch.dtype]:
    return None if t is None else t.dtype


def _layer_norm_call(x, weight, bias, eps):
    _tensor("x", x, min_ndim=1)
    shape = x.shape
    _vector("weight", weight, shape[-1], "x's last dimension")
    _vector("bias", bias, shape[-1], "x's last dimension")
    device = _same_device("x", x, weight=weight, bias=bias)
    return device, (x, weight, bias, _eps(eps)), (x.dtype, shape, _dtype(weight), _dtype(bias))


LAYER_NORM = DISPATCH.add(Op(
    "layer_norm", _eager_layer_norm, validate=_layer_norm_call, rows=_rows,
    key=lambda x, weight, bias, eps: (x.dtype, x.shape[-1], _dtype(weight), _dtype(bias)), fields=("c", "w", "b"),
    impls={"triton": triton_norm and (triton_norm.layer_norm, triton_norm.check_layer_norm),
           "cpp": extension and (extension.layer_norm, extension.check_layer_norm),
           "cuda": extension and (extension.layer_norm, extension.check_layer_norm)}))


def layer_norm(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
               eps: float = 1e-6) -> torch.Tensor:
    """LayerNorm over the last dimension; the output has x's dtype (statistics in fp32)."""
    device, args, call = _layer_norm_call(x, weight, bias, eps)
    return DISPATCH.select(LAYER_NORM, device, args, call)(*args)


def _add_layer_norm_call(x, residual, weight, bias, eps):
    _tensor("x", x, min_ndim=1)
    shape = x.shape
    if residual is not None:
        _tensor("residual", residual)
        if residual.shape != shape:
            raise ValueError(f"residual must have x's shape {tuple(shape)}, got {tuple(residual.shape)}")
    _vector("weight", weight, shape[-1], "x's last dimension")
    _vector("bias", bias, shape[-1], "x's last dimension")
    device = _same_device("x", x, residual=residual, weight=weight, bias=bias)
    return (device, (x, residual, weight, bias, _eps(eps)),
            (x.dtype, shape, _dtype(weight), _dtype(bias), _dtype(residual)))


ADD_LAYER_NORM = DISPATCH.add(Op(
    "add_layer_norm", _eager_add_layer_norm, validate=_add_layer_norm_call, rows=_rows,
    key=lambda x, residual, weight, bias, eps: (x.dtype, x.shape[-1], _dtype(weight), _dtype(bias), _dtype(residual)),
    fields=("c", "w", "b", "res"),
    impls={"triton": triton_norm and (triton_norm.add_layer_norm, triton_norm.check_add_layer_norm),
           "cpp": extension and (extension.add_layer_norm, extension.check_add_layer_norm),
           "cuda": extension and (extension.add_layer_norm, extension.check_add_layer_norm)}))


def add_layer_norm(x: torch.Tensor, residual: Optional[torch.Tensor], weight: Optional[torch.Tensor],
                   bias: Optional[torch.Tensor], eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """summed = x + residual (x alone if residual is None); returns (layer_norm(summed), summed)."""
    device, args, call = _add_layer_norm_call(x, residual, weight, bias, eps)
    return DISPATCH.select(ADD_LAYER_NORM, device, args, call)(*args)


def _linear_call(x, weight, bias, activation, layer_scale, residual):
    """(The facts end with whether autocast is on: then the inputs are cast to its dtype here.)"""
    _tensor("x", x, min_ndim=1)
    _tensor("weight", weight, ndim=2)
    shape, weight_shape = x.shape, weight.shape
    out_features, in_features = weight_shape
    if shape[-1] != in_features:
        raise ValueError(f"x's last dimension ({shape[-1]}) must equal weight's in_features "
                         f"({in_features}); weight has shape {tuple(weight_shape)}")
    _vector("bias", bias, out_features, "weight's out_features")
    _vector("layer_scale", layer_scale, out_features, "weight's out_features")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if residual is not None:
        _tensor("residual", residual)
        expected = (*shape[:-1], out_features)
        if tuple(residual.shape) != expected:
            raise ValueError(f"residual must have shape {expected}, got {tuple(residual.shape)}")
    device = _same_device("x", x, weight=weight, bias=bias, layer_scale=layer_scale, residual=residual)
    autocast = _autocast_on(x)
    if autocast:
        dtype = torch.get_autocast_dtype(device.type)
        x, weight, bias, layer_scale = (None if t is None else t.to(dtype) for t in (x, weight, bias, layer_scale))
    else:
        dtype = x.dtype
        if weight.dtype != dtype or (bias is not None and bias.dtype != dtype) or (
                layer_scale is not None and layer_scale.dtype != dtype):   # (the loop only to name it)
            for name, t in (("weight", weight), ("bias", bias), ("layer_scale", layer_scale)):
                if t is not None and t.dtype != dtype:
                    raise TypeError(f"{name} has dtype {t.dtype} but x has {dtype} (outside autocast "
                                    "all linear inputs must share a dtype)")
    return (device, (x, weight, bias, activation, layer_scale, residual),
            (dtype, shape, weight_shape, bias is not None, activation, layer_scale is not None, _dtype(residual),
             autocast))


LINEAR = DISPATCH.add(Op(
    "linear", _eager_linear, validate=_linear_call, rows=_rows,
    key=lambda x, weight, bias, activation, layer_scale, residual: (
        x.dtype, weight.shape[1], weight.shape[0], _dtype(bias), activation, _dtype(layer_scale), _dtype(residual)),
    fields=("in", "out", "bias", "act", "ls", "res"),
    impls={"triton": triton_linear and (triton_linear.linear, triton_linear.check),
           "cpp": extension and (extension.linear, extension.check_linear),
           "cuda": extension and (extension.linear, extension.check_linear)},
    reports={"triton": lambda device_type: triton_usage.report("linear", device_type)} if triton_linear else {}))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
           activation: Optional[str] = None, *, layer_scale: Optional[torch.Tensor] = None,
           residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """residual + layer_scale * activation(x @ weight.T + bias), each part optional.

    activation is None or "gelu" (exact erf GELU, as timm). Under torch.autocast the inputs
    are cast to the autocast dtype, as autocast does for F.linear; the residual keeps its
    dtype and the sum follows PyTorch's type promotion (an fp32 residual stream stays fp32)."""
    device, args, call = _linear_call(x, weight, bias, activation, layer_scale, residual)
    if call[-1]:   # under autocast: the inputs are cast already, the kernels run without it
        with _without_autocast(device.type):
            return DISPATCH.select(LINEAR, device, args, call)(*args)
    return DISPATCH.select(LINEAR, device, args, call)(*args)


OPS = tuple(DISPATCH.ops)
