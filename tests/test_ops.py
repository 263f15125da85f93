"""The dispatch layer: eager reference math, input validation, backend selection and reporting."""
import math

import pytest
import torch
import torch.nn.functional as F

from incubation import ops


def _ref_attention(q, k, v, scale):
    p = torch.softmax((q.double() @ k.double().transpose(-1, -2)) * scale, dim=-1)
    return p @ v.double()


def _ref_layer_norm(x, w, b, eps):
    x = x.double()
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    y = (x - mu) / torch.sqrt(var + eps)
    return y * w.double() + b.double()


def _ref_gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


@pytest.mark.parametrize("n, d", [(197, 64), (50, 32), (1, 80)])
def test_attention_matches_float64(n, d):
    q, k, v = (torch.randn(2, 3, n, d) for _ in range(3))
    with ops.use_backend("eager"):
        out = ops.attention(q, k, v)
    torch.testing.assert_close(out.double(), _ref_attention(q, k, v, d ** -0.5), atol=1e-5, rtol=1e-5)
    out2 = ops.attention(q, k, v, scale=0.3)
    torch.testing.assert_close(out2.double(), _ref_attention(q, k, v, 0.3), atol=1e-5, rtol=1e-5)


def test_layer_norm_and_add_layer_norm_match_float64():
    x, r = torch.randn(5, 7, 192), torch.randn(5, 7, 192)
    w, b = torch.randn(192), torch.randn(192)
    with ops.use_backend("eager"):
        y = ops.layer_norm(x, w, b, 1e-6)
        normed, summed = ops.add_layer_norm(x, r, w, b, 1e-6)
        normed_none, summed_none = ops.add_layer_norm(x, None, w, b, 1e-6)
    torch.testing.assert_close(y.double(), _ref_layer_norm(x, w, b, 1e-6), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(summed, x + r)
    torch.testing.assert_close(normed.double(), _ref_layer_norm(x + r, w, b, 1e-6), atol=1e-5, rtol=1e-5)
    assert summed_none is x and torch.equal(normed_none, y)


def test_layer_norm_keeps_input_dtype_with_fp32_weights():
    x = torch.randn(4, 64).bfloat16()
    y = ops.layer_norm(x, torch.ones(64), torch.zeros(64))
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), _ref_layer_norm(x, torch.ones(64), torch.zeros(64), 1e-6),
                               atol=2e-2, rtol=2e-2)


def test_linear_epilogues_match_float64():
    x, w, b = torch.randn(3, 5, 48), torch.randn(40, 48) * 0.1, torch.randn(40)
    ls, res = torch.rand(40), torch.randn(3, 5, 40)
    pre = x.double() @ w.double().T + b.double()
    out = ops.linear(x, w, b, "gelu", layer_scale=ls, residual=res)
    torch.testing.assert_close(out.double(), res.double() + ls.double() * _ref_gelu(pre), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ops.linear(x, w).double(), x.double() @ w.double().T, atol=1e-5, rtol=1e-5)


def test_gradients_flow_through_every_op():
    x = torch.randn(2, 2, 9, 16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: ops.attention(t, t * 0.5, t + 1), (x,))
    y = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, dtype=torch.float64, requires_grad=True)
    b = torch.randn(8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, c, d: ops.add_layer_norm(a, a * 2, c, d), (y, w, b))
    W = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, m: ops.linear(a, m, None, "gelu", residual=a[:, :5]), (y, W))


def test_linear_under_autocast_casts_like_f_linear():
    x, w, b = torch.randn(4, 16), torch.randn(8, 16), torch.randn(8)
    res = torch.randn(4, 8)
    # eager: the same bf16 roundings as F.linear (auto may measure cpp faster, whose fp32
    # epilogue rounds once less; the kernels' numerics are tested in test_kernels)
    with torch.autocast("cpu", dtype=torch.bfloat16), ops.use_backend("eager"):
        out = ops.linear(x, w, b, residual=res)
        ref = res + F.linear(x, w, b)
    assert out.dtype == ref.dtype == torch.float32  # bf16 GEMM, fp32 residual stream kept
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("call, exc, message", [
    (lambda: ops.attention(torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.randn(2, 3, 4)), ValueError, "q must have 4"),
    (lambda: ops.attention(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8)), ValueError, "head dim"),
    (lambda: ops.attention(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 5, 4), torch.randn(1, 2, 6, 4)), ValueError, "k and v"),
    (lambda: ops.attention(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4).half(), torch.randn(1, 2, 3, 4)), TypeError, "share a dtype"),
    (lambda: ops.attention(torch.randn(1, 1, 2, 4), torch.randn(1, 1, 2, 4), torch.randn(1, 1, 2, 4), scale=-1), ValueError, "scale"),
    (lambda: ops.attention("q", torch.randn(1, 1, 2, 4), torch.randn(1, 1, 2, 4)), TypeError, "q must be a torch.Tensor"),
    (lambda: ops.attention(*(torch.randn(2, 3, 4, 0) for _ in range(3))), ValueError, "head dim 0"),
    (lambda: ops.attention(*(torch.randn(2, 3, 4, 0) for _ in range(3)), scale=1.0), ValueError, "head dim 0"),
    (lambda: ops.attention(*(torch.randn(1, 1, 2, 4) for _ in range(3)), scale=math.inf), ValueError, "scale"),
    (lambda: ops.layer_norm(torch.randn(3, 8), None, None, eps=math.inf), ValueError, "eps"),
    (lambda: ops.layer_norm(torch.randn(3, 8), torch.ones(7), None), ValueError, "weight must have shape"),
    (lambda: ops.layer_norm(torch.randn(3, 8), None, torch.ones(8, 1)), ValueError, "bias must have 1"),
    (lambda: ops.layer_norm(torch.randn(3, 8), None, None, eps=0), ValueError, "eps"),
    (lambda: ops.layer_norm(torch.arange(8), None, None), TypeError, "floating-point"),
    (lambda: ops.add_layer_norm(torch.randn(3, 8), torch.randn(3, 9), None, None), ValueError, "residual must have"),
    (lambda: ops.linear(torch.randn(3, 8), torch.randn(4, 9)), ValueError, "in_features"),
    (lambda: ops.linear(torch.randn(3, 8), torch.randn(4, 8), torch.randn(5)), ValueError, "bias must have shape"),
    (lambda: ops.linear(torch.randn(3, 8), torch.randn(4, 8), activation="relu"), ValueError, "activation"),
    (lambda: ops.linear(torch.randn(3, 8), torch.randn(4, 8), layer_scale=torch.randn(3)), ValueError, "layer_scale"),
    (lambda: ops.linear(torch.randn(3, 8), torch.randn(4, 8), residual=torch.randn(3, 8)), ValueError, "residual must have shape"),
    (lambda: ops.linear(torch.randn(3, 8), torch.randn(4, 8).double()), TypeError, "weight has dtype"),
    (lambda: ops.linear(torch.randn(3, 8), torch.randn(4, 8, device="meta")), ValueError, "weight is on meta"),
])
def test_bad_input_names_the_argument(call, exc, message):
    with pytest.raises(exc, match=message):
        call()


def test_use_backend_and_environment(monkeypatch):
    assert ops.current_backend() in ("auto",) + ops.BACKENDS
    with ops.use_backend("eager"):
        assert ops.current_backend() == "eager"
        with ops.use_backend("auto"):
            assert ops.current_backend() == "auto"
    monkeypatch.setenv("INCUBATION_BACKEND", "eager")
    assert ops.current_backend() == "eager"
    monkeypatch.setenv("INCUBATION_BACKEND", "fastest")
    with pytest.raises(ValueError, match="INCUBATION_BACKEND='fastest'"):
        ops.current_backend()
    with pytest.raises(ValueError, match="unknown backend"):
        with ops.use_backend("numpy"):
            pass


@pytest.mark.parametrize("backend", ["eager", "auto"])
def test_empty_batches_keep_working(backend):
    """Zero rows, heads or tokens give empty results (as eager / timm do), forward and backward."""
    w, b = torch.randn(8, requires_grad=True), torch.randn(8, requires_grad=True)
    W = torch.randn(4, 8, requires_grad=True)
    with ops.use_backend(backend):
        for shape in ((0, 2, 5, 8), (2, 0, 5, 8), (2, 2, 0, 8)):
            q = torch.randn(shape, requires_grad=True)
            out = ops.attention(q, q, q)
            out.sum().backward()
            assert out.shape == shape and q.grad.shape == shape
        x = torch.randn(0, 7, 8, requires_grad=True)
        outs = [ops.layer_norm(x, w, b), *ops.add_layer_norm(x, x, w, b),
                ops.linear(x, W, None, "gelu", layer_scale=w[:4], residual=torch.zeros(0, 7, 4))]
        sum(o.sum() for o in outs).backward()
        assert [tuple(o.shape) for o in outs] == [(0, 7, 8)] * 3 + [(0, 7, 4)]
        assert x.grad.shape == x.shape and torch.equal(W.grad, torch.zeros_like(W))


# --------------------------------------------------------------------------------------
# issue 25: the eager reference on inputs SDPA's CPU kernel gets wrong, and the meta device
# --------------------------------------------------------------------------------------
def test_eager_attention_on_overlapping_views_matches_float64():
    """Defect 3: q, k, v as overlapping as_strided views of one buffer (SDPA's CPU kernel read
    them wrongly: values up to 1e34)."""
    torch.manual_seed(0)
    base = torch.randn(4096)
    for stride in [(8, 1, 2, 1), (64, 1, 1, 1), (1, 16, 0, 1), (1, 1, 8, 1), (40, 20, 4, 1)]:
        q = base.as_strided((2, 3, 17, 8), stride)
        k = base.as_strided((2, 3, 17, 8), stride, storage_offset=5)
        v = base.as_strided((2, 3, 17, 8), stride, storage_offset=11)
        want = _ref_attention(q.double(), k.double(), v.double(), 8 ** -0.5)
        with ops.use_backend("eager"):
            torch.testing.assert_close(ops.attention(q, k, v).double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_eager_attention_keeps_a_nan_query_nan(bad):
    """Defect 3: a query row holding NaN (or inf) gave 0 on CPU; its output row must be NaN, the
    others exact. The query is a strided view, as the ViT passes it."""
    torch.manual_seed(1)
    q, k, v = torch.randn(1, 9, 3, 2, 16).permute(2, 0, 3, 1, 4).unbind(0)
    q[0, 1, 4, 7] = bad
    with ops.use_backend("eager"):
        out = ops.attention(q, k, v)
    assert out[0, 1, 4].isnan().all()
    finite = torch.ones_like(out, dtype=torch.bool)
    finite[0, 1, 4] = False
    want = _ref_attention(q.double(), k.double(), v.double(), 16 ** -0.5)
    torch.testing.assert_close(out[finite].double(), want[finite], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["auto", "eager", "cpp"])
def test_vit_builds_and_runs_on_the_meta_device(backend):
    """Defect 6: every op failed on meta ("unknown device type for autocast"); timm models
    build and run on meta, and so must ours, whatever backend is chosen."""
    from incubation import VisionTransformer
    with torch.device("meta"):   # as timm's models are built on meta (e.g. for sharded loading)
        model = VisionTransformer(img_size=16, patch_size=4, in_chans=3, embed_dim=32, depth=2, num_heads=2,
                                  num_classes=5, init_values=0.1)
    with ops.use_backend(backend):
        out = model(torch.randn(3, 3, 16, 16, device="meta"))
        normed, summed = ops.add_layer_norm(torch.randn(2, 8, device="meta"), torch.randn(2, 8, device="meta"),
                                            None, None)
    assert out.device.type == "meta" and out.shape == (3, 5)
    assert normed.shape == summed.shape == (2, 8)

