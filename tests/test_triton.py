"""The Triton backend of incubation.ops (incubation/kernels): attention, (add +) LayerNorm, linear.

Without a GPU the kernels run under the Triton interpreter on CPU tensors (fp32 and fp16;
bf16 in one test of the interpreter's workarounds); with one, the same tests run on CUDA with
bf16 too, and TestCUDA adds ViT sizes. Every output and every gradient is checked against float64
with docs/DESIGN.md's rule: error at most 2x eager's error in the same dtype, plus an atol for
rounding; outputs are poisoned (NaN) before the call so unwritten elements show.
"""
from __future__ import annotations

import os

import torch

# Triton fixes interpreted-or-compiled when a kernel is decorated: the flag must be in the
# environment before incubation.kernels is imported (tests/conftest.py sets it too).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import kernel_rule  # noqa: E402
import pytest  # noqa: E402
from kernel_rule import assert_within_rule, make, poisoned_memory  # noqa: E402

from incubation import ops  # noqa: E402
from incubation.nn import VisionTransformer  # noqa: E402

kernels = pytest.importorskip("incubation.kernels", reason="Triton is not importable")
from incubation.kernels import attention as triton_attention, linear as triton_linear, norm as triton_norm  # noqa: E402,I001

HAS_CUDA = torch.cuda.is_available()
GPU_MARKS = (pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU"))
DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(
        not kernels.INTERPRET, reason="the kernels were compiled for the GPU (TRITON_INTERPRET unset)")),
    pytest.param("cuda", marks=GPU_MARKS),
]


def on_gpu(test):
    for mark in GPU_MARKS:
        test = mark(test)
    return test
LOW = (torch.float16, torch.bfloat16)
EPS = 1e-6


def device_dtypes():
    """(device, dtype) pairs: bf16 only on CUDA, since the interpreter truncates fp32 -> bf16
    casts instead of rounding them (test_bf16_under_the_interpreter covers that path)."""
    params = []
    for device in DEVICES:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            if device.values[0] == "cpu" and dtype == torch.bfloat16:
                continue
            params.append(pytest.param(device.values[0], dtype, marks=device.marks,
                                       id=f"{device.values[0]}-{str(dtype)[6:]}"))
    return params


@pytest.fixture(autouse=True)
def poisoned():
    with poisoned_memory():
        yield


def check_against_reference(fn, inputs, factor=2.0):
    kernel_rule.check_against_reference(fn, inputs, "triton", factor)


# --------------------------------------------------------------------------------------
# attention
# --------------------------------------------------------------------------------------
def attention_case(device, dtype, batch, heads, n_q, n_kv, head_dim, scale=None):
    q = make((batch, heads, n_q, head_dim), dtype, device)
    k = make((batch, heads, n_kv, head_dim), dtype, device)
    v = make((batch, heads, n_kv, head_dim), dtype, device)
    check_against_reference(lambda q, k, v: ops.attention(q, k, v, scale), [q, k, v])


@pytest.mark.parametrize("device, dtype", device_dtypes())
@pytest.mark.parametrize("batch, heads, n, head_dim", [
    (2, 2, 50, 32),    # the ViT test model: ragged second key block
    (1, 1, 197, 64),   # ViT-B/16 at 224: 7 ragged blocks
    (1, 2, 65, 80),    # head dim padded to 128
    (2, 1, 1, 128),    # one token
    (1, 1, 33, 96),
    # every ViT length with every head dim at least once (1 token, 50, 197, 257: one past 256)
    (1, 1, 1, 32), (1, 1, 1, 80), (1, 1, 50, 64), (1, 1, 50, 128),
    (1, 1, 197, 32), (1, 1, 197, 80), (1, 1, 257, 64), (1, 1, 257, 128),
])
def test_attention_matches_reference(device, dtype, batch, heads, n, head_dim):
    torch.manual_seed(n + head_dim)
    attention_case(device, dtype, batch, heads, n, n, head_dim)


@pytest.mark.parametrize("device", DEVICES)
def test_attention_queries_and_keys_of_different_lengths_and_custom_scale(device):
    torch.manual_seed(1)
    attention_case(device, torch.float32, 1, 2, 33, 70, 64, scale=0.3)
    attention_case(device, torch.float16, 1, 1, 70, 17, 32, scale=0.05)


@pytest.mark.parametrize("device, dtype", [p for p in device_dtypes() if p.values[1] != torch.bfloat16])
def test_attention_reads_strided_qkv_views(device, dtype):
    """q, k, v as the ViT makes them (views of one qkv tensor), the output gradient strided too."""
    torch.manual_seed(2)
    B, N, H, D = 2, 50, 2, 32
    qkv = make((B, N, 3 * H * D), dtype, device)

    def attend(qkv):
        q, k, v = qkv.reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)
        assert not q.is_contiguous()
        return ops.attention(q, k, v).transpose(1, 2).reshape(B, N, H * D)

    check_against_reference(attend, [qkv])


def _grads(backend, q, k, v, do):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    with ops.use_backend(backend):
        out = ops.attention(*leaves)
    return [out.detach(), *torch.autograd.grad(out, leaves, do)]


@pytest.mark.parametrize("device, dtype", [p for p in device_dtypes() if p.values[1] != torch.bfloat16])
def test_attention_output_is_bnhd_and_backward_takes_any_gradient_strides(device, dtype):
    """The Triton output is the (B, H, N, D) view of (B, N, H, D) memory, so the ViT's
    transpose(1, 2).reshape(B, N, C) is a view (no copy); the backward reads the output and
    its gradient through their strides, whatever they are."""
    torch.manual_seed(3)
    B, H, N, D = 2, 3, 50, 32
    q, k, v = (make((B, H, N, D), dtype, device) for _ in range(3))
    with ops.use_backend("triton"):
        out = ops.attention(q, k, v)
    assert out.shape == (B, H, N, D) and out.transpose(1, 2).is_contiguous()
    assert not out._is_view()   # autograd refuses in-place ops on views made inside a Function
    merged = out.transpose(1, 2).reshape(B, N, H * D)
    assert merged._is_view() and merged.data_ptr() == out.data_ptr()
    assert merged.untyped_storage().data_ptr() == out.untyped_storage().data_ptr()

    grads = {  # each in the inputs' dtype, with the strides autograd would hand the backward
        "contiguous (B, H, N, D)": make((B, H, N, D), dtype, device),
        "(B, N, H, D) as the ViT's reshape gives": make((B, N, H, D), dtype, device).transpose(1, 2),
        "every other element of a wider tensor": make((B, H, N, 2 * D), dtype, device)[..., ::2],
        "batch-expanded (stride 0)": make((1, H, N, D), dtype, device).expand(B, H, N, D),
    }
    for what, do in grads.items():
        assert do.is_contiguous() == what.startswith("contiguous")
        reference = _grads("eager", q.double(), k.double(), v.double(), do.double())
        eager = _grads("eager", q, k, v, do)
        ours = _grads("triton", q, k, v, do)
        for name, o, e, r in zip(("output", "dq", "dk", "dv"), ours, eager, reference):
            assert_within_rule(o, e, r, f"{name}, output gradient {what}")

    # in place on the output behaves as on eager's: allowed, and a later backward through it
    # refuses (both save the output), instead of raising at the in-place op (a Function's view)
    for backend in ("eager", "triton"):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        with ops.use_backend(backend):
            out = ops.attention(*leaves)
        out.mul_(2)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            out.sum().backward()


@pytest.mark.skipif(not kernels.INTERPRET, reason="runs the GPU tiles under the interpreter")
@pytest.mark.parametrize("kernel, configs", [("_forward_kernel", triton_attention._FORWARD_CONFIGS),
                                             ("_backward_kernel", triton_attention._BACKWARD_CONFIGS)])
def test_attention_gpu_tiles_are_correct(monkeypatch, kernel, configs):
    """Each GPU autotune config's tiles (the interpreter otherwise runs one small config): ragged
    N = 197 and 70 keys, head dim 80 padded to 128, fp16."""
    torch.manual_seed(4)
    autotuner = getattr(triton_attention, kernel)
    for config in {(tuple(c.kwargs.items())): c for c in configs}.values():
        monkeypatch.setattr(autotuner, "configs", [config])
        autotuner.cache.clear()
        q = make((1, 1, 197, 80), torch.float16, "cpu")
        k, v = (make((1, 1, 70, 80), torch.float16, "cpu") for _ in range(2))
        check_against_reference(lambda q, k, v: ops.attention(q, k, v), [q, k, v])


# --------------------------------------------------------------------------------------
# LayerNorm and add + LayerNorm
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("device, dtype", device_dtypes())
@pytest.mark.parametrize("rows, width", [(1, 192), (197, 384), (7, 768), (3 * 197, 1000), (5, 50)])
@pytest.mark.parametrize("residual", [False, True], ids=["ln", "add_ln"])
def test_layer_norm_matches_reference(device, dtype, rows, width, residual):
    torch.manual_seed(rows + width)
    x = make((rows, width), dtype, device, scale=2.0, shift=0.5)  # a non-zero mean stresses the variance
    w = make((width,), dtype, device, scale=0.2, shift=1.0)
    b = make((width,), dtype, device, scale=0.2)
    if residual:
        r = make((rows, width), dtype, device)
        check_against_reference(lambda x, r, w, b: ops.add_layer_norm(x, r, w, b, EPS), [x, r, w, b])
    else:
        check_against_reference(lambda x, w, b: ops.layer_norm(x, w, b, EPS), [x, w, b])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("affine", ["none", "weight", "bias"])
def test_layer_norm_optional_affine_3d(device, affine):
    torch.manual_seed(3)
    x = make((2, 50, 192), torch.float32, device, scale=3.0, shift=-1.0)
    r = make((2, 50, 192), torch.float32, device)
    params = [make((192,), torch.float32, device, shift=1.0)] if affine != "none" else []

    def split(p):
        return (p[0], None) if affine == "weight" else (None, p[0]) if affine == "bias" else (None, None)

    check_against_reference(lambda x, *p: ops.layer_norm(x, *split(p), EPS), [x, *params])
    check_against_reference(lambda x, r, *p: ops.add_layer_norm(x, r, *split(p), 1e-5), [x, r, *params])


@pytest.mark.parametrize("device", DEVICES)
def test_layer_norm_takes_fp32_parameters_and_strided_rows(device):
    """bf16 activations with fp32 parameters (gradients come back fp32); a transposed x (copied)
    and the class token of a (B, N, C) tensor (a strided row view, not copied)."""
    torch.manual_seed(4)
    x = make((384, 65), torch.bfloat16, device, shift=0.3).t()
    w = make((384,), torch.float32, device, shift=1.0)
    b = make((384,), torch.float32, device)
    check_against_reference(lambda x, w, b: ops.layer_norm(x, w, b, EPS), [x, w, b])
    tokens = make((3, 50, 192), torch.float32, device)
    check_against_reference(lambda t: ops.layer_norm(t[:, 0], None, None, EPS), [tokens])
    r = make((3, 192), torch.float32, device)
    check_against_reference(lambda t, r: ops.add_layer_norm(t[:, 0], r, None, None, EPS), [tokens, r])


@pytest.mark.parametrize("device", DEVICES)
def test_add_layer_norm_gradient_of_only_one_output(device):
    """Only `summed` or only `normed` feeds the loss: the other output's gradient is absent."""
    torch.manual_seed(5)
    x, r = make((6, 64), torch.float32, device), make((6, 64), torch.float32, device)
    w, b = make((64,), torch.float32, device), make((64,), torch.float32, device)
    check_against_reference(lambda x, r: ops.add_layer_norm(x, r, w, b, EPS)[1] * 3, [x, r])
    check_against_reference(lambda x, r, w, b: ops.add_layer_norm(x, r, w, b, EPS)[0], [x, r, w, b])


@pytest.mark.parametrize("device", DEVICES)
def test_norm_without_residual_and_empty_batch(device):
    x = make((5, 64), torch.float32, device)
    with ops.use_backend("triton"):
        normed, summed = ops.add_layer_norm(x, None, None, None, EPS)
        empty = torch.zeros(0, 64, device=device, requires_grad=True)
        w = torch.ones(64, device=device, requires_grad=True)
        out = ops.layer_norm(empty, w, None, EPS)
    assert summed is x
    torch.testing.assert_close(normed, torch.nn.functional.layer_norm(x, (64,), eps=EPS))
    assert out.shape == (0, 64)
    (dw,) = torch.autograd.grad(out.sum(), (w,))
    assert torch.equal(dw, torch.zeros_like(dw))


# --------------------------------------------------------------------------------------
# linear: GEMM + fused epilogue
# --------------------------------------------------------------------------------------
EPILOGUES = {  # name: (activation, bias, layer_scale, residual), as the ViT uses them
    "plain": (None, False, False, False),
    "qkv_bias": (None, True, False, False),
    "fc1_bias_gelu": ("gelu", True, False, False),
    "proj_bias_scale": (None, True, True, False),
    "fc2_bias_scale_residual": (None, True, True, True),
    "gelu_scale_residual": ("gelu", False, True, True),
}


def linear_fn(activation, has_bias, has_scale, has_residual):
    def fn(x, weight, *rest):
        rest = list(rest)
        bias = rest.pop(0) if has_bias else None
        scale = rest.pop(0) if has_scale else None
        residual = rest.pop(0) if has_residual else None
        return ops.linear(x, weight, bias, activation, layer_scale=scale, residual=residual)
    return fn


def linear_case(device, dtype, rows, in_features, out_features, epilogue, residual_dtype=None, factor=2.0):
    activation, has_bias, has_scale, has_residual = EPILOGUES[epilogue]
    x = make((rows, in_features), dtype, device)
    inputs = [x, make((out_features, in_features), dtype, device, scale=in_features ** -0.5)]
    if has_bias:
        inputs.append(make((out_features,), dtype, device, scale=0.5))
    if has_scale:
        inputs.append(make((out_features,), dtype, device, scale=0.5, shift=0.5))
    if has_residual:
        inputs.append(make((rows, out_features), residual_dtype or dtype, device))
    check_against_reference(linear_fn(*EPILOGUES[epilogue]), inputs, factor)


@pytest.mark.parametrize("device, dtype", device_dtypes())
@pytest.mark.parametrize("epilogue", list(EPILOGUES))
@pytest.mark.parametrize("rows, in_features, out_features", [(50, 64, 192), (7, 100, 1000), (1, 33, 50)])
def test_linear_matches_reference(device, dtype, epilogue, rows, in_features, out_features):
    torch.manual_seed(rows + out_features)
    linear_case(device, dtype, rows, in_features, out_features, epilogue)


@pytest.mark.parametrize("device, dtype", [p for p in device_dtypes() if p.values[1] in LOW])
def test_linear_low_precision_into_fp32_residual_stream(device, dtype):
    """As under autocast: bf16/fp16 GEMM, fp32 residual; the output and its gradient stay fp32."""
    torch.manual_seed(6)
    linear_case(device, dtype, 37, 64, 48, "fc2_bias_scale_residual", residual_dtype=torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_linear_reads_strided_inputs(device):
    """Transposed x, weight and residual, and a 3-D x: read through their strides."""
    torch.manual_seed(7)
    x = make((40, 2, 25), torch.float32, device).permute(1, 2, 0)           # (2, 25, 40), strided
    w = make((40, 48), torch.float32, device, scale=40 ** -0.5).t()         # (48, 40), transposed
    b, s = make((48,), torch.float32, device), make((48,), torch.float32, device)
    r = make((48, 2, 25), torch.float32, device).permute(1, 2, 0)
    check_against_reference(linear_fn("gelu", True, True, True), [x, w, b, s, r])


@pytest.mark.parametrize("device", DEVICES)
def test_linear_gradient_of_only_some_inputs(device):
    """Frozen weights (the meta model's layers): no pre-activation is kept, grads still right."""
    torch.manual_seed(8)
    x, w = make((9, 32), torch.float32, device), make((24, 32), torch.float32, device)
    b, s, r = (make((24,), torch.float32, device), make((24,), torch.float32, device),
               make((9, 24), torch.float32, device))
    with ops.use_backend("triton"):
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


@pytest.mark.parametrize("device", DEVICES)
def test_linear_empty_batch(device):
    x = torch.zeros(0, 16, device=device, requires_grad=True)
    w = torch.ones(8, 16, device=device, requires_grad=True)
    s = torch.ones(8, device=device, requires_grad=True)
    with ops.use_backend("triton"):
        out = ops.linear(x, w, None, "gelu", layer_scale=s)
    assert out.shape == (0, 8)
    dw, ds = torch.autograd.grad(out.sum(), (w, s))
    assert torch.equal(dw, torch.zeros_like(dw)) and torch.equal(ds, torch.zeros_like(ds))


# --------------------------------------------------------------------------------------
# what the backend refuses
# --------------------------------------------------------------------------------------
def refused_calls(device):
    """Calls the Triton kernels cannot serve: (op, args for ops.<op>, args for the check,
    the check, words its reason must contain)."""
    f32 = dict(device=device, dtype=torch.float32)
    big_head = torch.randn(1, 1, 4, 160, **f32)
    x64 = torch.randn(4, 8, device=device, dtype=torch.float64)
    x16 = torch.randn(4, 8, device=device, dtype=torch.float16)
    wide = torch.randn(2, triton_norm.MAX_FEATURES + 1, **f32)
    return [
        ("attention", (big_head, big_head, big_head), (big_head, big_head, big_head, 0.1), triton_attention.check,
         "head dim 160"),
        ("attention", (x64[None, None],) * 3, (x64[None, None],) * 3 + (0.1,), triton_attention.check, "float64"),
        ("add_layer_norm", (x16, x64, None, None), (x16, x64, None, None, EPS), triton_norm.check_add_layer_norm,
         "residual has dtype torch.float64"),
        ("layer_norm", (wide, None, None), (wide, None, None, EPS), triton_norm.check_layer_norm, "features exceed"),
        ("linear", (x64, torch.randn(3, 8, device=device, dtype=torch.float64)),
         (x64, torch.randn(3, 8, device=device, dtype=torch.float64), None, None, None, None), triton_linear.check,
         "float64"),
    ]


@pytest.mark.parametrize("device", DEVICES)
def test_check_gives_a_reason_and_forced_triton_raises(device):
    for op, args, check_args, check, words in refused_calls(device):
        reason = check(*check_args)
        assert reason and words in reason, (op, reason)
        with ops.use_backend("triton"), pytest.raises(ops.BackendError, match=words):
            getattr(ops, op)(*args)


@pytest.mark.skipif(not kernels.INTERPRET, reason="checks CPU tensors under the interpreter")
def test_attention_check_refuses_a_non_positive_scale_and_too_many_row_blocks(monkeypatch):
    """The kernels take the row max of unscaled scores (right for scale > 0 only), and put the
    row blocks of one (batch, head) on the grid's second axis (65535 on CUDA)."""
    q = torch.randn(1, 1, 100, 8)
    for scale in (-0.5, 0.0, float("nan")):
        assert "positive finite" in triton_attention.check(q, q, q, scale)
    monkeypatch.setattr(triton_attention, "MAX_GRID_BLOCKS", 6)
    assert "row blocks" in triton_attention.check(q, q, q, 0.5)    # 4 + 4 blocks of 32 rows
    short = q[:, :, :64]
    assert triton_attention.check(short, short, short, 0.5) is None


def test_check_refuses_views_reaching_past_32_bit_offsets(monkeypatch):
    """The kernels index a strided view with 32-bit offsets: a slice of a wider tensor reaches
    further than its element count. Shown with the limit lowered to 1000 elements."""
    monkeypatch.setattr(kernels, "_MAX_ELEMENTS", 1000)
    wide = torch.randn(10, 200)
    x, w = wide[:, :8], torch.randn(4, 8)        # 80 elements, but its last one is element 1807
    assert "reaches 1807 elements" in triton_linear.check(x, w, None, None, None, None)
    assert triton_linear.check(x.contiguous(), w, None, None, None, None) is None
    assert "reaches" in triton_linear.check(x.contiguous(), w, None, None, None, wide[:, 100:104])
    q = torch.randn(1, 1, 40, 8).expand(3, 1, 40, 8)    # stride 0 over the batch: reaches 319
    assert triton_attention.check(q, q, q, 0.5) is None
    kv = torch.randn(2, 1, 5, 8)
    assert "reaches 1807 elements" in triton_attention.check(wide.view(2, 5, 200)[:, None, :, :8], kv, kv, 0.5)


def test_check_refuses_cpu_tensors_for_compiled_kernels(monkeypatch):
    monkeypatch.setattr(kernels, "INTERPRET", False)
    assert "built for the GPU" in triton_norm.check_layer_norm(torch.randn(2, 8), None, None, EPS)


@on_gpu
def test_auto_falls_back_to_eager_and_reports_why():
    for op, args, _, _, words in refused_calls("cuda"):
        with ops.use_backend("auto"):
            outs = getattr(ops, op)(*args)
        with ops.use_backend("eager"):
            expected = getattr(ops, op)(*args)
        for o, e in zip(outs if isinstance(outs, tuple) else (outs,),
                        expected if isinstance(expected, tuple) else (expected,)):
            torch.testing.assert_close(o, e)
        assert words in ops.backends("cuda")[op]["refused"]["triton"], op


@pytest.mark.skipif(not kernels.INTERPRET, reason="checks the interpreter's bf16 path")
def test_bf16_under_the_interpreter():
    """The interpreter's bf16 tl.dot is wrong, so the kernels cast dot operands to fp32 there.
    Its fp32 -> bf16 casts truncate (up to an ulp, where rounding errs by half of one), hence
    4x eager's error here; the 2x rule for bf16 is checked on CUDA."""
    torch.manual_seed(11)
    bf16 = torch.bfloat16
    q, k, v = (make((1, 2, 50, 32), bf16, "cpu") for _ in range(3))
    check_against_reference(lambda q, k, v: ops.attention(q, k, v), [q, k, v], factor=4.0)
    x, r = make((7, 192), bf16, "cpu"), make((7, 192), bf16, "cpu")
    w, b = make((192,), bf16, "cpu", shift=1.0), make((192,), bf16, "cpu")
    check_against_reference(lambda x, r, w, b: ops.add_layer_norm(x, r, w, b, EPS), [x, r, w, b], factor=4.0)
    linear_case("cpu", bf16, 50, 64, 192, "gelu_scale_residual", factor=4.0)


def test_interpreter_flag_matches_the_machine():
    """Without CUDA the kernels must have been built interpreted, even when the whole test
    directory was collected first (other test files import incubation before this one)."""
    assert kernels.INTERPRET == (os.environ.get("TRITON_INTERPRET") == "1")
    if not HAS_CUDA:
        assert kernels.INTERPRET


# --------------------------------------------------------------------------------------
# the ViT on the Triton kernels
# --------------------------------------------------------------------------------------
VIT = dict(img_size=28, patch_size=4, in_chans=1, embed_dim=64, depth=2, num_heads=2, num_classes=10)


def _double(model):
    twin = VisionTransformer(model.config).to(next(model.parameters()).device).double()
    twin.load_state_dict(model.state_dict())
    return twin


def vit_case(device, config, batch, autocast_dtype=None):
    """Logits and every parameter gradient of the ViT on Triton vs eager vs eager float64."""
    torch.manual_seed(9)
    model = VisionTransformer(**config).to(device)
    images = torch.randn(batch, config["in_chans"], config["img_size"], config["img_size"], device=device)
    labels = torch.randint(0, config["num_classes"], (batch,), device=device)

    def run(m, x, backend, amp=None):
        m.zero_grad()
        with ops.use_backend(backend), torch.autocast(device, dtype=amp or torch.float32, enabled=amp is not None):
            logits = m(x)
        torch.nn.functional.cross_entropy(logits.float(), labels).backward()
        return [logits.detach()] + [p.grad.detach().clone() for p in m.parameters()]

    reference = run(_double(model), images.double(), "eager")
    eager = run(model, images, "eager", autocast_dtype)
    ours = run(model, images, "triton", autocast_dtype)
    names = ["logits"] + [name for name, _ in model.named_parameters()]
    for name, o, e, r in zip(names, ours, eager, reference):
        assert_within_rule(o, e, r, name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("init_values", [None, 0.5], ids=["no_layer_scale", "layer_scale"])
def test_vit_matches_eager_logits_and_gradients(device, init_values):
    vit_case(device, {**VIT, "init_values": init_values}, batch=2)


# --------------------------------------------------------------------------------------
# CUDA: bf16 and ViT sizes (compiled kernels, autotuned configs)
# --------------------------------------------------------------------------------------
@on_gpu
class TestCUDA:
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
    @pytest.mark.parametrize("n, head_dim", [(197, 64), (257, 64), (50, 32), (65, 80), (197, 128), (1, 64)])
    def test_attention_vit_sizes(self, dtype, n, head_dim):
        torch.manual_seed(n)
        attention_case("cuda", dtype, 8, 6, n, n, head_dim)

    def test_attention_long_sequence_bf16(self):
        torch.manual_seed(10)
        attention_case("cuda", torch.bfloat16, 2, 4, 1025, 1025, 64)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
    @pytest.mark.parametrize("width", [192, 384, 768, 1000, 1280])
    def test_add_layer_norm_vit_sizes(self, dtype, width):
        torch.manual_seed(width)
        x, r = make((64 * 197, width), dtype, "cuda"), make((64 * 197, width), dtype, "cuda")
        w, b = make((width,), torch.float32, "cuda", shift=1.0), make((width,), torch.float32, "cuda")
        check_against_reference(lambda x, r, w, b: ops.add_layer_norm(x, r, w, b, EPS), [x, r, w, b])

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
    @pytest.mark.parametrize("epilogue", list(EPILOGUES))
    @pytest.mark.parametrize("in_features, out_features", [(384, 1536), (1536, 384), (768, 1000)])
    def test_linear_vit_sizes(self, dtype, epilogue, in_features, out_features):
        torch.manual_seed(in_features)
        linear_case("cuda", dtype, 16 * 197, in_features, out_features, epilogue)

    @pytest.mark.parametrize("amp", [None, torch.bfloat16], ids=["fp32", "bf16_autocast"])
    def test_vit_small(self, amp):
        vit_case("cuda", dict(img_size=224, patch_size=16, in_chans=3, embed_dim=384, depth=2, num_heads=6,
                              num_classes=100, init_values=0.1), batch=4, autocast_dtype=amp)


# --------------------------------------------------------------------------------------
# autotune keys (issue 13, item 4)
# --------------------------------------------------------------------------------------
def tuning_key(autotuner, args, kwargs):
    """The key triton.runtime.Autotuner.run computes for a launch (its own rule: the named
    arguments present, then every tensor argument's dtype)."""
    named = {**dict(zip(autotuner.arg_names, args)), **kwargs}
    named = {k: v for k, v in named.items() if k in autotuner.arg_names}
    return tuple([named[k] for k in autotuner.keys if k in named] +
                 [str(v.dtype) for v in named.values() if hasattr(v, "dtype")])


def launch_keys(monkeypatch, autotuner, calls):
    """The tuning key of each launch of `autotuner` made by each call in `calls`."""
    keys, run = [], autotuner.run

    def recording_run(*args, **kwargs):
        keys.append(tuning_key(autotuner, args, kwargs))
        return run(*args, **kwargs)

    monkeypatch.setattr(autotuner, "run", recording_run)
    with ops.use_backend("triton"):
        for call in calls:
            call()
    return keys


def test_bucket_is_the_next_power_of_two():
    assert [kernels.bucket(n) for n in (0, 1, 2, 3, 64, 65, 197 * 7, 197 * 8)] == [1, 1, 2, 4, 64, 128, 2048, 2048]


@pytest.mark.skipif(not kernels.INTERPRET, reason="launches on CPU tensors under the interpreter")
def test_linear_key_buckets_rows_and_names_every_flag(monkeypatch):
    """A partial last batch (7 of 8 images x 197 tokens) keys like the full one, so it reuses the
    tuned config; a different epilogue (bias or layer scale on / off) keys apart."""
    w, b, s = torch.randn(48, 32), torch.randn(48), torch.randn(48)
    x = lambda rows: torch.randn(rows, 32)  # noqa: E731
    keys = launch_keys(monkeypatch, triton_linear._forward_kernel, [
        lambda: ops.linear(x(197 * 8), w, b, "gelu", layer_scale=s),
        lambda: ops.linear(x(197 * 7), w, b, "gelu", layer_scale=s),
        lambda: ops.linear(x(197 * 4), w, b, "gelu", layer_scale=s),
        lambda: ops.linear(x(197 * 8), w, None, "gelu", layer_scale=s),
        lambda: ops.linear(x(197 * 8), w, b, "gelu"),
    ])
    full, partial, half, no_bias, no_scale = keys
    assert full == partial
    assert len({full, half, no_bias, no_scale}) == 4


@pytest.mark.skipif(not kernels.INTERPRET, reason="launches on CPU tensors under the interpreter")
def test_attention_key_ignores_the_batch_and_names_its_constexprs(monkeypatch):
    q = lambda batch, d=32: torch.randn(batch, 2, 50, d)  # noqa: E731
    keys = launch_keys(monkeypatch, triton_attention._forward_kernel, [
        lambda: ops.attention(q(3), q(3), q(3)), lambda: ops.attention(q(2), q(2), q(2)),
        lambda: ops.attention(q(2, 24), q(2, 24), q(2, 24))])
    assert keys[0] == keys[1] != keys[2]
    for name in ("BLOCK_D", "UPCAST", "PRECISION"):
        assert name in triton_attention._forward_kernel.keys


def test_autotune_keeps_results_across_runs_where_triton_can():
    import inspect

    import triton
    for autotuner in (triton_linear._forward_kernel, triton_attention._forward_kernel,
                      triton_attention._backward_kernel):
        if "cache_results" in inspect.signature(triton.autotune).parameters and not kernels.INTERPRET:
            assert autotuner.cache_results
        for flag in ("HAS_BIAS", "HAS_LS", "GELU", "HAS_RESIDUAL", "STORE_PRE", "UPCAST", "PRECISION"):
            if flag in autotuner.fn.arg_names:
                assert flag in autotuner.keys, (autotuner.fn.__name__, flag)


def test_device_guard_is_a_no_op_for_cpu_tensors():
    with kernels.device_guard(torch.empty(1)):
        pass
    assert isinstance(kernels.device_guard(torch.empty(1)), __import__("contextlib").nullcontext)


# --------------------------------------------------------------------------------------
# mixed dtypes as under autocast (issue 13, item 5): fp32 residual stream, half-precision branch
# --------------------------------------------------------------------------------------
def mixed_dtypes():
    """(device, branch dtype): add + LayerNorm has no dots, so bf16 is right under the interpreter
    too (its outputs are fp32; only the cast of dx to bf16 is torch's)."""
    return [pytest.param(d.values[0], dtype, marks=d.marks, id=f"{d.values[0]}-{str(dtype)[6:]}")
            for d in DEVICES for dtype in LOW]


@pytest.mark.parametrize("device, dtype", mixed_dtypes())
@pytest.mark.parametrize("rows, width", [(1, 192), (197, 384), (3 * 50, 1000)])
@pytest.mark.parametrize("param_dtype", ["fp32", "branch"])
def test_add_layer_norm_fp32_residual_half_branch(device, dtype, rows, width, param_dtype):
    """summed and normed come back fp32 (as eager's promotion), dx in the branch's dtype, the
    residual's gradient fp32; all within the rule against float64."""
    torch.manual_seed(rows + width)
    pdtype = torch.float32 if param_dtype == "fp32" else dtype
    x = make((rows, width), dtype, device, scale=2.0, shift=0.5)
    r = make((rows, width), torch.float32, device, scale=3.0)
    w, b = make((width,), pdtype, device, scale=0.2, shift=1.0), make((width,), pdtype, device, scale=0.2)
    assert triton_norm.check_add_layer_norm(x, r, w, b, EPS) is None
    with ops.use_backend("triton"):
        normed, summed = ops.add_layer_norm(x, r, w, b, EPS)
    assert normed.dtype == summed.dtype == torch.float32
    check_against_reference(lambda x, r, w, b: ops.add_layer_norm(x, r, w, b, EPS), [x, r, w, b])
    check_against_reference(lambda x, r: ops.add_layer_norm(x, r, None, None, EPS), [x, r])
    # the other way round (an fp32 branch onto a half-precision stream) promotes the same way
    check_against_reference(lambda r, x: ops.add_layer_norm(r, x, w, b, EPS), [r, x])


@pytest.mark.parametrize("device", DEVICES)
def test_linear_fp32_residual_epilogue_fp16_all_flags(device):
    """The residual epilogue with every flag, fp16 GEMM onto an fp32 residual: out fp32."""
    torch.manual_seed(5)
    dtype = torch.float16 if device == "cpu" else torch.bfloat16
    for epilogue in ("fc2_bias_scale_residual", "gelu_scale_residual"):
        linear_case(device, dtype, 50, 64, 192, epilogue, residual_dtype=torch.float32)
