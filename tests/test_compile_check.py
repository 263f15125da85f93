"""benchmarks/compile_check.py: every Triton kernel compiled for sm_90 without a GPU.

Runs the tool in a subprocess (the kernels must be imported without TRITON_INTERPRET, which this
test session sets) in its --quick mode for bf16 and fp16, with a fresh Triton cache so the time is
what CI pays, and asserts on the compiled facts: every config the autotuner can see (not pruned)
compiles, fits sm_90's shared memory and spills no register, and the attention forward and
backward run every dot on wgmma. fp32 is reported by the tool, not asserted here.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMEM_LIMIT = 232448  # sm_90: shared memory one block may opt in to


def _bundled_tools():
    try:
        import triton
    except ImportError:
        return None
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    return tools if all(os.path.exists(os.path.join(tools, t)) for t in ("ptxas", "cuobjdump")) else None


@pytest.fixture(scope="module")
def records(session_folder):
    if _bundled_tools() is None:
        pytest.skip("Triton's bundled ptxas / cuobjdump (triton/backends/nvidia/bin) are absent")
    def compile_all(out):
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["TRITON_CACHE_DIR"] = str(out / "cache")
        env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
        start = time.perf_counter()
        run = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "compile_check.py"), "--quick",
                              "--dtypes", "bf16,fp16", "--quiet", "--json", str(out / "compile.json")],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
        print(run.stdout[-3000:], run.stderr[-3000:], f"compile_check took {time.perf_counter() - start:.0f} s")
        assert run.returncode == 0, run.stderr[-3000:]
    out = session_folder("compile_check", compile_all)   # xdist's workers share it
    with open(out / "compile.json") as f:
        return json.load(f)


def test_every_kernel_and_dtype_is_checked(records):
    kernels = {r["kernel"] for r in records}
    assert kernels == {"attention_fwd", "attention_delta", "attention_bwd",
                       "norm_fwd", "norm_bwd", "linear_fwd", "linear_fwd_tma", "linear_epilogue_bwd"}
    assert {r["dtype"] for r in records} == {"bf16", "fp16"}
    for r in records:
        assert r["arch"] == "sm_90"
        assert r["status"] in ("ok", "pruned") or r["status"].startswith("error: "), r["status"]
        if r["status"] == "ok":
            assert r["mma"] in ("wgmma", "mma.sync", "wgmma+mma.sync", "none")
            assert r["registers"] > 0 and r["smem_bytes"] >= 0
    # the attention and linear kernels are autotuned: each has several GPU configs per case
    for kernel in ("attention_fwd", "attention_bwd", "linear_fwd", "linear_fwd_tma"):
        configs = {r["config"] for r in records if r["kernel"] == kernel}
        assert len(configs) > 1, kernel


def test_configs_the_autotuner_sees_compile_and_fit(records):
    bad = [r for r in records if r["status"] != "pruned" and not (
        r["status"] == "ok" and r["spill_bytes"] == 0 and r["smem_bytes"] + r["static_smem_bytes"] <= SMEM_LIMIT)]
    report = "\n".join(f"{r['kernel']} {r['case']} {r['dtype']} {r['config']}: {r['status']}, smem "
                       f"{r['smem_bytes']}+{r['static_smem_bytes']}, spill {r['spill_bytes']}" for r in bad)
    assert not bad, "configs the prune lets through do not fit sm_90:\n" + report


def test_attention_dots_are_wgmma_without_spills(records):
    """Issue 13: every bf16/fp16 config the autotuner can see of the attention forward and the
    one-launch backward runs all its dots on Hopper's wgmma (no mma.sync: every product has a
    64-row side), spills nothing and fits sm_90's shared memory."""
    seen = [r for r in records if r["kernel"] in ("attention_fwd", "attention_bwd") and r["status"] == "ok"]
    assert {(r["kernel"], r["dtype"]) for r in seen} == {(k, d) for k in ("attention_fwd", "attention_bwd")
                                                         for d in ("bf16", "fp16")}
    bad = [f"{r['kernel']} {r['case']} {r['dtype']} {r['config']}: mma {r['mma']}, spill {r['spill_bytes']}, "
           f"smem {r['smem_bytes']}+{r['static_smem_bytes']}" for r in seen
           if not (r["mma"] == "wgmma" and r["spill_bytes"] == 0
                   and r["smem_bytes"] + r["static_smem_bytes"] <= SMEM_LIMIT)]
    assert not bad, "\n".join(bad)


def test_prune_leaves_every_case_a_config(records):
    cases = {}
    for r in records:
        cases.setdefault((r["kernel"], r["case"], r["dtype"]), []).append(r["status"])
    empty = [k for k, statuses in cases.items() if "ok" not in statuses]
    assert not empty, empty


def test_linear_tma_configs_use_wgmma_and_fit(records):
    """The persistent TMA kernel exists for Hopper's tensor cores: every bf16 / fp16 config the
    prune keeps compiles to wgmma, spills nothing and fits sm_90's shared memory, and a 128x256
    tile is among them."""
    tma = [r for r in records if r["kernel"] == "linear_fwd_tma" and r["status"] == "ok"]
    assert tma and {r["dtype"] for r in tma} == {"bf16", "fp16"}
    for r in tma:
        what = f"{r['case']} {r['dtype']} {r['config']}"
        assert r["mma"] == "wgmma", what
        assert r["spill_bytes"] == 0, what
        assert r["smem_bytes"] + r["static_smem_bytes"] <= SMEM_LIMIT, what
    assert any("BLOCK_M=128 BLOCK_N=256" in r["config"] for r in tma)
