"""The layout of a run dir: one directory per stage (meta, incubate-<i>, assemble, e2e, grow),
each holding the engine's files (final.json, metrics.jsonl, ...) and the CLI's config.json.
The CLI finds earlier stages here, and the report reads every stage back from here.
"""
from __future__ import annotations

import os
from typing import Optional

from .errors import IncubationError
from .utils import json_value, read_json_object

__all__ = ["stage_dir", "read_stage", "read_incubations", "pipeline_cost"]


def stage_dir(run_dir: str, stage: str, module: Optional[int] = None) -> str:
    """The directory of one stage in a run dir: meta, incubate-<i>, assemble, e2e, grow."""
    if stage == "incubate":
        if module is None:
            raise ValueError("the incubate stage needs a module index")
        return os.path.join(run_dir, f"incubate-{module}")
    if stage not in ("meta", "assemble", "e2e", "grow"):
        raise ValueError(f"unknown stage {stage!r}")
    return os.path.join(run_dir, stage)


def read_stage(directory: str) -> Optional[dict]:
    """The record of a finished stage (None if it has no final checkpoint): its final metadata,
    cost so far (wall seconds, train FLOPs, images, steps) and evaluation points."""
    if not os.path.exists(os.path.join(directory, "final.json")):
        return None
    final_path = os.path.join(directory, "final.json")
    final = read_json_object(final_path).get("metadata", {})
    if not isinstance(final, dict):
        raise IncubationError(f"{final_path}: 'metadata' must be a JSON object, got {type(final).__name__}")
    lines = []
    metrics = os.path.join(directory, "metrics.jsonl")
    if os.path.exists(metrics):
        with open(metrics, encoding="utf-8", errors="replace") as f:
            lines = [json_value(line, f"{metrics} line {i}") for i, line in enumerate(f, 1) if line.strip()]
        if not all(isinstance(m, dict) for m in lines):
            raise IncubationError(f"{metrics}: every line must be a JSON object")
    last = lines[-1] if lines else {}
    config = None
    if os.path.exists(os.path.join(directory, "config.json")):   # written by the CLI (absent for API runs)
        config = read_json_object(os.path.join(directory, "config.json"))
    evals = [{"step": m["step"], "flops": m.get("flops"), "wall_s": m.get("wall_s"), "acc": m["eval_acc"],
              "loss": m.get("eval_loss")} for m in lines if "eval_acc" in m]
    return {"dir": directory, "stage": final.get("stage"), "module": final.get("module"), "K": final.get("K"),
            "sizes": final.get("sizes"), "target_config": final.get("target_config"),
            "steps": final.get("step"), "eval_acc": final.get("eval_acc"), "eval_loss": final.get("eval_loss"),
            "train_loss": final.get("train_loss"), "wall_s": last.get("wall_s", 0.0),
            "flops": last.get("flops", 0.0), "images": last.get("images", 0), "evals": evals, "config": config}


def read_incubations(run_dir: str) -> list[dict]:
    found, i = [], 0
    while os.path.isdir(stage_dir(run_dir, "incubate", i)):
        found.append(read_stage(stage_dir(run_dir, "incubate", i)))
        i += 1
    return found


def pipeline_cost(run_dir: str) -> Optional[dict]:
    """Training cost of meta + incubations + assembly (None unless all of them finished)."""
    meta = read_stage(stage_dir(run_dir, "meta"))
    if meta is None:
        return None
    incubations = [read_stage(stage_dir(run_dir, "incubate", i)) for i in range(meta["K"])]
    assemble = read_stage(stage_dir(run_dir, "assemble"))
    stages = [meta, *incubations, assemble]
    if any(s is None for s in stages):
        return None
    return {"flops": sum(s["flops"] for s in stages), "wall_s": sum(s["wall_s"] for s in stages),
            "images": sum(s["images"] for s in stages)}
