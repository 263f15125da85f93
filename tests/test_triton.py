"""The Triton backend of incubation.ops (incubation/kernels), what is its own.

Its ops' numerics at small shapes (attention, (add +) LayerNorm, linear, the ViT: every output
and gradient against float64 with docs/DESIGN.md's rule) are checked with every other backend's
in test_kernels.py, under the interpreter on CPU tensors and compiled on CUDA. Here: what its
capability checks refuse and why, the interpreter's bf16 workarounds, TestCUDA at ViT sizes
(compiled kernels, autotuned configs), and the autotune keys. Outputs are poisoned (NaN) before
every call so unwritten elements show.
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
from kernel_rule import assert_within_rule, check_vit, linear_fn, linear_inputs, make, poisoned_memory  # noqa: E402

from incubation import ops  # noqa: E402

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


EPS = 1e-6


@pytest.fixture(autouse=True)
def poisoned():
    with poisoned_memory():
        yield


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

    # in place on the output is allowed, and a later backward through it refuses (the backward
    # reads the output, as SDPA's flash backward does), instead of raising at the in-place op
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    with ops.use_backend("triton"):
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
# --------------------------------------------------------------------------------------
# linear: GEMM + fused epilogue
# --------------------------------------------------------------------------------------
def linear_case(device, dtype, rows, in_features, out_features, epilogue, factor=2.0):
    inputs = linear_inputs(device, dtype, rows, in_features, out_features, epilogue)
    check_against_reference(linear_fn(epilogue), inputs, factor)


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
    monkeypatch.setattr(kernels.common, "_MAX_ELEMENTS", 1000)
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
    monkeypatch.setattr(kernels.common, "INTERPRET", False)
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
    @pytest.mark.parametrize("epilogue", ["plain", "qkv_bias", "fc1_bias_gelu", "proj_bias_scale",
                                          "fc2_bias_scale_residual", "gelu_scale_residual"])
    @pytest.mark.parametrize("in_features, out_features", [(384, 1536), (1536, 384), (768, 1000)])
    def test_linear_vit_sizes(self, dtype, epilogue, in_features, out_features):
        torch.manual_seed(in_features)
        linear_case("cuda", dtype, 16 * 197, in_features, out_features, epilogue)

    @pytest.mark.parametrize("amp", [None, torch.bfloat16], ids=["fp32", "bf16_autocast"])
    def test_vit_small(self, amp):
        check_vit("triton", "cuda", dict(img_size=224, patch_size=16, in_chans=3, embed_dim=384, depth=2, num_heads=6,
                                         num_classes=100, init_values=0.1), batch=4, seed=9, autocast_dtype=amp,
                  count=False)


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
    assert [kernels.common.bucket(n) for n in (0, 1, 2, 3, 64, 65, 197 * 7, 197 * 8)] == [1, 1, 2, 4, 64, 128, 2048, 2048]


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
    with kernels.common.device_guard(torch.empty(1)):
        pass
    assert isinstance(kernels.common.device_guard(torch.empty(1)), __import__("contextlib").nullcontext)


# --------------------------------------------------------------------------------------
# the kernels as torch custom ops: schemas, fake kernels, autograd registration, AOT dispatch
# --------------------------------------------------------------------------------------
def _opcheck_cases(device, dtype):
    """(op, args) for every Triton custom op, forward and backward, at odd sizes."""
    torch.manual_seed(6)
    q, k, v = (make((2, 3, 37, 16), dtype, device).requires_grad_() for _ in range(3))
    o, lse = triton_attention._forward(q.detach(), k.detach(), v.detach(), 0.25)
    x, r = make((5, 7, 40), dtype, device).requires_grad_(), make((5, 7, 40), dtype, device).requires_grad_()
    w, b = (make((40,), dtype, device).requires_grad_() for _ in range(2))
    _, s, mean, rstd = triton_norm._forward(x.detach(), r.detach(), w.detach(), b.detach(), EPS)
    weight, ls = make((24, 40), dtype, device).requires_grad_(), make((24,), dtype, device).requires_grad_()
    out, pre = triton_linear._linear_op(x.detach(), weight.detach(), ls.detach(), True, ls.detach(), None, True)
    return [
        (triton_attention._forward, (q, k, v, 0.25)),
        (triton_attention._backward, (make(o.shape, dtype, device), q.detach(), k.detach(), v.detach(), o, lse, 0.25)),
        (triton_norm._forward, (x, r, w, b, EPS)),
        (triton_norm._forward, (x, None, None, None, EPS)),
        (triton_norm._backward, (make(s.shape, dtype, device), s, s, w.detach(), mean, rstd, True, True)),
        (triton_norm._backward, (make(s.shape, dtype, device), None, s, None, mean, rstd, False, False)),
        (triton_linear._linear_op, (x, weight, ls, True, ls, make((5, 7, 24), dtype, device).requires_grad_(), True)),
        (triton_linear._linear_op, (x, weight, None, False, None, None, False)),
        (triton_linear._backward_op, (make(out.shape, dtype, device), x.detach(), weight.detach(), pre, ls.detach(),
                                      True, True, True, True, True)),
    ]


@pytest.mark.parametrize("device, dtype", device_dtypes())
def test_opcheck_every_triton_op(device, dtype):
    """torch.library.opcheck on each custom op (under the interpreter on CPU: the ops are
    plain custom ops with explicit fake kernels, so opcheck runs them; bf16 only on CUDA)."""
    for op, args in _opcheck_cases(device, dtype):
        results = torch.library.opcheck(op, args)
        assert all(v == "SUCCESS" for v in results.values()), f"{op}: {results}"
