"""The optimizer of the training engine: which parameters train, timm's optimizer (AdamW by
default) with weight decay off for 1-D parameters and tokens and optional layer-wise lr decay,
the EMA of the weights (the schedule: `schedule.lr_schedule`)."""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from .config import TrainConfig

__all__ = ["trained_parameters", "make_optimizer", "EMA", "NO_DECAY_NAMES"]


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


def _no_decay(name: str, p: nn.Parameter) -> bool:
    return p.ndim <= 1 or name.rsplit(".", 1)[-1] in NO_DECAY_NAMES


def make_optimizer(model: nn.Module, named: list[tuple[str, nn.Parameter]], cfg: TrainConfig) -> torch.optim.Optimizer:
    """timm's `create_optimizer_v2(cfg.opt)` over the trained parameters `named` (those of `model`
    that require grad): weight decay off by `_no_decay`; with cfg.layer_decay, timm's layer-wise
    groups by the model's group_matcher (each group's lr_scale multiplies the scheduled lr)."""
    from timm.optim import create_optimizer_v2, param_groups_layer_decay
    no_decay = {n for n, p in named if _no_decay(n, p)}
    if cfg.layer_decay is None:
        groups = [{"params": [p for n, p in named if n not in no_decay], "weight_decay": cfg.weight_decay},
                  {"params": [p for n, p in named if n in no_decay], "weight_decay": 0.0}]
        groups = [g for g in groups if g["params"]]
    elif callable(getattr(model, "group_matcher", None)):
        groups = param_groups_layer_decay(model, cfg.weight_decay, no_weight_decay_list=sorted(no_decay),
                                          layer_decay=cfg.layer_decay)
    else:
        raise ValueError(f"layer_decay needs the model's layers: {type(model).__name__} has no group_matcher "
                         "(timm's map of parameters to layers); train it without layer_decay")
    extra = {k: v for k, v in (("eps", cfg.opt_eps), ("betas", cfg.opt_betas)) if v is not None}
    # every group has its weight decay: the default is 0, as timm makes it for the groups it builds
    return create_optimizer_v2(groups, opt=cfg.opt, lr=cfg.lr, weight_decay=0.0, momentum=cfg.momentum, **extra)


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


