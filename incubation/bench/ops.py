"""Op benchmark: the fused ops of the ViT block on every backend reachable through
`incubation.ops` (ours: triton / cuda / cpp) against eager PyTorch, SDPA and torch.compile of
the eager code (theirs), at ViT shapes, all measured in one run so the ratios sit side by side.

    incubation bench ops                 # the full sweep for this device (GPU if present)
    incubation bench ops --quick         # one small shape: about 2 minutes on 2 CPU cores
    incubation bench ops --models B --seq 197 --batch 256 --dtypes bf16 --ops attention

Ops and modes (fwd is the training forward: inputs require grad, so activations are saved):
    attention        (B, H, N, D) q, k, v                fwd, fwd+bwd
    add_layer_norm   x + residual, LayerNorm (norm2)    fwd, bwd, fwd+bwd
    linear_gelu      fc1: (B, N, C) -> 4C, bias + GELU    fwd, fwd+bwd
    linear_residual  fc2: 4C -> C, bias + layer scale + residual   fwd, fwd+bwd
SDPA: the backend torch picks for the inputs (flash / efficient / cudnn / math, read from the
aten op the profiler sees) is recorded and pinned with torch.nn.attention.sdpa_kernel for the
timing, so that a rerun compares against the same kernel.
Work counted: attention 4*B*H*N^2*D FLOPs forward, x2.5 backward; linear 2*M*K*N forward, x2
backward; add + LayerNorm moves (at least) 4 tensors of x's size forward and 4 backward
(read both output grads and the sum, write the grad of the sum). Writes a table, JSON, a
markdown section and a PNG into --out.
"""
from __future__ import annotations

import argparse
import itertools
import math
import os
import statistics
import sys
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from incubation import ops
from incubation.bench.common import (
    DTYPES,
    MODELS,
    TRITON_ON_CPU,
    benchmark_parser,
    check_choices,
    describe_environment,
    describe_error,
    environment,
    free_memory,
    measure_ceilings,
    median_ms,
    parse_ints,
    parse_list,
    pyplot,
    resolve_device,
    set_threads,
    table,
    target,
    targets_markdown,
    targets_text,
    write_outputs,
)

OURS = ("triton", "cuda", "cpp")
THEIRS = ("eager", "sdpa", "compile")
PROVIDERS = THEIRS + OURS
EPS = 1e-6


@dataclass(frozen=True)
class Shape:
    model: str
    batch: int
    seq: int

    @property
    def width(self) -> int:
        return MODELS[self.model]["width"]

    @property
    def heads(self) -> int:
        return MODELS[self.model]["heads"]

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def tokens(self) -> int:
        return self.batch * self.seq


# --------------------------------------------------------------------------------------
# the ops: inputs, the eager code (theirs), ours through incubation.ops, and their work
# --------------------------------------------------------------------------------------
def _leaves(device, dtype):
    """make(*shape, scale=1, shift=0): a random leaf tensor that requires grad."""
    def make(*shape, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
        t = torch.randn(*shape, device=device, dtype=torch.float32) * scale + shift
        return t.to(dtype).requires_grad_()
    return make


def _attention_inputs(s: Shape, dtype, device):
    leaf = _leaves(device, dtype)
    return tuple(leaf(s.batch, s.heads, s.seq, s.head_dim) for _ in range(3))


def _attention_eager(q, k, v):
    """timm's non-fused attention: softmax(q k^T * scale) v."""
    return ((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1) @ v


def _add_layer_norm_inputs(s: Shape, dtype, device):
    leaf, c = _leaves(device, dtype), s.width
    return leaf(s.batch, s.seq, c), leaf(s.batch, s.seq, c), leaf(c, scale=0.1, shift=1.0), leaf(c, scale=0.1)


def _add_layer_norm_eager(x, residual, weight, bias):
    summed = x + residual
    return F.layer_norm(summed, (summed.shape[-1],), weight, bias, EPS), summed


def _linear_gelu_inputs(s: Shape, dtype, device):
    leaf, c = _leaves(device, dtype), s.width
    return leaf(s.batch, s.seq, c), leaf(4 * c, c, scale=c ** -0.5), leaf(4 * c, scale=0.1)


def _linear_residual_inputs(s: Shape, dtype, device):
    leaf, c = _leaves(device, dtype), s.width
    return (leaf(s.batch, s.seq, 4 * c), leaf(c, 4 * c, scale=(4 * c) ** -0.5), leaf(c, scale=0.1),
            leaf(c, scale=0.1, shift=0.5), leaf(s.batch, s.seq, c))


@dataclass(frozen=True)
class Op:
    name: str
    modes: tuple
    inputs: Callable            # (shape, dtype, device) -> leaf tensors
    eager: Callable             # theirs: plain PyTorch
    ours: Callable              # through incubation.ops (the backend is forced around the call)
    flops: Optional[Callable] = None    # shape -> forward FLOPs
    bytes: Optional[Callable] = None    # (shape, element size) -> forward bytes
    bwd_factor: float = 1.0             # backward work / forward work
    sdpa: Optional[Callable] = None

    def work(self, shape: Shape, elem: int, mode: str) -> tuple[Optional[float], Optional[float]]:
        """(FLOPs, bytes) of one call in `mode`."""
        factor = {"fwd": 1.0, "bwd": self.bwd_factor, "fwd+bwd": 1.0 + self.bwd_factor}[mode]
        return (None if self.flops is None else self.flops(shape) * factor,
                None if self.bytes is None else self.bytes(shape, elem) * factor)


OPS = {op.name: op for op in (
    Op("attention", ("fwd", "fwd+bwd"), _attention_inputs, _attention_eager, ops.attention,
       flops=lambda s: 4 * s.batch * s.heads * s.seq ** 2 * s.head_dim, bwd_factor=2.5,
       sdpa=F.scaled_dot_product_attention),
    Op("add_layer_norm", ("fwd", "bwd", "fwd+bwd"), _add_layer_norm_inputs, _add_layer_norm_eager,
       lambda x, r, w, b: ops.add_layer_norm(x, r, w, b, EPS),
       bytes=lambda s, elem: 4 * s.tokens * s.width * elem, bwd_factor=1.0),
    Op("linear_gelu", ("fwd", "fwd+bwd"), _linear_gelu_inputs, lambda x, w, b: F.gelu(F.linear(x, w, b)),
       lambda x, w, b: ops.linear(x, w, b, "gelu"),
       flops=lambda s: 2 * s.tokens * s.width * 4 * s.width, bwd_factor=2.0),
    Op("linear_residual", ("fwd", "fwd+bwd"), _linear_residual_inputs,
       lambda x, w, b, ls, r: r + ls * F.linear(x, w, b),
       lambda x, w, b, ls, r: ops.linear(x, w, b, layer_scale=ls, residual=r),
       flops=lambda s: 2 * s.tokens * 4 * s.width * s.width, bwd_factor=2.0),
)}


# --------------------------------------------------------------------------------------
# measuring
# --------------------------------------------------------------------------------------
class Skip(Exception):
    """A provider that does not apply to this op or cannot run here."""


def _as_tuple(out) -> tuple:
    return out if isinstance(out, tuple) else (out,)


SDPA_BACKENDS = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION",
                 "math": "MATH"}


def sdpa_backend(*inputs) -> Optional[str]:
    """The backend F.scaled_dot_product_attention picks for these inputs (requires_grad counts):
    the name in the aten op it dispatches to (aten::_scaled_dot_product_flash_attention,
    ..._efficient_attention, ..._cudnn_attention, ..._attention_math), or None if unrecognised."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        F.scaled_dot_product_attention(*inputs)
    names = [e.name for e in prof.events() if e.name.startswith("aten::_scaled_dot_product")]
    return next((b for b in SDPA_BACKENDS for n in names if b in n), None)


def _pinned_sdpa(backend: Optional[str]) -> Callable:
    """F.scaled_dot_product_attention restricted to `backend` (None: torch's choice)."""
    if backend is None:
        return F.scaled_dot_product_attention
    from torch.nn.attention import SDPBackend, sdpa_kernel

    pin = getattr(SDPBackend, SDPA_BACKENDS[backend])

    def pinned(*args):
        with sdpa_kernel(pin):
            return F.scaled_dot_product_attention(*args)
    return pinned


def _provider_fn(op: Op, provider: str) -> Callable:
    if provider == "eager":
        return op.eager
    if provider == "sdpa":
        if op.sdpa is None:
            raise Skip("SDPA is an attention kernel")
        return op.sdpa
    if provider == "compile":
        torch.compiler.reset()  # a fresh compile per shape: no recompile limit, static shapes
        return torch.compile(op.eager, dynamic=False)

    op_name = op.name if op.name in ops.OPS else "linear"
    if not ops.implements(op_name, provider):  # forced, it would run eager: nothing of ours to time
        raise ops.BackendError(f"the {provider} backend has no {op_name} kernel")

    def forced(*args):
        with ops.use_backend(provider):
            return op.ours(*args)
    return forced


def _time_mode(fn: Callable, inputs: tuple, grads: tuple, mode: str, device, quick: bool, rep_ms) -> float:
    leaves = [t for t in inputs if t.requires_grad]
    if mode == "fwd":
        call = lambda: fn(*inputs)  # noqa: E731
    elif mode == "fwd+bwd":
        call = lambda: torch.autograd.backward(_as_tuple(fn(*inputs)), grads)  # noqa: E731
    else:  # bwd alone: the graph of one forward, kept between repeats
        outs = _as_tuple(fn(*inputs))
        call = lambda: torch.autograd.backward(outs, grads, retain_graph=True)  # noqa: E731
    return median_ms(call, device, quick=quick, grad_to_none=leaves, rep_ms=rep_ms)


def bench_case(op: Op, shape: Shape, dtype_name: str, providers, device, ceilings: dict, quick: bool) -> list[dict]:
    """Every provider x mode of one op at one shape and dtype: a list of records.

    On CPU the providers are timed in 3 interleaved rounds (median of the rounds), so that a
    change of load on a shared machine does not favour whichever provider ran first."""
    dtype = DTYPES[dtype_name]
    elem = torch.finfo(dtype).bits // 8
    inputs = op.inputs(shape, dtype, device)
    with torch.no_grad():
        reference = [o.float() for o in _as_tuple(op.eager(*inputs))]
    grads = tuple(torch.randn_like(o).to(dtype) for o in reference)
    base = dict(op=op.name, model=shape.model, batch=shape.batch, seq=shape.seq, width=shape.width,
                heads=shape.heads, head_dim=shape.head_dim, dtype=dtype_name)
    kind = {p: "ours" if p in OURS else "theirs" for p in providers}
    records, ready, base_of = _prepare_providers(op, providers, inputs, reference, base, kind, device)
    rounds, rep_ms = (1, None) if device.type == "cuda" else (3, 50 if quick else 250)
    for mode in op.modes:
        times, failed = {p: [] for p in ready}, {}
        for _ in range(rounds):
            for provider, (fn, _) in ready.items():
                if provider in failed:
                    continue
                try:
                    times[provider].append(_time_mode(fn, inputs, grads, mode, device, quick, rep_ms))
                except Exception as exc:  # noqa: BLE001
                    failed[provider] = describe_error(exc)
                for t in inputs:
                    t.grad = None
        for provider, (_, diff) in ready.items():
            rec = dict(base_of[provider], mode=mode, provider=provider, kind=kind[provider], max_abs_diff=diff)
            if provider in failed:
                records.append(dict(rec, status="failed", reason=failed[provider]))
                continue
            ms = statistics.median(times[provider])
            flops, nbytes = op.work(shape, elem, mode)
            rec.update(status="ok", ms=ms, rounds=rounds, tflops=flops and flops / (ms * 1e-3) / 1e12,
                       gbps=nbytes and nbytes / (ms * 1e-3) / 1e9)
            if rec["gbps"] is not None:
                rec["pct_ceiling"] = 100 * rec["gbps"] / ceilings["copy_gbps"]
            elif rec["tflops"] is not None and dtype_name in ceilings["matmul_tflops"]:
                rec["pct_ceiling"] = 100 * rec["tflops"] / ceilings["matmul_tflops"][dtype_name]
            records.append(rec)
    _add_ratios(records)
    del inputs, reference, grads
    free_memory(device)
    return records


def _prepare_providers(op: Op, providers, inputs, reference, base: dict, kind: dict, device):
    """Call every provider once (a forced backend refuses here; torch.compile compiles):
    (records of those that cannot run, ready = provider -> (fn, max abs diff from eager),
    the base record of each provider, with SDPA's pinned backend)."""
    records, ready = [], {}
    base_of = {p: base for p in providers}
    for provider in providers:
        if provider == "triton" and device.type != "cuda":
            records += [dict(base, mode=m, provider=provider, kind=kind[provider], status="skipped",
                             reason=TRITON_ON_CPU) for m in op.modes]
            continue
        try:
            fn = _provider_fn(op, provider)
            if provider == "sdpa":
                backend = sdpa_backend(*inputs)
                base_of[provider] = dict(base, sdpa_backend=backend or "unrecognised (not pinned)")
                fn = _pinned_sdpa(backend)
            out = _as_tuple(fn(*inputs))  # first call: a forced backend refuses here; compiles
            ready[provider] = fn, max((o.detach().float() - r).abs().max().item() for o, r in zip(out, reference))
            del out
        except Skip:
            continue  # not applicable (SDPA for a non-attention op): no record
        except Exception as exc:  # noqa: BLE001 - report and go on with the other providers
            status = "skipped" if isinstance(exc, ops.BackendError) else "failed"
            records += [dict(base_of[provider], mode=m, provider=provider, kind=kind[provider], status=status,
                             reason=describe_error(exc)) for m in op.modes]
    return records, ready, base_of


def _add_ratios(records: list[dict]) -> None:
    """x_eager, x_sdpa, x_compile: each record's speed over theirs, same mode."""
    by_mode = {}
    for rec in records:
        if rec["status"] == "ok":
            by_mode.setdefault(rec["mode"], {})[rec["provider"]] = rec["ms"]
    for rec in records:
        if rec["status"] == "ok":
            for theirs in THEIRS:
                base_ms = by_mode[rec["mode"]].get(theirs)
                rec[f"x_{theirs}"] = base_ms / rec["ms"] if base_ms else None


# --------------------------------------------------------------------------------------
# targets, report
# --------------------------------------------------------------------------------------
GPU_TARGET_SHAPE = dict(model="B", seq=197, batch=256, dtype="bf16")


def _best_ours(records, **where) -> Optional[dict]:
    found = [r for r in records if r["status"] == "ok" and r["kind"] == "ours"
             and all(r[k] == v for k, v in where.items())]
    return min(found, key=lambda r: r["ms"]) if found else None


def evaluate_targets(records: list[dict], device, ceilings: dict) -> list[dict]:
    """The issue's targets, from this run's records (never assumed)."""
    if device.type == "cuda":
        where = dict(GPU_TARGET_SHAPE)
        missing = "not in this run (or no ours backend ran): needs ViT-B, N=197, B=256, bf16"
        out = []
        for op, ratio_of, threshold, label in (
                ("attention", "sdpa", 1.15, "attention fwd+bwd vs SDPA"),
                ("linear_gelu", "eager", 1.2, "linear+GELU fwd+bwd vs cuBLAS + eager GELU"),
                ("add_layer_norm", "eager", 1.0, "add+LayerNorm fwd+bwd faster than PyTorch")):
            best = _best_ours(records, op=op, mode="fwd+bwd", **where)
            value = best and best.get(f"x_{ratio_of}")
            out.append(target(label, value, threshold, "x",
                              f"{best['provider']}, {best['ms']:.3f} ms (ViT-B, N=197, B=256, bf16)"
                              if value else missing))
        best = _best_ours(records, op="add_layer_norm", mode="fwd+bwd", **where)
        out.append(target("add+LayerNorm fwd+bwd bandwidth vs copy", best and best["gbps"] / ceilings["copy_gbps"],
                          0.9, "x copy",
                          f"{best['provider']} {best['gbps']:.0f} GB/s, copy {ceilings['copy_gbps']:.0f} GB/s"
                          if best else missing))
        return out
    out = []
    for op in ("add_layer_norm", "linear_gelu", "linear_residual"):
        for mode in OPS[op].modes:
            ratios = [r["x_eager"] for r in records if r["status"] == "ok" and r["provider"] == "cpp"
                      and r["op"] == op and r["mode"] == mode and r.get("x_eager")]
            geo = math.exp(sum(map(math.log, ratios)) / len(ratios)) if ratios else None
            out.append(target(f"cpp {op} {mode} vs eager (CPU)", geo, 1.5, "x",
                              f"geometric mean over {len(ratios)} shapes/dtypes, range "
                              f"{min(ratios):.2f}-{max(ratios):.2f}" if ratios else "the cpp backend did not run"))
    return out


COLUMNS = [("op", "op", ""), ("mode", "mode", ""), ("model", "ViT", ""), ("batch", "B", "d"), ("seq", "N", "d"),
           ("dtype", "dtype", ""), ("provider", "provider", ""), ("ms", "ms", ".4g"), ("tflops", "TFLOP/s", ".3g"),
           ("gbps", "GB/s", ".4g"), ("pct_ceiling", "% ceiling", ".3g"), ("x_eager", "x eager", ".3g"),
           ("x_sdpa", "x sdpa", ".3g"), ("x_compile", "x compile", ".3g"), ("max_abs_diff", "max abs diff", ".2g")]


def _shown(records: list[dict]) -> list[dict]:
    """Records for a table: the SDPA rows name the backend they were pinned to, e.g. sdpa (flash)."""
    return [dict(r, provider=f"{r['provider']} ({r['sdpa_backend']})") if r.get("sdpa_backend") else r
            for r in records]


def _skips(records) -> dict:
    """(provider, op) -> reason, for providers that did not run."""
    return {(r["provider"], r["op"]): f"{r['status']}: {r['reason']}" for r in records if r["status"] != "ok"}


def _plot(records: list[dict], path: str, title: str) -> Optional[str]:
    plt = pyplot()
    ok = [r for r in records if r["status"] == "ok" and r.get("x_eager")]
    if plt is None or not ok:
        return None
    panels = sorted({(r["op"], r["mode"]) for r in ok},
                    key=lambda p: (list(OPS).index(p[0]), OPS[p[0]].modes.index(p[1])))
    providers = [p for p in PROVIDERS if any(r["provider"] == p for r in ok)]
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 3.6 * rows), squeeze=False)
    for ax, (op, mode) in zip(axes.flat, panels):
        cases = sorted({(r["model"], r["seq"], r["dtype"]) for r in ok if r["op"] == op and r["mode"] == mode},
                       key=lambda c: (list(MODELS).index(c[0]), c[1], c[2]))
        width = 0.8 / len(providers)
        for i, p in enumerate(providers):
            got = {(r["model"], r["seq"], r["dtype"]): r["x_eager"] for r in ok
                   if r["op"] == op and r["mode"] == mode and r["provider"] == p}
            ax.bar([j + i * width for j in range(len(cases))], [got.get(c, 0) for c in cases], width, label=p)
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))])
        ax.set_xticklabels([f"{m}/{n}\n{d}" for m, n, d in cases], fontsize=7)
        ax.set_title(f"{op} {mode}", fontsize=9)
        ax.set_ylabel("speed vs eager (x)")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles = {}
    for ax in axes.flat:
        handles.update(zip(*reversed(ax.get_legend_handles_labels())))
    fig.legend([handles[p] for p in providers if p in handles], [p for p in providers if p in handles],
               loc="upper right", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _markdown(payload: dict) -> str:
    env, ceil, cfg = payload["environment"], payload["ceilings"], payload["config"]
    label = "GPU" if env["device"] == "cuda" else "CPU (indicative: a shared 2-core machine)" \
        if (env["cpu_count"] or 0) <= 4 else "CPU"
    ok = [r for r in payload["results"] if r["status"] == "ok"]
    lines = [f"## Op benchmark, {label}, {env['date']}", "", describe_environment(env), "",
             f"Config: models {cfg['models']}, N {cfg['seqs']}, batch {cfg['batch']}, dtypes {cfg['dtypes']}, "
             f"{'quick' if cfg['quick'] else 'full'} timing. Ceilings: copy {ceil['copy_gbps']:.1f} GB/s; matmul "
             f"{ceil['matmul_size']}^3 " + ", ".join(f"{k} {v:.2f} TFLOP/s" for k, v in ceil["matmul_tflops"].items()),
             "", table(_shown(ok), COLUMNS, markdown=True), ""]
    if any(r.get("sdpa_backend") for r in ok):
        lines += ["sdpa (backend): the backend torch picks for these inputs, pinned with "
                  "torch.nn.attention.sdpa_kernel for the timing.", ""]
    skips = _skips(payload["results"])
    if skips:
        lines += ["Not run:", ""] + [f"- {p} / {op}: {why}" for (p, op), why in sorted(skips.items())] + [""]
    lines += ["Targets:", "", targets_markdown(payload["targets"])]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# entry points
# --------------------------------------------------------------------------------------
def run_op_benchmarks(device: Optional[str] = None, models: Optional[list[str]] = None,
                      seqs: Optional[list[int]] = None, batch: Optional[int] = None,
                      dtypes: Optional[list[str]] = None, op_names: Optional[list[str]] = None,
                      providers: Optional[list[str]] = None, quick: bool = False,
                      out_dir: Optional[str] = None, plot: bool = True,
                      append_results: Optional[str] = None, threads: Optional[int] = None,
                      log: Callable = print) -> dict:
    """Run the op benchmark and write <out_dir>/ops.{json,md,png}; returns the JSON payload.

    Unset arguments take the device's defaults: GPU: all ViTs Ti..H, N 197 and 257, batch 256,
    bf16/fp16/fp32. CPU: ViT-Ti and S, N 197, batch 4, fp32/bf16. quick: ViT-Ti (CPU, batch 2,
    fp32) or ViT-B (GPU, batch 256, bf16), N 197, and shorter timing. threads: torch's CPU
    threads (default: torch's choice)."""
    dev = resolve_device(device)
    set_threads(threads)
    gpu = dev.type == "cuda"
    defaults = {  # (models, seqs, batch, dtypes) per (device, quick)
        (True, False): (list(MODELS), [197, 257], 256, ["bf16", "fp16", "fp32"]),
        (True, True): (["B"], [197], 256, ["bf16"]),
        (False, False): (["Ti", "S"], [197], 4, ["fp32", "bf16"]),
        (False, True): (["Ti"], [197], 2, ["fp32"]),
    }[(gpu, quick)]
    models, seqs, batch, dtypes = (default if given is None else given
                                   for given, default in zip((models, seqs, batch, dtypes), defaults))
    op_names = list(OPS) if op_names is None else op_names
    providers = list(PROVIDERS) if providers is None else providers
    _check_arguments(models, seqs, batch, dtypes, op_names, providers)
    out_dir = out_dir or os.path.join("runs", "bench", f"ops-{dev.type}")

    env = environment(dev)
    log(describe_environment(env))
    ceilings = measure_ceilings(dev, dtypes, quick=quick)
    log(f"ceilings: copy {ceilings['copy_gbps']:.1f} GB/s, matmul " +
        ", ".join(f"{k} {v:.2f} TFLOP/s" for k, v in ceilings["matmul_tflops"].items()))
    records, said = [], set()
    for model, seq, dtype_name, name in itertools.product(models, seqs, dtypes, op_names):
        case = bench_case(OPS[name], Shape(model, batch, seq), dtype_name, providers, dev, ceilings, quick)
        for rec in case:
            if rec["status"] != "ok" and (rec["provider"], rec["op"]) not in said:
                said.add((rec["provider"], rec["op"]))
                log(f"  {rec['provider']} / {rec['op']}: {rec['status']}: {rec['reason']}")
        ok = [r for r in case if r["status"] == "ok"]
        if ok:
            log(table(_shown(ok), COLUMNS))
        records += case
    payload = {"benchmark": "ops", "environment": env, "ceilings": ceilings,
               "config": dict(device=dev.type, models=models, seqs=seqs, batch=batch, dtypes=dtypes, ops=op_names,
                              providers=providers, quick=quick),
               "results": records}
    payload["targets"] = evaluate_targets(records, dev, ceilings)
    log("\n" + targets_text(payload["targets"]))
    title = f"ops on {env['device_name']} ({'GPU' if gpu else 'CPU, indicative'}), {env['date']}"
    return write_outputs(out_dir, "ops", payload, _markdown(payload), append_results,
                         plot and (lambda path: _plot(records, path, title)), log)


def _check_arguments(models, seqs, batch, dtypes, op_names, providers) -> None:
    for what, values, choices in (("model", models, MODELS), ("dtype", dtypes, DTYPES), ("op", op_names, OPS),
                                  ("provider", providers, PROVIDERS)):
        check_choices(what, values, choices)
    if not (models and seqs and dtypes and op_names and providers):
        raise ValueError("models, seqs, dtypes, ops and providers must not be empty")
    if any(n < 1 for n in seqs) or batch < 1:
        raise ValueError(f"sequence lengths and batch must be positive, got seqs={seqs}, batch={batch}")


def build_parser() -> argparse.ArgumentParser:
    p = benchmark_parser("incubation bench ops", __doc__, "one small shape, short timing", "runs/bench/ops-<device>")
    p.add_argument("--models", help=f"comma-separated, from {list(MODELS)}")
    p.add_argument("--seq", help="comma-separated token counts N (197 = 224/16 + cls, 257 = 224/14 + cls)")
    p.add_argument("--batch", type=int, help="batch size (GPU default 256)")
    p.add_argument("--dtypes", help=f"comma-separated, from {list(DTYPES)}")
    p.add_argument("--ops", help=f"comma-separated, from {list(OPS)}")
    p.add_argument("--providers", help=f"comma-separated, from {list(PROVIDERS)}")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run_op_benchmarks(
            device=args.device, quick=args.quick,
            models=args.models and parse_list(args.models, MODELS, "model"),
            seqs=args.seq and parse_ints(args.seq, "--seq"), batch=args.batch,
            dtypes=args.dtypes and parse_list(args.dtypes, DTYPES, "dtype"),
            op_names=args.ops and parse_list(args.ops, OPS, "op"),
            providers=args.providers and parse_list(args.providers, PROVIDERS, "provider"),
            out_dir=args.out, plot=not args.no_plot, append_results=args.append_results, threads=args.threads)
    except ValueError as exc:
        print(f"incubation bench ops: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
