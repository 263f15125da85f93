"""The training engine's configuration (`TrainConfig`) and result (`TrainResult`)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from ..errors import IncubationError

SCHEDULES = ("warmup_cosine", "cosine", "step")   # ours, then timm's
AMP_DTYPES = ("bfloat16", "float16")              # timm's --amp-dtype

__all__ = ["TrainConfig", "TrainResult", "DivergedError"]


@dataclass
class TrainConfig:
    epochs: float = 1.0            # total length; `steps` overrides when set
    steps: Optional[int] = None    # optimizer steps
    batch_size: int = 128          # global batch per optimizer step (all ranks, all micro-batches)
    accum_steps: int = 1           # gradient accumulation micro-batches per step
    lr: float = 5e-4               # peak lr, absolute
    min_lr: float = 1e-6
    weight_decay: float = 0.05     # none on 1-D params (biases, norms, layer scale) and tokens
    opt: str = "adamw"             # timm's optimizer name (create_optimizer_v2)
    momentum: float = 0.9          # for the optimizers that take one
    opt_eps: Optional[float] = None    # None: the optimizer's default
    opt_betas: Optional[tuple] = None  # None: the optimizer's default
    layer_decay: Optional[float] = None  # timm's layer-wise lr decay (needs model.group_matcher)
    sched: str = "warmup_cosine"   # ours (schedule.lr_at), or timm's "cosine" / "step" per optimizer step
    warmup_steps: int = 0
    warmup_lr: float = 1e-5        # timm's schedules: the lr warmup starts from (ours starts from 0)
    decay_steps: Optional[int] = None  # ours: cosine length after warmup (default total - warmup); step: interval
    decay_rate: float = 0.1        # step: the lr factor of each decay
    clip_grad: Optional[float] = None  # max global grad norm of the trained params
    label_smoothing: float = 0.1
    mixup: float = 0.0             # mixup alpha (0 = off)
    cutmix: float = 0.0            # cutmix alpha (0 = off)
    amp: bool = True               # autocast in amp_dtype (see autocast_dtype); False: the model's dtype
    amp_dtype: str = "bfloat16"    # timm's --amp-dtype: bfloat16 (CUDA only) or float16 (CUDA and CPU, loss scaling)
    ema_decay: Optional[float] = None
    aug_repeats: int = 1           # repeated augmentation: each image this often per epoch (1 = off)
    seed: int = 0
    eval_every: int = 0            # steps between evaluations (0 = at the end only)
    eval_at_start: bool = False    # also evaluate before the first step (a metrics line of step 0)
    checkpoint_every: int = 0      # steps between checkpoints (0 = end of each epoch and at the end)
    checkpoint_hist: int = 0       # timm's: keep the weights of this many best evaluations (0 = none)
    eval_metric: str = "top1"      # what "best" means: top1, top5 (higher) or loss (lower)
    num_workers: int = 0
    device: str = "auto"           # auto -> cuda if available else cpu
    progress: bool = True          # tqdm bar with loss / acc / img/s
    log_interval: int = 0          # steps between metrics lines (0: ~1 % of the steps)
    tensorboard_dir: Optional[str] = None  # also write the metrics lines as TensorBoard scalars here
    resume_from: Optional[str] = None  # resume from this checkpoint (prefix, file or its dir), not out_dir's
    compile: bool = False          # torch.compile the model for training steps (eager ops under it)
    grad_checkpointing: bool = False  # recompute activations in backward (model.set_grad_checkpointing)
    channels_last: bool = False    # model (its 4-D weights: the patch conv) and images in channels-last format

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
        need(self.eval_metric in ("top1", "top5", "loss"), f"eval_metric must be top1, top5 or loss, "
             f"got {self.eval_metric!r}")
        for name in ("warmup_steps", "checkpoint_hist", "log_interval", "eval_every", "checkpoint_every", "num_workers", "seed"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) >= 0,
                 f"{name} must be an integer >= 0, got {getattr(self, name)!r}")
        need(self.decay_steps is None or (isinstance(self.decay_steps, int) and self.decay_steps >= 0),
             f"decay_steps must be an integer >= 0 or None, got {self.decay_steps!r}")
        need(self.amp_dtype in AMP_DTYPES, f"amp_dtype must be one of {AMP_DTYPES}, got {self.amp_dtype!r}")
        need(self.sched in SCHEDULES, f"sched must be one of {SCHEDULES}, got {self.sched!r}")
        need(self.sched != "cosine" or self.decay_steps is None,
             "decay_steps (our cosine's length, LEMON's schedule) does not apply to timm's cosine schedule")
        need(self.layer_decay is None or 0 < self.layer_decay <= 1, f"layer_decay must be in (0, 1], got {self.layer_decay}")
        need(self.opt_betas is None or len(self.opt_betas) == 2, f"opt_betas must be two numbers, got {self.opt_betas}")
        need(0 <= self.min_lr <= self.lr, f"need 0 <= min_lr <= lr, got lr={self.lr}, min_lr={self.min_lr}")
        need(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        need(self.clip_grad is None or self.clip_grad > 0, f"clip_grad must be > 0 or None, got {self.clip_grad}")
        need(0 <= self.label_smoothing < 1, f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        need(self.mixup >= 0 and self.cutmix >= 0, f"mixup/cutmix alphas must be >= 0, got {self.mixup}, {self.cutmix}")
        need(self.ema_decay is None or 0 < self.ema_decay < 1, f"ema_decay must be in (0, 1), got {self.ema_decay}")
        need(self.device == "auto" or self.device.split(":")[0] in ("cpu", "cuda"),
             f"device must be 'auto', 'cpu' or 'cuda[:i]', got {self.device!r}")
        if self.opt_betas is not None:
            self.opt_betas = tuple(self.opt_betas)
        if errors:
            raise ValueError("invalid TrainConfig: " + "; ".join(errors))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def autocast_dtype(self, device_type: str) -> Optional[str]:
        """The autocast dtype of this run on `device_type`, None for none. bfloat16 applies on CUDA
        only (a CPU run keeps the model's dtype, as before --amp-dtype); float16 applies on CUDA and
        on CPU, as timm's --amp-dtype float16 autocasts on any device, always with loss scaling."""
        if not self.amp or (self.amp_dtype == "bfloat16" and device_type != "cuda"):
            return None
        return self.amp_dtype

    @property
    def loss_scaling(self) -> bool:
        """float16 autocast trains with a GradScaler, on every device (timm's only on CUDA): float16's
        range is too small for unscaled gradients; bfloat16 has float32's and needs none."""
        return self.amp and self.amp_dtype == "float16"

    def precision(self, device_type: str) -> str:
        """In words, for the line a stage prints when it starts."""
        dtype = self.autocast_dtype(device_type)
        if dtype is None:
            return "no autocast" + (" (bfloat16 autocast applies on CUDA only)" if self.amp else "")
        return f"{dtype} autocast" + (" with loss scaling" if self.loss_scaling else "")


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
    eval_top5: Optional[float] = None  # top-5 %, None without an eval set


