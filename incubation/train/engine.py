"""The one training engine used by every stage (plain training, meta model, incubation,
assembly, growth).

Determinism: the data order is a pure function of (seed, epoch) and every step reseeds the
random generators from (seed, step), so a run resumed from a checkpoint replays exactly the
steps an uninterrupted run takes: on CPU the final weights are bit-identical. Hooks run under
a rank-independent seed (all DDP ranks sample the same depth); augmentation and dropout under
a per-rank seed. Datasets with random transforms are only replayed exactly with
num_workers=0 (worker processes have their own generators).

Repeated augmentation (aug_repeats=R > 1, DeiT's RASampler / timm's RepeatAugSampler): an epoch
is the shuffled indices with each one repeated R times in a row, cut to the data set's length;
rank r takes every world-th sample of a global batch, so the copies of an image go to different
ranks (with their own augmentation draws), as in DeiT. The order stays a pure function of
(seed, epoch).

Mixup / cutmix are timm.data.Mixup (batch mode, switch probability 0.5, label smoothing folded
into the soft targets), so they need an even micro-batch.

Global batch: every optimizer step consumes `batch_size` samples, cut into
world_size x accum_steps equal micro-batches; the loss is the mean over the global batch
whatever the split, so DDP and accumulation give the same step as one big batch.
"""
from __future__ import annotations

import atexit
import contextlib
import csv
import dataclasses
import hashlib
import io
import json
import math
import os
import random
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from .. import ops
from ..data import base_dataset
from ..errors import IncubationError
from ..nn.vit import train_flops_per_image
from ..utils import atomic_write, json_dumps
from .checkpoint import (
    CheckpointError,
    first_nonfinite,
    load_checkpoint,
    load_checkpoint_state,
    recover_checkpoint,
    save_checkpoint,
)
from .lock import RunDirLock, RunDirLocked
from .schedule import lr_at

__all__ = ["TrainConfig", "TrainResult", "train", "evaluate", "DivergedError"]

NO_DECAY_NAMES = ("cls_token", "reg_token", "dist_token", "pos_embed")
# Config fields that do not change the trajectory: they may differ between a run and its resume.
_FREE_FIELDS = ("eval_every", "eval_at_start", "checkpoint_every", "num_workers", "device", "progress", "compile",
                "grad_checkpointing")


@dataclass
class TrainConfig:
    epochs: float = 1.0            # total length; `steps` overrides when set
    steps: Optional[int] = None    # optimizer steps
    batch_size: int = 128          # global batch per optimizer step (all ranks, all micro-batches)
    accum_steps: int = 1           # gradient accumulation micro-batches per step
    lr: float = 5e-4               # peak lr, absolute
    min_lr: float = 1e-6
    weight_decay: float = 0.05     # AdamW; none on 1-D params (biases, norms, layer scale) and tokens
    warmup_steps: int = 0
    decay_steps: Optional[int] = None  # cosine length after warmup; default total - warmup
    clip_grad: Optional[float] = None  # max global grad norm of the trained params
    label_smoothing: float = 0.1
    mixup: float = 0.0             # mixup alpha (0 = off)
    cutmix: float = 0.0            # cutmix alpha (0 = off)
    amp: bool = True               # bf16 autocast on CUDA; ignored on CPU
    ema_decay: Optional[float] = None
    aug_repeats: int = 1           # repeated augmentation: each image this often per epoch (1 = off)
    seed: int = 0
    eval_every: int = 0            # steps between evaluations (0 = at the end only)
    eval_at_start: bool = False    # also evaluate before the first step (a metrics line of step 0)
    checkpoint_every: int = 0      # steps between checkpoints (0 = end of each epoch and at the end)
    num_workers: int = 0
    device: str = "auto"           # auto -> cuda if available else cpu
    progress: bool = True          # tqdm bar with loss / acc / img/s
    compile: bool = False          # torch.compile the model for training steps (eager ops under it)
    grad_checkpointing: bool = False  # recompute activations in backward (model.set_grad_checkpointing)

    def __post_init__(self):
        errors = []

        def need(ok, msg):
            if not ok:
                errors.append(msg)

        need(self.epochs > 0, f"epochs must be > 0, got {self.epochs}")
        need(self.steps is None or (isinstance(self.steps, int) and self.steps > 0),
             f"steps must be a positive integer or None, got {self.steps!r}")
        for name in ("batch_size", "accum_steps", "aug_repeats"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) >= 1,
                 f"{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("warmup_steps", "eval_every", "checkpoint_every", "num_workers", "seed"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) >= 0,
                 f"{name} must be an integer >= 0, got {getattr(self, name)!r}")
        need(self.decay_steps is None or (isinstance(self.decay_steps, int) and self.decay_steps >= 0),
             f"decay_steps must be an integer >= 0 or None, got {self.decay_steps!r}")
        need(0 <= self.min_lr <= self.lr, f"need 0 <= min_lr <= lr, got lr={self.lr}, min_lr={self.min_lr}")
        need(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        need(self.clip_grad is None or self.clip_grad > 0, f"clip_grad must be > 0 or None, got {self.clip_grad}")
        need(0 <= self.label_smoothing < 1, f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        need(self.mixup >= 0 and self.cutmix >= 0, f"mixup/cutmix alphas must be >= 0, got {self.mixup}, {self.cutmix}")
        need(self.ema_decay is None or 0 < self.ema_decay < 1, f"ema_decay must be in (0, 1), got {self.ema_decay}")
        need(self.device == "auto" or self.device.split(":")[0] in ("cpu", "cuda"),
             f"device must be 'auto', 'cpu' or 'cuda[:i]', got {self.device!r}")
        if errors:
            raise ValueError("invalid TrainConfig: " + "; ".join(errors))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class DivergedError(IncubationError, RuntimeError):
    """The loss, the gradient norm or the weights became NaN or infinite: the run stopped,
    without writing a checkpoint from the diverged weights."""


@dataclass
class TrainResult:
    train_loss: float              # mean train loss over the last logging window
    eval_acc: Optional[float]      # top-1 %, None without an eval set
    eval_loss: Optional[float]
    steps: int
    images_seen: int
    wall_seconds: float            # summed over the run and the runs it resumed
    train_flops: Optional[float]   # training FLOPs per image x images (see `_train_flops`), else None
    checkpoint_path: str           # final.safetensors
    metrics_path: str              # metrics.jsonl


# --------------------------------------------------------------------------------------
# seeds, data order, distribution
# --------------------------------------------------------------------------------------
def _derived_seed(*parts) -> int:
    """A 63-bit seed from integers, independent streams for different `parts`."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)  # CPU and every CUDA device
    random.seed(seed)
    np.random.seed(seed % 2**32)


def _rng_state() -> dict:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]],
            # this process's device only: touching every GPU would open a context on each
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None}


def _set_rng_state(state: dict) -> None:
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
class _Plan:
    steps_per_epoch: int
    total_steps: int
    micro_batch: int
    decay_steps: int


def _plan(num_samples: int, cfg: TrainConfig, world: int) -> _Plan:
    parts = world * cfg.accum_steps
    if cfg.batch_size % parts:
        raise ValueError(f"batch_size {cfg.batch_size} must be divisible by world_size x accum_steps "
                         f"= {world} x {cfg.accum_steps}")
    if num_samples < cfg.batch_size:
        raise ValueError(f"the training set has {num_samples} samples, fewer than one batch of {cfg.batch_size}")
    if (cfg.mixup or cfg.cutmix) and (cfg.batch_size // parts) % 2:
        raise ValueError(f"mixup/cutmix pair each image with its mirror in the micro-batch, which must be even: "
                         f"batch_size {cfg.batch_size} / (world_size x accum_steps = {parts}) = {cfg.batch_size // parts}")
    per_epoch = num_samples // cfg.batch_size  # incomplete last batch dropped: every step sees a full batch
    total = cfg.steps or max(1, math.ceil(cfg.epochs * per_epoch))
    decay = cfg.decay_steps if cfg.decay_steps is not None else max(0, total - cfg.warmup_steps)
    return _Plan(per_epoch, total, cfg.batch_size // parts, decay)


class _StepBatches(Sampler):
    """Index lists of this rank's micro-batches for steps [start, total), in order.
    Epoch e shuffles with a generator seeded from (seed, e); step s takes global batch
    s mod steps_per_epoch of it; micro-batch m of rank r is slice m x world + r."""

    def __init__(self, num_samples, plan: _Plan, cfg: TrainConfig, rank, world, start):
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
                g = torch.Generator().manual_seed(_derived_seed(self.cfg.seed, "epoch", e))
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


def _distributed() -> tuple[int, int, int]:
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


def _device(name: str, world: int, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {name!r} requested but CUDA is not available")
        if name == "cuda":
            name = f"cuda:{local_rank if world > 1 else torch.cuda.current_device()}"
    return torch.device(name)


def _all_sum(values: list[float], world: int, device) -> list[float]:
    if world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


# --------------------------------------------------------------------------------------
# loss, mixing, evaluation
# --------------------------------------------------------------------------------------
def _mixer(cfg: TrainConfig, model: nn.Module, dataset: Dataset):
    """timm's Mixup for this run (None without mixup / cutmix): it mixes a micro-batch with its
    mirror and returns the soft targets, label smoothing included."""
    if not (cfg.mixup or cfg.cutmix):
        return None
    from timm.data import Mixup
    # ours, a Deep Incubation hybrid (its meta model's head), Apollo (its ViT), or the data set under its Subsets
    for owner in (model, getattr(model, "meta", None), getattr(model, "vit", None), base_dataset(dataset)):
        num_classes = getattr(owner, "num_classes", None)
        if isinstance(num_classes, int) and num_classes > 0:
            return Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.label_smoothing,
                         num_classes=num_classes)
    raise ValueError("mixup/cutmix need the number of classes: give the model or the training set a "
                     "num_classes attribute")


def _soft_targets(y: torch.Tensor, num_classes: int, smoothing: float, dtype: torch.dtype) -> torch.Tensor:
    return F.one_hot(y, num_classes).to(dtype) * (1 - smoothing) + smoothing / num_classes


def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """Losses in float32 under bf16 autocast; a float64 model keeps float64."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _autocast(device: torch.device, amp: bool):
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _eval_loader(dataset: Dataset, batch_size: int, device, rank: int = 0, world: int = 1,
                 num_workers: int = 0) -> DataLoader:
    """This rank's contiguous shard of `dataset` in order; workers persist across evaluations."""
    n = len(dataset)
    if n == 0:
        raise ValueError("cannot evaluate on an empty data set")
    indices = list(range(n * rank // world, n * (rank + 1) // world))
    return DataLoader(dataset, batch_sampler=[indices[i:i + batch_size] for i in range(0, len(indices), batch_size)],
                      num_workers=num_workers, persistent_workers=num_workers > 0, pin_memory=device.type == "cuda")


@torch.no_grad()
def _evaluate(model: nn.Module, loader: DataLoader, device, amp: bool, world: int = 1) -> dict:
    was_training = model.training
    model.eval()
    correct, loss_sum = 0.0, 0.0
    try:
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with _autocast(device, amp):
                logits = model(x)
            logits = _at_least_fp32(logits)
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += float((logits.argmax(-1) == y).sum())
    finally:
        model.train(was_training)
    correct, loss_sum = _all_sum([correct, loss_sum], world, device)
    n = len(loader.dataset)
    return {"acc": 100.0 * correct / n, "loss": loss_sum / n}


def evaluate(model: nn.Module, dataset: Dataset, batch_size: int = 256, device=None, *, amp: bool = False) -> dict:
    """Top-1 accuracy (%) and mean cross-entropy of `model` on `dataset` (this process only).
    `device`: default the model's. `amp`: bf16 autocast when on CUDA."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if device is None:
        first = next(model.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
    device = torch.device(device)
    return _evaluate(model, _eval_loader(dataset, batch_size, device), device, amp)


# --------------------------------------------------------------------------------------
# parameters, optimizer, EMA
# --------------------------------------------------------------------------------------
def _trained_parameters(model: nn.Module, params) -> list[tuple[str, nn.Parameter]]:
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


def _adamw(named: list[tuple[str, nn.Parameter]], cfg: TrainConfig) -> torch.optim.AdamW:
    def no_decay(name, p):
        return p.ndim <= 1 or name.rsplit(".", 1)[-1] in NO_DECAY_NAMES
    groups = [{"params": [p for n, p in named if not no_decay(n, p)], "weight_decay": cfg.weight_decay},
              {"params": [p for n, p in named if no_decay(n, p)], "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr)


class _EMA:
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


# --------------------------------------------------------------------------------------
# the run's two records: the metrics log and the checkpoints
# --------------------------------------------------------------------------------------
SUMMARY_COLUMNS = ("step", "epoch", "lr", "train_loss", "eval_loss", "eval_top1", "ema_eval_loss", "ema_eval_top1",
                   "images", "wall_s")


@dataclass
class _Place:
    """Where this process trains: its rank among `world` processes, on `device`."""
    rank: int
    world: int
    device: torch.device


class _MetricsLog:
    """metrics.jsonl (a line every ~1 % of the steps and at every evaluation), summary.csv (one
    row per evaluation, as timm writes it) and the progress bar; it owns the timing of the run
    and the window of per-step losses since the last line. Only rank 0 writes."""

    def __init__(self, out_dir: str, stage: str, cfg: TrainConfig, plan: _Plan, place: _Place, start: int,
                 wall_before: float, flops: Optional[Callable[[], float]]):
        self.path, self.summary_path = os.path.join(out_dir, "metrics.jsonl"), os.path.join(out_dir, "summary.csv")
        self.cfg, self.plan, self.place, self.flops = cfg, plan, place, flops
        self.every = max(1, plan.total_steps // 100)
        self.t0, self.wall_before = time.time(), wall_before
        self.window = torch.zeros(2, dtype=torch.float64, device=place.device)  # loss sum, correct: no sync per step
        self.window_t, self.window_images = self.t0, 0
        self.bar = None
        if place.rank == 0:
            self._truncate(start)
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
        loss_sum, correct = _all_sum(self.window.tolist(), self.place.world, self.place.device)
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
                                 "ema_eval_loss": m.get("ema_eval_loss", ""),
                                 "ema_eval_top1": m.get("ema_eval_acc", ""), "images": m["images"], "wall_s": m["wall_s"]})
        text = io.StringIO()
        writer = csv.DictWriter(text, SUMMARY_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write(self.summary_path, text.getvalue().encode())

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _trajectory(cfg: TrainConfig) -> dict:
    return {k: v for k, v in cfg.to_dict().items() if k not in _FREE_FIELDS}


class _Checkpointer:
    """out_dir/checkpoint.* (what a resume reads: weights, optimizer, EMA, RNG, counters),
    written at the end of every epoch (or every cfg.checkpoint_every steps) and at the end, and
    out_dir/final.* / final_ema.* (what the stage leaves). `save_keys`: the state_dict keys
    written (a hybrid saves only its module). Only rank 0 writes."""

    def __init__(self, out_dir: str, stage: str, cfg: TrainConfig, plan: _Plan, place: _Place, save_keys: list,
                 metadata: dict):
        self.out_dir, self.prefix = out_dir, os.path.join(out_dir, "checkpoint")
        self.stage, self.cfg, self.place, self.save_keys = stage, cfg, place, save_keys
        self.metadata = {**metadata, "stage": stage}
        self.every = cfg.checkpoint_every or plan.steps_per_epoch
        self.total = plan.total_steps
        self.saved_step: Optional[int] = None

    def due(self, done: int) -> bool:
        return done % self.every == 0 or done == self.total

    def _weights(self, model: nn.Module) -> dict:
        sd = model.state_dict()
        return {k: sd[k] for k in self.save_keys}

    def resume(self, model, optimizer, ema: Optional["_EMA"]) -> tuple[int, dict]:
        """Load the checkpoint of this stage into model / optimizer / EMA; (start step, counters)."""
        prefix, place = self.prefix, self.place
        if place.rank == 0:
            recover_checkpoint(prefix)
        _barrier(place.world)
        if not os.path.exists(prefix + ".json"):
            return 0, {}
        state_dict, meta = load_checkpoint(prefix)
        if meta.get("stage") != self.stage:
            warnings.warn(f"{prefix}.json belongs to stage {meta.get('stage')!r}, not {self.stage!r}: starting afresh")
            return 0, {}
        state, trajectory = load_checkpoint_state(prefix), _trajectory(self.cfg)
        if state["trajectory"] != trajectory:
            diff = sorted(k for k in state["trajectory"] if state["trajectory"].get(k) != trajectory.get(k))
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
        _set_rng_state(state["rng"])
        self.saved_step = state["step"] or None
        return state["step"], state["counters"]

    def save(self, step: int, model, optimizer, ema: Optional["_EMA"], counters: dict) -> None:
        if self.place.rank == 0:
            state = {"step": step, "optimizer": optimizer.state_dict(), "trajectory": _trajectory(self.cfg),
                     "ema": ema.shadow if ema else None, "rng": _rng_state(), "counters": counters}
            save_checkpoint(self.prefix, self._weights(model), {**self.metadata, "step": step}, state=state)
        self.saved_step = step

    def save_final(self, model, ema: Optional["_EMA"], summary: dict) -> str:
        """final.* (and final_ema.*, the averaged weights); returns final.safetensors' path."""
        final = os.path.join(self.out_dir, "final")
        if self.place.rank == 0:
            summary = {**self.metadata, "step": self.total, **summary}
            save_checkpoint(final, self._weights(model), summary)
            if ema is not None:
                with ema.swapped_in():
                    save_checkpoint(os.path.join(self.out_dir, "final_ema"), self._weights(model),
                                    {**summary, "ema_decay": self.cfg.ema_decay})
        _barrier(self.place.world)
        return final + ".safetensors"


# --------------------------------------------------------------------------------------
# train
# --------------------------------------------------------------------------------------
def _train_flops(model: nn.Module) -> Optional[Callable[[], float]]:
    """Training FLOPs per image (`train_flops_per_image`), asked at every log line (Apollo's
    cost changes with the sampled depth); None for a model that cannot count its FLOPs."""
    if any(callable(getattr(model, name, None)) for name in ("train_flops_per_image", "flops_per_image")):
        return lambda: train_flops_per_image(model)
    return None


def _check_save_keys(model, save_keys, trained) -> list[str]:
    state_keys = list(model.state_dict().keys())
    if save_keys is None:
        return state_keys
    save_keys = list(save_keys)
    unknown = sorted(set(save_keys) - set(state_keys))
    if unknown:
        raise ValueError(f"save_keys not in the model's state_dict: {unknown[:5]}")
    unsaved = [n for n, _ in trained if n not in set(save_keys)]
    if unsaved:
        raise ValueError(f"trained parameters missing from save_keys (resume would lose them): {unsaved[:5]}")
    return save_keys


def _grad_checkpointing(model: nn.Module, stage: str) -> None:
    if callable(getattr(model, "set_grad_checkpointing", None)):
        model.set_grad_checkpointing(True)
    else:
        warnings.warn(f"{type(model).__name__} has no set_grad_checkpointing: stage {stage!r} trains without "
                      "gradient checkpointing", stacklevel=3)


@contextlib.contextmanager
def _only_trained_require_grad(model: nn.Module, trained):
    """Frozen parameters get no gradients (and DDP ignores them); restored afterwards."""
    flags = {p: p.requires_grad for p in model.parameters()}
    ids = {id(p) for _, p in trained}
    try:
        for p in model.parameters():
            p.requires_grad_(id(p) in ids)
        yield
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)


def train(model: nn.Module, train_set: Dataset, eval_set: Optional[Dataset], cfg: TrainConfig, out_dir: str, *,
          stage: str = "train", params: Optional[Iterable[nn.Parameter]] = None,
          save_keys: Optional[Sequence[str]] = None, metadata: Optional[dict] = None,
          hooks: Sequence[Callable[[int, nn.Module], None]] = (), resume: bool = True) -> TrainResult:
    """Train `model` with AdamW + warmup-cosine on `train_set`; returns a TrainResult.

    params: what the optimizer holds (default: every parameter that requires grad); the others
        are frozen for the run (requires_grad restored afterwards) and never change.
    save_keys: state_dict keys written to checkpoints (default all); must cover `params`.
    metadata: JSON-able, stored in every checkpoint's metadata together with stage and step.
    hooks: hook(step, model) is called at the start of every optimizer step, before its
        forward passes, under a seed shared by all ranks.
    resume: continue from `out_dir/checkpoint` if it belongs to the same stage; a checkpoint
        written with a different trajectory config raises CheckpointError.
    out_dir receives checkpoint.{safetensors,json,state.pt}, metrics.jsonl, summary.csv (one row per
    evaluation), final.{safetensors,json} (and final_ema.* with ema_decay); only rank 0 writes, holding out_dir/.lock for the run: a
    second run on the same out_dir raises RunDirLocked naming the holder.
    A NaN or infinite loss, gradient norm or weight raises DivergedError naming the stage and the
    step; checkpoints are never written from such weights, so out_dir keeps the last good one.
    """
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"cfg must be a TrainConfig, got {type(cfg).__name__}")
    if metadata is not None and metadata.get("stage", stage) != stage:
        raise ValueError(f"metadata['stage']={metadata['stage']!r} contradicts stage={stage!r}")
    rank, world, local_rank = _distributed()
    place = _Place(rank, world, _device(cfg.device, world, local_rank))
    plan = _plan(len(train_set), cfg, world)
    model.to(place.device)
    trained = _trained_parameters(model, params)
    out_dir = os.fspath(out_dir)
    checkpointer = _Checkpointer(out_dir, stage, cfg, plan, place, _check_save_keys(model, save_keys, trained),
                                 metadata or {})
    if rank == 0:
        os.makedirs(out_dir, exist_ok=True)
    if cfg.grad_checkpointing:
        _grad_checkpointing(model, stage)
    lock = _lock_run_dir(out_dir, place)
    try:
        with _only_trained_require_grad(model, trained):
            optimizer = _adamw(trained, cfg)
            ema = _EMA(trained, cfg.ema_decay) if cfg.ema_decay else None
            start, counters = checkpointer.resume(model, optimizer, ema) if resume else (0, {})
            log = _MetricsLog(out_dir, stage, cfg, plan, place, start, counters.get("wall_seconds", 0.0),
                              _train_flops(model))
            runner = _Runner(model=model, train_set=train_set, eval_set=eval_set, cfg=cfg, plan=plan, place=place,
                             trained=trained, optimizer=optimizer, ema=ema, hooks=hooks, counters=counters)
            return runner.run(start, log, checkpointer)
    finally:
        if lock is not None:
            lock.release()


def _lock_run_dir(out_dir: str, place: _Place) -> Optional[RunDirLock]:
    """Rank 0's lock on out_dir (only rank 0 writes there). If it is taken, every rank raises
    RunDirLocked: the others would otherwise wait for rank 0 at the first barrier."""
    lock, refused = None, None
    if place.rank == 0:
        try:
            lock = RunDirLock(out_dir).acquire()
        except RunDirLocked as exc:
            refused = exc
    if _all_sum([float(refused is not None)], place.world, place.device)[0]:
        raise refused or RunDirLocked(f"{out_dir} is in use by another run (rank 0 could not lock it)")
    return lock


def _agree_on_kernels(model, data, batch: int, device, amp: bool, rank: int) -> None:
    """Under DDP every rank must run the same kernels: rank 0 measures the model's op calls
    on a real micro-batch and the other ranks take its decisions (see incubation.dispatch)."""
    if ops.current_backend() != "auto":
        return
    if rank == 0:
        images = torch.stack([data[i][0] for i in range(min(batch, len(data)))]).to(device)
        with _autocast(device, amp):
            ops.tune(model, images)
    ops.share_decisions()


@dataclass(eq=False)
class _Runner:
    """The training loop: step -> log -> evaluate -> save. `_MetricsLog` and `_Checkpointer`
    decide when they are due and write the files; the runner trains and evaluates."""
    model: nn.Module
    train_set: object
    eval_set: object
    cfg: TrainConfig
    plan: _Plan
    place: _Place
    trained: list
    optimizer: torch.optim.Optimizer
    ema: Optional[_EMA]
    hooks: Sequence[Callable[[int, nn.Module], None]]
    counters: dict   # a checkpoint's, when resuming

    def __post_init__(self):
        self.device, self.rank, self.world = self.place.device, self.place.rank, self.place.world
        self.last_loss = self.counters.get("train_loss", float("nan"))
        self.last_eval = self.counters.get("eval", {})
        self.mixer = _mixer(self.cfg, self.model, self.train_set)
        self.eval_loader = None

    def _net(self):
        """What the steps call: the model, in DDP with several ranks (self.ddp, for no_sync),
        compiled with cfg.compile (checkpoints still read self.model, whose keys are unchanged)."""
        net = self.ddp = self.model
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            # hooks may switch parts of the model off (Apollo's sampled depth): let DDP look for them
            net = self.ddp = nn.parallel.DistributedDataParallel(self.model, device_ids=ids,
                                                                 find_unused_parameters=bool(self.hooks))
        return torch.compile(net) if self.cfg.compile else net

    def _evaluate_all(self) -> dict:
        result = {}
        if self.eval_set is None:
            return result
        if self.eval_loader is None:
            self.eval_loader = _eval_loader(self.eval_set, max(256, self.plan.micro_batch), self.device, self.rank,
                                            self.world, self.cfg.num_workers)
        ev = _evaluate(self.model, self.eval_loader, self.device, self.cfg.amp, self.world)
        result.update(eval_acc=ev["acc"], eval_loss=ev["loss"])
        if self.ema is not None:
            with self.ema.swapped_in():
                ev = _evaluate(self.model, self.eval_loader, self.device, self.cfg.amp, self.world)
            result.update(ema_eval_acc=ev["acc"], ema_eval_loss=ev["loss"])
        return result

    def _check_finite(self, done: int, save_keys=None) -> None:
        """Raise DivergedError if a step since the last check had a non-finite loss or gradient
        norm, or (with save_keys, before a checkpoint) a weight to save is not finite. The guard
        syncs with the device only here: where the engine syncs anyway (log lines) and before
        every checkpoint, so that nothing unchecked is ever saved."""
        first = self.first_bad.clone()
        bad_key = None
        if save_keys is not None:
            sd = self.model.state_dict()
            bad_key = first_nonfinite({k: sd[k] for k in save_keys})
            if bad_key is not None:
                first.clamp_(max=float(done))
        if self.world > 1:
            dist.all_reduce(first, op=dist.ReduceOp.MIN)  # every rank stops at the same step
        bad = float(first)
        if not math.isfinite(bad):
            return
        weight = f" (first non-finite weight: {bad_key!r})" if bad_key is not None else ""
        ckpt = self.checkpointer
        kept = (f"the last good checkpoint {ckpt.prefix}.safetensors (step {ckpt.saved_step}) is kept and a resume "
                f"starts from it" if ckpt.saved_step else "this run wrote no checkpoint")
        raise DivergedError(f"stage {ckpt.stage!r} diverged at step {int(bad)}: the loss, the gradient norm or the "
                            f"weights became NaN or infinite{weight}; {kept}. Lower the learning rate (peak "
                            f"{self.cfg.lr:g}), add warmup or set clip_grad")

    def _step(self, step: int, net: nn.Module, batches, window: torch.Tensor):
        """One optimizer step over accum_steps micro-batches; adds (loss sum, correct) to
        `window`; returns (lr, grad norm before clipping)."""
        cfg, device = self.cfg, self.device
        _seed_all(_derived_seed(cfg.seed, "step", step))  # same on every rank: hooks agree
        for hook in self.hooks:
            hook(step, self.model)
        _seed_all(_derived_seed(cfg.seed, "step", step, "rank", self.rank))
        lr = lr_at(step, lr=cfg.lr, min_lr=cfg.min_lr, warmup_steps=cfg.warmup_steps,
                   decay_steps=self.plan.decay_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        losses = []
        for micro in range(cfg.accum_steps):
            x, y = next(batches)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            x, targets = self.mixer(x, y) if self.mixer is not None else (x, None)
            last = micro == cfg.accum_steps - 1
            with contextlib.nullcontext() if (self.world == 1 or last) else self.ddp.no_sync():
                with _autocast(device, cfg.amp):
                    logits = net(x)
                logits = _at_least_fp32(logits)
                if targets is None:
                    targets = _soft_targets(y, logits.shape[-1], cfg.label_smoothing, logits.dtype)
                loss = F.cross_entropy(logits, targets.to(logits.dtype))
                (loss / cfg.accum_steps).backward()
            with torch.no_grad():
                window += torch.stack([loss.detach().double() * len(y), (logits.argmax(-1) == y).sum().double()])
            losses.append(loss.detach())
        params = [p for _, p in self.trained]
        if cfg.clip_grad is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad)
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        # Noted on the device, checked at the next sync (_check_finite). There is no GradScaler to
        # account for: CUDA AMP is bf16, whose range is fp32's, so a non-finite value is a real
        # divergence; an fp16 GradScaler's skipped steps (inf gradients on purpose) must not count.
        finite = torch.isfinite(grad_norm)
        for loss in losses:
            finite &= torch.isfinite(loss)
        self.done_t += 1  # = step + 1, counted on the device: a host scalar would cost a blocking copy
        self.first_bad = torch.where(finite, self.first_bad, torch.minimum(self.first_bad, self.done_t))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update()
        return lr, grad_norm

    def _batches(self, start: int):
        """This rank's micro-batches of steps [start, total), in order (see _StepBatches)."""
        sampler = _StepBatches(len(self.train_set), self.plan, self.cfg, self.rank, self.world, start)
        return iter(DataLoader(self.train_set, batch_sampler=sampler, num_workers=self.cfg.num_workers,
                               pin_memory=self.device.type == "cuda",
                               generator=torch.Generator().manual_seed(self.cfg.seed)))  # global RNG untouched

    def run(self, start: int, log: _MetricsLog, checkpointer: _Checkpointer) -> TrainResult:
        cfg, total = self.cfg, self.plan.total_steps
        self.checkpointer = checkpointer
        self.first_bad = torch.full((), math.inf, dtype=torch.float64, device=self.device)  # first non-finite step
        self.done_t = torch.full((), float(start), dtype=torch.float64, device=self.device)
        if self.world > 1:
            _agree_on_kernels(self.model, self.train_set, self.plan.micro_batch, self.device, cfg.amp, self.rank)
        net, batches = self._net(), self._batches(start)
        if cfg.eval_at_start and start == 0 and self.eval_set is not None:
            log.start_line(self._evaluate_all())
        self.model.train()
        try:
            for step in range(start, total):
                lr, grad_norm = self._step(step, net, batches, log.window)
                done = step + 1
                log.stepped()
                evaluated = done == total or bool(cfg.eval_every and done % cfg.eval_every == 0)
                logged, saved = evaluated or log.due(done), checkpointer.due(done)
                if logged or saved:
                    self._check_finite(done, checkpointer.save_keys if saved else None)
                if evaluated:
                    self.last_eval = self._evaluate_all()
                if logged:
                    self.last_loss = log.line(done, lr, grad_norm, self.last_eval if evaluated else None)["loss"]
                if saved:
                    counters = {"wall_seconds": log.wall(), "train_loss": self.last_loss, "eval": self.last_eval}
                    checkpointer.save(done, self.model, self.optimizer, self.ema, counters)
        finally:
            log.close()
        return self._finish(start, log, checkpointer)

    def _finish(self, start: int, log: _MetricsLog, checkpointer: _Checkpointer) -> TrainResult:
        total, images = self.plan.total_steps, self.plan.total_steps * self.cfg.batch_size
        if start == total and not self.last_eval and self.eval_set is not None:
            self.last_eval = self._evaluate_all()  # resumed a finished run whose eval was not recorded
        wall = log.wall()
        path = checkpointer.save_final(self.model, self.ema, {"train_loss": self.last_loss, **self.last_eval})
        return TrainResult(train_loss=self.last_loss, eval_acc=self.last_eval.get("eval_acc"),
                           eval_loss=self.last_eval.get("eval_loss"), steps=total, images_seen=images,
                           wall_seconds=wall, train_flops=log.flops() * images if log.flops else None,
                           checkpoint_path=path, metrics_path=log.path)
