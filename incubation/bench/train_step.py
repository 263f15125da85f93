"""Train-step benchmark: one optimizer step of a ViT (forward, cross-entropy, backward, AdamW)
in images/s and peak memory, for our model (incubation.VisionTransformer) on each backend of
incubation.ops against timm's VisionTransformer (fused attention on) eager and under
torch.compile, with the same weights, batch and optimizer, measured in one run.

    incubation bench train            # GPU: ViT-S/B/L/H, bf16 autocast; CPU: ViT-Ti/S, fp32
    incubation bench train --quick    # ViT-Ti, batch 2 on CPU; ViT-B on GPU
    incubation bench train --models B --batch 256 --providers ours-auto,timm,timm-compile

Providers: ours-eager, ours-triton, ours-cuda, ours-cpp (the backend forced for every op: one
that cannot serve some op is skipped, with the reason), ours-auto (each op's fastest available
backend, listed in the output), ours-compile (our model under torch.compile in auto mode: each
op's kernel is the decision cached for its signature, by `incubation tune` beforehand; eager,
which Inductor fuses, where none is), timm, timm-compile. Peak memory: what a provider adds (model
copy, gradients, optimizer state, activations): torch.cuda.max_memory_allocated on GPU, the
growth of the resident set on CPU (indicative).
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
from typing import Callable, Optional

import torch
import torch.nn.functional as F

import incubation
from incubation import ops
from incubation.bench.common import (
    DTYPES,
    MODELS,
    TRITON_ON_CPU,
    PeakRSS,
    benchmark_parser,
    check_choices,
    describe_environment,
    describe_error,
    environment,
    fmt,
    free_memory,
    median_ms,
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
from incubation.cli.options import positive_int
from incubation.nn import train_flops_per_image

PROVIDERS = ("ours-eager", "ours-triton", "ours-cuda", "ours-cpp", "ours-auto", "ours-compile", "timm", "timm-compile")
GPU_BATCH = {"Ti": 256, "S": 256, "B": 256, "L": 128, "H": 64, "demo": 1024}
CPU_BATCH = {"Ti": 8, "S": 4, "B": 2, "L": 1, "H": 1, "demo": 128}
NUM_CLASSES = 1000


def build_model(model: str, device, img_size: Optional[int] = None) -> incubation.VisionTransformer:
    m = MODELS[model]
    return incubation.VisionTransformer(img_size=img_size or m.get("img", 224), patch_size=m["patch"],
                                        in_chans=m.get("chans", 3), embed_dim=m["width"], depth=m["depth"],
                                        num_heads=m["heads"], num_classes=m.get("classes", NUM_CLASSES)).to(device)


def _provider_model(provider: str, ours: torch.nn.Module) -> tuple[torch.nn.Module, str]:
    """(model to train, backend forced around the step) for one provider; weights copied."""
    if provider == "ours-compile":   # auto: the compiled graph takes the decisions cached (by `tune`) at trace time
        return torch.compile(copy.deepcopy(ours)), "auto"
    if provider.startswith("ours-"):
        return copy.deepcopy(ours), provider[len("ours-"):]
    theirs = incubation.to_timm(ours).to(next(ours.parameters()).device)
    for block in theirs.blocks:
        block.attn.fused_attn = True  # timm's fast path: F.scaled_dot_product_attention
    return (torch.compile(theirs) if provider == "timm-compile" else theirs), "auto"


def prepare_provider(provider: str, ours: torch.nn.Module, images, labels, amp: Optional[torch.dtype],
                     device, warmup: int) -> tuple[Callable, dict]:
    """Build one provider's model and optimizer and run its warm-up steps: (step, facts).

    Peak memory is what the provider adds to what was allocated before it (its model copy,
    gradients, optimizer state, activations), over the warm-up steps (the timer adds buffers
    of its own)."""
    def step():
        opt.zero_grad(set_to_none=True)
        with ops.use_backend(backend), torch.autocast(device.type, dtype=amp or torch.float32,
                                                      enabled=amp is not None):
            loss = F.cross_entropy(model(images), labels)
        with ops.use_backend(backend):
            loss.backward()
        opt.step()
        return loss

    gpu = device.type == "cuda"
    free_memory(device)
    if gpu:
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    with PeakRSS() as rss:
        model, backend = _provider_model(provider, ours)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, fused=gpu)
        loss = step()  # first step: a forced backend refuses here; torch.compile compiles
        for _ in range(warmup - 1):
            step()
    if not torch.isfinite(loss).item():
        raise FloatingPointError(f"loss is {loss.item()} after the first step")
    peak = torch.cuda.max_memory_allocated(device) - before if gpu else rss.peak_bytes
    facts = {"peak_mem_gb": peak and peak / 1e9, "loss_first_step": loss.item()}
    if backend == "auto" and provider.startswith("ours"):
        facts["backends"] = {op: entry["backend"] for op, entry in ops.backends(device).items()}
    return step, facts


def bench_providers(providers: list[str], ours, images, labels, amp, device, quick: bool, warmup: int,
                    log: Callable = print, rounds: Optional[int] = None) -> dict:
    """provider -> (status, facts or reason). On GPU one provider at a time (memory); on CPU all
    of them prepared first, then timed in `rounds` interleaved rounds (default 7, 3 when quick; median of
    the rounds, each round's time kept as round_ms, the order reversed every other round) so that
    neither a change of load on a shared machine nor the position in a round favours a provider. Each result is
    logged as soon as it is measured (a run cut short keeps what it measured in its log)."""
    gpu = device.type == "cuda"
    groups = [[p] for p in providers] if gpu else [providers]
    default_rounds, rep_ms = (1, 1000 if quick else 3000) if gpu else (3 if quick else 7, 200 if quick else 1000)
    rounds = rounds or default_rounds
    results = {}
    for group in groups:
        live = {}
        for provider in group:
            if provider == "ours-triton" and not gpu:
                results[provider] = ("skipped", TRITON_ON_CPU)
                continue
            try:
                live[provider] = prepare_provider(provider, ours, images, labels, amp, device, warmup)
            except Exception as exc:  # noqa: BLE001 - report and go on with the other providers
                results[provider] = ("skipped" if isinstance(exc, ops.BackendError) else "failed",
                                     describe_error(exc))
                free_memory(device)
        times = {p: [] for p in live}
        for r in range(rounds):   # the order reversed every other round: no provider always goes first
            for provider, (step, _) in (reversed if r % 2 else iter)(list(live.items())):
                if provider in results:
                    continue  # failed in an earlier round
                try:  # warm=0: prepare_provider ran the warm-up steps
                    times[provider].append(median_ms(step, device, quick=quick, rep_ms=rep_ms, warm=0))
                except Exception as exc:  # noqa: BLE001
                    results[provider] = ("failed", describe_error(exc))
        for provider, (_, facts) in live.items():
            if provider not in results:
                results[provider] = ("ok", dict(facts, ms=statistics.median(times[provider]), round_ms=times[provider]))
                log(f"  measured {provider}: {results[provider][1]['ms']:.4g} ms/step")
        del live
        free_memory(device)
    return results


def _speedup(ours: dict, theirs: dict) -> float:
    """ours over theirs in images/s: the median of the per-round ratios (rounds are interleaved, so
    each ratio compares two steps timed under the same load)."""
    pairs = list(zip(ours.get("round_ms", []), theirs.get("round_ms", [])))
    if pairs:
        return statistics.median(t / o for o, t in pairs)
    return ours["images_per_s"] / theirs["images_per_s"]


def evaluate_targets(records: list[dict], device) -> list[dict]:
    ok = {(r["model"], r["provider"]): r for r in records if r["status"] == "ok"}

    def best_ours(model):
        found = [r for (m, p), r in ok.items() if m == model and p.startswith("ours-") and p != "ours-eager"]
        return max(found, key=lambda r: r["images_per_s"]) if found else None

    if device.type == "cuda":
        out, best = [], best_ours("B")
        for theirs, threshold in (("timm", 1.3), ("timm-compile", 1.1)):
            base = ok.get(("B", theirs))
            value = best["images_per_s"] / base["images_per_s"] if best and base else None
            out.append(target(f"ViT-B train step vs {theirs}", value, threshold, "x",
                              f"{best['provider']} {best['images_per_s']:.0f} img/s vs {base['images_per_s']:.0f} "
                              f"(batch {best['batch']}, {best['amp']})" if value else
                              "ViT-B with an ours backend and this baseline not both measured"))
        return out
    out = []
    for model in sorted({r["model"] for r in records}, key=list(MODELS).index):
        auto = ok.get((model, "ours-auto"))
        for theirs, threshold in (("timm", 1.0), ("ours-eager", 0.98)):   # dispatch must never cost the user speed
            base = ok.get((model, theirs))
            value = _speedup(auto, base) if auto and base else None
            out.append(target(f"ViT-{model} train step, ours-auto vs {theirs} (CPU)", value, threshold, "x",
                              f"{auto['images_per_s']:.2f} vs {base['images_per_s']:.2f} img/s; auto chose "
                              + "; ".join(f"{op} {b}" for op, b in auto.get("backends", {}).items()) if value else
                              "ours-auto or this baseline did not run"))
    return out


COLUMNS = [("model", "ViT", ""), ("batch", "batch", "d"), ("amp", "precision", ""), ("provider", "provider", ""),
           ("ms", "ms/step", ".4g"), ("images_per_s", "images/s", ".4g"), ("tflops", "TFLOP/s", ".3g"),
           ("x_timm", "x timm", ".3g"), ("x_timm_compile", "x timm-compile", ".3g"),
           ("peak_mem_gb", "peak mem GB", ".3g")]


def _plot(records: list[dict], path: str, title: str, device) -> Optional[str]:
    plt = pyplot()
    ok = [r for r in records if r["status"] == "ok"]
    if plt is None or not ok:
        return None
    models = sorted({r["model"] for r in ok}, key=list(MODELS).index)
    providers = [p for p in PROVIDERS if any(r["provider"] == p for r in ok)]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    width = 0.8 / len(providers)
    mem_label = "peak memory (GB)" if device.type == "cuda" else "peak RSS growth (GB, indicative)"
    for ax, key, label in ((axes[0], "images_per_s", "images/s"), (axes[1], "peak_mem_gb", mem_label)):
        for i, p in enumerate(providers):
            got = {r["model"]: r.get(key) or 0 for r in ok if r["provider"] == p}
            ax.bar([j + i * width for j in range(len(models))], [got.get(m, 0) for m in models], width, label=p)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(models))])
        ax.set_xticklabels([f"ViT-{m}" for m in models])
        ax.set_ylabel(label)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _markdown(payload: dict) -> str:
    env, cfg = payload["environment"], payload["config"]
    label = "GPU" if env["device"] == "cuda" else "CPU (indicative: a shared 2-core machine)" \
        if (env["cpu_count"] or 0) <= 4 else "CPU"
    ok = [r for r in payload["results"] if r["status"] == "ok"]
    lines = [f"## Train-step benchmark, {label}, {env['date']}", "", describe_environment(env), "",
             f"Config: models {cfg['models']}, batch {cfg['batch'] or 'per model (table)'}, precision {cfg['amp']}, "
             f"AdamW, {cfg['img_size'] or '224 (demo: 28)'} px, 1000 classes (demo: 1 channel, 10 classes), "
             f"{'quick' if cfg['quick'] else 'full'} timing.", "",
             table(ok, COLUMNS, markdown=True), ""]
    autos = {r["model"]: r["backends"] for r in ok if r.get("backends")}
    for model, chosen in autos.items():
        lines.append(f"ours-auto on ViT-{model}: " + ", ".join(f"{k}={v}" for k, v in chosen.items()))
    not_run = sorted({(r["provider"], f"{r['status']}: {r['reason']}")
                      for r in payload["results"] if r["status"] != "ok"})
    if not_run:
        lines += ["", "Not run:", ""] + [f"- {p}: {why}" for p, why in not_run]
    lines += ["", "Targets:", "", targets_markdown(payload["targets"])]
    return "\n".join(lines)


def run_train_benchmarks(device: Optional[str] = None, models: Optional[list[str]] = None,
                         batch: Optional[int] = None, amp: Optional[str] = None,
                         providers: Optional[list[str]] = None, quick: bool = False, warmup: Optional[int] = None,
                         out_dir: Optional[str] = None, plot: bool = True, append_results: Optional[str] = None,
                         threads: Optional[int] = None, img_size: Optional[int] = None, log: Callable = print,
                         rounds: Optional[int] = None) -> dict:
    """Run the train-step benchmark and write <out_dir>/train_step.{json,md,png}.

    Defaults: GPU: ViT-S/B/L/H, batch 256/256/128/64, bf16 autocast; CPU: ViT-Ti/S, batch 8/4,
    fp32. quick: ViT-B (GPU) or ViT-Ti with batch 2 (CPU). amp: 'bf16', 'fp16' or 'fp32'
    (no autocast). img_size: the model's by default (224; demo 28); smaller only to try the
    harness quickly. rounds: interleaved timing rounds on CPU (default 7; 3 when quick)."""
    dev = resolve_device(device)
    gpu = dev.type == "cuda"
    set_threads(threads)
    if models is None:
        models = (["B"] if gpu else ["Ti"]) if quick else (["S", "B", "L", "H"] if gpu else ["Ti", "S"])
    amp = amp or ("bf16" if gpu else "fp32")
    providers = list(PROVIDERS) if providers is None else providers
    warmup = (3 if gpu else 2) if warmup is None else warmup
    _check_arguments(models, providers, amp, batch, warmup, img_size)
    out_dir = out_dir or os.path.join("runs", "bench", f"train-{dev.type}")
    autocast = None if amp == "fp32" else DTYPES[amp]

    env = environment(dev)
    log(describe_environment(env))
    records = []
    for model in models:
        size = batch if batch is not None else (2 if quick and not gpu else (GPU_BATCH if gpu else CPU_BATCH)[model])
        records += _bench_model(model, size, amp, providers, dev, img_size, autocast, quick, warmup, log, rounds)
    _add_ratios(records)
    payload = {"benchmark": "train_step", "environment": env,
               "config": dict(device=dev.type, models=models, batch=batch, amp=amp, providers=providers,
                              quick=quick, warmup=warmup, img_size=img_size, rounds=rounds),
               "results": records}
    payload["targets"] = evaluate_targets(records, dev)
    log("\n" + table([r for r in records if r["status"] == "ok"], COLUMNS))
    log("\n" + targets_text(payload["targets"]))
    title = f"train step on {env['device_name']} ({'GPU' if gpu else 'CPU, indicative'}), {env['date']}"
    return write_outputs(out_dir, "train_step", payload, _markdown(payload), append_results,
                         plot and (lambda path: _plot(records, path, title, dev)), log)


def _check_arguments(models, providers, amp, batch, warmup, img_size) -> None:
    if not (models and providers):
        raise ValueError("models and providers must not be empty")
    check_choices("model", models, MODELS)
    check_choices("provider", providers, PROVIDERS)
    if amp not in DTYPES:
        raise ValueError(f"amp must be one of {list(DTYPES)}, got {amp!r}")
    if (batch is not None and batch < 1) or warmup < 1:
        raise ValueError(f"batch and warmup must be positive, got batch={batch}, warmup={warmup}")
    if img_size is not None and img_size < 16:
        raise ValueError(f"img_size must be at least one 16-pixel patch, got {img_size}")


def _bench_model(model, size, amp, providers, dev, img_size, autocast, quick, warmup, log, rounds) -> list[dict]:
    """One record per provider for ViT-`model` at batch `size`."""
    torch.manual_seed(0)
    ours = build_model(model, dev, img_size)
    c = ours.config
    images = torch.randn(size, c.in_chans, *c.img_size, device=dev)
    labels = torch.randint(0, c.num_classes, (size,), device=dev)
    flops = train_flops_per_image(ours) * size
    base = dict(model=model, batch=size, amp=amp)
    results = bench_providers(providers, ours, images, labels, autocast, dev, quick, warmup, log, rounds)
    records = []
    for provider in providers:
        status, got = results[provider]
        if status == "ok":
            rec = dict(base, provider=provider, status=status, **got,
                       images_per_s=size / (got["ms"] * 1e-3), tflops=flops / (got["ms"] * 1e-3) / 1e12)
        else:
            rec = dict(base, provider=provider, status=status, reason=got)
        log(f"ViT-{model} batch {size} {provider}: " + (
            f"{rec['images_per_s']:.4g} images/s, {rec['ms']:.4g} ms/step, peak {fmt(rec['peak_mem_gb'])} GB"
            if status == "ok" else f"{status}: {rec['reason']}"))
        records.append(rec)
    return records


def _add_ratios(records: list[dict]) -> None:
    """x_timm, x_timm_compile: each provider's throughput over timm's (same model), where both ran
    (`_speedup`: the median of the per-round ratios, as the targets)."""
    for rec in records:
        if rec["status"] == "ok":
            for theirs in ("timm", "timm-compile"):
                other = next((r for r in records if r["model"] == rec["model"] and r["provider"] == theirs
                              and r["status"] == "ok"), None)
                rec[f"x_{theirs.replace('-', '_')}"] = other and _speedup(rec, other)


def build_parser() -> argparse.ArgumentParser:
    p = benchmark_parser("incubation bench train", __doc__, "one small model, short timing", "runs/bench/train-<device>")
    p.add_argument("--models", help=f"comma-separated, from {list(MODELS)}")
    p.add_argument("--batch", type=int, help="batch size for every model (default per model)")
    p.add_argument("--amp", choices=list(DTYPES), help="autocast dtype; fp32 = no autocast (GPU default bf16)")
    p.add_argument("--providers", help=f"comma-separated, from {list(PROVIDERS)}")
    p.add_argument("--warmup", type=int, help="untimed steps first (compilation happens here)")
    p.add_argument("--rounds", type=positive_int, help="interleaved timing rounds on CPU (default 7, quick 3); "
                                                       "the ratios are medians of the per-round ratios")
    p.add_argument("--img-size", type=int, help="image size (default the model's: 224, demo 28; smaller only to try "
                                                 "the harness)")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run_train_benchmarks(
            device=args.device, quick=args.quick, models=args.models and parse_list(args.models, MODELS, "model"),
            batch=args.batch, amp=args.amp, warmup=args.warmup,
            providers=args.providers and parse_list(args.providers, PROVIDERS, "provider"),
            out_dir=args.out, plot=not args.no_plot, append_results=args.append_results, threads=args.threads,
            img_size=args.img_size, rounds=args.rounds)
    except ValueError as exc:
        print(f"incubation bench train: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
