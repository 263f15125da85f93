"""The one recipe schema: how a stage trains and augments its images.

Each field says what it is (`help`) and, when the `incubation` command takes it, its flags (timm's
train.py names first, our old spellings after) and the checking argument type (a name in
`incubation.cli.options`). The CLI generates its recipe options from these fields, `RunSpec.recipe`
holds the values given (field name -> value), and `Recipe.train_config` resolves the recipe to the
engine's steps (`TrainConfig`, which validates it). Adding a timm flag is one field here and its use.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional

from .data import Augment
from .train import TrainConfig, epochs_to_steps, steps_per_epoch

__all__ = ["Recipe", "OPTIONS", "EMA_DECAY"]

EMA_DECAY = 0.9998   # timm's --model-ema-decay default (what --model-ema alone turns on)


def _field(default, help: str, *flags: str, type: Optional[str] = None):
    return field(default=default, metadata={"help": help, "flags": flags, "type": type})


@dataclass(frozen=True)
class Recipe:
    """How one stage trains (optimisation, regularisation) and augments its images. The peak lr is
    `lr` when given (absolute, as timm's --lr), else timm's train.py rule: lr_base x (batch_size /
    lr_base_size), or its square root with lr_base_scale 'sqrt' (default: 'sqrt' for the Ada* and
    LAMB optimizers, else 'linear'). The presets give DeiT's base lrs at batch 512, scaled linearly."""
    epochs: float = _field(1.0, "epochs of the stage", "--epochs", type="positive_float")
    batch_size: int = _field(2048, "global batch per optimizer step", "-b", "--batch-size", type="positive_int")
    lr: Optional[float] = _field(None, "peak lr, absolute as timm's (default: from --lr-base)", "--lr",
                                 type="positive_float")
    lr_base: float = _field(5e-4, "base lr at --lr-base-size images per step, scaled to the batch when --lr is not "
                            "given", "--lr-base", type="positive_float")
    lr_base_size: int = _field(512, "the batch of --lr-base", "--lr-base-size", type="positive_int")
    lr_base_scale: Optional[str] = _field(None, "scaling of --lr-base to the batch: linear or sqrt (default: "
                                          "timm's, sqrt for Ada* / LAMB optimizers, else linear)", "--lr-base-scale",
                                          type="lr_base_scale")
    opt: str = _field("adamw", "optimizer, by timm's name (create_optimizer_v2: adamw, sgd, lamb, ...)", "--opt",
                      type="optimizer_name")
    momentum: float = _field(0.9, "optimizer momentum (sgd, ...)", "--momentum", type="momentum")
    opt_eps: Optional[float] = _field(None, "optimizer epsilon (default: the optimizer's)", "--opt-eps",
                                      type="positive_float")
    opt_betas: Optional[tuple] = _field(None, "optimizer betas, e.g. 0.9,0.999 (default: the optimizer's)",
                                        "--opt-betas", type="betas")
    layer_decay: Optional[float] = _field(None, "layer-wise lr decay (timm's, by the model's group_matcher)",
                                          "--layer-decay", type="decay_rate")
    sched: Optional[str] = _field(None, "lr schedule: cosine or step, timm's per optimizer step (default: ours, "
                                  "a warmup from 0 that reaches the peak on its last step, then a cosine to --min-lr)",
                                  "--sched", type="sched_name")
    warmup_lr: Optional[float] = _field(None, "--sched cosine|step: the lr warmup starts from (default timm's 1e-5)",
                                        "--warmup-lr", type="non_negative_float")
    decay_epochs: float = _field(90.0, "--sched step: epochs between decays", "--decay-epochs", type="positive_float")
    decay_rate: float = _field(0.1, "--sched step: the lr factor of each decay", "--decay-rate", type="decay_rate")
    min_lr: float = _field(1e-5, "the floor of the cosine schedule, absolute as timm's (capped at the peak lr)",
                           "--min-lr", type="positive_float")
    warmup_epochs: float = _field(20.0, "linear warmup epochs", "--warmup-epochs", type="non_negative_float")
    weight_decay: float = _field(0.05, "AdamW weight decay", "--weight-decay", type="non_negative_float")
    clip_grad: Optional[float] = _field(None, "max global gradient norm", "--clip-grad", type="positive_float")
    drop_path: float = _field(0.0, "stochastic depth rate of the trained model", "--drop-path", type="fraction")
    label_smoothing: float = _field(0.1, "label smoothing", "--smoothing", type="fraction")
    mixup: float = _field(0.8, "mixup alpha (0 = off)", "--mixup", type="non_negative_float")
    cutmix: float = _field(1.0, "cutmix alpha (0 = off)", "--cutmix", type="non_negative_float")
    auto_augment: Optional[str] = _field(None, "folder data: timm auto-augment policy, e.g. rand-m9-mstd0.5-inc1, "
                                         "or 'none'", "--aa", type="auto_augment")
    re_prob: float = _field(0.0, "folder data: random erasing probability", "--reprob", type="fraction")
    re_mode: str = _field("pixel", "random erasing mode (timm's --remode)")
    re_count: int = _field(1, "random erasing count (timm's --recount)")
    color_jitter: float = _field(0.0, "colour jitter (timm applies it only without auto-augment)")
    interpolation: str = _field("bilinear", "resizing of train and eval images")
    crop_pct: float = _field(0.875, "eval: resize to img_size / crop_pct, centre crop")
    aug_repeats: int = _field(1, "repeated augmentation: each image this often per epoch, spread over the ranks "
                              "(1 = off; the vit-* presets: 3)", "--aug-repeats", type="positive_int")
    ema_decay: Optional[float] = _field(None, f"EMA decay (default {EMA_DECAY}; implies --model-ema)",
                                        "--model-ema-decay", type="decay_rate")
    amp_dtype: str = _field("bfloat16", "autocast dtype: bfloat16 (on CUDA only; a CPU run keeps float32) or float16 "
                            "(on CUDA and CPU, with a GradScaler's loss scaling)", "--amp-dtype", type="amp_dtype")
    evals: int = _field(0, "evaluations spread over the stage for the accuracy curves (0 = every epoch)", "--evals",
                        type="non_negative_int")

    @property
    def peak_lr(self) -> float:
        """The absolute peak lr (timm's train.py: --lr, else --lr-base scaled to the global batch)."""
        if self.lr is not None:
            return self.lr
        scale = self.lr_base_scale or ("sqrt" if any(o in self.opt.lower() for o in ("ada", "lamb")) else "linear")
        ratio = self.batch_size / self.lr_base_size
        return self.lr_base * (ratio ** 0.5 if scale == "sqrt" else ratio)

    def steps(self, num_train: int) -> int:
        """Optimizer steps of `epochs` passes over `num_train` images (at least 1)."""
        return epochs_to_steps(self.epochs, num_train, self.batch_size)

    def augment(self) -> Augment:
        """The ImageFolder transforms of this recipe (Fashion-MNIST is not augmented)."""
        return Augment(auto_augment=None if self.auto_augment in (None, "none") else self.auto_augment,
                       re_prob=self.re_prob, re_mode=self.re_mode, re_count=self.re_count,
                       color_jitter=self.color_jitter, interpolation=self.interpolation, crop_pct=self.crop_pct)

    def train_config(self, num_train: int, steps: Optional[int] = None, **options) -> TrainConfig:
        """The engine's TrainConfig of this recipe on `num_train` images; `steps` overrides the
        epochs; `options` are the TrainConfig fields a recipe leaves open (seed, device, ...)."""
        steps = steps or self.steps(num_train)
        evals = self.evals or max(1, round(steps / max(1, steps_per_epoch(num_train, self.batch_size))))  # every epoch
        timm_sched = dict(sched=self.sched, warmup_lr=1e-5 if self.warmup_lr is None else self.warmup_lr,
                          decay_steps=epochs_to_steps(self.decay_epochs, num_train, self.batch_size)
                          if self.sched == "step" else None,
                          decay_rate=self.decay_rate) if self.sched else {}
        return TrainConfig(
            steps=steps, batch_size=self.batch_size, lr=self.peak_lr, min_lr=min(self.min_lr, self.peak_lr),
            opt=self.opt, momentum=self.momentum, opt_eps=self.opt_eps, opt_betas=self.opt_betas,
            layer_decay=self.layer_decay, **timm_sched,
            weight_decay=self.weight_decay, clip_grad=self.clip_grad, label_smoothing=self.label_smoothing,
            warmup_steps=min(epochs_to_steps(self.warmup_epochs, num_train, self.batch_size, minimum=0), steps - 1),
            mixup=self.mixup, cutmix=self.cutmix, ema_decay=self.ema_decay, aug_repeats=self.aug_repeats,
            amp_dtype=self.amp_dtype,
            eval_every=math.ceil(steps / evals), **options)


# the fields the `incubation` command takes, in the order of its help
OPTIONS = [f for f in dataclasses.fields(Recipe) if f.metadata["flags"]]
