"""Shared checks for every fast backend (extension, Triton): docs/DESIGN.md's tolerance rule.

A kernel's error against a float64 reference may be at most `factor` (2) times eager PyTorch's
error in the same dtype, plus an atol of a few float32 ulps at the reference's scale; outputs
and the gradients of every input are checked, with uninitialised memory poisoned (NaN) so an
output element a kernel forgot to write shows up.
"""
import contextlib
import importlib
import warnings

import pytest
import torch

from incubation import ops


@contextlib.contextmanager
def poisoned_memory():
    """torch.empty (and at::empty in the kernels) returns NaN inside the block."""
    was_on = torch.are_deterministic_algorithms_enabled()
    was_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    was_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        assert torch.empty(8).isnan().all(), "poisoning is not active"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # warn_only: eager ops without a deterministic variant
            yield
    finally:
        torch.use_deterministic_algorithms(was_on, warn_only=was_warn_only)
        torch.utils.deterministic.fill_uninitialized_memory = was_fill


def make(shape, dtype, device, scale=1.0, shift=0.0):
    return (torch.randn(shape, dtype=torch.float64) * scale + shift).to(device=device, dtype=dtype)


def assert_within_rule(ours, eager, ref, what, factor=2.0):
    """|ours - ref| <= factor |eager - ref| + atol; ref in float64, atol 8 fp32 ulps at ref's scale."""
    assert ours.shape == eager.shape and ours.dtype == eager.dtype, \
        f"{what}: {tuple(ours.shape)} {ours.dtype} vs eager's {tuple(eager.shape)} {eager.dtype}"
    assert torch.isfinite(ours).all(), f"{what}: non-finite values (an unwritten output element?)"
    if ref.numel() == 0:
        return
    ref = ref.double()
    atol = 8 * torch.finfo(torch.float32).eps * max(1.0, ref.abs().max().item())
    err = (ours.double() - ref).abs().max().item()
    err_eager = (eager.double() - ref).abs().max().item()
    assert err <= factor * err_eager + atol, \
        f"{what}: error {err:.3g} > {factor} x eager's {err_eager:.3g} + {atol:.3g}"


def _run(fn, inputs, backend, grads_out=None):
    """fn's outputs on `backend`, then (with grads_out) the gradients of every tensor input
    (None inputs are passed through)."""
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in inputs]
    with ops.use_backend(backend):
        outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    if grads_out is None:
        return outs
    wrt = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(outs, wrt, [g.to(o.dtype) for g, o in zip(grads_out, outs)])
    return [o.detach() for o in outs] + list(grads)


def check_against_reference(fn, inputs, backend, factor=2.0):
    """`backend` vs eager (same dtypes) vs eager in float64: outputs and every input's gradient."""
    as_double = [None if t is None else t.double() for t in inputs]
    ref_outs = _run(fn, as_double, "eager")
    dtype = next(t for t in inputs if t is not None).dtype
    grads_out = [torch.randn_like(o).to(dtype).double() for o in ref_outs]
    reference = _run(fn, as_double, "eager", grads_out)
    eager = _run(fn, inputs, "eager", grads_out)
    ours = _run(fn, inputs, backend, grads_out)
    names = [f"output {i}" for i in range(len(ref_outs))] + \
        [f"grad of input {i}" for i in range(len(reference) - len(ref_outs))]
    for name, o, e, r in zip(names, ours, eager, reference):
        assert_within_rule(o, e, r, f"{backend} {name}", factor)


def _module(name):
    try:
        return importlib.import_module(name)
    except Exception:  # noqa: BLE001 - not built / not importable: its tests are skipped
        return None


def backend_params():
    """pytest params (backend, device) for every fast backend, so that a test written once runs
    on each: the compiled extension on CPU ("cpp") and CUDA ("cuda"), Triton under its
    interpreter (CPU tensors) and on the GPU; each skipped, with the reason, where this machine
    cannot run it."""
    extension, kernels = _module("incubation.extension"), _module("incubation.kernels")
    gpu = torch.cuda.is_available()
    runs = [
        ("cpp", "cpu", "cpp", extension is not None, "incubation._C is not built or cannot load here"),
        ("cuda", "cuda", "cuda", gpu and extension is not None and extension.with_cuda,
         "needs a CUDA device and incubation._C built with its CUDA kernels"),
        ("triton", "cpu", "triton-interpreter", kernels is not None and kernels.INTERPRET,
         "needs Triton's interpreter (TRITON_INTERPRET=1 before incubation.kernels is imported)"),
        ("triton", "cuda", "triton-cuda", gpu and kernels is not None and not kernels.INTERPRET,
         "needs a CUDA GPU and Triton"),
    ]
    return [pytest.param(backend, device, id=name, marks=pytest.mark.skipif(not ok, reason=reason))
            for backend, device, name, ok, reason in runs]
