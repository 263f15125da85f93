"""Learning-rate schedule: linear warmup, then cosine decay to min_lr, then min_lr held."""
from __future__ import annotations

import math

__all__ = ["lr_at", "epochs_to_steps"]


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


def epochs_to_steps(epochs: float, num_train: int, batch_size: int, minimum: int = 1) -> int:
    """Optimizer steps of `epochs` passes over `num_train` images in batches of `batch_size`
    (rounded, at least `minimum`)."""
    return max(minimum, round(epochs * num_train / batch_size))
