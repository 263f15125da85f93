"""Our ViT under torch.compile and torch.export: the incubation:: ops in the graph, the same
numbers as eager, no graph break (dynamic batch too), and under `auto` exactly the decisions
that `tune` cached, read at trace time and never measured there (issue 24 items 1 and 2)."""
import io

import pytest
import torch

import incubation
from incubation import dispatch, measure, ops
from incubation.dispatch import DISPATCH

try:
    from incubation import extension
except ImportError:   # no compiled extension: its cases skip
    extension = None
NEEDS_EXTENSION = pytest.mark.skipif(extension is None, reason="needs the compiled extension incubation._C")

VIT = dict(img_size=8, patch_size=4, in_chans=1, embed_dim=16, depth=2, num_heads=2, num_classes=3, init_values=0.1)


def _model():
    torch.manual_seed(0)
    return incubation.VisionTransformer(**VIT)


class Capture:
    """A torch.compile backend that keeps Dynamo's graphs and runs them through AOT autograd
    (the fake kernels and the autograd registrations), as Inductor would get them."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return torch._dynamo.backends.debugging.aot_eager(gm, example_inputs)

    def ours(self) -> list[str]:
        return sorted(str(n.target).removesuffix(".default") for g in self.graphs for n in g.graph.nodes
                      if n.op == "call_function" and str(n.target).startswith("incubation."))


def _loss_and_grads(run, model, images):
    """The loss of run(images) (the model or its compiled form) and the model's gradients."""
    labels = torch.arange(images.shape[0], device=images.device) % VIT["num_classes"]
    model.zero_grad()
    loss = torch.nn.functional.cross_entropy(run(images), labels)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.fixture(autouse=True)
def fresh_dynamo(monkeypatch, tmp_path):
    monkeypatch.setenv("INCUBATION_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("INCUBATION_BACKEND", raising=False)
    torch._dynamo.reset()
    DISPATCH.clear_decisions()
    yield
    torch._dynamo.reset()
    DISPATCH.clear_decisions()
    DISPATCH.graph_notes.clear()


def _triton_interpreted() -> bool:
    try:
        from incubation import kernels
    except Exception:  # noqa: BLE001 - no Triton: its case is skipped
        return False
    return kernels.INTERPRET


def _expected(backend: str, depth: int) -> dict[str, int]:
    """Our ops in one forward graph of the ViT (depth blocks, layer scale on)."""
    if backend in ("cpp", "cuda"):   # GELU / layer-scale / residual linears (proj, fc1, fc2); the norms
        return {"incubation.linear_epilogue_fwd": 3 * depth, "incubation.add_layer_norm_fwd": depth,
                "incubation.layer_norm_fwd": depth + 1}
    return {"incubation.triton_linear": 4 * depth, "incubation.triton_attention": depth,
            "incubation.triton_add_layer_norm": 2 * depth + 1}


GPU = (pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"))


@pytest.mark.parametrize("backend, device", [
    pytest.param("cpp", "cpu", marks=NEEDS_EXTENSION),
    pytest.param("triton", "cpu", marks=pytest.mark.skipif(
        not _triton_interpreted(), reason="Triton on CPU tensors needs TRITON_INTERPRET=1")),
    pytest.param("triton", "cuda", marks=GPU),
    pytest.param("cuda", "cuda", marks=(*GPU, pytest.mark.skipif(
        not (extension and extension.with_cuda), reason="needs incubation._C built with its CUDA kernels")))])
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "mark_dynamic"])
def test_compiled_vit_with_a_forced_backend_runs_our_ops_with_its_numbers(backend, device, dynamic):
    model = _model().to(device)
    capture = Capture()
    compiled = torch.compile(model, fullgraph=True, backend=capture)
    with ops.use_backend(backend):
        for batch in (4, 3):
            images = torch.randn(batch, 1, 8, 8, device=device)
            if dynamic:
                torch._dynamo.mark_dynamic(images, 0)
            want_loss, want_grads = _loss_and_grads(model, model, images)
            got_loss, got_grads = _loss_and_grads(compiled, model, images)
            torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-5)
            for name, g in want_grads.items():
                torch.testing.assert_close(got_grads[name], g, rtol=1e-5, atol=1e-5, msg=name)
    assert len(capture.graphs) == (1 if dynamic else 2)   # fullgraph: a break would have raised
    ours = capture.ours()
    for op, count in _expected(backend, VIT["depth"]).items():
        assert ours.count(op) == len(capture.graphs) * count, (op, ours)


@NEEDS_EXTENSION
def test_export_round_trip_keeps_our_ops():
    model = _model().eval()
    images = torch.randn(2, 1, 8, 8)
    with ops.use_backend("cpp"):
        want = model(images)
        program = torch.export.export(model, (images,))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert {"incubation.layer_norm_fwd.default", "incubation.linear_epilogue_fwd.default"} <= targets, targets
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    buffer.seek(0)
    loaded = torch.export.load(buffer)
    assert {str(n.target) for n in loaded.graph.nodes if n.op == "call_function"} == targets
    torch.testing.assert_close(loaded.module()(images), want, rtol=1e-5, atol=1e-5)


def test_compiled_graph_without_decisions_runs_eager_and_says_so(monkeypatch):
    def no_measuring(*args):
        raise AssertionError("measured inside a trace")
    monkeypatch.setattr(dispatch, "measure", no_measuring)
    capture = Capture()
    torch.compile(_model(), fullgraph=True, backend=capture)(torch.randn(2, 1, 8, 8))
    assert capture.ours() == []
    assert "compiled" in ops.format_backends("cpu") and "no measured decision" in ops.format_backends("cpu")


@NEEDS_EXTENSION
def test_compiled_graph_uses_exactly_the_decisions_tune_cached(monkeypatch):
    """A fake backend (the cpp functions, faster by a fake clock for some calls only) wins
    the signatures `tune` measures where it is faster; the compiled graph then holds our ops
    for exactly those calls, read from the cache file, and nothing is measured at trace time."""
    cost = []

    def costed(seconds, fn):
        def impl(*args):
            cost.append(seconds(*args))
            return fn(*args)
        return impl

    def elapsed(fn, device):
        cost.clear()
        fn()
        return sum(cost)
    monkeypatch.setattr(measure, "elapsed", elapsed)
    saved = {name: dict(op.impls) for name, op in DISPATCH.ops.items()}
    try:
        for name in ("layer_norm", "add_layer_norm", "linear"):
            cpp, check = DISPATCH.ops[name].impls["cpp"]
            DISPATCH.ops[name].impls = {"eager": (costed(lambda *a: 1e-3, DISPATCH.ops[name].eager), None)}
            # fake wins add_layer_norm and the GELU linear (fc1), loses layer_norm and the others
            faster = {"add_layer_norm": lambda *a: 0.5e-3, "layer_norm": lambda *a: 2e-3,
                      "linear": lambda x, w, b, act, ls, r: 0.5e-3 if act == "gelu" else 2e-3}[name]
            ops.register(name, "fake", costed(faster, cpp), check, devices=("cpu",))
        model = _model()
        images = torch.randn(4, 1, 8, 8)
        ops.tune(model, images)
        DISPATCH.clear_decisions()        # a later process: only the file is left
        monkeypatch.setattr(dispatch, "measure", lambda *a: pytest.fail("measured inside a trace"))
        capture = Capture()
        compiled = torch.compile(model, fullgraph=True, backend=capture)
        want_loss, want_grads = _loss_and_grads(model, model, images)   # (eager or fake per the cache)
        got_loss, got_grads = _loss_and_grads(compiled, model, images)
    finally:
        for name, impls in saved.items():
            DISPATCH.ops[name].impls = impls
    depth = VIT["depth"]
    # per block: add_layer_norm (the residual add + norm2) and fc1 (GELU) on the fake backend;
    # norm1, the final norm and the other linears (qkv, proj, fc2, embedding, head) eager
    assert capture.ours().count("incubation.linear_epilogue_fwd") == depth
    assert "incubation.layer_norm_fwd" not in capture.ours()
    assert capture.ours().count("incubation.add_layer_norm_fwd") == depth
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-5)
    for name, g in want_grads.items():
        torch.testing.assert_close(got_grads[name], g, rtol=1e-5, atol=1e-5, msg=name)
