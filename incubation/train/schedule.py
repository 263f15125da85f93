"""Learning-rate schedules, each a pure function of the optimizer step (a resume replays it exactly):
ours (`lr_at`: linear warmup, then cosine decay to min_lr, then min_lr held; LEMON's shortened
schedule), or timm's cosine / step schedulers evaluated per optimizer step."""
from __future__ import annotations

import functools
import math
from typing import Callable

import torch

from .config import SCHEDULES, TrainConfig

__all__ = ["lr_at", "lr_schedule", "epochs_to_steps", "steps_per_epoch", "SCHEDULES"]


def lr_at(step: int, *, lr: float, min_lr: float, warmup_steps: int, decay_steps: int) -> float:
    """The learning rate of optimizer step `step` (0-based).

    Warmup rises linearly to `lr`, reaching it on step `warmup_steps - 1` (so step 0 already
    learns); the cosine then runs from `lr` on step `warmup_steps` down to `min_lr` on step
    `warmup_steps + decay_steps`, after which `min_lr` is held (LEMON's shortened schedule).
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    t = 1.0 if decay_steps <= 0 else min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * t))


def steps_per_epoch(num_train: int, batch_size: int) -> int:
    """Optimizer steps of one pass over `num_train` images: full batches only (the incomplete last
    batch is dropped, as timm's train loader drops it), so an epoch of steps is an epoch of data."""
    return num_train // batch_size


def epochs_to_steps(epochs: float, num_train: int, batch_size: int, minimum: int = 1) -> int:
    """Optimizer steps of `epochs` passes over `num_train` images in batches of `batch_size`
    (epochs x steps_per_epoch rounded, at least `minimum`)."""
    return max(minimum, round(epochs * steps_per_epoch(num_train, batch_size)))


def lr_schedule(cfg: TrainConfig, total_steps: int, decay_steps: int) -> Callable[[int], float]:
    """step -> peak-scale lr of `cfg.sched` (before a parameter group's layer-decay lr_scale).
    timm's schedules are its own scheduler (create_scheduler_v2) stepped per update, as timm's
    train.py with --sched-on-updates: the lr of step s is the scheduler's at update s."""
    if cfg.sched == "warmup_cosine":
        return functools.partial(lr_at, lr=cfg.lr, min_lr=cfg.min_lr, warmup_steps=cfg.warmup_steps,
                                 decay_steps=decay_steps)
    from timm.scheduler import create_scheduler_v2
    holder = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.lr)   # the scheduler writes here
    scheduler, _ = create_scheduler_v2(holder, cfg.sched, num_epochs=total_steps, decay_epochs=decay_steps,
                                       decay_rate=cfg.decay_rate, min_lr=cfg.min_lr, warmup_lr=cfg.warmup_lr,
                                       warmup_epochs=cfg.warmup_steps, step_on_epochs=False, updates_per_epoch=1)

    def lr(step: int) -> float:
        scheduler.step_update(step)
        return holder.param_groups[0]["lr"]
    return lr
