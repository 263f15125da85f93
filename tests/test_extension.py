"""The compiled extension incubation._C, what is its own: the "cpp" (CPU) and "cuda" backends of
incubation.ops as built here. Its kernels' numerics (every op against float64 with docs/DESIGN.md's
rule, over shapes and dtypes, the ViT's logits and gradients) are checked with every other
backend's in test_kernels.py; here are float64 gradchecks (only the C++ kernels take float64),
the raw torch.library operators and their input validation, its capability checks and what
dispatch does with them, the import error without a build, and a few training steps on it.
CUDA twins of the CPU tests run when a GPU and a CUDA build are present.
"""
from __future__ import annotations

import importlib

import pytest
import torch
from kernel_rule import backend_table, make, serving

from incubation import ops
from incubation.nn import VisionTransformer

try:
    from incubation import extension
except ImportError as exc:  # the extension is optional: CI builds it, a pure-Python install lacks it
    pytest.skip(f"incubation._C is not available: {exc}", allow_module_level=True)

L = torch.ops.incubation
HAS_CUDA = torch.cuda.is_available() and extension.with_cuda
# `gpu` marks what needs CUDA (benchmarks/gpu.sh selects it with -m gpu)
GPU_MARKS = (pytest.mark.gpu, pytest.mark.skipif(
    not HAS_CUDA, reason="needs a CUDA device and incubation._C built with its CUDA kernels"))
DEVICES = ["cpu", pytest.param("cuda", marks=GPU_MARKS)]
BACKEND = {"cpu": "cpp", "cuda": "cuda"}
EPS = 1e-6
CHECK = {op: check for op, (_, check) in backend_table("cpp").items()}   # the capability checks


# --------------------------------------------------------------------------------------
# float64 gradchecks: LayerNorm and add + LayerNorm
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("residual", [False, True])
def test_layer_norm_gradcheck_float64(residual):
    torch.manual_seed(3)
    x = torch.randn(6, 37, dtype=torch.float64, requires_grad=True)
    r = torch.randn(6, 37, dtype=torch.float64, requires_grad=True)
    w = torch.randn(37, dtype=torch.float64, requires_grad=True)
    b = torch.randn(37, dtype=torch.float64, requires_grad=True)
    with ops.use_backend("cpp"):
        if residual:
            assert torch.autograd.gradcheck(lambda x, r, w, b: ops.add_layer_norm(x, r, w, b, 1e-5), (x, r, w, b))
        else:
            assert torch.autograd.gradcheck(lambda x, w, b: ops.layer_norm(x, w, b, 1e-5), (x, w, b))


# --------------------------------------------------------------------------------------
# float64 gradchecks: linear with its fused epilogue
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("activation", [None, "gelu"])
def test_linear_gradcheck_float64(activation):
    torch.manual_seed(4)
    args = [torch.randn(*shape, dtype=torch.float64, requires_grad=True)
            for shape in ((2, 5, 12), (9, 12), (9,), (9,), (2, 5, 9))]
    with ops.use_backend("cpp"):
        assert torch.autograd.gradcheck(
            lambda x, w, b, s, r: ops.linear(x, w, b, activation, layer_scale=s, residual=r), args)


# --------------------------------------------------------------------------------------
# the raw operators: torch.library registrations and input validation
# --------------------------------------------------------------------------------------
OPCHECK_CASES = [pytest.param("cpu", dtype, id=f"cpu-{str(dtype)[6:]}") for dtype in extension.DTYPES["cpu"]] + [
    pytest.param("cuda", dtype, id=f"cuda-{str(dtype)[6:]}", marks=GPU_MARKS) for dtype in extension.DTYPES["cuda"]]


@pytest.mark.parametrize("device, dtype", OPCHECK_CASES)
def test_opcheck_all_ops(device, dtype):
    """Schemas, fake kernels, autograd registration and AOT dispatch (torch.compile's path),
    in every dtype the kernels are built for."""
    torch.manual_seed(5)
    x = make((7, 40), dtype, device).requires_grad_()
    r = make((7, 40), dtype, device).requires_grad_()
    w = make((40,), dtype, device).requires_grad_()
    b = make((40,), dtype, device).requires_grad_()
    _, mean, rstd = L.layer_norm_fwd(x.detach(), w.detach(), b.detach(), EPS)
    g = make((7, 40), dtype, device)
    cases = [
        (L.layer_norm_fwd, (x, w, b, EPS)),
        (L.layer_norm_fwd, (x, None, None, EPS)),
        (L.add_layer_norm_fwd, (x, r, w, b, EPS)),
        (L.layer_norm_bwd, (g, g, x.detach(), mean, rstd, w.detach(), True, True)),
        (L.layer_norm_bwd, (g, None, x.detach(), mean, rstd, None, False, False)),
        (L.linear_epilogue_fwd, (x, b, w, r, True)),
        (L.linear_epilogue_fwd, (x, None, None, r, False)),
        (L.linear_epilogue_bwd, (g, x.detach(), b.detach(), w.detach(), True, True, True)),
    ]
    if device == "cpu":   # attention: (B, H, N, D) heads, the ViT's strided views of qkv included
        qkv = make((2, 5, 3, 2, 8), dtype, device).requires_grad_()
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        out, lse = L.attention_fwd(q.detach(), k.detach(), v.detach(), 0.3)
        cases += [(L.attention_fwd, (q, k, v, 0.3)),
                  (L.attention_fwd, (make((1, 2, 3, 8), dtype, device), k[:1], v[:1], 1.0)),
                  (L.attention_bwd, (make((2, 2, 5, 8), dtype, device), q.detach(), k.detach(), v.detach(), out, lse,
                                     0.3))]
    for op, args in cases:
        results = torch.library.opcheck(op, args)
        assert all(v == "SUCCESS" for v in results.values()), f"{op}: {results}"


def _attention_error_cases(q, out, lse):
    return [
        (L.attention_fwd, (q[0], q, q, 0.3), r"q must have 4 dimensions \(B, H, N, D\)"),
        (L.attention_fwd, (q, q.double(), q, 0.3), "k has dtype Double but q has Float"),
        (L.attention_fwd, (q, q[:, :2], q[:, :2], 0.3), "must agree in batch, heads and head dim"),
        (L.attention_fwd, (q, q, q[:, :, :4], 0.3), "k and v must have the same shape"),
        (L.attention_fwd, (q, q[:, :, :0], q[:, :, :0], 0.3), "keys and the head dim must be non-empty"),
        (L.attention_fwd, (q, q, q.transpose(2, 3).contiguous().transpose(2, 3), 0.3),
         "v's last dimension must have stride 1"),
        (L.attention_fwd, (q, q, q, 0.0), "scale must be a positive finite number"),
        (L.attention_fwd, (q.to(torch.int32), q, q, 0.3), "q must be float32"),
        (L.attention_bwd, (q, q, q, q, out, lse.double(), 0.3), "lse must be Float"),
        (L.attention_bwd, (q, q, q, q, out, lse[:, :, :4], 0.3), r"lse must have shape \(B, H, N\)"),
        (L.attention_bwd, (q[:, :, :4], q, q, q, out, lse, 0.3), "must have q's shape"),
    ]


def _error_cases(device):
    f32 = dict(device=device, dtype=torch.float32)
    x, w = torch.randn(4, 8, **f32), torch.randn(8, **f32)
    _, mean, rstd = L.layer_norm_fwd(x, w, None, EPS)
    cases = [
        (L.layer_norm_fwd, (x.to(torch.int32), None, None, EPS), "x must be float32, bfloat16 or float16"),
        (L.layer_norm_fwd, (torch.randn(8, 4, **f32).t(), None, None, EPS), "x must be contiguous"),
        (L.layer_norm_fwd, (torch.tensor(1.0, **f32), None, None, EPS), "x must have at least one dimension"),
        (L.layer_norm_fwd, (torch.randn(4, 0, **f32), None, None, EPS), "x's last dimension must be non-empty"),
        (L.layer_norm_fwd, (x, torch.randn(7, **f32), None, EPS), r"weight must have shape \(8,\)"),
        (L.layer_norm_fwd, (x, None, w.double(), EPS), "bias has dtype Double but x has Float"),
        (L.layer_norm_fwd, (x, None, None, 0.0), "eps must be a positive finite number"),
        (L.layer_norm_fwd, (x, None, None, float("nan")), "eps must be a positive finite number"),
        (L.add_layer_norm_fwd, (x, torch.randn(4, 7, **f32), None, None, EPS), "residual must have x's shape"),
        (L.add_layer_norm_fwd, (x, x.bfloat16(), None, None, EPS), "residual has dtype BFloat16 but x has Float"),
        (L.layer_norm_bwd, (x, None, x, mean.double(), rstd, None, False, False), "mean must have dtype Float"),
        (L.layer_norm_bwd, (x, None, x, mean, rstd[:3], None, False, False), "rstd must hold one value per row"),
        (L.layer_norm_bwd, (x[:2], None, x, mean, rstd, None, False, False), "grad_out must have input's shape"),
        (L.layer_norm_bwd, (x, None, x, mean, rstd, None, True, False), "weight_grad=True needs a weight"),
        (L.linear_epilogue_fwd, (x, torch.randn(3, **f32), None, None, True), r"bias must have shape \(8,\)"),
        (L.linear_epilogue_fwd, (x, None, None, x.double(), False), "residual has dtype Double but y has Float"),
        (L.linear_epilogue_bwd, (x, x, None, None, True, False, True), "scale_grad=True needs a layer_scale"),
        (L.linear_epilogue_bwd, (x.t(), x, None, None, True, False, False), "grad must have y's shape"),
    ]
    if device == "cpu":   # attention has CPU kernels only
        q = torch.randn(2, 3, 5, 8, **f32)
        attn_out, lse = L.attention_fwd(q, q, q, 0.3)
        cases += _attention_error_cases(q, attn_out, lse)
    if device == "cuda":
        cases += [
            (L.layer_norm_fwd, (x, w.cpu(), None, EPS), "weight is on cpu but x is on cuda"),
            (L.layer_norm_fwd, (x.double(), None, None, EPS), r"float64 on CPU only\), got Double on cuda"),
        ]
    return cases


@pytest.mark.parametrize("device", DEVICES)
def test_raw_ops_reject_bad_input_with_clear_errors(device):
    for op, args, message in _error_cases(device):
        with pytest.raises(RuntimeError, match=message):
            op(*args)


# --------------------------------------------------------------------------------------
# dispatch: what incubation.ops picks and refuses
# --------------------------------------------------------------------------------------
def test_backends_report_cpp_on_cpu():
    with ops.use_backend("auto"):
        report = ops.backends("cpu")
    for op in ("layer_norm", "add_layer_norm", "linear", "attention"):
        assert "cpp" in report[op]["candidates"], report[op]
    if not extension.with_cuda:
        with ops.use_backend("cuda"):
            reason = ops.backends("cuda")["layer_norm"]["refused"]["cuda"]
            assert "without its CUDA kernels" in reason or "no CUDA device" in reason, reason


def test_check_refuses_mixed_dtypes_and_auto_falls_back():
    x, r = torch.randn(4, 16), torch.randn(4, 16, dtype=torch.float64)
    with ops.use_backend("cpp"), pytest.raises(ops.BackendError, match="residual dtype torch.float64 differs"):
        ops.add_layer_norm(x, r, None, None, EPS)
    with ops.use_backend("auto"):
        normed, summed = ops.add_layer_norm(x, r, None, None, EPS)   # eager serves it
        decisions = ops.backends("cpu")["add_layer_norm"]["decisions"].values()
        assert any("residual dtype" in d["refused"].get("cpp", "") for d in decisions)
    assert summed.dtype == torch.float64
    torch.testing.assert_close(normed, torch.nn.functional.layer_norm(x + r, (16,), eps=EPS))
    with ops.use_backend("cpp"), pytest.raises(ops.BackendError, match="residual dtype"):
        ops.linear(x, torch.randn(16, 16), residual=r)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device and incubation._C built with its CUDA kernels")
def test_cuda_check_refuses_float64_and_wide_rows():
    x = torch.randn(2, 8, device="cuda", dtype=torch.float64)
    with ops.use_backend("cuda"), pytest.raises(ops.BackendError, match="float64 is not supported on cuda"):
        ops.layer_norm(x, None, None, EPS)
    wide = torch.randn(2, extension.CUDA_MAX_FEATURES + 1, device="cuda")
    with ops.use_backend("cuda"), pytest.raises(ops.BackendError, match="exceed"):
        ops.layer_norm(wide, None, None, EPS)


def test_check_on_cpu_refuses_nothing_it_supports():
    for dtype in extension.DTYPES["cpu"]:
        x = torch.randn(2, 8, dtype=dtype)
        assert CHECK["layer_norm"](x, None, None, EPS) is None


def test_missing_extension_raises_import_error_with_instructions(monkeypatch):
    real_import = importlib.import_module

    def fail(name, *args):
        if name == "incubation._C":
            raise ImportError("no module named incubation._C")
        return real_import(name, *args)

    monkeypatch.setattr(importlib, "import_module", fail)
    with pytest.raises(ImportError, match="pip install --no-build-isolation"):
        extension._import_compiled()


# --------------------------------------------------------------------------------------
# training steps on the extension's kernels
# --------------------------------------------------------------------------------------
VIT = dict(img_size=28, patch_size=4, in_chans=1, embed_dim=64, depth=2, num_heads=2, num_classes=10)


@pytest.mark.parametrize("device", DEVICES)
def test_vit_trains_on_extension(device):
    """A few AdamW steps: the loss falls, along eager's trajectory from the same start."""
    torch.manual_seed(7)
    start = VisionTransformer(**VIT, init_values=0.1).state_dict()
    images = torch.randn(16, 1, 28, 28, device=device)
    labels = torch.randint(0, 10, (16,), device=device)

    def train(context):
        model = VisionTransformer(**VIT, init_values=0.1).to(device)
        model.load_state_dict(start)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        losses = []
        with context:
            for _ in range(10):
                optimizer.zero_grad()
                loss = torch.nn.functional.cross_entropy(model(images), labels)
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
        return torch.tensor(losses)

    ours = train(serving(BACKEND[device]))
    eager = train(ops.use_backend("eager"))
    assert torch.isfinite(ours).all() and ours[-1] < 0.8 * ours[0], ours
    torch.testing.assert_close(ours, eager, rtol=1e-3, atol=1e-3)


# --------------------------------------------------------------------------------------
# mixed dtypes as under autocast (issue 13, item 5): what the checks refuse
# --------------------------------------------------------------------------------------
def test_check_refuses_the_mixed_dtypes_the_kernels_lack():
    half, f32 = torch.randn(4, 16, dtype=torch.bfloat16), torch.randn(4, 16)
    assert CHECK["linear"](f32, torch.randn(16, 16), None, None, None, half) is not None   # fp32 GEMM, bf16 residual
    assert "float32 residual onto a bfloat16" in CHECK["add_layer_norm"](half, half.half(), None, None, EPS)
    assert CHECK["add_layer_norm"](f32, half, None, None, EPS) is None   # served swapped
    assert CHECK["linear"](half, torch.randn(16, 16, dtype=torch.bfloat16), None, None, None, f32) is None
