"""The two records of a run: the metrics log (metrics.jsonl, summary.csv, progress bar) and the
checkpointer (resume, periodic and final checkpoints)."""
from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import time
import warnings
from typing import Callable, Optional

import torch
from torch import nn

from ..utils import atomic_write, json_dumps, same_file
from .checkpoint import (
    CheckpointError,
    _prefix,
    load_checkpoint,
    load_checkpoint_state,
    recover_checkpoint,
    save_checkpoint,
)
from .config import TrainConfig
from .distributed import Place, Plan, all_sum, barrier, rng_state, set_rng_state
from .optim import EMA

__all__ = ["MetricsLog", "Checkpointer", "SUMMARY_COLUMNS", "EVAL_METRICS"]

# --eval-metric -> (the evaluation's key, +1 when higher is better)
EVAL_METRICS = {"top1": ("eval_acc", 1), "top5": ("eval_top5", 1), "loss": ("eval_loss", -1)}


# Config fields that do not change the trajectory: they may differ between a run and its resume.
_FREE_FIELDS = ("tensorboard_dir", "checkpoint_hist", "eval_metric", "resume_from", "log_interval", "eval_every",
                "eval_at_start", "checkpoint_every", "num_workers", "device", "progress", "compile",
                "grad_checkpointing")


# --------------------------------------------------------------------------------------
# the run's two records: the metrics log and the checkpoints
# --------------------------------------------------------------------------------------
# timm's summary.csv columns first, then ours
SUMMARY_COLUMNS = ("epoch", "train_loss", "eval_loss", "eval_top1", "eval_top5", "lr", "step", "ema_eval_loss",
                   "ema_eval_top1", "ema_eval_top5", "images", "wall_s")


class MetricsLog:
    """metrics.jsonl (a line every ~1 % of the steps and at every evaluation), summary.csv (one
    row per evaluation, per epoch by default, timm's columns first) and the progress bar; it owns the timing of the run
    and the window of per-step losses since the last line. Only rank 0 writes."""

    def __init__(self, out_dir: str, stage: str, cfg: TrainConfig, plan: Plan, place: Place, start: int,
                 wall_before: float, flops: Optional[Callable[[], float]]):
        self.path, self.summary_path = os.path.join(out_dir, "metrics.jsonl"), os.path.join(out_dir, "summary.csv")
        self.cfg, self.plan, self.place, self.flops = cfg, plan, place, flops
        self.every = cfg.log_interval or max(1, plan.total_steps // 100)
        self.t0, self.wall_before = time.time(), wall_before
        self.window = torch.zeros(2, dtype=torch.float64, device=place.device)  # loss sum, correct: no sync per step
        self.window_t, self.window_images = self.t0, 0
        self.bar, self.tensorboard = None, None
        if place.rank == 0:
            self._truncate(start)
            if cfg.tensorboard_dir is not None:   # a run per stage dir, beside the other stages'
                from torch.utils.tensorboard import SummaryWriter
                self.tensorboard = SummaryWriter(os.path.join(cfg.tensorboard_dir, os.path.basename(out_dir)))
            if cfg.progress:
                from tqdm.auto import tqdm
                self.bar = tqdm(total=plan.total_steps, initial=start, desc=stage, dynamic_ncols=True)

    def _truncate(self, last_step: int) -> None:
        """Drop the lines a killed run wrote after its last checkpoint (and any torn line)."""
        if not os.path.exists(self.path):
            return
        kept = []
        with open(self.path) as f:
            for line in f:
                try:
                    if json.loads(line)["step"] <= last_step:
                        kept.append(line if line.endswith("\n") else line + "\n")
                except (ValueError, KeyError, TypeError):
                    pass
        atomic_write(self.path, "".join(kept).encode())

    def wall(self) -> float:
        """Seconds of training so far, the runs this one resumed included."""
        return self.wall_before + time.time() - self.t0

    def stepped(self) -> None:
        self.window_images += self.cfg.batch_size
        if self.bar is not None:
            self.bar.update(1)

    def due(self, done: int) -> bool:
        return done % self.every == 0

    def line(self, done: int, lr: float, grad_norm: torch.Tensor, evaluation: Optional[dict]) -> dict:
        """Write the line of step `done` (every rank calls it: the window is summed over them);
        returns it."""
        now = time.time()
        loss_sum, correct = all_sum(self.window.tolist(), self.place.world, self.place.device)
        line = {"step": done, "epoch": done / self.plan.steps_per_epoch, "lr": lr,
                "img_per_s": self.window_images / max(now - self.window_t, 1e-9), "wall_s": self.wall(),
                "images": done * self.cfg.batch_size, "loss": loss_sum / self.window_images,
                "acc": 100.0 * correct / self.window_images, "grad_norm": float(grad_norm)}
        if self.flops is not None:
            line["flops"] = self.flops() * done * self.cfg.batch_size
        self._write({**line, **(evaluation or {})}, evaluation is not None)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{line['loss']:.4f}", acc=f"{line['acc']:.1f}", img_s=f"{line['img_per_s']:.0f}")
        self.window.zero_()
        self.window_t, self.window_images = time.time(), 0
        return line

    def start_line(self, evaluation: dict) -> None:
        """The evaluation before the first step (step 0)."""
        line = {"step": 0, "epoch": 0.0, "lr": 0.0, "wall_s": self.wall_before, "images": 0, **evaluation}
        if self.flops is not None:
            line["flops"] = 0.0
        self._write(line, False)

    def _write(self, line: dict, evaluated: bool) -> None:
        if self.place.rank != 0:
            return
        with open(self.path, "a") as f:
            f.write(json_dumps(line) + "\n")
        if self.tensorboard is not None:   # every number of the line, at its step
            for key, value in line.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(key, value, line["step"])
        if evaluated:
            self._write_summary()

    def _write_summary(self) -> None:
        rows = []
        with open(self.path) as f:
            for line in f:
                m = json.loads(line)
                if "eval_acc" in m:
                    rows.append({"step": m["step"], "epoch": m["epoch"], "lr": m["lr"],
                                 "train_loss": m.get("loss", ""), "eval_loss": m["eval_loss"], "eval_top1": m["eval_acc"],
                                 "eval_top5": m.get("eval_top5", ""), "ema_eval_loss": m.get("ema_eval_loss", ""),
                                 "ema_eval_top1": m.get("ema_eval_acc", ""), "ema_eval_top5": m.get("ema_eval_top5", ""),
                                 "images": m["images"], "wall_s": m["wall_s"]})
        text = io.StringIO()
        writer = csv.DictWriter(text, SUMMARY_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write(self.summary_path, text.getvalue().encode())

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tensorboard is not None:
            self.tensorboard.close()


def _trajectory(cfg: TrainConfig) -> dict:
    return {k: v for k, v in cfg.to_dict().items() if k not in _FREE_FIELDS}


class Checkpointer:
    """out_dir/checkpoint.* (what a resume reads: weights, optimizer, EMA, RNG, counters),
    written at the end of every epoch (or every cfg.checkpoint_every steps) and at the end, and
    out_dir/final.* / final_ema.* (what the stage leaves). `save_keys`: the state_dict keys
    written (a hybrid saves only its module). Only rank 0 writes."""

    def __init__(self, out_dir: str, stage: str, cfg: TrainConfig, plan: Plan, place: Place, save_keys: list,
                 metadata: dict):
        self.out_dir, self.prefix = out_dir, os.path.join(out_dir, "checkpoint")
        self.stage, self.cfg, self.place, self.save_keys = stage, cfg, place, save_keys
        self.metadata = {**metadata, "stage": stage}
        self.every = cfg.checkpoint_every or plan.steps_per_epoch
        self.total = plan.total_steps
        self.saved_step: Optional[int] = None
        self.kept: list = []   # [eval metric, step] of the checkpoint-<step>.* kept, best first

    def due(self, done: int) -> bool:
        return done % self.every == 0 or done == self.total

    def _weights(self, model: nn.Module) -> dict:
        sd = model.state_dict()
        return {k: sd[k] for k in self.save_keys}

    def resume(self, model, optimizer, ema: Optional["EMA"], scaler=None) -> tuple[int, dict]:
        """Load the checkpoint of this stage into model / optimizer / EMA / GradScaler; (start step, counters)."""
        prefix, place, given = self.prefix, self.place, self.cfg.resume_from
        if given is not None:   # --resume PATH: another run's checkpoint of this stage (read only)
            prefix = os.path.join(given, "checkpoint") if os.path.isdir(given) else _prefix(given)
            if same_file([self.out_dir], [os.path.dirname(prefix) or "."]):   # its files are this stage's outputs
                raise CheckpointError(f"resume from {given}: it is in this stage's own directory {self.out_dir}, "
                                      "whose checkpoints the stage writes over; leave out --resume to resume "
                                      "there, or resume from a copy elsewhere")
        elif place.rank == 0:
            recover_checkpoint(prefix)
        barrier(place.world)
        if not os.path.exists(prefix + ".json"):
            if given is not None:
                raise CheckpointError(f"resume from {given}: there is no checkpoint {prefix}.json")
            return 0, {}
        state_dict, meta = load_checkpoint(prefix)
        if meta.get("stage") != self.stage:
            if given is not None:
                raise CheckpointError(f"resume from {given}: the checkpoint is stage {meta.get('stage')!r}'s, "
                                      f"not {self.stage!r}'s")
            warnings.warn(f"{prefix}.json belongs to stage {meta.get('stage')!r}, not {self.stage!r}: starting afresh")
            return 0, {}
        # a field a checkpoint predates had its default's behaviour then
        state, trajectory = load_checkpoint_state(prefix), _trajectory(self.cfg)
        saved = {**_trajectory(TrainConfig()), **state["trajectory"]}
        if saved != trajectory:
            diff = sorted(k for k in saved if saved.get(k) != trajectory.get(k))
            raise CheckpointError(f"checkpoint {prefix}.json was written with a different config ({diff}); "
                                  f"use resume=False or another out_dir")
        if sorted(state_dict) != sorted(self.save_keys):
            raise CheckpointError(f"checkpoint {prefix}.safetensors holds other keys than save_keys")
        model.load_state_dict(state_dict, strict=False)
        optimizer.load_state_dict(state["optimizer"])
        if ema is not None:
            if state["ema"] is None:
                raise CheckpointError(f"checkpoint {prefix}.state.pt has no EMA state but ema_decay is set")
            ema.shadow = {n: t.to(ema.shadow[n].device) for n, t in state["ema"].items()}
        if scaler is not None:   # float16 is a trajectory field: its checkpoints hold the scaler's state
            if state.get("scaler") is None:
                raise CheckpointError(f"checkpoint {prefix}.state.pt has no GradScaler state but amp_dtype is float16")
            scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        self.saved_step = state["step"] or None
        self.kept = state["counters"].get("kept", [])
        return state["step"], state["counters"]

    def save(self, step: int, model, optimizer, ema: Optional["EMA"], counters: dict, scaler=None) -> None:
        if self.place.rank == 0:
            state = {"step": step, "optimizer": optimizer.state_dict(), "trajectory": _trajectory(self.cfg),
                     "ema": ema.shadow if ema else None, "rng": rng_state(), "counters": {**counters, "kept": self.kept},
                     "scaler": scaler.state_dict() if scaler is not None else None}
            save_checkpoint(self.prefix, self._weights(model), {**self.metadata, "step": step}, state=state)
        self.saved_step = step

    @property
    def keeps(self) -> bool:
        return self.cfg.checkpoint_hist > 0

    def keep(self, step: int, model, evaluation: dict) -> None:
        """timm's CheckpointSaver: the weights of the cfg.checkpoint_hist best evaluations by
        cfg.eval_metric (checkpoint-<step>.*, the others deleted) and of the best (model_best.*)."""
        if not self.keeps or not evaluation or self.place.rank != 0:
            return
        key, sign = EVAL_METRICS[self.cfg.eval_metric]
        summary, weights = {**self.metadata, "step": step, **evaluation}, self._weights(model)
        save_checkpoint(os.path.join(self.out_dir, f"checkpoint-{step}"), weights, summary)
        self.kept = sorted([k for k in self.kept if k[1] != step] + [[evaluation[key], step]],
                           key=lambda k: (-sign * k[0], k[1]))
        for _, old in self.kept[self.cfg.checkpoint_hist:]:
            for suffix in (".safetensors", ".json"):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(self.out_dir, f"checkpoint-{old}{suffix}"))
        self.kept = self.kept[:self.cfg.checkpoint_hist]
        if self.kept[0][1] == step:
            save_checkpoint(os.path.join(self.out_dir, "model_best"), weights, summary)

    def save_final(self, model, ema: Optional["EMA"], summary: dict) -> str:
        """final.* (and final_ema.*, the averaged weights); returns final.safetensors' path."""
        final = os.path.join(self.out_dir, "final")
        if self.place.rank == 0:
            summary = {**self.metadata, "step": self.total, **summary}
            save_checkpoint(final, self._weights(model), summary)
            if ema is not None:
                with ema.swapped_in():
                    save_checkpoint(os.path.join(self.out_dir, "final_ema"), self._weights(model),
                                    {**summary, "ema_decay": self.cfg.ema_decay})
        barrier(self.place.world)
        return final + ".safetensors"


