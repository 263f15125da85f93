"""Shared checks for every fast backend (extension, Triton): docs/DESIGN.md's tolerance rule.

A kernel's error against a float64 reference may be at most `factor` (2) times eager PyTorch's
error in the same dtype, plus an atol of a few float32 ulps at the reference's scale; outputs
and the gradients of every input are checked, with uninitialised memory poisoned (NaN) so an
output element a kernel forgot to write shows up.
"""
import collections
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


def factor(backend, device, dtype):
    """The rule's factor for a kernel that writes `dtype`: 2, but 4 for bfloat16 under Triton's
    interpreter, whose fp32 -> bf16 casts truncate (up to an ulp, where rounding errs by half of
    one; the 2x rule for bf16 is checked on CUDA). A kernel whose outputs are fp32 (a half branch
    onto an fp32 stream) keeps 2x everywhere."""
    return 4.0 if backend == "triton" and device == "cpu" and dtype == torch.bfloat16 else 2.0


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


def check_scaled_against_reference(fn, inputs, scaled, power, backend, factor=2.0):
    """check_against_reference at inputs whose `scaled` ones (indices) are multiplied by 2**power,
    for an fn whose outputs that scale leaves alone (LayerNorm, eps aside): rows so large that
    eager's own statistics overflow to NaN. The baseline is eager at the inputs as given; the
    gradients of the scaled inputs, which scale by 2**-power, are compared scaled back (exact)."""
    big = [t * 2.0 ** power if i in scaled else t for i, t in enumerate(inputs)]
    as_double = [t.double() for t in big]
    ref_outs = _run(fn, as_double, "eager")
    outs = len(ref_outs)
    grads_out = [torch.randn_like(o).to(inputs[0].dtype).double() for o in ref_outs]

    def scaled_back(results):
        grads = results[outs:]
        return results[:outs] + [g * 2.0 ** power if i in scaled else g for i, g in enumerate(grads)]

    reference = scaled_back(_run(fn, as_double, "eager", grads_out))
    ours = scaled_back(_run(fn, big, backend, grads_out))
    eager = _run(fn, inputs, "eager", grads_out)
    names = [f"output {i}" for i in range(outs)] + [f"grad of input {i}" for i in range(len(inputs))]
    for name, o, e, r in zip(names, ours, eager, reference):
        assert_within_rule(o, e, r, f"{backend} {name} at inputs x 2^{power}", factor)


EPILOGUES = {  # name: (activation, bias, layer_scale, residual): ops.linear's epilogues as the ViT uses them
    "plain": (None, False, False, False),
    "qkv_bias": (None, True, False, False),
    "fc1_bias_gelu": ("gelu", True, False, False),
    "proj_bias_scale": (None, True, True, False),
    "fc2_bias_scale_residual": (None, True, True, True),
    "gelu_scale_residual": ("gelu", False, True, True),
    "residual_only": (None, False, False, True),
}


def linear_fn(epilogue):
    """ops.linear with `epilogue`'s optional tensors taken from the arguments after x and weight."""
    activation, has_bias, has_scale, has_residual = EPILOGUES[epilogue]

    def fn(x, weight, *rest):
        rest = list(rest)
        bias = rest.pop(0) if has_bias else None
        scale = rest.pop(0) if has_scale else None
        residual = rest.pop(0) if has_residual else None
        return ops.linear(x, weight, bias, activation, layer_scale=scale, residual=residual)
    return fn


def linear_inputs(device, dtype, rows, in_features, out_features, epilogue, residual_dtype=None):
    """linear_fn(epilogue)'s arguments: x (rows, in_features), weight, then the epilogue's tensors."""
    _, has_bias, has_scale, has_residual = EPILOGUES[epilogue]
    return linear_tensors(device, dtype, rows, in_features, out_features, has_bias, has_scale, has_residual,
                          residual_dtype)


def linear_tensors(device, dtype, rows, in_features, out_features, has_bias, has_scale, has_residual,
                   residual_dtype=None):
    """x (rows, in_features), weight, then bias, layer scale and residual where asked for."""
    inputs = [make((rows, in_features), dtype, device),
              make((out_features, in_features), dtype, device, scale=in_features ** -0.5)]
    if has_bias:
        inputs.append(make((out_features,), dtype, device, scale=0.5))
    if has_scale:
        inputs.append(make((out_features,), dtype, device, scale=0.5, shift=0.5))
    if has_residual:
        inputs.append(make((rows, out_features), residual_dtype or dtype, device))
    return inputs


def check_vit(backend, device, config, batch, seed, autocast_dtype=None, count=True):
    """The ViT's logits and every parameter gradient on `backend` vs eager vs eager float64
    (optionally under autocast); with `count`, every op the backend implements must serve."""
    from incubation.nn import VisionTransformer

    torch.manual_seed(seed)
    model = VisionTransformer(**config).to(device)
    double = VisionTransformer(model.config).to(device).double()
    double.load_state_dict(model.state_dict())
    images = torch.randn(batch, config["in_chans"], config["img_size"], config["img_size"], device=device)
    labels = torch.randint(0, config["num_classes"], (batch,), device=device)

    def run(m, x, context, amp=None):
        m.zero_grad()
        with context, torch.autocast(device, dtype=amp or torch.float32, enabled=amp is not None):
            logits = m(x)
        torch.nn.functional.cross_entropy(logits.float(), labels).backward()
        return [logits.detach()] + [p.grad.detach().clone() for p in m.parameters()]

    reference = run(double, images.double(), ops.use_backend("eager"))
    eager = run(model, images, ops.use_backend("eager"), autocast_dtype)
    ours = run(model, images, serving(backend) if count else ops.use_backend(backend), autocast_dtype)
    names = ["logits"] + [name for name, _ in model.named_parameters()]
    for name, o, e, r in zip(names, ours, eager, reference):
        assert_within_rule(o, e, r, f"{backend} {name}")


def _module(name):
    try:
        return importlib.import_module(name)
    except Exception:  # noqa: BLE001 - not built / not importable: its tests are skipped
        return None


def backend_table(backend):
    """`backend`'s implementations {op: (function, capability check)}, as incubation.ops declares them."""
    return {name: op.impls[backend] for name, op in ops.DISPATCH.ops.items() if backend in op.impls}


def skip_unless_implemented(op, backend):
    if not ops.implements(op, backend):
        pytest.skip(f"{backend} has no {op} (it would run eager)")


def skip_unless_dtype(backend, device, dtype):
    """Skip, with the reason, a dtype a backend has no kernels for (forced, it would raise), or
    one whose path is checked elsewhere."""
    if dtype == torch.float64 and backend != "cpp":
        pytest.skip(f"{backend} has no float64 kernels (float64 runs eager; only the C++ CPU kernels take it)")
    if dtype == torch.bfloat16 and backend == "triton" and device == "cpu":
        pytest.skip("Triton's interpreter truncates fp32 -> bf16 casts and its bf16 tl.dot is wrong: its bf16 "
                    "path is checked once per op, at 4x, by test_triton.py::test_bf16_under_the_interpreter")


INTERPRETER_MAX_MACS = 10 ** 6


def skip_if_slow_under_interpreter(backend, device, macs):
    """Skip a GEMM of more than INTERPRETER_MAX_MACS multiply-adds under Triton's interpreter,
    where one of 591 x 96 x 1000 takes most of a minute (the extension's shapes, which Triton
    never ran before they shared this suite); such shapes run compiled on CUDA."""
    if backend == "triton" and device == "cpu" and macs > INTERPRETER_MAX_MACS:
        pytest.skip(f"{macs} multiply-adds are too slow for Triton's interpreter (at most {INTERPRETER_MAX_MACS}); "
                    "they run compiled on CUDA")


@contextlib.contextmanager
def serving(backend):
    """Force `backend` and count the calls its kernels serve (what it lacks runs eager); on
    leaving, every op it implements must have served at least once."""
    table, calls = backend_table(backend), collections.Counter()

    def counted(op, fn):
        def call(*args):
            calls[op] += 1
            return fn(*args)
        return call

    for op, (fn, check) in table.items():
        ops.register(op, backend, counted(op, fn), check)
    try:
        with ops.use_backend(backend):
            yield
    finally:
        for op, (fn, check) in table.items():
            ops.register(op, backend, fn, check)
    assert all(calls[op] > 0 for op in table), f"the {backend} kernels served only {dict(calls)}"


def backend_params():
    """pytest params (backend, device) for every fast backend, so that a test written once runs
    on each: the compiled extension on CPU ("cpp") and CUDA ("cuda"), Triton under its
    interpreter (CPU tensors) and on the GPU; each skipped, with the reason, where this machine
    cannot run it (without a CUDA device, conftest.py leaves the CUDA ones, marked gpu, out)."""
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
    # `gpu` marks what needs CUDA (benchmarks/gpu.sh selects it with -m gpu)
    return [pytest.param(backend, device, id=name, marks=(pytest.mark.skipif(not ok, reason=reason),
                                                        *((pytest.mark.gpu,) if device == "cuda" else ())))
            for backend, device, name, ok, reason in runs]
