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

import contextlib
import math
import os
import warnings
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .. import ops
from ..data import base_dataset
from ..nn.vit import train_flops_per_image
from .checkpoint import (
    first_nonfinite,
)
from .config import DivergedError, TrainConfig, TrainResult
from .distributed import Place, Plan, StepBatches, all_sum, derived_seed, device_of, join_process_group, make_plan, seed_all
from .lock import RunDirLock, RunDirLocked
from .optim import EMA, make_optimizer, trained_parameters
from .records import Checkpointer, MetricsLog
from .schedule import lr_schedule

__all__ = ["TrainConfig", "TrainResult", "train", "evaluate", "DivergedError"]

# Under float16 loss scaling, a scale below this means the gradients overflow at every scale: a
# divergence, not an overflow the GradScaler skips (fairseq's --min-loss-scale default)
MIN_LOSS_SCALE = 1e-4


# --------------------------------------------------------------------------------------
# loss, mixing, evaluation
# --------------------------------------------------------------------------------------
def _mixer(cfg: TrainConfig, model: nn.Module, dataset: Dataset):
    """timm's Mixup for this run (None without mixup / cutmix): it mixes a micro-batch with its
    mirror and returns the soft targets, label smoothing included."""
    if not (cfg.mixup or cfg.cutmix):
        return None
    from timm.data import Mixup
    # the model's (our ViT, a Deep Incubation hybrid and Apollo have it), else the data set's under its Subsets
    for owner in (model, base_dataset(dataset)):
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


def _autocast(device: torch.device, dtype: Optional[str]):
    """Autocast in `dtype` ("bfloat16", "float16"; TrainConfig.autocast_dtype), or none for None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, dtype))


def _grad_scaler(cfg: TrainConfig, device: torch.device) -> Optional[torch.amp.GradScaler]:
    """The run's GradScaler (TrainConfig.loss_scaling: float16 autocast), on the run's device."""
    return torch.amp.GradScaler(device.type) if cfg.loss_scaling else None


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
def _evaluate(model: nn.Module, loader: DataLoader, device, amp: Optional[str], world: int = 1) -> dict:
    was_training = model.training
    model.eval()
    correct, correct5, loss_sum = 0.0, 0.0, 0.0
    try:
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with _autocast(device, amp):
                logits = model(x)
            logits = _at_least_fp32(logits)
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += float((logits.argmax(-1) == y).sum())
            top5 = logits.topk(min(5, logits.shape[-1]), dim=-1).indices   # timm's accuracy(topk=(1, 5))
            correct5 += float((top5 == y[:, None]).any(-1).sum())
    finally:
        model.train(was_training)
    correct, correct5, loss_sum = all_sum([correct, correct5, loss_sum], world, device)
    n = len(loader.dataset)
    return {"acc": 100.0 * correct / n, "top5": 100.0 * correct5 / n, "loss": loss_sum / n}


def evaluate(model: nn.Module, dataset: Dataset, batch_size: int = 256, device=None, *, amp: bool = False) -> dict:
    """Top-1 and top-5 accuracy (%, "acc" and "top5") and mean cross-entropy of `model` on `dataset` (this process only).
    `device`: default the model's. `amp`: bf16 autocast when on CUDA."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if device is None:
        first = next(model.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
    device = torch.device(device)
    return _evaluate(model, _eval_loader(dataset, batch_size, device), device,
                     "bfloat16" if amp and device.type == "cuda" else None)


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
    """Train `model` with cfg.opt (AdamW) + cfg.sched (warmup-cosine) on `train_set`; returns a TrainResult.

    params: what the optimizer holds (default: every parameter that requires grad); the others
        are frozen for the run (requires_grad restored afterwards) and never change.
    save_keys: state_dict keys written to checkpoints (default all); must cover `params`.
    metadata: JSON-able, stored in every checkpoint's metadata together with stage and step.
    hooks: hook(step, model) is called at the start of every optimizer step, before its
        forward passes, under a seed shared by all ranks.
    resume: continue from `out_dir/checkpoint` if it belongs to the same stage; a checkpoint
        written with a different trajectory config raises CheckpointError.
    out_dir receives checkpoint.{safetensors,json,state.pt}, metrics.jsonl, summary.csv (timm's
    columns, one row per evaluation: per epoch by default), final.{safetensors,json} (and
    final_ema.* with ema_decay); only rank 0 writes, holding out_dir/.lock for the run: a second run
    on the same out_dir raises RunDirLocked naming the holder.
    A NaN or infinite loss, gradient norm or weight raises DivergedError naming the stage and the
    step; checkpoints are never written from such weights, so out_dir keeps the last good one.
    Under float16 autocast (cfg.amp_dtype) a GradScaler scales the loss; a step it skips for
    infinite gradients is no divergence, a loss scale below MIN_LOSS_SCALE is.
    """
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"cfg must be a TrainConfig, got {type(cfg).__name__}")
    if metadata is not None and metadata.get("stage", stage) != stage:
        raise ValueError(f"metadata['stage']={metadata['stage']!r} contradicts stage={stage!r}")
    rank, world, local_rank = join_process_group()
    place = Place(rank, world, device_of(cfg.device, world, local_rank))
    plan = make_plan(len(train_set), cfg, world)
    model.to(place.device, memory_format=torch.channels_last if cfg.channels_last else torch.preserve_format)
    trained = trained_parameters(model, params)
    out_dir = os.fspath(out_dir)
    checkpointer = Checkpointer(out_dir, stage, cfg, plan, place, _check_save_keys(model, save_keys, trained),
                                 metadata or {})
    if rank == 0:
        os.makedirs(out_dir, exist_ok=True)
    if cfg.grad_checkpointing:
        _grad_checkpointing(model, stage)
    lock = _lock_run_dir(out_dir, place)
    try:
        with _only_trained_require_grad(model, trained):
            optimizer = make_optimizer(model, trained, cfg)
            ema = EMA(trained, cfg.ema_decay) if cfg.ema_decay else None
            scaler = _grad_scaler(cfg, place.device)
            start, counters = checkpointer.resume(model, optimizer, ema, scaler) if resume else (0, {})
            log = MetricsLog(out_dir, stage, cfg, plan, place, start, counters.get("wall_seconds", 0.0),
                              _train_flops(model))
            runner = _Runner(model=model, train_set=train_set, eval_set=eval_set, cfg=cfg, plan=plan, place=place,
                             trained=trained, optimizer=optimizer, ema=ema, scaler=scaler, hooks=hooks,
                             counters=counters)
            return runner.run(start, log, checkpointer)
    finally:
        if lock is not None:
            lock.release()


def _lock_run_dir(out_dir: str, place: Place) -> Optional[RunDirLock]:
    """Rank 0's lock on out_dir (only rank 0 writes there). If it is taken, every rank raises
    RunDirLocked: the others would otherwise wait for rank 0 at the first barrier."""
    lock, refused = None, None
    if place.rank == 0:
        try:
            lock = RunDirLock(out_dir).acquire()
        except RunDirLocked as exc:
            refused = exc
    if all_sum([float(refused is not None)], place.world, place.device)[0]:
        raise refused or RunDirLocked(f"{out_dir} is in use by another run (rank 0 could not lock it)")
    return lock


def _agree_on_kernels(model, data, batch: int, device, amp: Optional[str], rank: int) -> None:
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
    """The training loop: step -> log -> evaluate -> save. `MetricsLog` and `Checkpointer`
    decide when they are due and write the files; the runner trains and evaluates."""
    model: nn.Module
    train_set: object
    eval_set: object
    cfg: TrainConfig
    plan: Plan
    place: Place
    trained: list
    optimizer: torch.optim.Optimizer
    ema: Optional[EMA]
    scaler: Optional[torch.amp.GradScaler]   # float16 autocast's loss scaling
    hooks: Sequence[Callable[[int, nn.Module], None]]
    counters: dict   # a checkpoint's, when resuming

    def __post_init__(self):
        self.device, self.rank, self.world = self.place.device, self.place.rank, self.place.world
        self.last_loss = self.counters.get("train_loss", float("nan"))
        self.last_eval = self.counters.get("eval", {})
        self.mixer = _mixer(self.cfg, self.model, self.train_set)
        self.lr_of = lr_schedule(self.cfg, self.plan.total_steps, self.plan.decay_steps)
        self.eval_loader = None
        self.amp = self.cfg.autocast_dtype(self.device.type)

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
        ev = _evaluate(self.model, self.eval_loader, self.device, self.amp, self.world)
        result.update(eval_acc=ev["acc"], eval_top5=ev["top5"], eval_loss=ev["loss"])
        if self.ema is not None:
            with self.ema.swapped_in():
                ev = _evaluate(self.model, self.eval_loader, self.device, self.amp, self.world)
            result.update(ema_eval_acc=ev["acc"], ema_eval_top5=ev["top5"], ema_eval_loss=ev["loss"])
        return result

    def _check_finite(self, done: int, save_keys=None) -> None:
        """Raise DivergedError if a step since the last check had a non-finite loss or gradient
        norm (not one the GradScaler skipped), the loss scale fell below MIN_LOSS_SCALE, or (with
        save_keys, before a checkpoint) a weight to save is not finite. The guard syncs with the
        device only here: where the engine syncs anyway (log lines) and before every checkpoint, so
        that nothing unchecked is ever saved."""
        first = self.first_bad.clone()
        bad_key = None
        scale = self.scaler.get_scale() if self.scaler is not None else math.inf   # the same on every rank
        if scale < MIN_LOSS_SCALE:
            first.clamp_(max=float(done))
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
        detail = f" (first non-finite weight: {bad_key!r})" if bad_key is not None else ""
        if scale < MIN_LOSS_SCALE:
            detail += f" (the float16 loss scale fell to {scale:g}: the gradients overflow at every scale)"
        ckpt = self.checkpointer
        kept = (f"the last good checkpoint {ckpt.prefix}.safetensors (step {ckpt.saved_step}) is kept and a resume "
                f"starts from it" if ckpt.saved_step else "this run wrote no checkpoint")
        raise DivergedError(f"stage {ckpt.stage!r} diverged at step {int(bad)}: the loss, the gradient norm or the "
                            f"weights became NaN or infinite{detail}; {kept}. Lower the learning rate (peak "
                            f"{self.cfg.lr:g}), add warmup or set clip_grad")

    def _step(self, step: int, net: nn.Module, batches, window: torch.Tensor):
        """One optimizer step over accum_steps micro-batches; adds (loss sum, correct) to
        `window`; returns (lr, grad norm before clipping)."""
        cfg, device = self.cfg, self.device
        seed_all(derived_seed(cfg.seed, "step", step))  # same on every rank: hooks agree
        for hook in self.hooks:
            hook(step, self.model)
        seed_all(derived_seed(cfg.seed, "step", step, "rank", self.rank))
        lr = self.lr_of(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)   # timm's layer decay
        losses = []
        for micro in range(cfg.accum_steps):
            x, y = next(batches)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            x, targets = self.mixer(x, y) if self.mixer is not None else (x, None)
            last = micro == cfg.accum_steps - 1
            with contextlib.nullcontext() if (self.world == 1 or last) else self.ddp.no_sync():
                with _autocast(device, self.amp):
                    logits = net(x)
                logits = _at_least_fp32(logits)
                if targets is None:
                    targets = _soft_targets(y, logits.shape[-1], cfg.label_smoothing, logits.dtype)
                loss = F.cross_entropy(logits, targets.to(logits.dtype))
                scaled = loss / cfg.accum_steps
                (scaled if self.scaler is None else self.scaler.scale(scaled)).backward()
            with torch.no_grad():
                window += torch.stack([loss.detach().double() * len(y), (logits.argmax(-1) == y).sum().double()])
            losses.append(loss.detach())
        return lr, self._update(losses)

    def _update(self, losses: list) -> torch.Tensor:
        """Clip, note a divergence, step the optimizer (through the GradScaler under float16
        autocast) and the EMA; returns the gradient norm before clipping."""
        cfg, scaler = self.cfg, self.scaler
        params = [p for _, p in self.trained]
        if scaler is not None:
            scaler.unscale_(self.optimizer)   # the norm and its clipping are the true gradients'
        if cfg.clip_grad is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad)
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        # Noted on the device, checked at the next sync (_check_finite). A non-finite loss is a
        # divergence. So is a non-finite gradient norm under bfloat16 (float32's range) or none;
        # under float16 the GradScaler skips that step and lowers its scale (an overflow it expects:
        # not counted; a scale that keeps falling is, in _check_finite).
        finite = torch.stack([torch.isfinite(loss) for loss in losses]).all()
        if scaler is None:
            finite &= torch.isfinite(grad_norm)
        self.done_t += 1  # = step + 1, counted on the device: a host scalar would cost a blocking copy
        self.first_bad = torch.where(finite, self.first_bad, torch.minimum(self.first_bad, self.done_t))
        if scaler is None:
            self.optimizer.step()
        else:
            scaler.step(self.optimizer)   # skipped when a gradient is not finite
            scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update()
        return grad_norm

    def _batches(self, start: int):
        """This rank's micro-batches of steps [start, total), in order (see StepBatches)."""
        sampler = StepBatches(len(self.train_set), self.plan, self.cfg, self.rank, self.world, start)
        return iter(DataLoader(self.train_set, batch_sampler=sampler, num_workers=self.cfg.num_workers,
                               pin_memory=self.device.type == "cuda",
                               generator=torch.Generator().manual_seed(self.cfg.seed)))  # global RNG untouched

    def run(self, start: int, log: MetricsLog, checkpointer: Checkpointer) -> TrainResult:
        cfg, total = self.cfg, self.plan.total_steps
        self.checkpointer = checkpointer
        self.first_bad = torch.full((), math.inf, dtype=torch.float64, device=self.device)  # first non-finite step
        self.done_t = torch.full((), float(start), dtype=torch.float64, device=self.device)
        if self.world > 1:
            _agree_on_kernels(self.model, self.train_set, self.plan.micro_batch, self.device, self.amp, self.rank)
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
                    kept = evaluated and checkpointer.keeps
                    self._check_finite(done, checkpointer.save_keys if saved or kept else None)
                if evaluated:
                    self.last_eval = self._evaluate_all()
                    checkpointer.keep(done, self.model, self.last_eval)
                if logged:
                    self.last_loss = log.line(done, lr, grad_norm, self.last_eval if evaluated else None)["loss"]
                if saved:
                    counters = {"wall_seconds": log.wall(), "train_loss": self.last_loss, "eval": self.last_eval}
                    checkpointer.save(done, self.model, self.optimizer, self.ema, counters, self.scaler)
        finally:
            log.close()
        return self._finish(start, log, checkpointer)

    def _finish(self, start: int, log: MetricsLog, checkpointer: Checkpointer) -> TrainResult:
        total, images = self.plan.total_steps, self.plan.total_steps * self.cfg.batch_size
        if start == total and not self.last_eval and self.eval_set is not None:
            self.last_eval = self._evaluate_all()  # resumed a finished run whose eval was not recorded
        wall = log.wall()
        path = checkpointer.save_final(self.model, self.ema, {"train_loss": self.last_loss, **self.last_eval})
        return TrainResult(train_loss=self.last_loss, eval_acc=self.last_eval.get("eval_acc"),
                           eval_top5=self.last_eval.get("eval_top5"),
                           eval_loss=self.last_eval.get("eval_loss"), steps=total, images_seen=images,
                           wall_seconds=wall, train_flops=log.flops() * images if log.flops else None,
                           checkpoint_path=path, metrics_path=log.path)

