"""Mixed dtypes as autocast makes them (issue 13, item 5): a whole ViT block under autocast, with
the fused add + LayerNorm and the linear residual epilogue serving an fp32 residual stream and a
half-precision branch, on the forced backend (a refusal would raise BackendError), its output
and every gradient within docs/DESIGN.md's rule against float64.

Triton under the interpreter runs fp16 autocast: its bf16 casts truncate (tests/test_triton.py),
so bf16 is judged on the GPU twin. The cpp backend runs bf16 and fp16 autocast on CPU.
"""
from __future__ import annotations

import collections
import contextlib
import importlib
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from kernel_rule import assert_within_rule, backend_table, poisoned_memory  # noqa: E402

from incubation import ops  # noqa: E402
from incubation.nn.vit import Block  # noqa: E402


def _module(name):
    try:
        return importlib.import_module(name)
    except Exception:  # noqa: BLE001 - not built / not importable: its cases are skipped
        return None


extension, kernels = _module("incubation.extension"), _module("incubation.kernels")
GPU = torch.cuda.is_available()
CASES = [  # (backend, device, autocast dtype), each skipped with its reason where it cannot run
    pytest.param("cpp", "cpu", torch.bfloat16, id="cpp-cpu-bf16",
                 marks=pytest.mark.skipif(extension is None, reason="incubation._C is not built here")),
    pytest.param("cpp", "cpu", torch.float16, id="cpp-cpu-fp16",
                 marks=pytest.mark.skipif(extension is None, reason="incubation._C is not built here")),
    pytest.param("triton", "cpu", torch.float16, id="triton-interpreter-fp16",
                 marks=pytest.mark.skipif(kernels is None or not kernels.INTERPRET,
                                          reason="needs Triton's interpreter (TRITON_INTERPRET=1)")),
    pytest.param("cuda", "cuda", torch.bfloat16, id="cuda-bf16", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not (GPU and extension is not None and extension.with_cuda),
        reason="needs a CUDA GPU and incubation._C built with its CUDA kernels")]),
    pytest.param("triton", "cuda", torch.bfloat16, id="triton-cuda-bf16", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not (GPU and kernels is not None and not kernels.INTERPRET), reason="needs a CUDA GPU and Triton")]),
]


@contextlib.contextmanager
def counting_mixed_calls(backend):
    """Counts the add_layer_norm and residual-linear calls `backend` serves with a residual whose
    dtype differs from x's (the calls autocast makes)."""
    table = backend_table(backend)
    calls = collections.Counter()

    def counted(op, fn):
        def call(*args):
            x, residual = args[0], args[1] if op == "add_layer_norm" else args[5]
            if residual is not None and residual.dtype != x.dtype:
                calls[op] += 1
            return fn(*args)
        return call

    for op in ("add_layer_norm", "linear"):
        fn, check = table[op]
        ops.register(op, backend, counted(op, fn), check)
    try:
        yield calls
    finally:
        for op in ("add_layer_norm", "linear"):
            ops.register(op, backend, *table[op])


@pytest.mark.parametrize("backend, device, dtype", CASES)
@pytest.mark.parametrize("init_values", [None, 0.5], ids=["no_layer_scale", "layer_scale"])
def test_block_under_autocast_serves_the_fused_mixed_dtype_ops(backend, device, dtype, init_values):
    torch.manual_seed(13)
    dim, heads, tokens = (64, 2, 50) if device == "cpu" else (384, 6, 197)
    block = Block(dim, heads, qkv_bias=True, init_values=init_values).to(device)
    x = torch.randn(2, tokens, dim, device=device)
    grad_out = torch.randn(2, tokens, dim, device=device, dtype=torch.float64)

    def run(module, x, backend, amp):
        module.zero_grad()
        x = x.detach().clone().requires_grad_()
        with ops.use_backend(backend), torch.autocast(device, dtype=amp or torch.float32, enabled=amp is not None):
            out = module(x)
        (out.double() * grad_out).sum().backward()
        return [out.detach(), x.grad] + [p.grad.detach().clone() for p in module.parameters()]

    twin = Block(dim, heads, qkv_bias=True, init_values=init_values).to(device).double()
    twin.load_state_dict(block.state_dict())
    reference = run(twin, x.double(), "eager", None)
    eager = run(block, x, "eager", dtype)
    with poisoned_memory(), counting_mixed_calls(backend) as calls:
        ours = run(block, x, backend, dtype)
    # one add + LayerNorm (norm2 after the attention branch) and the fc2 residual epilogue per block
    assert calls["add_layer_norm"] == 1 and calls["linear"] == 1, dict(calls)
    assert ours[0].dtype == torch.float32   # the residual stream stays fp32, as eager's
    names = ["output", "grad of x"] + [name for name, _ in block.named_parameters()]
    for name, o, e, r in zip(names, ours, eager, reference):
        assert_within_rule(o, e, r, f"{backend} {name}")
