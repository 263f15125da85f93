"""Op numerics of every fast backend, each test written once and run on each: the compiled
extension on CPU ("cpp") and CUDA ("cuda"), Triton under its interpreter (CPU tensors) and on
the GPU (kernel_rule.backend_params; each skipped, with the reason, where this machine cannot
run it; GPU runs are marked `gpu` and collected only where CUDA is).

Every output and every gradient is checked against float64 with docs/DESIGN.md's rule (error at
most kernel_rule.factor(backend, device, dtype) x eager's error in the same dtype, plus an atol
for rounding), over shapes x dtypes x backends, with uninitialised memory poisoned (NaN) so an
element a kernel forgot to write shows. A dtype a backend has no kernels for is skipped with the
reason (kernel_rule.skip_unless_dtype), and so is an op it lacks (attention on the extension).
What is one backend's own (the build and loading of incubation._C, its raw operators, Triton's
autotune keys, refusals, the interpreter's bf16) stays in test_extension.py and test_triton.py;
the second-derivative and stride contracts and the property tests are in test_backend_*.py.
"""
from __future__ import annotations

import pytest
import torch
from kernel_rule import (
    EPILOGUES,
    backend_params,
    backend_table,
    check_against_reference,
    check_scaled_against_reference,
    check_vit,
    factor,
    linear_fn,
    linear_inputs,
    make,
    poisoned_memory,
    skip_if_slow_under_interpreter,
    skip_unless_dtype,
    skip_unless_implemented,
)

from incubation import ops

BACKENDS = backend_params()   # (backend, device): cpp, cuda, triton-interpreter, triton-cuda
DTYPES = [pytest.param(dtype, id=str(dtype)[6:]) for dtype in (torch.float32, torch.float16, torch.bfloat16,
                                                                torch.float64)]
HALF = [pytest.param(dtype, id=str(dtype)[6:]) for dtype in (torch.bfloat16, torch.float16)]
EPS = 1e-6
# 50: not a multiple of any SIMD / 16-byte pack width; 591 = 3 x 197 tokens, 197: ViT-B/16 at 224
WIDTHS = (50, 192, 384, 768, 1000)
NORM_SHAPES = sorted({(rows, width) for rows in (1, 591) for width in WIDTHS} |
                     {(1, 192), (197, 384), (7, 768), (591, 1000), (5, 50)})
LINEAR_SHAPES = sorted({(rows, 96, width) for rows in (1, 591) for width in WIDTHS} |
                       {(50, 64, 192), (7, 100, 1000), (1, 33, 50)})   # (rows, in_features, out_features)


# Under Triton's interpreter every program of a launch runs in Python, so a shape costs about its
# tile count. There LayerNorm's 591 and 150 rows become 37, which leave a partial last row tile for
# every tiling the kernels choose (37 = 2 x 16 + 5 = 4 x 8 + 5 = 9 x 4 + 1) and still give the
# backward several programs looping over several tiles each; and linear's out_features 384 and 768,
# whole 32-wide tiles as 192 is in the interpreter's one config (32 x 32 x 32), are left to the
# compiled backends. cpp and CUDA run every shape.
NORM_INTERPRETER_ROWS = {591: 37, 150: 37}
LINEAR_INTERPRETER_SKIPS = {(1, 96, 384), (1, 96, 768)}


def shapes(values):
    """pytest params of shape tuples, named like 591x1000."""
    return [pytest.param(*shape, id="x".join(map(str, shape))) for shape in values]


def backend_shapes(values, interpreter_rows=None, interpreter_skips=()):
    """pytest params (backend, device, *shape) of every backend with every shape of `values`, but
    under Triton's interpreter with rows (a shape's first entry) replaced as interpreter_rows says
    and without the shapes in interpreter_skips; named like 591x1000-cpp."""
    params = []
    for backend in BACKENDS:
        chosen = values
        if backend.id == "triton-interpreter":
            rows = interpreter_rows or {}
            chosen = sorted({(rows.get(s[0], s[0]), *s[1:]) for s in values if s not in interpreter_skips})
        params += [pytest.param(*backend.values, *shape, marks=backend.marks, id="x".join(map(str, shape)) + "-" + backend.id)
                   for shape in chosen]
    return params


@pytest.fixture(autouse=True)
def poisoned():
    with poisoned_memory():
        yield


# --------------------------------------------------------------------------------------
# LayerNorm and add + LayerNorm
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend, device, rows, width", backend_shapes(NORM_SHAPES, NORM_INTERPRETER_ROWS))
@pytest.mark.parametrize("residual", [False, True], ids=["ln", "add_ln"])
def test_layer_norm_matches_reference(backend, device, dtype, rows, width, residual):
    skip_unless_dtype(backend, device, dtype)
    torch.manual_seed(rows + width)
    x = make((rows, width), dtype, device, scale=2.0, shift=0.5)   # a non-zero mean stresses the variance
    w = make((width,), dtype, device, scale=0.2, shift=1.0)
    b = make((width,), dtype, device, scale=0.2)
    rule = factor(backend, device, dtype)
    if residual:
        r = make((rows, width), dtype, device)
        check_against_reference(lambda x, r, w, b: ops.add_layer_norm(x, r, w, b, EPS), [x, r, w, b], backend, rule)
    else:
        check_against_reference(lambda x, w, b: ops.layer_norm(x, w, b, EPS), [x, w, b], backend, rule)


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("dtype", [DTYPES[0], DTYPES[3]])
@pytest.mark.parametrize("width", [768, 4099])
@pytest.mark.parametrize("residual", [False, True], ids=["ln", "add_ln"])
def test_layer_norm_of_rows_far_from_zero(backend, device, dtype, width, residual):
    """1000 + 0.01 N (issue 25): a mean or a variance taken of the values themselves loses the
    digits that tell them apart (Triton and the C++ kernels erred 2x eager's and more)."""
    skip_unless_dtype(backend, device, dtype)
    torch.manual_seed(width)
    x = make((3, width), dtype, device, scale=0.01, shift=1000.0)
    w = make((width,), dtype, device, scale=0.2, shift=1.0)
    b = make((width,), dtype, device, scale=0.2)
    if residual:
        r = make((3, width), dtype, device, scale=0.01)
        check_against_reference(lambda x, r, w, b: ops.add_layer_norm(x, r, w, b, EPS), [x, r, w, b], backend)
    else:
        check_against_reference(lambda x, w, b: ops.layer_norm(x, w, b, EPS), [x, w, b], backend)


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("dtype, power", [(torch.float32, 67), (torch.bfloat16, 100), (torch.float32, 120)],
                         ids=["float32-1e20", "bfloat16-1e30", "float32-1e36"])
@pytest.mark.parametrize("residual", [False, True], ids=["ln", "add_ln"])
def test_layer_norm_of_huge_rows(backend, device, dtype, power, residual):
    """Finite rows whose squares overflow float32 (issue 25: the C++ kernels gave NaN, Triton
    zeros): LayerNorm's output does not depend on the rows' scale, so the baseline is eager at
    the same rows divided by 2^power."""
    skip_unless_dtype(backend, device, dtype)
    torch.manual_seed(power)
    x = make((5, 384), dtype, device, scale=2.0, shift=0.5)
    w = make((384,), dtype, device, scale=0.2, shift=1.0)
    b = make((384,), dtype, device, scale=0.2)
    rule = factor(backend, device, dtype)
    if residual:
        r = make((5, 384), dtype, device)
        fn = lambda x, r, w, b: ops.add_layer_norm(x, r, w, b, EPS)[0]   # noqa: E731 - summed is x + r, scaled
        check_scaled_against_reference(fn, [x, r, w, b], {0, 1}, power, backend, rule)
    else:
        check_scaled_against_reference(lambda x, w, b: ops.layer_norm(x, w, b, EPS), [x, w, b], {0}, power, backend,
                                       rule)


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("shape", [(3, 197, 384), (2, 50, 192)], ids=lambda shape: "x".join(map(str, shape)))
@pytest.mark.parametrize("affine", ["none", "weight", "bias"])
def test_layer_norm_optional_affine_3d(backend, device, shape, affine):
    torch.manual_seed(shape[-1])
    width = shape[-1]
    x = make(shape, torch.float32, device, scale=3.0, shift=-1.0)
    r = make(shape, torch.float32, device)
    params = [make((width,), torch.float32, device, shift=1.0 if affine == "weight" else 0.0)] if affine != "none" else []

    def split(p):
        return (p[0], None) if affine == "weight" else (None, p[0]) if affine == "bias" else (None, None)

    check_against_reference(lambda x, *p: ops.layer_norm(x, *split(p), EPS), [x, *params], backend)
    check_against_reference(lambda x, r, *p: ops.add_layer_norm(x, r, *split(p), 1e-5), [x, r, *params], backend)


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_layer_norm_fp32_parameters_and_strided_inputs(backend, device):
    """bf16 activations with fp32 parameters (as eager: parameters cast to x's dtype, gradients
    back to fp32); a transposed x, a contiguous view whose data is not 16-byte aligned, and the
    class token of a (B, N, C) tensor (a strided row view)."""
    torch.manual_seed(2)
    for width, rows in ((768, 197), (384, 65)):
        x = make((width, rows), torch.bfloat16, device, shift=0.3).t()          # (rows, width), not contiguous
        w = make((width,), torch.float32, device, shift=1.0)
        b = make((width,), torch.float32, device)
        check_against_reference(lambda x, w, b: ops.layer_norm(x, w, b, EPS), [x, w, b], backend)
    flat = make((197 * 768 + 1,), torch.float32, device)
    shifted = flat[1:].view(197, 768)                                            # contiguous, 4-byte offset
    r = make((197, 768), torch.float32, device)
    check_against_reference(lambda x, r: ops.add_layer_norm(x, r, None, None, EPS), [shifted, r], backend)
    tokens = make((3, 50, 192), torch.float32, device)
    check_against_reference(lambda t: ops.layer_norm(t[:, 0], None, None, EPS), [tokens], backend)
    r = make((3, 192), torch.float32, device)
    check_against_reference(lambda t, r: ops.add_layer_norm(t[:, 0], r, None, None, EPS), [tokens, r], backend)


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_add_layer_norm_gradient_of_only_one_output(backend, device):
    """Only `summed` or only `normed` feeds the loss: the other output's gradient is absent."""
    torch.manual_seed(5)
    x, r = make((6, 64), torch.float32, device), make((6, 64), torch.float32, device)
    w, b = make((64,), torch.float32, device), make((64,), torch.float32, device)
    check_against_reference(lambda x, r: ops.add_layer_norm(x, r, w, b, EPS)[1] * 3, [x, r], backend)
    check_against_reference(lambda x, r, w, b: ops.add_layer_norm(x, r, w, b, EPS)[0], [x, r, w, b], backend)


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_add_layer_norm_without_residual_returns_x(backend, device):
    x = make((5, 64), torch.float32, device)
    with ops.use_backend(backend):
        normed, summed = ops.add_layer_norm(x, None, None, None, EPS)
    assert summed is x
    torch.testing.assert_close(normed, torch.nn.functional.layer_norm(x, (64,), eps=EPS))


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_empty_batch(backend, device):
    x = torch.zeros(0, 64, device=device, requires_grad=True)
    w = torch.ones(64, device=device, requires_grad=True)
    b = torch.zeros(64, device=device, requires_grad=True)
    weight = torch.ones(32, 64, device=device, requires_grad=True)
    with ops.use_backend(backend):
        out = ops.layer_norm(x, w, b, EPS)
        lin = ops.linear(x, weight, None, "gelu", layer_scale=w[:32])
    assert out.shape == (0, 64) and lin.shape == (0, 32)
    dw, db = torch.autograd.grad(out.sum(), (w, b))
    assert torch.equal(dw, torch.zeros_like(dw)) and torch.equal(db, torch.zeros_like(db))
    dweight, ds = torch.autograd.grad(lin.sum(), (weight, w))
    assert torch.equal(dweight, torch.zeros_like(dweight)) and torch.equal(ds, torch.zeros_like(ds))


# --------------------------------------------------------------------------------------
# linear: GEMM + fused epilogue
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend, device, rows, in_features, out_features",
                         backend_shapes(LINEAR_SHAPES, interpreter_skips=LINEAR_INTERPRETER_SKIPS))
@pytest.mark.parametrize("epilogue", list(EPILOGUES))
def test_linear_matches_reference(backend, device, dtype, rows, in_features, out_features, epilogue):
    skip_unless_dtype(backend, device, dtype)
    skip_if_slow_under_interpreter(backend, device, rows * in_features * out_features)
    torch.manual_seed(rows + out_features)
    inputs = linear_inputs(device, dtype, rows, in_features, out_features, epilogue)
    check_against_reference(linear_fn(epilogue), inputs, backend, factor(backend, device, dtype))


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_linear_reads_strided_inputs(backend, device):
    """Transposed x, weight and residual, and a 3-D x: read through their strides."""
    torch.manual_seed(7)
    x = make((40, 2, 25), torch.float32, device).permute(1, 2, 0)           # (2, 25, 40), strided
    w = make((40, 48), torch.float32, device, scale=40 ** -0.5).t()         # (48, 40), transposed
    b, s = make((48,), torch.float32, device), make((48,), torch.float32, device)
    r = make((48, 2, 25), torch.float32, device).permute(1, 2, 0)
    check_against_reference(lambda x, w, b, s, r: ops.linear(x, w, b, "gelu", layer_scale=s, residual=r),
                            [x, w, b, s, r], backend)


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_linear_gradient_of_only_some_inputs(backend, device):
    """Frozen weights (the meta model's layers): no pre-activation is kept, grads still right."""
    torch.manual_seed(8)
    x, w = make((9, 32), torch.float32, device), make((24, 32), torch.float32, device)
    b, s, r = (make((24,), torch.float32, device), make((24,), torch.float32, device),
               make((9, 24), torch.float32, device))
    with ops.use_backend(backend):
        xs = x.clone().requires_grad_()
        out = ops.linear(xs, w, b, "gelu", layer_scale=s, residual=r)
        (dx,) = torch.autograd.grad(out.sum(), (xs,))
        rs = r.clone().requires_grad_()
        (dr,) = torch.autograd.grad(ops.linear(x, w, b, "gelu", layer_scale=s, residual=rs).sum(), (rs,))
    x64 = x.double().requires_grad_()
    out64 = r.double() + s.double() * torch.nn.functional.gelu(x64 @ w.double().T + b.double())
    (dx64,) = torch.autograd.grad(out64.sum(), (x64,))
    torch.testing.assert_close(out.double(), out64.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dx.double(), dx64, atol=1e-5, rtol=1e-5)
    assert torch.equal(dr, torch.ones_like(r))


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_float16(backend, device):
    """float16 at a ViT-S block's size, one call per op with every flag on."""
    torch.manual_seed(8)
    x, r = make((197, 384), torch.float16, device, shift=0.5), make((197, 384), torch.float16, device)
    w, b = make((384,), torch.float16, device, shift=1.0), make((384,), torch.float16, device)
    check_against_reference(lambda x, r, w, b: ops.add_layer_norm(x, r, w, b, EPS), [x, r, w, b], backend)
    weight = make((384, 384), torch.float16, device, scale=384 ** -0.5)
    check_against_reference(lambda x, w, b, s, r: ops.linear(x, w, b, "gelu", layer_scale=s, residual=r),
                            [x, weight, b, w, r], backend)


# --------------------------------------------------------------------------------------
# mixed dtypes as under autocast (issue 13, item 5): fp32 residual stream, half-precision branch
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("backend, device, rows, width", backend_shapes([(1, 192), (197, 384), (3 * 50, 1000), (5, 50)],
                                                                                 NORM_INTERPRETER_ROWS))
@pytest.mark.parametrize("param_dtype", ["fp32", "branch"])
def test_add_layer_norm_fp32_residual_half_branch(backend, device, dtype, rows, width, param_dtype):
    """summed and normed come back fp32 (eager's promotion), dx in the branch's dtype, the
    residual's gradient fp32; also with the fp32 tensor passed as x (served swapped). The
    outputs are fp32, so the 2x rule holds under Triton's interpreter in bf16 too (add +
    LayerNorm has no dots; only the cast of dx is torch's)."""
    torch.manual_seed(rows + width)
    pdtype = torch.float32 if param_dtype == "fp32" else dtype
    x = make((rows, width), dtype, device, scale=2.0, shift=0.5)
    r = make((rows, width), torch.float32, device, scale=3.0)
    w, b = make((width,), pdtype, device, scale=0.2, shift=1.0), make((width,), pdtype, device, scale=0.2)
    assert backend_table(backend)["add_layer_norm"][1](x, r, w, b, EPS) is None
    with ops.use_backend(backend):
        normed, summed = ops.add_layer_norm(x, r, w, b, EPS)
    assert normed.dtype == summed.dtype == torch.float32
    check_against_reference(lambda x, r, w, b: ops.add_layer_norm(x, r, w, b, EPS), [x, r, w, b], backend)
    check_against_reference(lambda x, r: ops.add_layer_norm(x, r, None, None, EPS), [x, r], backend)
    # the other way round (an fp32 branch onto a half-precision stream) promotes the same way
    check_against_reference(lambda r, x: ops.add_layer_norm(r, x, None, None, EPS), [r, x], backend)
    check_against_reference(lambda r, x: ops.add_layer_norm(r, x, w, b, EPS), [r, x], backend)


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("rows, in_features, out_features", shapes([(50, 64, 192), (37, 64, 48)]))
@pytest.mark.parametrize("epilogue", ["fc2_bias_scale_residual", "gelu_scale_residual", "residual_only"])
def test_linear_residual_epilogue_fp32_residual_half_branch(backend, device, dtype, rows, in_features,
                                                            out_features, epilogue):
    """A half-precision GEMM onto an fp32 residual (as under autocast): out fp32, the residual's
    gradient fp32."""
    torch.manual_seed(4)
    fn = linear_fn(epilogue)
    inputs = linear_inputs(device, dtype, rows, in_features, out_features, epilogue, residual_dtype=torch.float32)
    with ops.use_backend(backend):
        assert fn(*inputs).dtype == torch.float32
    check_against_reference(fn, inputs, backend, factor(backend, device, dtype))


# --------------------------------------------------------------------------------------
# attention
# --------------------------------------------------------------------------------------
def attention_case(backend, device, dtype, batch, heads, n_q, n_kv, head_dim, scale=None):
    q = make((batch, heads, n_q, head_dim), dtype, device)
    k = make((batch, heads, n_kv, head_dim), dtype, device)
    v = make((batch, heads, n_kv, head_dim), dtype, device)
    check_against_reference(lambda q, k, v: ops.attention(q, k, v, scale), [q, k, v], backend,
                            factor(backend, device, dtype))


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES[:3])
@pytest.mark.parametrize("batch, heads, n, head_dim", shapes([
    (2, 2, 50, 32),    # the ViT test model: ragged second key block
    (1, 1, 197, 64),   # ViT-B/16 at 224: 7 ragged blocks
    (1, 2, 65, 80),    # head dim padded to 128
    (2, 1, 1, 128),    # one token
    (1, 1, 33, 96),
    # every ViT length with every head dim at least once (1 token, 50, 197, 257: one past 256)
    (1, 1, 1, 32), (1, 1, 1, 80), (1, 1, 50, 64), (1, 1, 50, 128),
    (1, 1, 197, 32), (1, 1, 197, 80), (1, 1, 257, 64), (1, 1, 257, 128),
]))
def test_attention_matches_reference(backend, device, dtype, batch, heads, n, head_dim):
    skip_unless_implemented("attention", backend)
    skip_unless_dtype(backend, device, dtype)
    torch.manual_seed(n + head_dim)
    attention_case(backend, device, dtype, batch, heads, n, n, head_dim)


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_attention_queries_and_keys_of_different_lengths_and_custom_scale(backend, device):
    skip_unless_implemented("attention", backend)
    torch.manual_seed(1)
    attention_case(backend, device, torch.float32, 1, 2, 33, 70, 64, scale=0.3)
    attention_case(backend, device, torch.float16, 1, 1, 70, 17, 32, scale=0.05)


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES[:2])
def test_attention_reads_strided_qkv_views(backend, device, dtype):
    """q, k, v as the ViT makes them (views of one qkv tensor), the output gradient strided too."""
    skip_unless_implemented("attention", backend)
    torch.manual_seed(2)
    B, N, H, D = 2, 50, 2, 32
    qkv = make((B, N, 3 * H * D), dtype, device)

    def attend(qkv):
        q, k, v = qkv.reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)
        assert not q.is_contiguous()
        return ops.attention(q, k, v).transpose(1, 2).reshape(B, N, H * D)

    check_against_reference(attend, [qkv], backend)


# --------------------------------------------------------------------------------------
# the small ViT on each backend's kernels
# --------------------------------------------------------------------------------------
VIT = dict(img_size=28, patch_size=4, in_chans=1, embed_dim=64, depth=2, num_heads=2, num_classes=10)


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("init_values", [None, 0.5], ids=["no_layer_scale", "layer_scale"])
def test_vit_matches_eager_logits_and_gradients(backend, device, init_values):
    """Logits and every parameter gradient, with every op the backend has serving (what it
    lacks, attention on the extension, runs eager)."""
    check_vit(backend, device, {**VIT, "init_values": init_values}, batch=4, seed=6)
