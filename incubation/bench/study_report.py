"""The study's tables (study.md) and plots (study.png), from the dict of study.json that
`incubation.bench.study.write_report` gathers."""
from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Optional

__all__ = ["METHODS", "markdown", "plot"]

METHODS = {"e2e": "E2E", "deep": "Deep Incubation", "deep-lemon": "Deep Incubation, LEMON init",
           "deep-metatrain": "Deep Incubation, meta in train mode", "lemon": "LEMON", "apollo": "Apollo"}


def _fmt_acc(row: dict) -> str:
    return f"{row['acc']:.2f}" + (f" ± {row['acc_std']:.2f}" if row["acc_std"] is not None else "")


def _fmt_reach(entry: Optional[dict], unit: float) -> str:
    if entry is None:
        return "not reached"
    return f"{'<=' if entry['bound'] == '<=' else ''}{entry['cost'] / unit:.2f} ({entry['speedup']:.2f}x)"


def _fmt_ratio(entry: Optional[dict]) -> str:
    if entry is None:
        return "beyond E2E's curve"
    return f"{'<=' if entry['bound'] == '<=' else ''}{entry['ratio']:.2f}x"


def markdown(study: dict) -> str:
    """The tables of study.md."""
    cfg, summary = SimpleNamespace(**study["config"]), study["summary"]
    top = cfg.budgets[-1]
    lines = [f"Target: ViT depth {cfg.depth}, width {cfg.width}, {cfg.heads} heads, patch {cfg.patch}, K = {cfg.K}; "
             f"budget unit = one E2E epoch = {study['budget_unit_flops'] / 1e12:.3f} TFLOP.", "",
             f"At the largest budget ({top:g} E2E epochs, {cfg.seeds} seeds; mean ± std of top-1 %"
             + (f" on the validation split of {cfg.val_size} held-out training images, which every comparison "
                "uses; the test split's top-1 is reported beside it, once per final model" if cfg.val_size else "")
             + "). 'To reach E2E' is the cost at which the method's curve reaches E2E's accuracy at this budget "
             "(speedup = E2E's cost / that; '<=' when its cheapest point already does).", "",
             f"| method | {'val ' if cfg.val_size else ''}top-1 % |" + (" test top-1 % |" if cfg.val_size else "")
             + " TFLOP | wall (s) | wall, K machines (s) | to reach E2E: TFLOP | to reach E2E: wall, K machines (s) |",
             "|---|---|" + ("---|" if cfg.val_size else "") + "---|---|---|---|---|"]
    for method, entry in summary.items():
        row = entry["curve"][-1] if entry["curve"] and entry["curve"][-1]["budget"] == top else None
        if row is None:
            continue
        reach = entry.get("to_e2e_acc", {})
        test = ""
        if cfg.val_size:
            test = "-" if row.get("test_acc") is None else _fmt_acc({"acc": row["test_acc"], "acc_std": row["test_acc_std"]})
            test = f" {test} |"
        lines.append(f"| {METHODS.get(method, method)} | {_fmt_acc(row)} |{test} {row['flops'] / 1e12:.2f} | {row['wall_s']:.0f} | "
                     f"{row['wall_s_k_machines']:.0f} | {_fmt_reach(reach.get('flops'), 1e12)} | "
                     f"{_fmt_reach(reach.get('wall_s_k_machines'), 1)} |")
    lines += ["", "Top-1 % at every budget (seed 0 below the largest budget) and, in brackets, the FLOPs E2E needs "
              "for the same accuracy divided by the method's (above 1x: the method is cheaper):", "",
              "| method | " + " | ".join(f"{b:g} ep" for b in cfg.budgets) + " |",
              "|---|" + "---|" * len(cfg.budgets)]
    for method, entry in summary.items():
        cells = {r["budget"]: _fmt_acc(r) + ("" if method == "e2e" or "e2e_flops_ratio" not in r
                                             else f" ({_fmt_ratio(r['e2e_flops_ratio'])})") for r in entry["curve"]}
        lines.append(f"| {METHODS.get(method, method)} | " + " | ".join(cells.get(b, "-") for b in cfg.budgets) + " |")
    return "\n".join(lines) + "\n"


def plot(study: dict, path: str) -> None:
    import matplotlib
    import matplotlib.ticker
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for method, entry in study["summary"].items():
        curve = entry["curve"]
        acc = [r["acc"] for r in curve]
        err = [r["acc_std"] or 0.0 for r in curve]
        axes[0].errorbar([r["flops"] / 1e12 for r in curve], acc, yerr=err, marker="o", capsize=3,
                         label=METHODS.get(method, method))
        axes[1].errorbar([r["wall_s_k_machines"] / 60 for r in curve], acc, yerr=err, marker="o", capsize=3,
                         label=METHODS.get(method, method))
    axes[0].set_xlabel("training cost (TFLOP)")
    axes[1].set_xlabel("wall-clock (min; Deep Incubation's modules on K machines at once)")
    for ax in axes:
        ax.set_xscale("log", base=2)  # budgets double: evenly spaced points
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%.3g"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_ylabel("top-1 accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Fashion-MNIST, accuracy vs training budget (error bars: std over seeds)")
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
