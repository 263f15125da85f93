"""Property tests: every fast backend's ops against eager float64 (docs/DESIGN.md's rule, outputs and
every gradient) over random shapes, layouts of the 1-D parameters (contiguous, sliced,
expanded from a scalar, offset in their storage), layouts of the activations and the ops'
flags. Few examples per run, since the Triton interpreter is slow; derandomized, so a run
gives the same examples (CI stays reproducible).
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_rule import assert_within_rule, backend_params, make, poisoned_memory

from incubation import ops

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True, database=None)
VECTOR_LAYOUTS = ("contiguous", "sliced", "expanded", "offset")
ROW_LAYOUTS = ("contiguous", "transposed", "expanded_rows", "column_slice")


def vector(layout, n, device, shift=0.0):
    """(base tensor, view of it as an n-vector in that layout)."""
    if layout == "contiguous":
        return make((n,), torch.float32, device, 0.5, shift), lambda t: t
    if layout == "sliced":          # stride 2 from offset 1
        return make((2 * n + 1,), torch.float32, device, 0.5, shift), lambda t: t[1::2]
    if layout == "expanded":        # stride 0
        return make((), torch.float32, device, 0.5, shift), lambda t: t.expand(n)
    return make((n + 1,), torch.float32, device, 0.5, shift), lambda t: t[1:]   # offset: 4 bytes off alignment


def rows(layout, m, c, device, spread=False):
    """(base tensor, view of it as an (m, c) matrix in that layout). With `spread`, each row is
    a ramp from -2 to 2 plus noise, so that its variance stays well away from 0 (a LayerNorm
    row of a few nearly equal values amplifies rounding by its large rstd, in eager too)."""
    values = make((m, c), torch.float32, device, 0.5 if spread else 1.0)
    if spread:
        values += torch.linspace(-2, 2, c, device=device)
    if layout == "contiguous":
        return values, lambda t: t
    if layout == "transposed":      # the last dimension has stride m
        return values.t().contiguous(), lambda t: t.t()
    if layout == "expanded_rows":   # one row, stride 0
        return values[0].clone(), lambda t: t.expand(m, c)
    base = make((m, c + 3), torch.float32, device)   # rows of stride c + 3, from offset 1
    base[:, 1:c + 1] = values
    return base, lambda t: t[:, 1:c + 1]


def run(fn, parts, dtype, backend, grads_out=None):
    """fn's outputs on the views of `parts` ((base, view) pairs, or None for an absent
    argument), then (with grads_out) the gradient of every view: of each argument as the op
    receives it, since the sum an expanded base's gradient adds up would also add up the
    rounding of all its uses (test_backend_contracts checks the bases' gradients)."""
    views = []
    for part in parts:
        view = None
        if part is not None:
            view = part[1](part[0].detach().clone().to(dtype).requires_grad_())
            view.retain_grad()
        views.append(view)
    with ops.use_backend(backend):
        outs = fn(*views)
    outs = outs if isinstance(outs, tuple) else (outs,)
    if grads_out is None:
        return outs
    torch.autograd.backward(outs, [g.to(o.dtype) for g, o in zip(grads_out, outs)])
    return [o.detach() for o in outs] + [v.grad for v in views if v is not None]


def check(backend, op, fn, parts, seed):
    """`backend` vs eager (float32) vs eager float64: outputs and every argument's gradient."""
    if not ops.implements(op, backend):
        pytest.skip(f"{backend} has no {op}")
    torch.manual_seed(seed)
    with poisoned_memory():
        grads_out = [make(o.shape, torch.float32, o.device).double()
                     for o in run(fn, parts, torch.float64, "eager")]
        reference, eager, ours = (run(fn, parts, dtype, name, grads_out) for dtype, name in
                                  ((torch.float64, "eager"), (torch.float32, "eager"), (torch.float32, backend)))
    for i, (o, e, r) in enumerate(zip(ours, eager, reference)):
        what = f"output {i}" if i < len(grads_out) else f"grad of argument {i - len(grads_out)}"
        assert_within_rule(o, e, r, f"{backend} {op} {what}")


@pytest.mark.parametrize("backend, device", backend_params())
@SETTINGS
@given(m=st.integers(1, 24), c=st.integers(2, 70), x_layout=st.sampled_from(ROW_LAYOUTS),
       w_layout=st.sampled_from(VECTOR_LAYOUTS + (None,)), b_layout=st.sampled_from(VECTOR_LAYOUTS + (None,)),
       residual=st.sampled_from(ROW_LAYOUTS + (None,)), seed=st.integers(0, 2 ** 16))
def test_layer_norm_properties(backend, device, m, c, x_layout, w_layout, b_layout, residual, seed):
    """(c >= 2: with one feature the output is the bias and dx is 0 up to rounding amplified by
    rstd = eps ** -0.5, which eager sometimes happens to get exactly.)"""
    torch.manual_seed(seed)
    parts = [rows(x_layout, m, c, device, spread=True),
             None if residual is None else rows(residual, m, c, device, spread=True),
             None if w_layout is None else vector(w_layout, c, device, shift=1.0),
             None if b_layout is None else vector(b_layout, c, device)]
    if residual is None:
        check(backend, "layer_norm", lambda x, r, w, b: ops.layer_norm(x, w, b, 1e-5), parts, seed)
    else:
        check(backend, "add_layer_norm", lambda x, r, w, b: ops.add_layer_norm(x, r, w, b, 1e-5), parts, seed)


@pytest.mark.parametrize("backend, device", backend_params())
@SETTINGS
@given(m=st.integers(1, 40), k=st.integers(1, 40), n=st.integers(1, 40), x_layout=st.sampled_from(ROW_LAYOUTS),
       bias=st.sampled_from(VECTOR_LAYOUTS + (None,)), scale=st.sampled_from(VECTOR_LAYOUTS + (None,)),
       gelu=st.booleans(), residual=st.sampled_from(ROW_LAYOUTS + (None,)), seed=st.integers(0, 2 ** 16))
def test_linear_properties(backend, device, m, k, n, x_layout, bias, scale, gelu, residual, seed):
    torch.manual_seed(seed)
    parts = [rows(x_layout, m, k, device), (make((n, k), torch.float32, device, k ** -0.5), lambda t: t),
             None if bias is None else vector(bias, n, device),
             None if scale is None else vector(scale, n, device, shift=0.5),
             None if residual is None else rows(residual, m, n, device)]
    check(backend, "linear", lambda x, w, b, s, r: ops.linear(x, w, b, "gelu" if gelu else None, layer_scale=s,
                                                              residual=r), parts, seed)


@pytest.mark.parametrize("backend, device", backend_params())
@SETTINGS
@given(b=st.integers(1, 2), h=st.integers(1, 2), n_q=st.integers(1, 40), n_kv=st.integers(2, 40),
       d=st.integers(1, 40), layout=st.sampled_from(("contiguous", "transposed", "expanded")),
       seed=st.integers(0, 2 ** 16))
def test_attention_properties(backend, device, b, h, n_q, n_kv, d, layout, seed):
    """q, k, v contiguous; or with a strided head dim (transposed); or k, v shared over heads
    and q over the batch (stride 0). (n_kv >= 2: with one key dq is 0 by cancellation, which
    eager sometimes gets exactly and any other summation order only up to rounding.)"""
    torch.manual_seed(seed)

    def qkv(n, shared):
        if layout == "transposed":
            return make((b, h, d, n), torch.float32, device), lambda t: t.transpose(-1, -2)
        if layout == "expanded":
            shape = (b, 1, n, d) if shared == "heads" else (1, h, n, d)
            return make(shape, torch.float32, device), lambda t: t.expand(b, h, n, d)
        return make((b, h, n, d), torch.float32, device), lambda t: t

    parts = [qkv(n_q, "batch"), qkv(n_kv, "heads"), qkv(n_kv, "heads")]
    check(backend, "attention", lambda q, k, v: ops.attention(q, k, v), parts, seed)
