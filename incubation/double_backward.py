"""Exact second derivatives through the fused kernels.

The fused backward kernels are not themselves differentiable. Autograd runs a backward with
grad mode on only when it was asked for create_graph=True (gradient penalties,
Hessian-vector products), so that is when `needed()` is true: the backends then compute the
backward by re-running the op's eager PyTorch math on the saved inputs and differentiating
it with create_graph=True, which makes every higher derivative exact. With create_graph
False (training) the fused backward runs as before.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

__all__ = ["needed", "eager_grads", "layer_norm_grads"]


def needed() -> bool:
    """Whether the running backward must itself be differentiable (create_graph=True)."""
    return torch.is_grad_enabled()


def eager_grads(fn: Callable, inputs: Sequence[Optional[torch.Tensor]], needs: Sequence[bool],
                grad_outputs: Sequence[Optional[torch.Tensor]]) -> list[Optional[torch.Tensor]]:
    """The gradients of fn(*inputs) for the inputs flagged in `needs` (None for the others),
    as differentiable functions of the inputs and of grad_outputs (None: that output gets no
    gradient). `inputs` are the saved tensors, which stay connected to the autograd graph."""
    needs = [bool(need) and t is not None for t, need in zip(inputs, needs)]
    with torch.enable_grad():
        # each needed input enters through its own alias, so that autograd.grad returns the
        # gradient through that argument only, even when one tensor is passed twice (x, x)
        args = [t.view_as(t) if need else t for t, need in zip(inputs, needs)]
        outs = fn(*args)
        outs = outs if isinstance(outs, tuple) else (outs,)
        pairs = [(o, g) for o, g in zip(outs, grad_outputs) if g is not None and o.requires_grad]
        wrt = [a for a, need in zip(args, needs) if need]
        if not pairs or not wrt:
            return [None] * len(needs)
        grads = iter(torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs],
                                         create_graph=True, materialize_grads=True))
    return [next(grads) if need else None for need in needs]


def layer_norm_grads(s: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float,
                     needs: Sequence[bool], dy: Optional[torch.Tensor], ds_direct: Optional[torch.Tensor] = None):
    """(d s, d weight, d bias) of LayerNorm(s), differentiable, plus `ds_direct`: the gradient
    that reached s itself (add_layer_norm's `summed` output). With a residual, s is that saved
    output, and differentiating through it reaches x and residual via the op's own backward."""
    def normed(s, w, b):
        cast = lambda t: None if t is None else t.to(s.dtype)  # noqa: E731 - as eager casts them
        return F.layer_norm(s, s.shape[-1:], cast(w), cast(b), eps)

    ds, dw, db = eager_grads(normed, (s, weight, bias), needs, (dy,))
    if ds_direct is not None:
        ds = ds_direct if ds is None else ds + ds_direct
    return ds, dw, db
