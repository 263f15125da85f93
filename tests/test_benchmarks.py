"""The benchmark harnesses (incubation bench ops, incubation bench train) in their quickest mode
on tiny shapes: the JSON they write has the expected fields and self-consistent numbers.
No timing is asserted (performance claims come from benchmarks/ only)."""
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tarfile

import pytest
import torch

from incubation import bench
from incubation.bench import ops as ops_module
from incubation.bench import train_step as train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

OK_STATUSES = {"ok", "skipped", "failed"}
TARGET_STATUSES = {"met", "missed", "not measured"}


@pytest.fixture(scope="module")
def ops_bench():
    return ops_module


@pytest.fixture(scope="module")
def ops_payload(ops_bench, tmp_path_factory):
    out = tmp_path_factory.mktemp("ops")
    payload = ops_bench.run_op_benchmarks(
        device="cpu", models=["Ti"], seqs=[5], batch=1, dtypes=["fp32"], quick=True, out_dir=str(out),
        providers=["eager", "sdpa", "triton", "cpp"], log=lambda *_: None)
    return payload, out


def test_ops_json_fields(ops_bench, ops_payload):
    _, out = ops_payload
    with open(out / "ops.json") as f:
        written = json.load(f)
    assert written["benchmark"] == "ops"
    for key in ("date", "commit", "device", "device_name", "torch", "triton", "timm", "backends"):
        assert key in written["environment"], key
    assert written["environment"]["device"] == "cpu"
    ceilings = written["ceilings"]
    assert ceilings["copy_gbps"] > 0 and ceilings["matmul_tflops"]["fp32"] > 0
    assert written["config"]["seqs"] == [5] and written["config"]["batch"] == 1
    records = written["results"]
    assert {r["status"] for r in records} <= OK_STATUSES
    for r in records:
        for key in ("op", "mode", "provider", "kind", "model", "batch", "seq", "dtype", "status"):
            assert key in r, key
        if r["status"] != "ok":
            assert r["reason"], r
    # every op and mode was timed on eager, and eager is its own baseline
    eager = {(r["op"], r["mode"]): r for r in records if r["provider"] == "eager"}
    expected = {(op.name, m) for op in ops_bench.OPS.values() for m in op.modes}
    assert set(eager) == expected
    for r in eager.values():
        assert r["status"] == "ok" and r["ms"] > 0 and r["x_eager"] == pytest.approx(1.0)
        assert r["max_abs_diff"] == 0.0
    assert (out / "ops.md").read_text().startswith("## Op benchmark, CPU")
    assert os.path.exists(out / "ops.png")
    assert {t["status"] for t in written["targets"]} <= TARGET_STATUSES
    assert any("cpp add_layer_norm" in t["name"] for t in written["targets"])


def test_ops_work_and_correctness(ops_payload):
    """FLOPs / bytes behind TFLOP/s and GB/s follow the documented formulas; every provider that
    ran agrees with eager."""
    payload, _ = ops_payload
    B, N, C, H, D = 1, 5, 192, 3, 64
    fwd_work = {"attention": 4 * B * H * N * N * D, "linear_gelu": 2 * B * N * C * 4 * C,
                "linear_residual": 2 * B * N * 4 * C * C, "add_layer_norm": 4 * B * N * C * 4}
    factor = {"attention": {"fwd": 1, "fwd+bwd": 3.5}, "linear_gelu": {"fwd": 1, "fwd+bwd": 3},
              "linear_residual": {"fwd": 1, "fwd+bwd": 3}, "add_layer_norm": {"fwd": 1, "bwd": 1, "fwd+bwd": 2}}
    for r in payload["results"]:
        if r["status"] != "ok":
            continue
        work = fwd_work[r["op"]] * factor[r["op"]][r["mode"]]
        measured = r["gbps"] * 1e9 if r["op"] == "add_layer_norm" else r["tflops"] * 1e12
        assert measured * r["ms"] * 1e-3 == pytest.approx(work, rel=1e-9), r
        assert r["max_abs_diff"] < 1e-4, r
        assert math.isfinite(r["pct_ceiling"]) and r["pct_ceiling"] > 0


def test_ops_skips_are_recorded(ops_payload):
    records = ops_payload[0]["results"]
    triton = [r for r in records if r["provider"] == "triton"]
    assert triton and all(r["status"] == "skipped" and "interpreter" in r["reason"] for r in triton)
    cpp = [r for r in records if r["provider"] == "cpp"]
    cpp_attention = [r for r in cpp if r["op"] == "attention"]   # the CPU attention kernel, timed like the others
    assert cpp_attention and all(r["status"] == "ok" and r["max_abs_diff"] < 1e-4 for r in cpp_attention)
    assert not any(r["provider"] == "sdpa" for r in records if r["op"] != "attention")


def test_ops_records_the_pinned_sdpa_backend(ops_bench, ops_payload):
    payload, out = ops_payload
    sdpa = [r for r in payload["results"] if r["provider"] == "sdpa"]
    assert sdpa and all(r["status"] == "ok" and r["sdpa_backend"] in ops_bench.SDPA_BACKENDS for r in sdpa)
    q, k, v = ops_bench._attention_inputs(ops_bench.Shape("Ti", 1, 5), torch.float32, "cpu")
    assert ops_bench.sdpa_backend(q, k, v) == "flash"  # torch's CPU flash kernel for these inputs
    with pytest.raises(RuntimeError, match="same dtype"):  # an input SDPA refuses: its error, as in the timing
        ops_bench.sdpa_backend(q, k, v.double())
    assert f"sdpa ({sdpa[0]['sdpa_backend']})" in (out / "ops.md").read_text()


def test_ops_bad_arguments(ops_bench, capsys):
    with pytest.raises(ValueError, match="unknown model"):
        ops_bench.run_op_benchmarks(device="cpu", models=["XL"], log=lambda *_: None)
    with pytest.raises(ValueError, match="unknown provider"):
        ops_bench.run_op_benchmarks(device="cpu", providers=["cudnn"], log=lambda *_: None)
    with pytest.raises(ValueError, match="must be positive"):
        ops_bench.run_op_benchmarks(device="cpu", batch=0, log=lambda *_: None)
    assert ops_bench.main(["--device", "cpu", "--seq", "0"]) == 2
    assert "--seq must be positive" in capsys.readouterr().err
    assert bench.main(["nope"]) == 2
    if not torch.cuda.is_available():
        assert ops_bench.main(["--device", "cuda"]) == 2
    for kwargs, match in ((dict(warmup=0), "must be positive"), (dict(amp="fp8"), "amp must be one of"),
                          (dict(providers=["ours-fast"]), "unknown provider")):
        with pytest.raises(ValueError, match=match):
            train.run_train_benchmarks(device="cpu", log=lambda *_: None, **kwargs)


def test_train_step_json(tmp_path):
    payload = train.run_train_benchmarks(
        device="cpu", models=["Ti"], batch=1, providers=["ours-eager", "ours-triton", "timm"], quick=True,
        warmup=1, out_dir=str(tmp_path), plot=False, log=lambda *_: None, rounds=2)
    with open(tmp_path / "train_step.json") as f:
        written = json.load(f)
    assert written["benchmark"] == "train_step" and written["environment"]["device"] == "cpu"
    by_provider = {r["provider"]: r for r in written["results"]}
    assert set(by_provider) == {"ours-eager", "ours-triton", "timm"}
    assert by_provider["ours-triton"]["status"] == "skipped"
    flops = 3 * train.build_model("Ti", "cpu").flops_per_image()
    for name in ("ours-eager", "timm"):
        r = by_provider[name]
        assert r["status"] == "ok", r
        assert r["images_per_s"] == pytest.approx(1 / (r["ms"] * 1e-3))
        assert r["tflops"] * 1e12 * r["ms"] * 1e-3 == pytest.approx(flops)
        assert r["peak_mem_gb"] is None or r["peak_mem_gb"] >= 0
        assert math.isfinite(r["loss_first_step"])
    # same weights and batch: both start from the same loss
    assert by_provider["ours-eager"]["loss_first_step"] == pytest.approx(by_provider["timm"]["loss_first_step"],
                                                                         rel=1e-4)
    assert by_provider["timm"]["x_timm"] == pytest.approx(1.0)
    for name in ("ours-eager", "timm"):   # two interleaved rounds, the median of them reported
        assert len(by_provider[name]["round_ms"]) == 2
        assert by_provider[name]["ms"] == pytest.approx(statistics.median(by_provider[name]["round_ms"]))
    assert {t["status"] for t in written["targets"]} <= TARGET_STATUSES
    assert (tmp_path / "train_step.md").read_text().startswith("## Train-step benchmark, CPU")
    assert payload["config"]["batch"] == 1



def test_dispatch_overhead_benchmark(tmp_path, monkeypatch):
    """`incubation bench dispatch`: every op with and without grad, the backend auto chose called
    directly, through the dispatcher, and through the public op; overhead = dispatched - direct,
    validation = public - dispatched (the times themselves are not asserted)."""
    from incubation.bench import dispatch as dispatch_bench
    monkeypatch.setenv("INCUBATION_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(dispatch_bench, "CALLS", 3)
    assert bench.main(["dispatch", "--quick", "--device", "cpu", "--no-plot", "--out", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "dispatch.json").read_text())
    rows = payload["rows"]
    assert {(r["op"], r["grad"]) for r in rows} == {(op, g) for op in ("attention", "layer_norm", "add_layer_norm",
                                                                       "linear") for g in (False, True)}
    for r in rows:
        assert r["backend"] in ("eager", "cpp") and r["public_us"] > 0 and r["direct_us"] > 0
        assert r["public_us"] == pytest.approx(r["direct_us"] + r["overhead_us"] + r["validation_us"])
    assert payload["worst_us"] == max(r["overhead_us"] for r in rows)
    assert "Dispatch overhead per call" in (tmp_path / "dispatch.md").read_text()

@pytest.mark.slow
def test_gpu_sh_dry_run(tmp_path):
    """benchmarks/gpu.sh's plumbing on CPU (DEVICE=cpu DRY=1): every step of the lease gets a
    status line in summary.md, lease.tgz holds every log and JSON, OUTDIR stays at two files."""
    out = tmp_path / "out"
    env = dict(os.environ, DEVICE="cpu", DRY="1", PYTHON=sys.executable, TMPDIR=str(tmp_path))
    proc = subprocess.run(["bash", os.path.join(REPO, "benchmarks", "gpu.sh"), str(out), "lease"], env=env,
                          capture_output=True, text=True, timeout=600)
    summary = (out / "summary.md").read_text()
    steps = dict(re.findall(r"^\| ([\w-]+) \| ([^|]+?) \| [\d-]+ \| \S+ \|$", summary, re.M))
    assert list(steps) == ["env", "build", "tests-triton", "backends", "tests-extension", "ops", "ops-attention",
                           "tune", "backends-tuned", "train"], summary
    bad = {name for name, status in steps.items() if status != "ok" and not status.startswith("skipped (dry run")}
    assert not bad, (summary, proc.stdout[-4000:], proc.stderr[-2000:])
    assert proc.returncode == 0
    assert sorted(os.listdir(out)) == ["lease.tgz", "summary.md"]
    with tarfile.open(out / "lease.tgz") as tar:
        names = set(tar.getnames())
    logs = {f"lease/{name}.log" for name, status in steps.items() if not status.startswith("skipped")}
    assert logs | {"lease/env.txt", "lease/summary.md", "lease/ops/ops.json", "lease/ops-attention/ops.json",
                   "lease/train/train_step.json", "lease/tests-triton-0.log", "lease/tests-extension-1.log"} <= names
    for heading in ("## Op benchmark, CPU", "## Train-step benchmark, CPU", "tests-triton: ", "tests-extension: "):
        assert heading in summary
    assert "sdpa (flash)" in summary


@pytest.mark.slow
def test_bench_runs_from_an_installed_wheel(tmp_path):
    """`incubation bench ops` from a wheel installed away from the checkout (pure Python, no
    extension), run in another directory: the benchmarks ship in the package and write under
    the current directory."""
    env = dict(os.environ, INCUBATION_SKIP_EXTENSION="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    env.pop("PYTHONPATH", None)
    pip = [sys.executable, "-m", "pip"]
    # a copy of the sources: setuptools builds in the source tree, whose build/ may hold stale files
    source = tmp_path / "source"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "runs", "*.egg-info", "__pycache__", "*.so", ".hypothesis", ".pytest_cache"))
    subprocess.run(pip + ["wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"), str(source)],
                   env=env, check=True, capture_output=True, timeout=600)
    (wheel,) = (tmp_path / "dist").glob("incubation-*.whl")
    site = tmp_path / "site"
    subprocess.run(pip + ["install", "--no-deps", "-q", "--target", str(site), str(wheel)], env=env, check=True,
                   capture_output=True, timeout=600)
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    env["PYTHONPATH"] = str(site)   # ahead of the checkout's editable install
    where = subprocess.run([sys.executable, "-c", "import incubation; print(incubation.__file__)"], env=env, cwd=cwd,
                           capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(site)), where
    proc = subprocess.run([str(site / "bin" / "incubation"), "bench", "ops", "--quick", "--device", "cpu", "--ops",
                           "add_layer_norm", "--providers", "eager", "--no-plot"], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    written = json.loads((cwd / "runs" / "bench" / "ops-cpu" / "ops.json").read_text())
    assert {r["provider"] for r in written["results"]} == {"eager"}
