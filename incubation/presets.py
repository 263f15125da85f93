"""Named recipes for the CLI: a target ViT, its split into K modules, one training recipe per
stage (meta, incubate, assemble, e2e) and the data augmentation.

- "tiny" (default): an 8-block ViT for Fashion-MNIST on a CPU, for quick looks and tests.
- "demo" (`make demo`): the pipeline docs/STUDY.md recommends, where it helps: a 24-block,
  64-wide target, modules initialised by LEMON (`--init lemon`), stage lengths in the paper's
  proportions (meta 3 : each module 1 : assembly 1) at one E2E epoch of training FLOPs; the
  whole `incubation run` with its E2E baseline takes under 10 minutes on 2 cores.
- "vit-b", "vit-l", "vit-h": the official Deep Incubation recipe on ImageNet-sized data, value
  by value from the authors' code (LeapLabTHU/Deep-Incubation): main.py's defaults (the DeiT
  recipe: lr 5e-4 x batch/512, 20 warmup epochs, min lr 1e-5, weight decay 0.05, label
  smoothing 0.1, mixup 0.8 / cutmix 1.0, RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25
  pixel mode, bicubic, repeated augmentation x3), TRAINING.md's per-stage commands (global batch
  2048; meta 300 epochs without drop-path; each module 100 epochs with drop-path 0.1; assembly
  100 epochs, no warmup, grad clip 1.0, drop-path 0.1 / 0.5 / 0.6) and the architectures of their
  timm/models/vision_transformer.py (ViT-H/14: qkv without bias, LayerNorm eps 1e-5). The
  README's "Training on ImageNet" table lists each value with its source. The E2E baseline uses
  the assembly's drop-path with the meta recipe's schedule; `incubation run` gives it the
  pipeline's training FLOPs.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

from .data import Augment
from .nn import ViTConfig
from .recipe import Recipe

__all__ = ["Recipe", "Preset", "PRESETS", "STAGES", "OFFICIAL_AUGMENT", "get_preset"]

STAGES = ("meta", "incubate", "assemble", "e2e")


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    model: dict                        # ViTConfig fields; in_chans / num_classes come from the data
    meta: Recipe
    incubate: Recipe
    assemble: Recipe
    e2e: Recipe
    K: int = 4
    sizes: Optional[tuple] = None      # blocks per module (None: even split)
    img_size: Optional[int] = None     # images are resized to this (None: the data set's own size)
    init: str = "random"               # how incubation starts each module (--init): random or lemon

    @property
    def augment(self) -> Augment:
        """The ImageFolder transforms (the same in every stage; Fashion-MNIST is not augmented)."""
        return self.meta.augment()

    def recipe(self, stage: str) -> Recipe:
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}: one of {STAGES}")
        return getattr(self, stage)

    def target_config(self, in_chans: int, num_classes: int, img_size: int) -> ViTConfig:
        """The target ViT for a data set of this kind (images already at `img_size`)."""
        return ViTConfig(**{**self.model, "img_size": img_size, "in_chans": in_chans, "num_classes": num_classes})


# the official recipe's augmentation (Recipe fields)
OFFICIAL_AUGMENT = dict(auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25, re_mode="pixel", re_count=1,
                        color_jitter=0.4, interpolation="bicubic", crop_pct=224 / 256)


def _official(name: str, model: dict, drop_path: float) -> Preset:
    # main.py's lr 5e-4 is a base lr at batch 512, scaled linearly (DeiT's rule)
    meta = Recipe(epochs=300, lr_base=5e-4, lr_base_size=512, lr_base_scale="linear", drop_path=0.0, aug_repeats=3,
                  **OFFICIAL_AUGMENT)
    return Preset(
        name=name, description=f"{name.upper()} with the official Deep Incubation recipe (GPU, ImageNet-sized data)",
        model=model, img_size=224, meta=meta,
        incubate=replace(meta, epochs=100, drop_path=0.1),
        assemble=replace(meta, epochs=100, warmup_epochs=0.0, clip_grad=1.0, drop_path=drop_path),
        e2e=replace(meta, drop_path=drop_path))


_TINY = Recipe(epochs=2.0, batch_size=128, lr_base=2e-3, lr_base_scale="linear", min_lr=1e-5, warmup_epochs=0.1, mixup=0.0, cutmix=0.0,
               evals=2)

PRESETS = {
    "tiny": Preset(
        name="tiny", description="an 8-block, 64-wide ViT (patch 7) for Fashion-MNIST on a CPU",
        model=dict(patch_size=7, embed_dim=64, depth=8, num_heads=4),
        meta=_TINY, incubate=replace(_TINY, epochs=1.0, evals=1),
        assemble=replace(_TINY, epochs=1.0, warmup_epochs=0.0, clip_grad=1.0, evals=4),
        e2e=replace(_TINY, evals=4)),
    # the study's 24-block target at one E2E epoch: meta 1.09, each module 0.36, assembly 0.36 epochs
    "demo": Preset(
        name="demo", description="a 24-block, 64-wide ViT (patch 7) for Fashion-MNIST, LEMON-initialised modules",
        model=dict(patch_size=7, embed_dim=64, depth=24, num_heads=4), init="lemon",
        meta=replace(_TINY, epochs=1.09), incubate=replace(_TINY, epochs=0.36, evals=1),
        assemble=replace(_TINY, epochs=0.36, warmup_epochs=0.0, clip_grad=1.0, evals=4),
        e2e=replace(_TINY, epochs=1.0, evals=4)),
    "vit-b": _official("vit-b", dict(patch_size=16, embed_dim=768, depth=12, num_heads=12), 0.1),
    "vit-l": _official("vit-l", dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16), 0.5),
    "vit-h": _official("vit-h", dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16, qkv_bias=False,
                                     norm_eps=1e-5), 0.6),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}: one of {sorted(PRESETS)}")
    return PRESETS[name]
