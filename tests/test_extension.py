"""The compiled extension incubation._C: the "cpp" (CPU) and "cuda" backends of incubation.ops.

Every kernel is checked against a float64 eager reference with the tolerance rule of
docs/DESIGN.md (error at most 2x eager's error in the same dtype, plus an atol for rounding),
outputs and every gradient, on odd shapes, with outputs poisoned (NaN) before the call.
CUDA twins of the CPU tests run when a GPU and a CUDA build are present.
"""
from __future__ import annotations

import collections
import contextlib
import importlib

import pytest
import torch
from kernel_rule import assert_within_rule, check_against_reference, make, poisoned_memory

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
ROWS = (1, 197 * 3)
WIDTHS = (50, 192, 384, 768, 1000)   # 50: not a multiple of any SIMD / 16-byte pack width
EPS = 1e-6


def device_dtype_params():
    """(device, dtype) pairs: float64 on CPU only (the CUDA kernels have no float64)."""
    params = []
    for device in DEVICES:
        name = device if isinstance(device, str) else device.values[0]
        marks = () if isinstance(device, str) else device.marks
        for dtype in (torch.float32, torch.bfloat16, torch.float64):
            if name == "cuda" and dtype == torch.float64:
                continue
            params.append(pytest.param(name, dtype, marks=marks, id=f"{name}-{str(dtype)[6:]}"))
    return params


@pytest.fixture
def poisoned():
    with poisoned_memory():
        yield


# --------------------------------------------------------------------------------------
# LayerNorm and add + LayerNorm
# --------------------------------------------------------------------------------------
@pytest.mark.usefixtures("poisoned")
@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("residual", [False, True], ids=["ln", "add_ln"])
def test_layer_norm_matches_reference(device, dtype, rows, width, residual):
    torch.manual_seed(rows * 7 + width)
    x = make((rows, width), dtype, device, scale=2.0, shift=0.5)   # non-zero mean stresses the variance
    w = make((width,), dtype, device, scale=0.2, shift=1.0)
    b = make((width,), dtype, device, scale=0.2)
    if residual:
        r = make((rows, width), dtype, device)
        check_against_reference(lambda x, r, w, b: ops.add_layer_norm(x, r, w, b, EPS), [x, r, w, b],
                                BACKEND[device])
    else:
        check_against_reference(lambda x, w, b: ops.layer_norm(x, w, b, EPS), [x, w, b], BACKEND[device])


@pytest.mark.usefixtures("poisoned")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("affine", ["none", "weight", "bias"])
def test_layer_norm_optional_affine_3d(device, affine):
    torch.manual_seed(1)
    x = make((3, 197, 384), torch.float32, device, scale=3.0, shift=-1.0)
    r = make((3, 197, 384), torch.float32, device)
    w = make((384,), torch.float32, device, shift=1.0) if affine == "weight" else None
    b = make((384,), torch.float32, device) if affine == "bias" else None
    params = [t for t in (w, b) if t is not None]

    def affine_args(params):
        return (params[0] if w is not None else None), (params[-1] if b is not None else None)

    backend = BACKEND[device]
    check_against_reference(lambda x, *p: ops.layer_norm(x, *affine_args(p), EPS), [x, *params], backend)
    check_against_reference(lambda x, r, *p: ops.add_layer_norm(x, r, *affine_args(p), 1e-5), [x, r, *params],
                            backend)


@pytest.mark.usefixtures("poisoned")
@pytest.mark.parametrize("device", DEVICES)
def test_layer_norm_casts_parameters_and_takes_any_strides(device):
    """bf16 activations with fp32 parameters (as eager: parameters cast to x's dtype, gradients
    back to fp32); a transposed x and a view whose data is not 16-byte aligned."""
    torch.manual_seed(2)
    x = make((768, 197), torch.bfloat16, device, shift=0.3).t()           # (197, 768), not contiguous
    w = make((768,), torch.float32, device, shift=1.0)
    b = make((768,), torch.float32, device)
    check_against_reference(lambda x, w, b: ops.layer_norm(x, w, b, EPS), [x, w, b], BACKEND[device])
    flat = make((197 * 768 + 1,), torch.float32, device)
    shifted = flat[1:].view(197, 768)                                       # contiguous, 4-byte offset
    r = make((197, 768), torch.float32, device)
    check_against_reference(lambda x, r: ops.add_layer_norm(x, r, None, None, EPS), [shifted, r], BACKEND[device])


@pytest.mark.parametrize("device", DEVICES)
def test_add_layer_norm_without_residual_returns_x(device):
    x = make((5, 64), torch.float32, device)
    with ops.use_backend(BACKEND[device]):
        normed, summed = ops.add_layer_norm(x, None, None, None, EPS)
    assert summed is x
    torch.testing.assert_close(normed, torch.nn.functional.layer_norm(x, (64,), eps=EPS))


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch(device):
    x = torch.zeros(0, 64, device=device, requires_grad=True)
    w = torch.ones(64, device=device, requires_grad=True)
    b = torch.zeros(64, device=device, requires_grad=True)
    with ops.use_backend(BACKEND[device]):
        out = ops.layer_norm(x, w, b, EPS)
        lin = ops.linear(x, torch.ones(32, 64, device=device), None, "gelu", layer_scale=w[:32])
    assert out.shape == (0, 64) and lin.shape == (0, 32)
    dw, db = torch.autograd.grad(out.sum(), (w, b))
    assert torch.equal(dw, torch.zeros_like(dw)) and torch.equal(db, torch.zeros_like(db))


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
# linear: GEMM + fused epilogue
# --------------------------------------------------------------------------------------
EPILOGUES = {   # name: (activation, bias, layer_scale, residual), as the ViT uses them
    "fc1_bias_gelu": ("gelu", True, False, False),
    "proj_bias_scale": (None, True, True, False),
    "fc2_bias_scale_residual": (None, True, True, True),
    "gelu_scale_residual": ("gelu", False, True, True),
    "residual_only": (None, False, False, True),
}


@pytest.mark.usefixtures("poisoned")
@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("epilogue", list(EPILOGUES))
def test_linear_epilogue_matches_reference(device, dtype, rows, width, epilogue):
    activation, has_bias, has_scale, has_residual = EPILOGUES[epilogue]
    torch.manual_seed(rows + width)
    in_features = 96
    x = make((rows, in_features), dtype, device)
    weight = make((width, in_features), dtype, device, scale=in_features ** -0.5)
    inputs = [x, weight]
    if has_bias:
        inputs.append(make((width,), dtype, device, scale=0.5))
    if has_scale:
        inputs.append(make((width,), dtype, device, scale=0.5, shift=0.5))
    if has_residual:
        inputs.append(make((rows, width), dtype, device))

    def fn(x, weight, *rest):
        rest = list(rest)
        bias = rest.pop(0) if has_bias else None
        scale = rest.pop(0) if has_scale else None
        residual = rest.pop(0) if has_residual else None
        return ops.linear(x, weight, bias, activation, layer_scale=scale, residual=residual)

    check_against_reference(fn, inputs, BACKEND[device])


@pytest.mark.usefixtures("poisoned")
@pytest.mark.parametrize("device", DEVICES)
def test_float16(device):
    """float16 shares bfloat16's code path (converted rows on CPU, packs of 8 on CUDA): one
    shape per op (eager float16 is slow on CPU)."""
    torch.manual_seed(8)
    x, r = make((197, 384), torch.float16, device, shift=0.5), make((197, 384), torch.float16, device)
    w, b = make((384,), torch.float16, device, shift=1.0), make((384,), torch.float16, device)
    check_against_reference(lambda x, r, w, b: ops.add_layer_norm(x, r, w, b, EPS), [x, r, w, b], BACKEND[device])
    weight = make((384, 384), torch.float16, device, scale=384 ** -0.5)
    check_against_reference(lambda x, w, b, s, r: ops.linear(x, w, b, "gelu", layer_scale=s, residual=r),
                            [x, weight, b, w, r], BACKEND[device])


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
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_all_ops(device):
    """Schemas, fake kernels, autograd registration and AOT dispatch (torch.compile's path)."""
    torch.manual_seed(5)
    x = make((7, 40), torch.float32, device).requires_grad_()
    r = make((7, 40), torch.float32, device).requires_grad_()
    w = make((40,), torch.float32, device).requires_grad_()
    b = make((40,), torch.float32, device).requires_grad_()
    _, mean, rstd = L.layer_norm_fwd(x.detach(), w.detach(), b.detach(), EPS)
    g = make((7, 40), torch.float32, device)
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
    for op, args in cases:
        results = torch.library.opcheck(op, args)
        assert all(v == "SUCCESS" for v in results.values()), f"{op}: {results}"


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
    for op in ("layer_norm", "add_layer_norm", "linear"):
        assert "cpp" in report[op]["candidates"], report[op]
    assert "cpp" not in report["attention"]["candidates"]
    if not extension.with_cuda:
        with ops.use_backend("cuda"):
            assert "without its CUDA kernels" in ops.backends("cuda")["layer_norm"]["refused"]["cuda"]


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
        assert extension._check_layer_norm(x, None, None, EPS) is None


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
# the small ViT on the extension's kernels
# --------------------------------------------------------------------------------------
VIT = dict(img_size=28, patch_size=4, in_chans=1, embed_dim=64, depth=2, num_heads=2, num_classes=10)


@contextlib.contextmanager
def on_extension(device, monkeypatch):
    """Run on the extension where it serves, counting the calls it serves. Attention runs
    eager: the extension has none, and a forced backend runs what it lacks eager."""
    backend, calls = BACKEND[device], collections.Counter()
    served = {"layer_norm": (extension._layer_norm, extension._check_layer_norm),
              "add_layer_norm": (extension._add_layer_norm, extension._check_add_layer_norm),
              "linear": (extension._linear, extension._check_linear)}

    def counted(op, fn):
        def call(*args):
            calls[op] += 1
            return fn(*args)
        return call

    for op, (fn, check) in served.items():
        ops.register(op, backend, counted(op, fn), check)
    try:
        with ops.use_backend(backend):
            yield
    finally:
        for op, (fn, check) in served.items():
            ops.register(op, backend, fn, check)
    assert all(calls[op] > 0 for op in served), f"the {backend} kernels served only {dict(calls)}"


@pytest.mark.usefixtures("poisoned")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("init_values", [None, 0.5], ids=["no_layer_scale", "layer_scale"])
def test_vit_matches_eager_logits_and_gradients(device, init_values, monkeypatch):
    torch.manual_seed(6)
    model = VisionTransformer(**VIT, init_values=init_values).to(device)
    images = torch.randn(4, 1, 28, 28, device=device)
    labels = torch.randint(0, 10, (4,), device=device)

    def run(m, x, context):
        m.zero_grad()
        with context:
            logits = m(x)
        torch.nn.functional.cross_entropy(logits, labels).backward()
        return [logits.detach()] + [p.grad.detach().clone() for p in m.parameters()]

    reference = run(_double(model), images.double(), ops.use_backend("eager"))
    eager = run(model, images, ops.use_backend("eager"))
    ours = run(model, images, on_extension(device, monkeypatch))
    names = ["logits"] + [name for name, _ in model.named_parameters()]
    for name, o, e, r in zip(names, ours, eager, reference):
        assert_within_rule(o, e, r, name)


def _double(model):
    twin = VisionTransformer(model.config).to(next(model.parameters()).device).double()
    twin.load_state_dict(model.state_dict())
    return twin


@pytest.mark.parametrize("device", DEVICES)
def test_vit_trains_on_extension(device, monkeypatch):
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

    ours = train(on_extension(device, monkeypatch))
    eager = train(ops.use_backend("eager"))
    assert torch.isfinite(ours).all() and ours[-1] < 0.8 * ours[0], ours
    torch.testing.assert_close(ours, eager, rtol=1e-3, atol=1e-3)


# --------------------------------------------------------------------------------------
# mixed dtypes as under autocast (issue 13, item 5): fp32 residual stream, half-precision branch
# --------------------------------------------------------------------------------------
MIXED = [pytest.param(device, dtype, id=f"{device}-{str(dtype)[6:]}", marks=GPU_MARKS if device == "cuda" else ())
         for device in ("cpu", "cuda") for dtype in (torch.bfloat16, torch.float16)]


@pytest.mark.usefixtures("poisoned")
@pytest.mark.parametrize("device, dtype", MIXED)
@pytest.mark.parametrize("rows, width", [(1, 192), (197, 384), (3 * 50, 1000), (5, 50)])
def test_add_layer_norm_fp32_residual_half_branch(device, dtype, rows, width):
    """summed and normed fp32 (eager's promotion), dx in the branch's dtype, dresidual fp32; also
    with the fp32 tensor passed as x (served swapped) and with parameters in the branch's dtype."""
    torch.manual_seed(rows + width)
    backend = BACKEND[device]
    x = make((rows, width), dtype, device, scale=2.0, shift=0.5)
    r = make((rows, width), torch.float32, device, scale=3.0)
    w, b = make((width,), torch.float32, device, scale=0.2, shift=1.0), make((width,), torch.float32, device, scale=0.2)
    assert extension._check_add_layer_norm(x, r, w, b, EPS) is None
    with ops.use_backend(backend):
        normed, summed = ops.add_layer_norm(x, r, w, b, EPS)
    assert normed.dtype == summed.dtype == torch.float32
    check_against_reference(lambda x, r, w, b: ops.add_layer_norm(x, r, w, b, EPS), [x, r, w, b], backend)
    check_against_reference(lambda r, x: ops.add_layer_norm(r, x, None, None, EPS), [r, x], backend)
    check_against_reference(lambda x, r, w, b: ops.add_layer_norm(x, r, w, b, EPS),
                            [x, r, w.to(dtype), b.to(dtype)], backend)


@pytest.mark.usefixtures("poisoned")
@pytest.mark.parametrize("device, dtype", MIXED)
@pytest.mark.parametrize("epilogue", ["fc2_bias_scale_residual", "gelu_scale_residual", "residual_only"])
def test_linear_residual_epilogue_fp32_residual_half_branch(device, dtype, epilogue):
    """A half-precision GEMM onto an fp32 residual: out fp32, the residual's gradient fp32."""
    torch.manual_seed(4)
    activation, has_bias, has_scale, _ = EPILOGUES[epilogue]
    rows, k, n = 50, 64, 192
    inputs = [make((rows, k), dtype, device), make((n, k), dtype, device, scale=k ** -0.5),
              make((n,), dtype, device, scale=0.5) if has_bias else None,
              make((n,), dtype, device, scale=0.5, shift=0.5) if has_scale else None,
              make((rows, n), torch.float32, device)]

    def fn(x, w, b, s, r):
        return ops.linear(x, w, b, activation, layer_scale=s, residual=r)

    with ops.use_backend(BACKEND[device]):
        assert fn(*inputs).dtype == torch.float32
    check_against_reference(fn, inputs, BACKEND[device])


def test_check_refuses_the_mixed_dtypes_the_kernels_lack():
    half, f32 = torch.randn(4, 16, dtype=torch.bfloat16), torch.randn(4, 16)
    assert extension._check_linear(f32, torch.randn(16, 16), None, None, None, half) is not None   # fp32 GEMM, bf16 residual
    assert "float32 residual onto a bfloat16" in extension._check_add_layer_norm(half, half.half(), None, None, EPS)
    assert extension._check_add_layer_norm(f32, half, None, None, EPS) is None   # served swapped
    assert extension._check_linear(half, torch.randn(16, 16, dtype=torch.bfloat16), None, None, None, f32) is None
