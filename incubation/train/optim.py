"""The optimizer of the training engine: which parameters train, AdamW with weight decay off
for 1-D parameters and tokens, the EMA of the weights (the schedule: `schedule.lr_at`)."""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from .config import TrainConfig

__all__ = ["trained_parameters", "adamw", "EMA", "NO_DECAY_NAMES"]


NO_DECAY_NAMES = ("cls_token", "reg_token", "dist_token", "pos_embed")


# --------------------------------------------------------------------------------------
# parameters, optimizer, EMA
# --------------------------------------------------------------------------------------
def trained_parameters(model: nn.Module, params) -> list[tuple[str, nn.Parameter]]:
    named = list(model.named_parameters())
    if params is None:
        chosen = [(n, p) for n, p in named if p.requires_grad]
    else:
        params = list(params)
        names = {id(p): n for n, p in named}
        missing = [i for i, p in enumerate(params) if id(p) not in names]
        if missing:
            raise ValueError(f"params[{missing[0]}] (and {len(missing) - 1} more) are not parameters of the model")
        wanted = {id(p) for p in params}
        chosen = [(n, p) for n, p in named if id(p) in wanted]  # model order: deterministic groups
    if not chosen:
        raise ValueError("there are no parameters to train (params is empty or nothing requires grad)")
    return chosen


def adamw(named: list[tuple[str, nn.Parameter]], cfg: TrainConfig) -> torch.optim.AdamW:
    def no_decay(name, p):
        return p.ndim <= 1 or name.rsplit(".", 1)[-1] in NO_DECAY_NAMES
    groups = [{"params": [p for n, p in named if not no_decay(n, p)], "weight_decay": cfg.weight_decay},
              {"params": [p for n, p in named if no_decay(n, p)], "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr)


class EMA:
    """Exponential moving average (float32) of the trained parameters."""

    def __init__(self, named, decay: float):
        self.decay = decay
        self.named = named
        self.shadow = {n: p.detach().float().clone() for n, p in named}

    @torch.no_grad()
    def update(self):
        for n, p in self.named:
            self.shadow[n].lerp_(p.detach().float(), 1 - self.decay)

    @contextlib.contextmanager
    def swapped_in(self):
        """Temporarily put the averaged weights into the model."""
        saved = {n: p.detach().clone() for n, p in self.named}
        with torch.no_grad():
            for n, p in self.named:
                p.copy_(self.shadow[n])
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in self.named:
                    p.copy_(saved[n])


