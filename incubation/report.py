"""Run reports: report.md + report.json + PNG plots from the files the stages left in a run dir.

Everything is read back from disk (each stage's final.json and metrics.jsonl), so a report can
be written for a run whose stages ran in other processes or on other machines.
"""
from __future__ import annotations

import math
import os
from typing import Optional

from .pipeline import read_incubations, read_stage, stage_dir
from .utils import atomic_write, json_dumps

__all__ = ["write_report"]

PLOTS = ("acc_vs_flops.png", "acc_vs_time.png", "stage_time.png")


def _curve(stage: dict, flops0: float = 0.0, wall0: float = 0.0) -> list[dict]:
    return [{"flops": flops0 + (e["flops"] or 0.0), "wall_s": wall0 + (e["wall_s"] or 0.0), "acc": e["acc"]}
            for e in stage["evals"]]


def _summarise(run_dir: str) -> dict:
    meta = read_stage(stage_dir(run_dir, "meta"))
    incubations = [s for s in read_incubations(run_dir) if s is not None]
    assemble = read_stage(stage_dir(run_dir, "assemble"))
    e2e = read_stage(stage_dir(run_dir, "e2e"))
    stages = {"meta": meta, **{f"incubate-{s['module']}": s for s in incubations}, "assemble": assemble, "e2e": e2e}
    stages = {k: v for k, v in stages.items() if v is not None}
    curves, summary = {}, {}
    before = [s for s in (meta, *incubations) if s is not None]
    flops0, wall0 = sum(s["flops"] for s in before), sum(s["wall_s"] for s in before)
    if meta is not None:
        curves["meta model"] = _curve(meta)
    if incubations:  # each hybrid at the cumulative cost after it (stages run one after another)
        points, f, w = [], meta["flops"] if meta else 0.0, meta["wall_s"] if meta else 0.0
        for s in incubations:
            f, w = f + s["flops"], w + s["wall_s"]
            if s["eval_acc"] is not None:
                points.append({"flops": f, "wall_s": w, "acc": s["eval_acc"]})
        curves["hybrids"] = points
    if assemble is not None:
        curves["deep incubation"] = _curve(assemble, flops0, wall0)
        summary["deep incubation"] = {"acc": assemble["eval_acc"], "top5": assemble.get("eval_top5"),
                                      "flops": flops0 + assemble["flops"],
                                      "wall_s": wall0 + assemble["wall_s"],
                                      "wall_s_parallel": (meta["wall_s"] if meta else 0.0) + assemble["wall_s"] +
                                      max((s["wall_s"] for s in incubations), default=0.0)}
    if e2e is not None:
        curves["end to end"] = _curve(e2e)
        summary["end to end"] = {"acc": e2e["eval_acc"], "top5": e2e.get("eval_top5"), "flops": e2e["flops"],
                                 "wall_s": e2e["wall_s"]}
    return {"run_dir": os.path.abspath(run_dir), "stages": stages, "curves": curves, "summary": summary,
            "assembly": _assembly(meta, incubations, assemble)}


def _assembly(meta, incubations, assemble) -> Optional[dict]:
    """How well the modules fit together: the meta model, each hybrid (the meta model with only
    module i substituted), and the assembled model (all of them) before and after fine-tuning."""
    if assemble is None:
        return None
    start = next((e["acc"] for e in assemble["evals"] if e["step"] == 0), None)
    return {"meta": meta["eval_acc"] if meta else None,
            "hybrids": {s["module"]: s["eval_acc"] for s in incubations},
            "assembled_before_fine_tuning": start, "assembled": assemble["eval_acc"]}


def _flop_unit(report: dict) -> tuple[float, str]:
    """(scale, name) of the largest unit in which the biggest stage cost is at least 1."""
    biggest = max([s["flops"] for s in report["stages"].values()] +
                  [s["flops"] for s in report["summary"].values()] + [0.0])
    scale, name = 1e9, "GFLOP"
    for candidate in ((1e12, "TFLOP"), (1e15, "PFLOP"), (1e18, "EFLOP")):
        if biggest >= candidate[0]:
            scale, name = candidate
    return scale, name


def _time_curves(report: dict) -> dict:
    """The curves against wall-clock, with Deep Incubation also as it runs with its K incubations
    on K machines at once (the same points, earlier by the incubations that overlap)."""
    curves = dict(report["curves"])
    di = report["summary"].get("deep incubation")
    if di and curves.get("deep incubation"):
        shift = di["wall_s_parallel"] - di["wall_s"]
        curves["deep incubation, K machines"] = [{**p, "wall_s": p["wall_s"] + shift} for p in curves["deep incubation"]]
    return curves


def _plot(report: dict, run_dir: str) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written, (unit, unit_name) = [], _flop_unit(report)
    for axis, fname, label, title, scale, curves in (
            ("flops", PLOTS[0], f"training cost ({unit_name})", "Eval accuracy vs training cost", 1.0 / unit,
             report["curves"]),
            ("wall_s", PLOTS[1], "training time (s)", "Eval accuracy vs wall-clock (one machine, and K)", 1.0,
             _time_curves(report))):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for name, points in curves.items():
            if not points:
                continue
            style = {"hybrids": dict(ls="none", marker="x"), "meta model": dict(ls=":", marker="."),
                     "deep incubation, K machines": dict(ls="--", marker="o", mfc="none")}.get(name, dict(marker="o"))
            line, = ax.plot([p[axis] * scale for p in points], [p["acc"] for p in points], label=name, **style)
            if name not in ("hybrids", "meta model"):   # each method's final value, written at its last point
                last = points[-1]
                ax.annotate(f"{last['acc']:.2f} %", (last[axis] * scale, last["acc"]), textcoords="offset points",
                            xytext=(4, 4), fontsize=8, color=line.get_color())
        ax.set_title(title)
        ax.set_xlabel(label)
        ax.set_ylabel("eval top-1 accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(run_dir, fname), dpi=110)
        plt.close(fig)
        written.append(fname)
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    names = list(report["stages"])
    ax.barh(names, [report["stages"][n]["wall_s"] for n in names])
    ax.invert_yaxis()
    ax.set_title("Wall time per stage")
    ax.set_xlabel("wall time (s)")
    fig.tight_layout()
    fig.savefig(os.path.join(run_dir, PLOTS[2]), dpi=110)
    plt.close(fig)
    return written + [PLOTS[2]]


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _eval_images(report: dict) -> Optional[int]:
    """How many images the final evaluations saw (from the CLI's config.json; None for API runs)."""
    for name in ("e2e", "assemble"):
        config = (report["stages"].get(name) or {}).get("config")
        if config:
            return config["data"]["eval_images"]
    return None


def _noise(a: float, b: float, n: int) -> float:
    """The binomial standard error (points) of the difference of two accuracies on n images,
    and never less than one image."""
    p, q = a / 100, b / 100
    return max(100 * math.sqrt((p * (1 - p) + q * (1 - q)) / n), 100 / n)


def _verdict(summary: dict, n: Optional[int]) -> tuple[list[str], Optional[str]]:
    """A plain sentence on which method reached the higher accuracy, with the margin, the
    evaluation-set size and whether the margin is beyond noise; and the winner (None: no clear one)."""
    di, e2e = summary.get("deep incubation"), summary.get("end to end")
    if not (di and e2e) or di["acc"] is None or e2e["acc"] is None:
        return [], None
    costs = f"{di['flops'] / 1e12:.2f} vs {e2e['flops'] / 1e12:.2f} TFLOP"
    margin = abs(di["acc"] - e2e["acc"])
    lead = "Deep Incubation" if di["acc"] >= e2e["acc"] else "End-to-end training"
    accs = f"{max(di['acc'], e2e['acc']):.2f} % against {min(di['acc'], e2e['acc']):.2f} %"
    if n is None:
        return ["", f"{lead} reached {accs} at matched training cost ({costs}), a margin of {margin:.2f} points; "
                    "the evaluation-set size is unknown (no config.json), so whether that is beyond noise is too."], None
    noise = _noise(di["acc"], e2e["acc"], n)
    where = f"a margin of {margin:.2f} points on {n} evaluation images (standard error {noise:.2f} points)"
    if margin <= noise:
        return ["", f"**No clear winner**: {lead} reached {accs} at matched training cost ({costs}), {where}: "
                    "within the noise of this evaluation set."], None
    return ["", f"**{lead} won**: {accs} at matched training cost ({costs}), {where}."], lead


def _varied_times(report: dict) -> list[str]:
    """A warning when stages doing the same work took very different times: the machine was busy,
    and wall-clock figures from it are not to be compared."""
    times = [s["wall_s"] for name, s in report["stages"].items() if name.startswith("incubate-") and s["wall_s"] > 0]
    if len(times) < 2 or max(times) <= 1.5 * min(times):
        return []
    return ["", f"**Wall-clock is unreliable here**: the incubations did the same work in {min(times):.0f} to "
                f"{max(times):.0f} s, so this machine was busy while they ran. Compare training FLOPs, or re-run "
                "on an idle machine before quoting times."]


def _next_steps(winner: Optional[str], n: Optional[int]) -> list[str]:
    """What to do next, given the outcome."""
    if winner is None and n is not None:
        step = (f"The two methods are within the noise of {n} evaluation images: repeat with other seeds "
                "(`--seed`) or evaluate on more images before choosing (`incubation bench study` does both).")
    elif winner == "Deep Incubation":
        step = ("Deep Incubation was ahead at the same cost. To scale up, give each of the K incubations its own "
                "machine (`incubation incubate --module i` per machine, or `incubation run --parallel K`).")
    elif winner is not None:
        step = ("End-to-end training was ahead. If the assembled model before fine-tuning is far below the hybrids "
                "(assembly table), the modules do not fit together: try `--init lemon` (the study's recommendation) "
                "or a longer assembly stage.")
    else:
        step = "Run `incubation report` on a run made by the CLI for a verdict with its evaluation-set size."
    return ["", "## Next", "", step]


def _assembly_table(a: Optional[dict]) -> list[str]:
    if not a:
        return []
    rows = [f"| meta model alone | {_fmt(a['meta'], '.2f')} |"]
    rows += [f"| meta model with only module {i} (hybrid {i}) | {_fmt(acc, '.2f')} |"
             for i, acc in sorted(a["hybrids"].items())]
    rows += [f"| all modules assembled, before fine-tuning (step 0) | {_fmt(a['assembled_before_fine_tuning'], '.2f')} |",
             f"| all modules assembled, after fine-tuning | {_fmt(a['assembled'], '.2f')} |"]
    return ["", "Assembly: how well the incubated modules fit together (eval acc %):", "",
            "| model | eval acc % |", "|---|---:|", *rows]


def _recipe_table(report: dict) -> list[str]:
    """The important fields of each stage's config.json (see there for everything)."""
    rows = []
    for name, s in report["stages"].items():
        c = s.get("config")
        if not c:
            continue
        t, a, d = c["train_config"], c["augment"], c["data"]
        aug = f"{a['auto_augment'] or '-'} / {a['re_prob']:g} / x{t['aug_repeats']}" if not d["name"].startswith(
            "fashion") else f"- / - / x{t['aug_repeats']}"
        split = "val" if d.get("eval_split", "test").startswith("val") else "test"   # val/, validation/, held out
        rows.append(f"| {name} | {d['name']} ({d['train_images']} / {d['eval_images']} {split}) | {c['recipe']['epochs']:g} | "
                    f"{t['batch_size']} | {t['lr']:.3g} | {t['warmup_steps']} | {t['weight_decay']:g} | "
                    f"{c['model']['drop_path_rate']:g} | {t['label_smoothing']:g} | {t['mixup']:g} / {t['cutmix']:g} | "
                    f"{aug} | {t['ema_decay'] or '-'} | {c['versions']['commit'] or '-'} |")
    if not rows:
        return []
    return ["", "Recipes (each stage's config.json holds the whole record):", "",
            "| stage | data (train / eval images) | epochs | batch | peak lr | warmup steps | weight decay | drop-path | "
            "smoothing | mixup / cutmix | auto-augment / erasing / repeats | EMA | commit |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|---|---|", *rows]


def _markdown(report: dict, plots: list[str]) -> str:
    unit, unit_name = _flop_unit(report)
    lines = ["# Deep Incubation run report", "", f"Run dir: `{report['run_dir']}`", ""]
    stages = list(report["stages"].values())
    target = next((s["target_config"] for s in stages if s.get("target_config")), None)
    split = next((s["sizes"] for s in stages if s.get("sizes")), None)
    if target:
        lines += [f"Target ViT: depth {target['depth']}, width {target['embed_dim']}, {target['num_heads']} heads, "
                  f"patch {target['patch_size'][0]}, image {target['img_size'][0]}, {target['num_classes']} classes"
                  + (f"; K = {len(split)} modules of {split} blocks." if split else "."), ""]
    lines += [
             f"| stage | steps | images | train {unit_name} | wall s | eval acc % | eval top-5 % | eval loss |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, s in report["stages"].items():
        lines.append(f"| {name} | {_fmt(s['steps'], 'd')} | {_fmt(s['images'], 'd')} | {s['flops'] / unit:.3f} | "
                     f"{s['wall_s']:.1f} | {_fmt(s['eval_acc'], '.2f')} | {_fmt(s.get('eval_top5'), '.2f')} | "
                     f"{_fmt(s['eval_loss'], '.4f')} |")
    summary = report["summary"]
    if summary:
        lines += ["", f"| method | eval acc % | eval top-5 % | train {unit_name} | wall s (sequential) |",
                  "|---|---:|---:|---:|---:|"]
        for name, s in summary.items():
            lines.append(f"| {name} | {_fmt(s['acc'], '.2f')} | {_fmt(s.get('top5'), '.2f')} | {s['flops'] / unit:.3f} | "
                         f"{s['wall_s']:.1f} |")
        if "deep incubation" in summary:
            lines += ["", f"With the K incubations on K machines at once the Deep Incubation wall time is "
                          f"{summary['deep incubation']['wall_s_parallel']:.1f} s."]
    verdict, winner = _verdict(summary, _eval_images(report))
    lines += verdict + _varied_times(report)
    lines += _assembly_table(report.get("assembly"))
    lines += _recipe_table(report)
    lines += ["", "Train FLOPs are the engine's count: 3 x forward FLOPs x images, less the backward a hybrid's "
                  "frozen meta blocks skip (no weight gradients; none at all before the module).", ""]
    lines += [f"![{p}]({p})" for p in plots]
    if summary:
        lines += _next_steps(winner, _eval_images(report))
    return "\n".join(lines) + "\n"


def write_report(run_dir: str) -> dict:
    """Write report.json, report.md and the plots into `run_dir`; returns the report dict."""
    report = _summarise(run_dir)
    if not report["stages"]:
        raise FileNotFoundError(f"{run_dir} has no finished stage (no */final.json) to report on")
    plots = _plot(report, run_dir)
    atomic_write(os.path.join(run_dir, "report.json"), json_dumps(report, indent=1).encode())
    atomic_write(os.path.join(run_dir, "report.md"), _markdown(report, plots).encode())
    return report
