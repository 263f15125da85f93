"""Compile every Triton kernel of incubation/kernels for sm_90 without a GPU and report what
each (kernel, config, dtype) costs: shared memory, registers, spilled bytes, tensor-core
instruction family.

    python benchmarks/compile_check.py --json compile.json        # everything: minutes on 2 cores
    python benchmarks/compile_check.py --quick --json compile.json # CI runs this for bf16,fp16: a few minutes on 2 busy cores
    python benchmarks/compile_check.py --kernels attention_fwd,linear_fwd --dtypes bf16

Every autotuned kernel is compiled with each of its GPU configs (the `gpu` list given to
incubation.kernels.autotune), after the kernel's own early_config_prune: a config the prune
removes is recorded with status "pruned" and not compiled. fp32 is compiled with both dot
precisions the dispatcher can pass (ieee by default, tf32 when torch allows TF32). Kernels
with a fixed tiling (the attention delta pre-pass, the LayerNorm kernels, the linear epilogue
backward) are compiled with the tiling the Python wrapper computes, for every tile width it can
choose.

Tools: triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32)) and the ptxas and
cuobjdump bundled with Triton (a compiled kernel's n_regs / n_spills need a GPU driver).
registers and static shared memory come from `cuobjdump -res-usage` on the cubin, spill_bytes
from ptxas -v ("bytes spill stores"; Triton prints that log with TRITON_DUMP_PTXAS_LOG=1),
stack_bytes is the stack frame (cuobjdump), smem_bytes the dynamic shared memory Triton launches
with (`metadata.shared`). A block fits sm_90 when smem_bytes + static_smem_bytes <= 232448.
mma is read from the PTX: "wgmma" (wgmma.mma_async), "mma.sync", "wgmma+mma.sync" (some dots of
the kernel get each: Hopper's wgmma needs 64-row multiples) or "none".
A config that fails to compile is recorded with status "error: ..." and the run goes on.
--compile-pruned also compiles the pruned configs (status stays "pruned") to show what the
prune removed.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
import types
from typing import Optional

# The autotuners hold their GPU configs only when the kernels are imported without the
# interpreter (incubation.kernels reads the flag when triton is imported).
os.environ.pop("TRITON_INTERPRET", None)
os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"  # the spill counts are only in ptxas -v's log

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

SMEM_LIMIT = 232448  # sm_90: shared memory a block may opt in to (static + dynamic)
# (CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES plus the static size may not exceed it)
ARCH = 90
TOOLS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
PTXAS, CUOBJDUMP = os.path.join(TOOLS, "ptxas"), os.path.join(TOOLS, "cuobjdump")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
HEAD_DIMS = (32, 64, 80, 128)
QUICK_HEAD_DIMS = (64, 128)   # 80 pads to the same BLOCK_D as 128, 32 is the smallest tile


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


# --- the representative launch of each kernel -------------------------------------------
# A case gives every argument as the wrapper would pass it: pointers as "*" + the dtype name
# ("*dt" is the kernel's dtype), ints and floats as sample values. Ints are specialised the
# way Triton's launcher does it (1 -> constexpr, multiples of 16 -> divisibility hint), so the
# compiled code is the one a real call gets. Shapes: ViT at 224 px (N = 197 tokens).

def _attention_args(head_dim: int, backward: bool) -> dict:
    H, N, D = 12, 197, head_dim
    C = H * D
    qkv = (N * 3 * C, D, 3 * C, 1)  # q, k, v: views of the qkv projection (B, N, 3, H, D)
    bnhd = (N * C, D, C, 1)         # o and its gradient: (B, N, H, D) memory seen as (B, H, N, D)
    args = dict(qk_scale=0.125 * 1.4427, sqb=qkv[0], sqh=qkv[1], sqn=qkv[2], sqd=qkv[3],
                skb=qkv[0], skh=qkv[1], skn=qkv[2], skd=qkv[3], svb=qkv[0], svh=qkv[1], svn=qkv[2], svd=qkv[3])
    if backward:
        args.update(scale=0.125, sdb=bnhd[0], sdh=bnhd[1], sdn=bnhd[2], sdd=bnhd[3])
    else:
        args.update(sob=bnhd[0], soh=bnhd[1], son=bnhd[2], sod=bnhd[3])
    args.update(H=H, N_Q=N, N_KV=N, HEAD_DIM=D)
    return args


def _cases_attention(kernel: str, head_dims) -> list:
    """(label, args, constexprs, autotuned) for the attention kernels."""
    cases = []
    for hd in head_dims:
        if kernel == "attention_fwd":
            args = dict(Q="*dt", K="*dt", V="*dt", O="*dt", LSE="*fp32", **_attention_args(hd, False))
        elif kernel == "attention_delta":
            bnhd = dict(b=197 * 12 * hd, h=hd, n=12 * hd, d=1)
            args = dict(O="*dt", DO="*dt", DELTA="*fp32", **{f"so{k}": v for k, v in bnhd.items()},
                        **{f"sd{k}": v for k, v in bnhd.items()}, H=12, N_Q=197, HEAD_DIM=hd)
            cases.append((f"hd{hd}", hd, args, dict(BLOCK_D=_block_d(hd), BLOCK_M=64)))
            continue
        else:
            args = dict(Q="*dt", K="*dt", V="*dt", DO="*dt", LSE="*fp32", DELTA="*fp32", DQ="*dt", DK="*dt",
                        DV="*dt", **_attention_args(hd, True))
        cases.append((f"hd{hd}", hd, args, dict(BLOCK_D=_block_d(hd), UPCAST=False)))
    return cases


_LINEAR_VARIANTS = {  # the epilogues the ViT block uses, and everything at once (the most live values)
    "bias": dict(HAS_BIAS=True, GELU=False, HAS_LS=False, HAS_RESIDUAL=False, STORE_PRE=False),   # qkv
    "bias+gelu+pre": dict(HAS_BIAS=True, GELU=True, HAS_LS=False, HAS_RESIDUAL=False, STORE_PRE=True),  # fc1
    "bias+ls+res": dict(HAS_BIAS=True, GELU=False, HAS_LS=True, HAS_RESIDUAL=True, STORE_PRE=True),  # fc2
    "all": dict(HAS_BIAS=True, GELU=True, HAS_LS=True, HAS_RESIDUAL=True, STORE_PRE=True),
}


def _cases_linear_fwd(variants) -> list:
    M, N, K = 197 * 8, 3072, 768
    args = dict(X="*dt", W="*dt", BIAS="*dt", LS="*dt", RES="*dt", OUT="*dt", PRE="*dt", M=M, N=N, K=K,
                sxm=K, sxk=1, swn=K, swk=1, srm=N, srn=1, M_BUCKET=triton.next_power_of_2(M))
    return [(v, None, args, dict(_LINEAR_VARIANTS[v], UPCAST=False)) for v in variants]


def _cases_linear_fwd_tma(variants) -> list:
    """The persistent TMA kernel: x, weight, residual, out and pre as host-side tensor descriptors
    ("desc:" + their block shape in constexprs, set per config as the kernel's pre-hook does)."""
    M, N, K = 197 * 8, 3072, 768
    tile = "desc:BLOCK_M,BLOCK_N/EPILOGUE_SPLIT"
    args = dict(X="desc:BLOCK_M,BLOCK_K", W="desc:BLOCK_N,BLOCK_K", BIAS="*dt", LS="*dt", RES=tile, OUT=tile,
                PRE=tile, M=M, N=N, K=K, M_BUCKET=triton.next_power_of_2(M))
    return [(v, None, args, dict(_LINEAR_VARIANTS[v], UPCAST=False)) for v in variants]


def _cases_linear_epilogue_bwd() -> list:
    """The wrapper's tiling: BLOCK_M 32, BLOCK_N = next power of two of N in [16, 128], 4 warps."""
    cases = []
    for block_n in (16, 32, 64, 128):
        N = 3072 if block_n == 128 else block_n
        args = dict(G="*dt", PRE="*dt", LS="*dt", DPRE="*dt", DB_PART="*fp32", DLS_PART="*fp32",
                    M=197 * 8, N=N, sgm=N, sgn=1, rows_per_program=64)
        cases.append((f"BLOCK_N={block_n}", None, args,
                      dict(GELU=True, HAS_LS=True, WANT_DB=True, WANT_DLS=True, BLOCK_M=32, BLOCK_N=block_n),
                      dict(num_warps=4)))
    return cases


def _cases_norm(kernel: str, widths) -> list:
    """The wrapper's tiling (norm._tiling) for each width, all features on (residual, affine)."""
    from incubation.kernels import norm
    cases = []
    for C in widths:
        block_m, block_c, fwd_warps, bwd_warps = norm._tiling(C)
        tile = dict(BLOCK_M=block_m, BLOCK_C=block_c)
        if kernel == "norm_fwd":
            args = dict(X="*dt", R="*dt", W="*dt", B="*dt", Y="*dt", S="*dt", MEAN="*fp32", RSTD="*fp32",
                        M=197 * 8, C=C, sx=C, sr=C, eps=1e-6)
            cases.append((f"C={C}", None, args, dict(HAS_RESIDUAL=True, HAS_W=True, HAS_B=True, **tile),
                          dict(num_warps=fwd_warps)))
        else:
            args = dict(DY="*dt", DS="*dt", S="*dt", W="*dt", MEAN="*fp32", RSTD="*fp32", DX="*dt",
                        DW_PART="*fp32", DB_PART="*fp32", M=197 * 8, C=C, sdy=C, sds=C, ss=C,
                        rows_per_program=block_m * 4)
            cases.append((f"C={C}", None, args, dict(HAS_DS=True, HAS_W=True, WANT_DW=True, WANT_DB=True, **tile),
                          dict(num_warps=bwd_warps)))
    return cases


NORM_WIDTHS = (16, 32, 64, 128, 192, 384, 768, 1280, 2048, 4096, 8192)  # every BLOCK_C the tiling can pick
QUICK_NORM_WIDTHS = (192, 768, 1280, 4096, 8192)
KERNELS = ("attention_fwd", "attention_delta", "attention_bwd",
           "norm_fwd", "norm_bwd", "linear_fwd", "linear_fwd_tma", "linear_epilogue_bwd")


def kernel_object(name: str):
    """The decorated kernel (an Autotuner or a JITFunction) of a kernel name."""
    from incubation.kernels import attention, linear, norm
    return {"attention_fwd": attention._forward_kernel, "attention_delta": attention._delta_kernel,
            "attention_bwd": attention._backward_kernel,
            "norm_fwd": norm._forward_kernel, "norm_bwd": norm._backward_kernel,
            "linear_fwd": linear._forward_kernel, "linear_fwd_tma": linear._forward_tma_kernel,
            "linear_epilogue_bwd": linear._epilogue_backward_kernel}[name]


def _precisions(dtype: str) -> list:
    """The PRECISION constexprs incubation.kernels.dot_precision can give this dtype."""
    return ["ieee", "tf32"] if dtype == "fp32" else ["tf32"]


def plan(kernels, dtypes, quick: bool) -> list[dict]:
    """One job per (kernel, case, dtype, precision, config); pruned configs become finished records."""
    head_dims = QUICK_HEAD_DIMS if quick else HEAD_DIMS
    widths = QUICK_NORM_WIDTHS if quick else NORM_WIDTHS
    jobs = []
    for name in kernels:
        obj = kernel_object(name)
        if name.startswith("attention"):
            cases = [(*c, None) for c in _cases_attention(name, head_dims)]
        elif name in ("linear_fwd", "linear_fwd_tma"):
            make = _cases_linear_fwd if name == "linear_fwd" else _cases_linear_fwd_tma
            cases = [(*c, None) for c in make(["all"] if quick else list(_LINEAR_VARIANTS))]
        elif name == "linear_epilogue_bwd":
            cases = _cases_linear_epilogue_bwd()
        else:
            cases = _cases_norm(name, widths)
        autotuned = isinstance(obj, triton.runtime.Autotuner)
        for label, head_dim, args, constexprs, options in cases:
            for dtype in dtypes:
                for precision in _precisions(dtype) if autotuned or "PRECISION" in obj.arg_names else [None]:
                    meta = dict(constexprs)
                    if precision is not None:
                        meta["PRECISION"] = precision
                    if "DTYPE" in (obj.fn if autotuned else obj).arg_names:  # (linear_fwd_tma's autotune key)
                        meta["DTYPE"] = str(DTYPES[dtype])
                    base = dict(kernel=name, case=label, head_dim=head_dim, dtype=dtype, precision=precision,
                                arch=f"sm_{ARCH}", args=args)
                    if not autotuned:
                        options = options or {}
                        jobs.append(dict(base, config=_describe(meta, options), constexprs=meta, options=options))
                        continue
                    kept = _prune(obj, args, dtype, meta)
                    for cfg in obj.configs:
                        options = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
                        job = dict(base, config=_describe(cfg.kwargs, options), constexprs={**meta, **cfg.kwargs},
                                   options=options)
                        if cfg not in kept:
                            job["status"] = "pruned"
                        jobs.append(job)
    return jobs


def _describe(kwargs: dict, options: dict) -> str:
    tiles = " ".join(f"{k}={v}" for k, v in kwargs.items() if k.startswith("BLOCK") or k == "GROUP_M")
    return f"{tiles} w{options.get('num_warps', 4)} s{options.get('num_stages', 3)}"


def _prune(autotuner, args: dict, dtype: str, meta: dict) -> list:
    """The configs the autotuner would benchmark for this call (its early_config_prune)."""
    prune = autotuner.early_config_prune
    if prune is None:
        return list(autotuner.configs)
    def value(v):
        if not isinstance(v, str):
            return v
        if v.startswith("desc:"):  # the prune reads a descriptor's tensor (its .base)
            return types.SimpleNamespace(base=torch.empty(0, dtype=DTYPES[dtype]))
        return torch.empty(0, dtype=DTYPES[dtype] if v == "*dt" else DTYPES[v[1:]])
    named = {k: value(v) for k, v in args.items()}
    return prune(autotuner.configs, named, **meta)


def _signature(fn, args: dict, dtype: str, constexprs: dict):
    """(signature, constexprs, attrs) of ASTSource, specialised like Triton's launcher."""
    signature, consts, attrs = {}, dict(constexprs), {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        value = args[name]
        if isinstance(value, str) and value.startswith("desc:"):  # a host-side tensor descriptor
            block = ", ".join(str(_block_dim(c, constexprs)) for c in value[5:].split(","))
            signature[name] = f"tensordesc<{dtype}[{block}]>"
        elif isinstance(value, str):  # a pointer: torch allocations are 16-byte aligned
            signature[name] = "*" + (dtype if value == "*dt" else value[1:])
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        elif value == 1:
            signature[name] = "constexpr"
            consts[name] = 1
        else:
            signature[name] = "i32"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, consts, attrs


def _block_dim(expr: str, constexprs: dict) -> int:
    """A descriptor's block dimension: a constexpr's name, or "A/B" (A // B)."""
    a, _, b = expr.partition("/")
    return constexprs[a] // (constexprs[b] if b else 1)


_RES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
_SPILLS = re.compile(r"(\d+) bytes spill stores")


def compile_one(job: dict) -> dict:
    """Compile one job; the record of what it costs (status "error: ..." if it does not compile)."""
    record = {k: v for k, v in job.items() if k not in ("args", "constexprs", "options", "measure")}
    if record.get("status") == "pruned" and not job.get("measure"):
        return dict(record, smem_bytes=None, static_smem_bytes=None, registers=None, spill_bytes=None, stack_bytes=None,
                    mma=None, seconds=0.0)
    obj = kernel_object(job["kernel"])
    fn = obj.fn if isinstance(obj, triton.runtime.Autotuner) else obj
    start = time.perf_counter()
    try:
        signature, consts, attrs = _signature(fn, job["args"], job["dtype"], job["constexprs"])
        log = io.StringIO()
        with contextlib.redirect_stdout(log):  # Triton prints ptxas -v here (TRITON_DUMP_PTXAS_LOG)
            compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs),
                                      target=GPUTarget("cuda", ARCH, 32), options=job["options"])
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(compiled.asm["cubin"])
            f.flush()
            usage = subprocess.run([CUOBJDUMP, "-res-usage", f.name], capture_output=True, text=True,
                                   check=True).stdout
        regs, stack, static_smem, local = map(int, _RES.search(usage).groups())
        spills = _SPILLS.search(log.getvalue())
        ptx = compiled.asm["ptx"]
        kinds = [k for k, op in (("wgmma", "wgmma.mma_async"), ("mma.sync", "mma.sync")) if op in ptx]
        mma = "+".join(kinds) or "none"  # both when some dots of a kernel get one and some the other
        record.update(status="pruned" if job.get("status") == "pruned" else "ok",
                      smem_bytes=compiled.metadata.shared, static_smem_bytes=static_smem, registers=regs,
                      spill_bytes=int(spills.group(1)) if spills else stack + local,  # (no log: the frame)
                      stack_bytes=stack + local, mma=mma)
    except Exception as exc:  # noqa: BLE001 - a config that does not compile is a finding, not a crash
        lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()] or [""]
        if lines[0].startswith("at ") and len(lines) > 1:  # Triton's frontend: "at L:C:", the source, the message
            message = f"{lines[0]} {lines[-1]}"
        else:  # ptxas: its exit code, then its stderr
            message = " ".join([lines[0]] + [line for line in lines[1:] if "error" in line.lower()][:1])
        record.update(status=f"error: {type(exc).__name__}: {message[:300]}", smem_bytes=None,
                      static_smem_bytes=None, registers=None, spill_bytes=None, stack_bytes=None, mma=None)
    record["seconds"] = round(time.perf_counter() - start, 2)
    return record


def fits(record: dict) -> bool:
    """Compiled, no spilled registers and the block's shared memory within sm_90's limit."""
    return (record["status"] == "ok" and record["spill_bytes"] == 0
            and record["smem_bytes"] + record["static_smem_bytes"] <= SMEM_LIMIT)


def run(kernels=KERNELS, dtypes=tuple(DTYPES), quick: bool = False, jobs: Optional[int] = None,
        compile_pruned: bool = False, log=print) -> list[dict]:
    """Compile everything asked for; the records in plan order."""
    work = plan(kernels, dtypes, quick)
    if compile_pruned:
        for j in work:
            j["measure"] = True
    todo = [j for j in work if j.get("status") != "pruned" or compile_pruned]
    pruned = sum(j.get("status") == "pruned" for j in work)
    log(f"compile_check: {len(todo)} compiles ({pruned} pruned configs{', compiled too' if compile_pruned else ''}) "
        f"for sm_{ARCH}, triton {triton.__version__}")
    workers = max(1, min(jobs or os.cpu_count() or 1, len(todo)))
    if workers == 1:
        done = [compile_one(j) for j in todo]
    else:  # fork: the workers share the imported kernels; nothing has been compiled yet
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            done = pool.map(compile_one, todo, chunksize=1)
    results, compiled = iter(done), {id(j) for j in todo}
    return [next(results) if id(j) in compiled else compile_one(j) for j in work]


def _dtype_label(r: dict) -> str:
    return r["dtype"] + (f"/{r['precision']}" if r["dtype"] == "fp32" and r["precision"] else "")


def format_table(records: list[dict]) -> str:
    head = (f"{'kernel':<20} {'case':<14} {'dtype':<10} {'config':<42} {'smem':>7} {'regs':>4} {'spill':>5} "
            f"{'mma':<14} status")
    lines = [head, "-" * len(head)]
    for r in records:
        dtype = _dtype_label(r)
        smem = "" if r["smem_bytes"] is None else r["smem_bytes"] + r["static_smem_bytes"]
        flag = "" if r["registers"] is None or fits(dict(r, status="ok")) else "  <-- does not fit"
        lines.append(f"{r['kernel']:<20} {r['case']:<14} {dtype:<10} {r['config']:<42} {smem!s:>7} "
                     f"{r['registers'] if r['registers'] is not None else '':>4} "
                     f"{r['spill_bytes'] if r['spill_bytes'] is not None else '':>5} {r['mma'] or '':<14} "
                     f"{r['status'][:60]}{flag}")
    return "\n".join(lines)


def summary(records: list[dict]) -> str:
    ok = [r for r in records if r["status"] == "ok"]
    bad = [r for r in ok if not fits(r)]
    errors = [r for r in records if r["status"].startswith("error")]
    pruned = sum(r["status"] == "pruned" for r in records)
    mma = {}
    for r in ok:
        mma.setdefault(r["kernel"], set()).add(f"{_dtype_label(r)}:{r['mma']}")
    lines = [f"{len(ok)} compiled, {pruned} pruned, {len(errors)} errors, {len(bad)} compiled but do not fit "
             f"(spill or > {SMEM_LIMIT} B shared)"]
    measured = [r for r in records if r["status"] == "pruned" and r["registers"] is not None]
    if measured:
        would_fit = sum(fits(dict(r, status="ok")) for r in measured)
        lines.append(f"  pruned and compiled anyway: {len(measured) - would_fit} do not fit, {would_fit} would have")
    lines += [f"  mma {k}: {', '.join(sorted(v))}" for k, v in mma.items()]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="benchmarks/compile_check.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("--json", metavar="PATH", help="write the records (a JSON list) here")
    p.add_argument("--kernels", default=",".join(KERNELS), help=f"comma list from {','.join(KERNELS)}")
    p.add_argument("--dtypes", default=",".join(DTYPES), help="comma list from bf16,fp16,fp32")
    p.add_argument("--quick", action="store_true",
                   help=f"head dims {QUICK_HEAD_DIMS}, the 'all' linear epilogue, widths {QUICK_NORM_WIDTHS}")
    p.add_argument("--jobs", type=int, default=None, help="parallel compiles (default: the CPU count)")
    p.add_argument("--quiet", action="store_true", help="print the summary only, not the table")
    p.add_argument("--compile-pruned", action="store_true", help="compile the pruned configs too")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    kernels = [k.strip() for k in args.kernels.split(",") if k.strip()]
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    unknown = [k for k in kernels if k not in KERNELS] + [d for d in dtypes if d not in DTYPES]
    if unknown:
        raise SystemExit(f"unknown kernels/dtypes {unknown}; kernels: {list(KERNELS)}, dtypes: {list(DTYPES)}")
    if not (os.path.exists(PTXAS) and os.path.exists(CUOBJDUMP)):
        raise SystemExit(f"Triton's bundled ptxas/cuobjdump are missing under {TOOLS}")
    start = time.perf_counter()
    records = run(kernels, dtypes, args.quick, args.jobs, args.compile_pruned)
    elapsed = time.perf_counter() - start
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
    if not args.quiet:
        print(format_table(records))
    print(summary(records))
    print(f"compile_check: {elapsed:.1f} s with {args.jobs or os.cpu_count()} workers")
    return 0


if __name__ == "__main__":
    sys.exit(main())
