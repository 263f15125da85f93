"""The one dispatch point for the fused ops of the ViT block and the meta model.

Public ops (all differentiable):

    attention(q, k, v, scale=None)                       -> (B, H, N, D)
    layer_norm(x, weight, bias, eps=1e-6)                -> normed
    add_layer_norm(x, residual, weight, bias, eps=1e-6)  -> (normed, summed)
    linear(x, weight, bias=None, activation=None, *, layer_scale=None, residual=None)
        -> residual + layer_scale * activation(x @ weight.T + bias)

Each call picks a backend by the device of its tensors:

    CUDA tensors: triton -> cuda (compiled extension) -> eager
    CPU tensors:  cpp (compiled extension) -> eager
                  (triton serves CPU tensors only under TRITON_INTERPRET=1 and only when
                  forced: the interpreter is for testing, not for speed)

`INCUBATION_BACKEND=eager|triton|cuda|cpp|auto` or the context manager `use_backend(name)`
forces a choice; a forced backend that cannot serve a call raises `BackendError` (an op the
forced backend does not implement at all, like attention in the compiled extension, runs
eager, so a whole model can run under a forced backend). In `auto`
mode a refused backend falls back to the next one and the reason is recorded:
`backends()` reports, for every op, the backend chosen and why each faster one was refused.

Backends register their implementations with `register(op, backend, fn, check)`; `check`
returns None when the backend can serve a call, else the reason it cannot. The eager
backend is the reference: exactly timm's math (exact erf GELU, SDPA attention).
"""
from __future__ import annotations

import contextlib
import importlib
import numbers
import os
from typing import Callable, Optional

import torch
import torch.nn.functional as F

__all__ = [
    "attention", "layer_norm", "add_layer_norm", "linear",
    "backends", "format_backends", "implements", "use_backend", "current_backend", "register", "BackendError",
    "OPS", "BACKENDS",
]

OPS = ("attention", "layer_norm", "add_layer_norm", "linear")
BACKENDS = ("triton", "cuda", "cpp", "eager")
ACTIVATIONS = (None, "gelu")
_PREFERENCE = {"cuda": ("triton", "cuda", "eager"), "cpu": ("triton", "cpp", "eager")}


class BackendError(RuntimeError):
    """A forced backend cannot serve a call."""


# --------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------
_impls: dict[str, dict[str, Callable]] = {op: {} for op in OPS}
_checks: dict[str, dict[str, Optional[Callable]]] = {op: {} for op in OPS}
_backend_unavailable: dict[str, str] = {}  # backend -> why it cannot serve anything
_runtime_refusals: dict[str, dict[str, str]] = {op: {} for op in OPS}  # last reason seen per call
_loaded = False
# set by use_backend(); a plain global rather than a ContextVar so torch.compile can trace
# the dispatch (the forced choice is process-wide, not per thread)
_forced: Optional[str] = None


def register(op: str, backend: str, fn: Callable, check: Optional[Callable] = None) -> None:
    """Register `fn` as `backend`'s implementation of `op`.

    `fn` takes the op's arguments in the public signature's order (keywords included) and
    must be differentiable; `check(*args)` returns None if the backend can serve that call,
    else a short reason (shape, dtype or stride it does not support).
    """
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; ops are {OPS}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; backends are {BACKENDS}")
    _impls[op][backend] = fn
    _checks[op][backend] = check


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _load_backends() -> None:
    """Import the optional backends once; each registers what it implements."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    try:
        importlib.import_module("incubation.kernels")
    except Exception as exc:  # noqa: BLE001 - any import failure means "not available"
        _backend_unavailable["triton"] = f"Triton kernels unavailable ({type(exc).__name__}: {exc})"
    try:
        importlib.import_module("incubation.extension")
    except Exception as exc:  # noqa: BLE001
        reason = f"compiled extension incubation._C unavailable ({type(exc).__name__}: {exc})"
        _backend_unavailable.setdefault("cpp", reason)
        _backend_unavailable.setdefault("cuda", reason)


def mark_unavailable(backend: str, reason: str) -> None:
    """For backend modules: record that `backend` cannot serve anything, and why."""
    _backend_unavailable[backend] = reason


# --------------------------------------------------------------------------------------
# selection
# --------------------------------------------------------------------------------------
def current_backend() -> str:
    """The forced backend (`use_backend`, else INCUBATION_BACKEND), or 'auto'."""
    name = _forced or os.environ.get("INCUBATION_BACKEND", "auto") or "auto"
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"INCUBATION_BACKEND={name!r} is not one of {('auto',) + BACKENDS}")
    return name


@contextlib.contextmanager
def use_backend(name: str):
    """Force `name` ('auto' restores automatic choice) for the ops called inside the block."""
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {('auto',) + BACKENDS}")
    global _forced
    previous, _forced = _forced, name
    try:
        yield
    finally:
        _forced = previous


def _device_reason(backend: str, device_type: str, forced: bool) -> Optional[str]:
    if device_type == "cuda" and backend != "eager" and not torch.cuda.is_available():
        return "no CUDA device is available on this machine"
    if backend == "triton":
        if device_type == "cuda":
            return None
        if not _interpreting():
            return "Triton needs CUDA tensors (set TRITON_INTERPRET=1 to run it on CPU for testing)"
        if not forced:
            return "the Triton interpreter runs on CPU only when forced (it is for testing, not speed)"
        return None
    if backend == "cuda" and device_type != "cuda":
        return f"the CUDA kernels need CUDA tensors, got {device_type}"
    if backend == "cpp" and device_type != "cpu":
        return f"the C++ kernels need CPU tensors, got {device_type}"
    return None


def _why_not(op: str, backend: str, device_type: str, args: tuple, forced: bool) -> Optional[str]:
    if backend == "eager":
        return None
    reason = _device_reason(backend, device_type, forced) or _backend_unavailable.get(backend)
    if reason:
        return reason
    if backend not in _impls[op]:
        return f"no {backend} implementation of {op}"
    check = _checks[op][backend]
    return check(*args) if (check is not None and args) else None


def _select(op: str, device_type: str, args: tuple) -> Callable:
    _load_backends()
    forced = current_backend()
    if forced != "auto":
        reason = _why_not(op, forced, device_type, args, forced=True)
        if reason is None:
            return _impls[op][forced]
        usable = forced not in _backend_unavailable and not _device_reason(forced, device_type, True)
        if usable and forced not in _impls[op]:  # e.g. attention under "cpp": the rest of the model still runs forced
            _runtime_refusals[op][forced] = f"no {forced} implementation of {op} (ran eager)"
            return _impls[op]["eager"]
        raise BackendError(f"incubation.ops.{op}: backend {forced!r} was forced "
                           f"(INCUBATION_BACKEND / use_backend) but cannot serve this call: {reason}")
    for backend in _PREFERENCE.get(device_type, ("eager",)):
        reason = _why_not(op, backend, device_type, args, forced=False)
        if reason is None:
            return _impls[op][backend]
        _runtime_refusals[op][backend] = reason
    return _impls[op]["eager"]


def implements(op: str, backend: str) -> bool:
    """Whether `backend` has a kernel for `op` at all (it may still refuse some calls)."""
    _load_backends()
    return backend not in _backend_unavailable and backend in _impls.get(op, {})


def backends(device: str | torch.device = "cpu") -> dict[str, dict]:
    """For every op: the backend `auto` picks on `device` and why each faster one was refused.

    Reasons are those known without a concrete call (imports, device), plus the last reason
    a shape/dtype check gave at run time ("at run time: ...")."""
    _load_backends()
    device_type = torch.device(device).type
    forced = current_backend()
    report = {}
    for op in OPS:
        refused, chosen = {}, "eager"
        order = (forced,) if forced != "auto" else _PREFERENCE.get(device_type, ("eager",))
        for backend in order:
            reason = _why_not(op, backend, device_type, (), forced=forced != "auto")
            if reason is None:
                chosen = backend
                break
            refused[backend] = reason
        for backend, reason in _runtime_refusals[op].items():
            refused.setdefault(backend, f"at run time: {reason}")
        report[op] = {"backend": chosen, "refused": refused}
    return report


def format_backends(device: str | torch.device = "cpu") -> str:
    """`backends(device)` as a human-readable table."""
    lines = [f"incubation.ops backends for {torch.device(device).type} tensors "
             f"(mode: {current_backend()})"]
    for op, entry in backends(device).items():
        lines.append(f"  {op:<15} -> {entry['backend']}")
        for backend, reason in entry["refused"].items():
            lines.append(f"      {backend:<7} refused: {reason}")
    return "\n".join(lines)


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


def _same_device(ref_name: str, ref: torch.Tensor, **others) -> None:
    for name, t in others.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")


def _vector(name: str, t, size: int, what: str) -> None:
    if t is None:
        return
    _tensor(name, t, ndim=1)
    if t.shape[0] != size:
        raise ValueError(f"{name} must have shape ({size},) to match {what}, got {tuple(t.shape)}")


def _eps(eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not eps > 0:
        raise ValueError(f"eps must be a positive number, got {eps!r}")
    return float(eps)


# --------------------------------------------------------------------------------------
# public ops
# --------------------------------------------------------------------------------------
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float] = None) -> torch.Tensor:
    """softmax(q @ k^T * scale) @ v for (B, H, N, D) tensors; scale defaults to D ** -0.5."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        _tensor(name, t, ndim=4)
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree in batch, heads "
                         "and head dim (shapes are (B, H, N, D))")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    _same_device("q", q, k=k, v=v)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    elif isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not scale > 0:
        raise ValueError(f"scale must be a positive number or None, got {scale!r}")
    args = (q, k, v, float(scale))
    return _select("attention", q.device.type, args)(*args)


def layer_norm(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
               eps: float = 1e-6) -> torch.Tensor:
    """LayerNorm over the last dimension; the output has x's dtype (statistics in fp32)."""
    _tensor("x", x, min_ndim=1)
    _vector("weight", weight, x.shape[-1], "x's last dimension")
    _vector("bias", bias, x.shape[-1], "x's last dimension")
    _same_device("x", x, weight=weight, bias=bias)
    args = (x, weight, bias, _eps(eps))
    return _select("layer_norm", x.device.type, args)(*args)


def add_layer_norm(x: torch.Tensor, residual: Optional[torch.Tensor], weight: Optional[torch.Tensor],
                   bias: Optional[torch.Tensor], eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """summed = x + residual (x alone if residual is None); returns (layer_norm(summed), summed)."""
    _tensor("x", x, min_ndim=1)
    if residual is not None:
        _tensor("residual", residual)
        if residual.shape != x.shape:
            raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
    _vector("weight", weight, x.shape[-1], "x's last dimension")
    _vector("bias", bias, x.shape[-1], "x's last dimension")
    _same_device("x", x, residual=residual, weight=weight, bias=bias)
    args = (x, residual, weight, bias, _eps(eps))
    return _select("add_layer_norm", x.device.type, args)(*args)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
           activation: Optional[str] = None, *, layer_scale: Optional[torch.Tensor] = None,
           residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """residual + layer_scale * activation(x @ weight.T + bias), each part optional.

    activation is None or "gelu" (exact erf GELU, as timm). Under torch.autocast the inputs
    are cast to the autocast dtype, as autocast does for F.linear; the residual keeps its
    dtype and the sum follows PyTorch's type promotion (an fp32 residual stream stays fp32)."""
    _tensor("x", x, min_ndim=1)
    _tensor("weight", weight, ndim=2)
    out_features, in_features = weight.shape
    if x.shape[-1] != in_features:
        raise ValueError(f"x's last dimension ({x.shape[-1]}) must equal weight's in_features "
                         f"({in_features}); weight has shape {tuple(weight.shape)}")
    _vector("bias", bias, out_features, "weight's out_features")
    _vector("layer_scale", layer_scale, out_features, "weight's out_features")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if residual is not None:
        _tensor("residual", residual)
        expected = (*x.shape[:-1], out_features)
        if tuple(residual.shape) != expected:
            raise ValueError(f"residual must have shape {expected}, got {tuple(residual.shape)}")
    _same_device("x", x, weight=weight, bias=bias, layer_scale=layer_scale, residual=residual)
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight, bias, layer_scale = (
            None if t is None else t.to(dtype) for t in (x, weight, bias, layer_scale))
    else:
        for name, t in (("weight", weight), ("bias", bias), ("layer_scale", layer_scale)):
            if t is not None and t.dtype != x.dtype:
                raise TypeError(f"{name} has dtype {t.dtype} but x has {x.dtype} (outside autocast "
                                "all linear inputs must share a dtype)")
    args = (x, weight, bias, activation, layer_scale, residual)
    with torch.autocast(x.device.type, enabled=False):
        return _select("linear", x.device.type, args)(*args)


# --------------------------------------------------------------------------------------
# eager backend: the reference (timm's math)
# --------------------------------------------------------------------------------------
def _eager_attention(q, k, v, scale):
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def _eager_layer_norm(x, weight, bias, eps):
    w = None if weight is None else weight.to(x.dtype)
    b = None if bias is None else bias.to(x.dtype)
    with torch.autocast(x.device.type, enabled=False):
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


register("attention", "eager", _eager_attention)
register("layer_norm", "eager", _eager_layer_norm)
register("add_layer_norm", "eager", _eager_add_layer_norm)
register("linear", "eager", _eager_linear)
