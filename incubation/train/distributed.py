"""Distributed set-up and the data order of the training engine: seeds (a pure function of
(seed, step)), the plan of micro-batches, the sampler, the process group, the device of a rank."""
from __future__ import annotations

import atexit
import hashlib
import math
import os
import random
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from .config import TrainConfig
from .schedule import steps_per_epoch

__all__ = ["derived_seed", "seed_all", "rng_state", "set_rng_state", "Plan", "make_plan", "StepBatches",
           "join_process_group", "device_of", "all_sum", "barrier", "Place"]


# --------------------------------------------------------------------------------------
# seeds, data order, distribution
# --------------------------------------------------------------------------------------
def derived_seed(*parts) -> int:
    """A 63-bit seed from integers, independent streams for different `parts`."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def seed_all(seed: int) -> None:
    torch.manual_seed(seed)  # CPU and every CUDA device
    random.seed(seed)
    np.random.seed(seed % 2**32)


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]],
            # this process's device only: touching every GPU would open a context on each
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_tuples(state["python"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy(), *rest))
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _tuples(x):
    """random.setstate wants the nested tuples that a save/load round trip may make lists."""
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


@dataclass
class Plan:
    steps_per_epoch: int
    total_steps: int
    micro_batch: int
    decay_steps: int


def make_plan(num_samples: int, cfg: TrainConfig, world: int) -> Plan:
    parts = world * cfg.accum_steps
    if cfg.batch_size % parts:
        raise ValueError(f"batch_size {cfg.batch_size} must be divisible by world_size x accum_steps "
                         f"= {world} x {cfg.accum_steps}")
    if num_samples < cfg.batch_size:
        raise ValueError(f"the training set has {num_samples} samples, fewer than one batch of {cfg.batch_size}")
    if (cfg.mixup or cfg.cutmix) and (cfg.batch_size // parts) % 2:
        raise ValueError(f"mixup/cutmix pair each image with its mirror in the micro-batch, which must be even: "
                         f"batch_size {cfg.batch_size} / (world_size x accum_steps = {parts}) = {cfg.batch_size // parts}")
    per_epoch = steps_per_epoch(num_samples, cfg.batch_size)  # every step sees a full batch
    total = cfg.steps or max(1, math.ceil(cfg.epochs * per_epoch))
    decay = cfg.decay_steps if cfg.decay_steps is not None else max(0, total - cfg.warmup_steps)
    return Plan(per_epoch, total, cfg.batch_size // parts, decay)


class StepBatches(Sampler):
    """Index lists of this rank's micro-batches for steps [start, total), in order.
    Epoch e shuffles with a generator seeded from (seed, e); step s takes global batch
    s mod steps_per_epoch of it; micro-batch m of rank r is slice m x world + r."""

    def __init__(self, num_samples, plan: Plan, cfg: TrainConfig, rank, world, start):
        self.n, self.plan, self.cfg, self.rank, self.world, self.start = num_samples, plan, cfg, rank, world, start

    def __len__(self):
        return (self.plan.total_steps - self.start) * self.cfg.accum_steps

    def __iter__(self):
        plan, batch, mb = self.plan, self.cfg.batch_size, self.plan.micro_batch
        epoch, order = None, None
        for step in range(self.start, plan.total_steps):
            e, i = divmod(step, plan.steps_per_epoch)
            if e != epoch:
                epoch = e
                g = torch.Generator().manual_seed(derived_seed(self.cfg.seed, "epoch", e))
                order = torch.randperm(self.n, generator=g)
                if self.cfg.aug_repeats > 1:
                    order = order.repeat_interleave(self.cfg.aug_repeats)[:self.n]
            global_batch = order[i * batch:(i + 1) * batch]
            if self.cfg.aug_repeats > 1:   # copies of an image in a row: spread them over the ranks
                mine = global_batch[self.rank::self.world]
                for m in range(self.cfg.accum_steps):
                    yield mine[m * mb:(m + 1) * mb].tolist()
                continue
            for m in range(self.cfg.accum_steps):
                j = m * self.world + self.rank
                yield global_batch[j * mb:(j + 1) * mb].tolist()


def join_process_group() -> tuple[int, int, int]:
    """(rank, world size, local rank); joins the torchrun process group if there is one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_nccl = torch.cuda.is_available()
    if use_nccl:
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if use_nccl else "gloo")
    atexit.register(dist.destroy_process_group)  # kept for later train() calls of the same process
    return dist.get_rank(), dist.get_world_size(), local


def auto_device(name: Optional[str]) -> str:
    """The device `name` means: "auto" (or none given) is cuda when torch sees a GPU, else cpu."""
    return ("cuda" if torch.cuda.is_available() else "cpu") if not name or name == "auto" else name


def device_of(name: str, world: int, local_rank: int) -> torch.device:
    name = auto_device(name)
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {name!r} requested but CUDA is not available")
        if name == "cuda":
            name = f"cuda:{local_rank if world > 1 else torch.cuda.current_device()}"
    return torch.device(name)


def all_sum(values: list[float], world: int, device) -> list[float]:
    if world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def barrier(world: int) -> None:
    if world > 1:
        dist.barrier()




@dataclass
class Place:
    """Where this process trains: its rank among `world` processes, on `device`."""
    rank: int
    world: int
    device: torch.device


