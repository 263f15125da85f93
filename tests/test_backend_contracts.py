"""No silent wrong answer, checked once for every fast backend (cpp, cuda, triton).

- Second derivatives (create_graph=True, then differentiating the gradient again, as a
  gradient penalty does) are exact: gradgradcheck in float64 on the C++ kernels, and
  Hessian-vector products against eager float64 with docs/DESIGN.md's rule on every backend.
- 1-D parameters (LayerNorm weight / bias, linear bias / layer scale) of any stride, sliced
  (w[::2]) or expanded (stride 0), and activations with odd layouts (stride-0 rows, a
  transposed last dimension) give eager's outputs and gradients (an expanded tensor's
  gradient is the sum over its uses, as eager's).
Each test runs on every backend that implements the op (kernel_rule.backend_params); the
property tests over random shapes, strides and flags are in test_backend_properties.py.
"""
from __future__ import annotations

import itertools

import pytest
import torch
from kernel_rule import (
    assert_within_rule,
    backend_params,
    check_against_reference,
    make,
    poisoned_memory,
    skip_unless_implemented,
)
from torch.nn.attention import SDPBackend, sdpa_kernel

from incubation import ops

EPS = 1e-5
LINEAR_FLAGS = list(itertools.product((False, True), repeat=4))   # bias, gelu, layer_scale, residual


def linear_name(bias, gelu, scale, residual):
    parts = [name for name, on in (("bias", bias), ("gelu", gelu), ("scale", scale), ("residual", residual)) if on]
    return "linear_" + ("_".join(parts) or "plain")


def linear_fn(bias, gelu, scale, residual):
    """ops.linear with the optional tensors taken from the arguments after x and weight."""
    def fn(x, weight, *rest):
        rest = iter(rest)
        return ops.linear(x, weight, next(rest) if bias else None, "gelu" if gelu else None,
                          layer_scale=next(rest) if scale else None, residual=next(rest) if residual else None)
    return fn


CASES = ["layer_norm", "add_layer_norm", "add_layer_norm_x_twice", "attention", "self_attention"] + \
    [linear_name(*flags) for flags in LINEAR_FLAGS]


def build(case, device, dtype, rows=(2, 7), width=40):
    """(op, fn, inputs) of a small call: x of shape (*rows, width)."""
    def t(*shape, scale=1.0, shift=0.0):
        return make(shape, dtype, device, scale=scale, shift=shift)

    if case == "layer_norm":
        return "layer_norm", lambda x, w, b: ops.layer_norm(x, w, b, EPS), \
            [t(*rows, width, scale=2.0, shift=0.5), t(width, scale=0.3, shift=1.0), t(width)]
    if case == "add_layer_norm":   # both outputs feed the loss
        return "add_layer_norm", lambda x, r, w, b: ops.add_layer_norm(x, r, w, b, EPS), \
            [t(*rows, width, scale=2.0, shift=0.5), t(*rows, width), t(width, scale=0.3, shift=1.0), t(width)]
    if case == "add_layer_norm_x_twice":   # one tensor as two arguments: each gets its own gradient
        return "add_layer_norm", lambda x, w, b: ops.add_layer_norm(x, x, w, b, EPS), \
            [t(*rows, width, scale=2.0, shift=0.5), t(width, scale=0.3, shift=1.0), t(width)]
    if case == "attention":
        return "attention", lambda q, k, v: ops.attention(q, k, v, 0.3), \
            [t(1, 2, 9, 16), t(1, 2, 11, 16), t(1, 2, 11, 16)]
    if case == "self_attention":
        return "attention", lambda x: ops.attention(x, x, x, 0.3), [t(1, 2, 9, 16)]
    bias, gelu, scale, residual = next(f for f in LINEAR_FLAGS if linear_name(*f) == case)
    k, n = width * 3 // 5, width - 4   # (24, 36) by default
    inputs = [t(*rows, k), t(n, k, scale=k ** -0.5)]
    for on, shape, scale_, shift in ((bias, (n,), 0.5, 0.0), (scale, (n,), 0.5, 0.5), (residual, (*rows, n), 1.0, 0.0)):
        if on:
            inputs.append(t(*shape, scale=scale_, shift=shift))
    return "linear", linear_fn(bias, gelu, scale, residual), inputs


# --------------------------------------------------------------------------------------
# second derivatives
# --------------------------------------------------------------------------------------
def second_order(fn, inputs, backend, vs, us):
    """The gradients of fn's outputs (weighted by vs) taken with create_graph=True, then the
    gradient of sum(gradient * u) with respect to the inputs and to vs: Hessian-vector
    products and the mixed terms a gradient penalty differentiates."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    vs = [v.detach().clone().requires_grad_() for v in vs]
    with ops.use_backend(backend):
        outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    grads = torch.autograd.grad(outs, leaves, vs, create_graph=True, materialize_grads=True)
    total = sum((g * u).sum() for g, u in zip(grads, us))
    second = torch.autograd.grad(total, leaves + vs, materialize_grads=True)
    return [g.detach() for g in grads] + list(second)


@pytest.mark.parametrize("backend, device", backend_params())
@pytest.mark.parametrize("case", CASES)
def test_second_derivatives_match_eager_float64(backend, device, case):
    torch.manual_seed(len(case))
    op, fn, inputs = build(case, device, torch.float32)
    skip_unless_implemented(op, backend)
    with ops.use_backend("eager"):
        outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    vs = [make(o.shape, torch.float32, device) for o in outs]
    us = [make(t.shape, torch.float32, device) for t in inputs]
    # eager attention on CPU is a fused kernel without a double backward: its math variant has one
    with poisoned_memory(), sdpa_kernel(SDPBackend.MATH):
        reference = second_order(fn, [t.double() for t in inputs], "eager", [v.double() for v in vs],
                                 [u.double() for u in us])
        eager = second_order(fn, inputs, "eager", vs, us)
        ours = second_order(fn, inputs, backend, vs, us)
    names = [f"grad of input {i}" for i in range(len(inputs))] + \
        [f"second derivative wrt input {i}" for i in range(len(inputs))] + \
        [f"second derivative wrt grad of output {i}" for i in range(len(vs))]
    for name, o, e, r in zip(names, ours, eager, reference):
        assert_within_rule(o, e, r, f"{backend} {case}: {name}")


@pytest.mark.parametrize("case", [c for c in CASES if c not in ("attention", "self_attention")])
def test_cpp_gradgradcheck_float64(case):
    """Exact double backward of the C++ kernels (they take float64 on CPU)."""
    pytest.importorskip("incubation.extension", reason="incubation._C is not built")
    torch.manual_seed(len(case))
    _, fn, inputs = build(case, "cpu", torch.float64, rows=(2, 3), width=10)
    inputs = [t.requires_grad_() for t in inputs]
    with ops.use_backend("cpp"):
        assert torch.autograd.gradgradcheck(fn, inputs)


# --------------------------------------------------------------------------------------
# strides: 1-D parameters and activations
# --------------------------------------------------------------------------------------
def sliced(base):          # every other element: stride 2, from offset 1
    return base[1::2]


def expanded(n):           # a 0-d base expanded to n elements: stride 0
    return lambda base: base.expand(n)


def strided_params_case(case, device):
    """(op, fn, inputs): the op with its 1-D parameters sliced or expanded from `inputs`."""
    def t(*shape, scale=1.0, shift=0.0):
        return make(shape, torch.float32, device, scale=scale, shift=shift)

    x, r, C, N = t(3, 5, 48, scale=2.0), t(3, 5, 48), 48, 40
    if case == "layer_norm":
        return "layer_norm", lambda x, w, b: ops.layer_norm(x, sliced(w), expanded(C)(b), EPS), \
            [x, t(2 * C, shift=1.0), t()]
    if case == "layer_norm_swapped":
        return "layer_norm", lambda x, w, b: ops.layer_norm(x, expanded(C)(w), sliced(b), EPS), \
            [x, t(shift=1.0), t(2 * C)]
    if case == "add_layer_norm":
        return "add_layer_norm", lambda x, r, w, b: ops.add_layer_norm(x, r, sliced(w), expanded(C)(b), EPS), \
            [x, r, t(2 * C, shift=1.0), t()]
    if case == "add_layer_norm_swapped":
        return "add_layer_norm", lambda x, r, w, b: ops.add_layer_norm(x, r, expanded(C)(w), sliced(b), EPS), \
            [x, r, t(shift=1.0), t(2 * C)]
    weight, residual = t(N, C, scale=C ** -0.5), t(3, 5, N)
    if case == "linear":
        return "linear", lambda x, w, b, s, r: ops.linear(x, w, sliced(b), "gelu", layer_scale=expanded(N)(s),
                                                           residual=r), [x, weight, t(2 * N), t(shift=0.5), residual]
    assert case == "linear_swapped"
    return "linear", lambda x, w, b, s: ops.linear(x, w, expanded(N)(b), None, layer_scale=sliced(s)), \
        [x, weight, t(), t(2 * N, shift=0.5)]


@pytest.mark.parametrize("backend, device", backend_params())
@pytest.mark.parametrize("case", ["layer_norm", "layer_norm_swapped", "add_layer_norm", "add_layer_norm_swapped",
                                  "linear", "linear_swapped"])
def test_sliced_and_expanded_1d_parameters(backend, device, case):
    """Outputs and every gradient (the expanded scalar's is the sum) against eager float64."""
    torch.manual_seed(len(case))
    op, fn, inputs = strided_params_case(case, device)
    skip_unless_implemented(op, backend)
    with poisoned_memory():
        check_against_reference(fn, inputs, backend)


def odd_layout_case(case, device):
    """(op, fn, inputs): activations with stride-0 rows or a transposed last dimension."""
    def t(*shape, scale=1.0, shift=0.0):
        return make(shape, torch.float32, device, scale=scale, shift=shift)

    if case == "layer_norm_expanded_rows":       # one row seen 6 times (stride 0)
        return "layer_norm", lambda x, w, b: ops.layer_norm(x.expand(6, 40), w, b, EPS), \
            [t(40, shift=0.5), t(40), t(40)]
    if case == "add_layer_norm_expanded_x_transposed_residual":
        return "add_layer_norm", lambda x, r: ops.add_layer_norm(x.expand(6, 40), r.t(), None, None, EPS), \
            [t(1, 40, shift=0.5), t(40, 6)]
    if case == "linear_expanded_x_and_weight_rows":
        return "linear", lambda x, w, b, r: ops.linear(x.expand(7, 24), w.expand(36, 24), b, "gelu",
                                                       residual=r.t()), [t(24), t(24, scale=0.2), t(36), t(36, 7)]
    if case == "linear_transposed_x":            # the last dimension of x has stride 7
        return "linear", lambda x, w, s: ops.linear(x.t(), w.t(), None, None, layer_scale=s), \
            [t(24, 7), t(24, 36, scale=0.2), t(36)]
    assert case == "attention_expanded_and_transposed"   # q: head dim strided; k over heads, v over the batch
    return "attention", lambda q, k, v: ops.attention(q.transpose(-1, -2), k.expand(2, 3, 11, 16),
                                                      v.expand(2, 3, 11, 16)), \
        [t(2, 3, 16, 9), t(2, 1, 11, 16), t(1, 3, 11, 16)]


@pytest.mark.parametrize("backend, device", backend_params())
@pytest.mark.parametrize("case", ["layer_norm_expanded_rows", "add_layer_norm_expanded_x_transposed_residual",
                                  "linear_expanded_x_and_weight_rows", "linear_transposed_x",
                                  "attention_expanded_and_transposed"])
def test_activations_with_odd_strides(backend, device, case):
    torch.manual_seed(len(case))
    op, fn, inputs = odd_layout_case(case, device)
    skip_unless_implemented(op, backend)
    with poisoned_memory():
        check_against_reference(fn, inputs, backend)
