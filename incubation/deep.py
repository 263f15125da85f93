"""Deep Incubation (Ni et al., ICCV 2023): train a large ViT as K independently incubated modules.

A target ViT of L blocks is cut into K modules (consecutive blocks; module 0 also owns the stem,
module K-1 the final norm and head). The three stages, each an ordinary run of the one training
engine (`incubation.train.train`):

1. meta model   `build_meta_model(target_cfg, K)`: the target with one block per module, trained
                 end to end (`train_meta`).
2. incubation   `build_hybrid(meta, target_cfg, i)`: the frozen meta model with its block i replaced
                 by a fresh target module i (`TargetModule`); only module i is trained
                 (`train_module`). The K jobs are independent and can run on K machines.
3. assembly     `assemble(target_cfg, module_checkpoints)`: the target with every module loaded
                 from its incubation checkpoint, after validating every file; then fine-tuned
                 end to end (`train_assembled`).
The baseline `train_e2e` trains the same target directly.

Usage:
    from incubation import ViTConfig, deep
    from incubation.train import TrainConfig
    target = ViTConfig(img_size=28, patch_size=7, in_chans=1, num_classes=10,
                       embed_dim=64, depth=8, num_heads=4)
    cfg = TrainConfig(epochs=1, batch_size=128, lr=5e-4)
    deep.train_meta(target, 4, train_set, eval_set, cfg, "runs/x/meta")
    for i in range(4):   # independent jobs
        deep.train_module("runs/x/meta/final", target, i, train_set, eval_set, cfg, f"runs/x/incubate-{i}")
    deep.train_assembled(target, [f"runs/x/incubate-{i}/final" for i in range(4)],
                         train_set, eval_set, cfg, "runs/x/assemble", meta_checkpoint="runs/x/meta/final")

Choices (where this differs from the authors' DeiT-based code, on purpose):
- The frozen meta parts of a hybrid (requires_grad=False either way) run in one of two modes,
  `meta_mode` of `build_hybrid` / `train_module`, recorded in the module checkpoint's metadata:
  "eval" (default): the meta parts stay in eval mode whatever `train()` says, so the module
    learns against the deterministic function the meta model computes at test time, which is
    also what its neighbours will feed it after assembly. The module's own blocks use the
    target's drop-path rates (those of their positions in the target).
  "train" (the authors' hybrid): the whole hybrid follows `train()`, and drop-path is spread by
    timm's rule, linspace(0, target drop_path_rate, depth), over all the hybrid's K - 1 + n
    blocks in order (the frozen meta blocks included, the module's blocks at their positions in
    the hybrid), so drop-path (and any dropout of the meta config) stays active in the frozen
    meta blocks. This sets the drop-path rates of the meta model's blocks in place.
- Module parameters live under the target's own state_dict keys (`blocks.<global index>...`),
  so a module checkpoint (keys `module.<target key>`) maps to the target without renaming rules.
- When L is not a multiple of K, `split_modules` gives the first L % K modules one extra block.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
from typing import Optional, Sequence, Union

import torch
from torch import nn

from .nn import VisionTransformer, ViTConfig
from .nn.vit import TRAIN_FLOPS_PER_FORWARD
from .train import train
from .train.checkpoint import CheckpointError, load_checkpoint
from .weights import load_into

__all__ = ["split_modules", "meta_config", "build_meta_model", "TargetModule", "Hybrid", "build_hybrid",
           "weights_sha256", "load_meta", "assemble", "train_meta", "train_module",
           "train_assembled", "train_e2e", "MODULE_PREFIX", "META_MODES"]

MODULE_PREFIX = "module."          # key prefix of a TargetModule inside a Hybrid (and its checkpoint)
STEM = ("patch_embed", "cls_token", "reg_token", "pos_embed", "norm_pre")  # owned by module 0
HEAD = ("norm", "fc_norm", "head")                                        # owned by module K-1
# Config fields that only change training (regularisation), not the weights' meaning or shapes.
_TRAINING_FIELDS = ("drop_rate", "pos_drop_rate", "proj_drop_rate", "attn_drop_rate", "drop_path_rate")
META_MODES = ("eval", "train")     # how a hybrid runs its frozen meta parts (see the module docstring)
# Stage metadata entries added later, and the value a checkpoint written before them implies.
_METADATA_DEFAULTS = {"meta_mode": "eval"}


# ----------------------------------------------------------------------------------------------
# splitting and model construction
# ----------------------------------------------------------------------------------------------
def split_modules(target: Union[ViTConfig, VisionTransformer, int], K: int = 4,
                  sizes: Optional[Sequence[int]] = None) -> list[range]:
    """The block indices of each of the K modules of a target (a config, a model or a depth).

    `sizes` gives an explicit (possibly uneven) number of blocks per module; without it the
    split is as even as possible (the first depth % K modules get one block more)."""
    depth = target.config.depth if isinstance(target, VisionTransformer) else \
        target.depth if isinstance(target, ViTConfig) else target
    if isinstance(K, bool) or not isinstance(K, int) or K < 2:
        raise ValueError(f"K (the number of modules) must be an integer >= 2, got {K!r}")
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise ValueError(f"target depth must be a positive integer, got {depth!r}")
    if sizes is None:
        if K > depth:
            raise ValueError(f"cannot split {depth} blocks into K={K} modules: every module needs a block")
        base, extra = divmod(depth, K)
        sizes = [base + (m < extra) for m in range(K)]
    else:
        sizes = list(sizes)
        if len(sizes) != K:
            raise ValueError(f"split sizes {sizes} name {len(sizes)} modules, but K={K}")
        if any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in sizes):
            raise ValueError(f"split sizes {sizes} must be positive integers (every module needs a block)")
        if sum(sizes) != depth:
            raise ValueError(f"split sizes {sizes} add up to {sum(sizes)} blocks, but the target has depth {depth}")
    spans, start = [], 0
    for s in sizes:
        spans.append(range(start, start + s))
        start += s
    return spans


def _sizes(spans: Sequence[range]) -> list[int]:
    return [len(s) for s in spans]


def _architecture(cfg: ViTConfig) -> dict:
    """The config fields that define the weights (everything but dropout/drop-path rates)."""
    return {k: v for k, v in cfg.to_dict().items() if k not in _TRAINING_FIELDS}


def _differences(found: dict, expected: dict) -> list[str]:
    return [f"{k}={found.get(k)!r} (expected {expected.get(k)!r})"
            for k in sorted(set(found) | set(expected)) if found.get(k) != expected.get(k)]


def meta_config(target_cfg: ViTConfig, K: int, drop_path_rate: float = 0.0) -> ViTConfig:
    """The meta model's config: the target with one block per module (official: no drop-path)."""
    split_modules(target_cfg, K)  # validates K against the depth
    return target_cfg.replace(depth=K, drop_path_rate=drop_path_rate)


def build_meta_model(target_cfg: ViTConfig, K: int, drop_path_rate: float = 0.0) -> VisionTransformer:
    """A fresh meta model: same width, heads, stem and head as the target, one block per module."""
    return VisionTransformer(meta_config(target_cfg, K, drop_path_rate))


class TargetModule(VisionTransformer):
    """Module `index` of the target ViT cut into K modules: the target with every part outside
    the module removed, so its state_dict keys are exactly the target's (`blocks.<global index>.*`,
    plus the stem for module 0 and the final norm / head for module K-1). Initialised like the
    target (timm's init, the target's drop-path rate of each block).

    forward(tokens) runs the module's blocks on the residual stream (B, N, D); `embed` (module 0)
    and `head_logits` (module K-1) are the target's. The full target is built and then pruned,
    so construction briefly needs the target's memory."""

    def __init__(self, target_cfg: ViTConfig, K: int, index: int, sizes: Optional[Sequence[int]] = None):
        spans = split_modules(target_cfg, K, sizes)
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < K:
            raise ValueError(f"module index must be in 0..{K - 1} for K={K}, got {index!r}")
        super().__init__(target_cfg)
        self.K, self.index, self.span, self.sizes = K, index, spans[index], _sizes(spans)
        for b in range(target_cfg.depth):
            if b not in self.span:
                self.blocks.register_module(str(b), None)
        for name in (STEM if index != 0 else ()) + (HEAD if index != K - 1 else ()):
            setattr(self, name, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.span:
            x = self.blocks[b](x)
        return x

    def flops_per_image(self) -> int:
        """Forward FLOPs of the module's blocks alone (tokens -> tokens)."""
        return _block_flops(self.config) * len(self.span)


def _block_flops(cfg: ViTConfig) -> int:
    """Forward FLOPs per image of one transformer block of config `cfg`."""
    return cfg.replace(depth=2).flops_per_image() - cfg.replace(depth=1).flops_per_image()


class Hybrid(nn.Module):
    """The meta model with its block `index` replaced by target module `index` (a TargetModule);
    for index 0 the module's stem, for index K-1 the module's final norm / head are used.

    The meta model is frozen: its parameters get requires_grad=False. With meta_mode="eval" it
    stays in eval mode whatever `train()` says; with meta_mode="train" it follows `train()` and
    drop-path is spread over all the hybrid's blocks (see the module docstring). Only
    `self.module` trains; its keys in the hybrid's state_dict are `module.<target key>`
    (`module_keys()`)."""

    def __init__(self, meta: VisionTransformer, module: TargetModule, index: int, meta_mode: str = "eval"):
        super().__init__()
        _check_meta_mode(meta_mode)
        if not isinstance(meta, VisionTransformer) or not isinstance(module, TargetModule):
            raise TypeError(f"Hybrid needs a VisionTransformer meta model and a TargetModule, got "
                            f"{type(meta).__name__} and {type(module).__name__}")
        if module.index != index:
            raise ValueError(f"the target module is module {module.index}, but the hybrid slot is {index}")
        if meta.config.depth != module.K:
            raise ValueError(f"the meta model has {meta.config.depth} blocks, but the target is cut into "
                             f"K={module.K} modules (the meta model needs one block per module)")
        diff = _differences(_architecture(meta.config), _architecture(module.config.replace(depth=module.K)))
        if diff:
            raise ValueError("the meta model does not match the target (other than depth): " + "; ".join(diff))
        self.index, self.K, self.meta_mode = index, module.K, meta_mode
        self.meta = meta.requires_grad_(False).eval()
        self.module = module
        if meta_mode == "train":
            rates = torch.linspace(0, module.config.drop_path_rate, len(self.hybrid_blocks())).tolist()
            for block, rate in zip(self.hybrid_blocks(), rates):
                block.drop_path1.drop_prob = block.drop_path2.drop_prob = rate
        self.train(module.training)

    @property
    def num_classes(self) -> int:
        """The classes of its head (the meta model's): what the training engine's mixup needs."""
        return self.meta.num_classes

    def hybrid_blocks(self) -> list[nn.Module]:
        """The hybrid's blocks in forward order: meta blocks 0..index-1, the module's blocks,
        meta blocks index+1..K-1."""
        meta = list(self.meta.blocks)
        return meta[:self.index] + [self.module.blocks[b] for b in self.module.span] + meta[self.index + 1:]

    def train(self, mode: bool = True) -> "Hybrid":
        super().train(mode)
        if self.meta_mode == "eval":
            self.meta.eval()
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        first, last = self.index == 0, self.index == self.K - 1
        x = self.module.embed(images) if first else self.meta.embed(images)
        for k, meta_block in enumerate(self.meta.blocks):
            x = self.module(x) if k == self.index else meta_block(x)
        return self.module.head_logits(x) if last else self.meta.head_logits(x)

    def module_keys(self) -> list[str]:
        """The hybrid state_dict keys of the module (what an incubation checkpoint stores)."""
        return [MODULE_PREFIX + k for k in self.module.state_dict()]

    def flops_per_image(self) -> int:
        """Forward FLOPs: those of a ViT with the hybrid's depth (K - 1 + module blocks)."""
        return self.meta.config.replace(depth=self.K - 1 + len(self.module.span)).flops_per_image()

    def train_flops_per_image(self) -> int:
        """FLOPs of one training image: 3x forward, less the backward the frozen meta blocks skip.
        Those before the module run forward only (nothing upstream trains); those after it
        backpropagate input gradients but compute no weight gradients (1x forward instead of 2x).
        The stem / head are counted as trained (a negligible overcount)."""
        before, after = self.index, self.K - 1 - self.index
        return TRAIN_FLOPS_PER_FORWARD * self.flops_per_image() - _block_flops(self.meta.config) * (2 * before + after)


def build_hybrid(meta: VisionTransformer, target_cfg: ViTConfig, index: int,
                 sizes: Optional[Sequence[int]] = None, init: str = "random", meta_mode: str = "eval") -> Hybrid:
    """The hybrid that incubates module `index` of the target (K = the meta model's depth).

    init="random": the module is initialised like the target (timm's init).
    init="lemon":  the module is the LEMON depth expansion of meta block `index`
                   (`incubation.growth.lemon.expand_block`, its default depth_init), with the
                   meta stem (module 0) or head (module K-1) copied, so the hybrid starts as the
                   meta model's function.
    meta_mode: "eval" (frozen meta parts in eval mode) or "train" (the authors' hybrid); see
    the module docstring."""
    if init not in ("random", "lemon"):
        raise ValueError(f"init must be 'random' or 'lemon', got {init!r}")
    _check_meta_mode(meta_mode)
    module = TargetModule(target_cfg, meta.config.depth, index, sizes)
    if init == "lemon":
        _lemon_init(module, meta)
    return Hybrid(meta, module, index, meta_mode)


def _check_meta_mode(meta_mode) -> None:
    if meta_mode not in META_MODES:
        raise ValueError(f"meta_mode must be one of {META_MODES}, got {meta_mode!r}")


def _lemon_init(module: TargetModule, meta: VisionTransformer) -> None:
    from .growth.lemon import expand_block  # optional feature: import only when asked for

    i, span = module.index, module.span
    blocks = expand_block(copy.deepcopy(meta.blocks[i]), len(span))
    if len(blocks) != len(span):
        raise RuntimeError(f"expand_block returned {len(blocks)} blocks, expected {len(span)}")
    for b, block in zip(span, blocks):
        fresh = module.blocks[b]  # keep the target's drop-path schedule
        block.drop_path1.drop_prob, block.drop_path2.drop_prob = fresh.drop_path1.drop_prob, fresh.drop_path2.drop_prob
        module.blocks.register_module(str(b), block.requires_grad_(True).train(module.training))
    for name in (STEM if i == 0 else ()) + (HEAD if i == module.K - 1 else ()):
        part = copy.deepcopy(getattr(meta, name))
        setattr(module, name, part.requires_grad_(True) if part is not None else None)


# ----------------------------------------------------------------------------------------------
# checkpoints
# ----------------------------------------------------------------------------------------------
def weights_sha256(state_dict: dict) -> str:
    """sha256 over a state_dict's keys, dtypes, shapes and bytes (independent of file format)."""
    h = hashlib.sha256()
    for key in sorted(state_dict):
        t = state_dict[key].detach().cpu().contiguous()
        h.update(json.dumps([key, str(t.dtype), list(t.shape)]).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _owner(key: str, spans: Sequence[range]) -> int:
    """The module that owns target state_dict key `key`."""
    first = key.split(".")[0]
    if first == "blocks":
        b = int(key.split(".")[1])
        return next(m for m, span in enumerate(spans) if b in span)
    if first in STEM:
        return 0
    if first in HEAD:
        return len(spans) - 1
    raise KeyError(f"no module owns target key {key!r}")


def stage_metadata(stage: str, target_cfg: ViTConfig, spans: Sequence[range], **extra) -> dict:
    """What a stage's checkpoints record about the run (and a resume must match)."""
    return {"stage": stage, "K": len(spans), "sizes": _sizes(spans), "target_config": target_cfg.to_dict(),
            **extra}


def _check_target(path, md: dict, target_cfg: ViTConfig, what: str) -> None:
    try:
        found = _architecture(ViTConfig.from_dict(md["target_config"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: metadata has no valid target_config ({exc})") from exc
    diff = _differences(found, _architecture(target_cfg))
    if diff:
        raise CheckpointError(f"{path}: {what} was made for a different target: " + "; ".join(diff))


def load_meta(path: str, target_cfg: Optional[ViTConfig] = None) -> tuple[VisionTransformer, dict, str]:
    """(meta model, its checkpoint metadata, weights_sha256) from a meta-stage checkpoint; with
    `target_cfg`, also checks the meta model was made for that target."""
    state, md = load_checkpoint(path)
    if md.get("stage") != "meta":
        raise CheckpointError(f"{path} is a {md.get('stage')!r} checkpoint, not a meta model")
    if target_cfg is not None:
        _check_target(path, md, target_cfg, "the meta model")
    try:
        meta = VisionTransformer(ViTConfig.from_dict(md["meta_config"]))
        meta.load_state_dict(state)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: cannot rebuild the meta model: {exc}") from exc
    return meta, md, weights_sha256(meta.state_dict())


def _check_module_file(path, md: dict, slot: int, spans: Sequence[range], target_cfg: ViTConfig) -> None:
    K = len(spans)
    if md.get("stage") != "incubate":
        raise CheckpointError(f"{path} is a {md.get('stage')!r} checkpoint, not an incubated module")
    if md.get("K") != K:
        raise CheckpointError(f"{path} was incubated for K={md.get('K')} modules, but {K} module files were given")
    if md.get("module") != slot:
        raise CheckpointError(f"{path} holds module {md.get('module')}, but was given for slot {slot}")
    _check_target(path, md, target_cfg, f"module {slot}")
    if md.get("sizes") != _sizes(spans):
        raise CheckpointError(f"{path} was incubated with the split {md.get('sizes')}, expected {_sizes(spans)}")


def _assemble(target_cfg: ViTConfig, module_checkpoints: Sequence[str], sizes=None,
              meta_sha256: Optional[str] = None) -> tuple[VisionTransformer, str, list[str]]:
    """(assembled target, meta weights sha256, weights sha256 of each module file)."""
    paths = list(module_checkpoints)
    spans = split_modules(target_cfg, len(paths), sizes)
    target = VisionTransformer(target_cfg)
    shapes = {k: tuple(v.shape) for k, v in target.state_dict().items()}
    merged, module_shas, reference = {}, [], ("the given meta model", meta_sha256)
    for slot, path in enumerate(paths):
        state, md = load_checkpoint(path)
        _check_module_file(path, md, slot, spans, target_cfg)
        sha = md.get("meta_sha256")
        if reference[1] is None:
            reference = (str(path), sha)
        elif sha != reference[1]:
            raise CheckpointError(f"{path} was incubated from a different meta model (weights sha256 "
                                  f"{str(sha)[:12]}...) than {reference[0]} ({reference[1][:12]}...)")
        weights = {k[len(MODULE_PREFIX):] if k.startswith(MODULE_PREFIX) else "<no module prefix> " + k: v
                   for k, v in state.items()}
        expected = {k for k in shapes if _owner(k, spans) == slot}
        missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
        if missing or unexpected:
            raise CheckpointError(f"{path} does not hold exactly module {slot}'s weights: "
                                  f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                                  f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
        for k, v in weights.items():
            if tuple(v.shape) != shapes[k]:
                raise CheckpointError(f"{path}: {k} has shape {tuple(v.shape)}, the target needs {shapes[k]}")
        merged.update(weights)
        module_shas.append(weights_sha256(weights))
    target.load_state_dict(merged, strict=True)  # every key validated above: all or nothing
    return target, reference[1], module_shas


def assemble(target_cfg: ViTConfig, module_checkpoints: Sequence[str], *, sizes: Optional[Sequence[int]] = None,
             meta_sha256: Optional[str] = None) -> VisionTransformer:
    """The target ViT with module i loaded from `module_checkpoints[i]` (K = their number).

    Every file is validated before anything is loaded: it must be an incubation checkpoint for
    the same K, this slot, the same split and target architecture, from the same meta model
    (`meta_sha256`, else the first file's), with exactly module i's weights in the target's
    shapes; a bad file raises CheckpointError naming it."""
    return _assemble(target_cfg, module_checkpoints, sizes, meta_sha256)[0]


# ----------------------------------------------------------------------------------------------
# the stages, each one run of the training engine
# ----------------------------------------------------------------------------------------------
def _train(model, train_set, eval_set, cfg, out_dir, metadata: dict, **train_kwargs):
    """engine.train with the stage's `metadata` saved in every checkpoint, refusing to resume a
    checkpoint whose metadata differs (e.g. a module checkpoint incubated from a meta model
    that has since been retrained)."""
    previous = os.path.join(os.fspath(out_dir), "checkpoint")
    if train_kwargs.get("resume", True) and os.path.exists(previous + ".json"):
        try:
            md = load_checkpoint(previous)[1]
        except CheckpointError:
            md = None  # unreadable: the engine reports or replaces it
        if md is not None and md.get("stage") == metadata["stage"]:
            differ = sorted(k for k in metadata if md.get(k, _METADATA_DEFAULTS.get(k)) != metadata[k])
            if differ:
                raise CheckpointError(f"{previous}.json belongs to another {metadata['stage']} run ({', '.join(differ)} "
                                      f"differ): delete {out_dir} or choose another output directory")
    return train(model, train_set, eval_set, cfg, out_dir, stage=metadata["stage"], metadata=metadata, **train_kwargs)


def _start_from(model: VisionTransformer, initial_checkpoint: Optional[str], metadata: dict) -> None:
    """Load `initial_checkpoint` (any format incubation.weights reads) into the fresh model and
    record it in the metadata (a resume from another start is then refused)."""
    if initial_checkpoint is None:
        return
    load_into(model, initial_checkpoint)
    metadata["initial_checkpoint"] = os.path.abspath(initial_checkpoint)


def train_meta(target_cfg: ViTConfig, K: int, train_set, eval_set, cfg, out_dir: str, *,
               sizes: Optional[Sequence[int]] = None, drop_path_rate: float = 0.0,
               initial_checkpoint: Optional[str] = None, **train_kwargs):
    """Stage 1: train the meta model of `target_cfg` cut into K modules (from the weights in
    `initial_checkpoint` if given). Returns the TrainResult.
    (Every stage seeds torch with cfg.seed before building its model, so runs repeat exactly.)"""
    spans = split_modules(target_cfg, K, sizes)
    torch.manual_seed(cfg.seed)
    meta = build_meta_model(target_cfg, K, drop_path_rate)
    metadata = stage_metadata("meta", target_cfg, spans, meta_config=meta.config.to_dict())
    _start_from(meta, initial_checkpoint, metadata)
    return _train(meta, train_set, eval_set, cfg, out_dir, metadata, **train_kwargs)


def train_module(meta_checkpoint: str, target_cfg: ViTConfig, index: int, train_set, eval_set, cfg,
                 out_dir: str, *, init: str = "random", meta_mode: str = "eval", **train_kwargs):
    """Stage 2: incubate module `index` in the hybrid of the meta model in `meta_checkpoint`
    (its K and split come from there). Only the module trains and only it is saved. `init` and
    `meta_mode` as in `build_hybrid`; both are recorded in the checkpoint metadata."""
    _check_meta_mode(meta_mode)
    meta, md, meta_sha = load_meta(meta_checkpoint, target_cfg)
    spans = split_modules(target_cfg, md["K"], md["sizes"])
    torch.manual_seed(cfg.seed)  # the module's blocks are those a full target init gives its positions
    hybrid = build_hybrid(meta, target_cfg, index, md["sizes"], init, meta_mode)
    metadata = stage_metadata("incubate", target_cfg, spans, module=index, meta_config=meta.config.to_dict(),
                                 meta_sha256=meta_sha, init=init, meta_mode=meta_mode)
    return _train(hybrid, train_set, eval_set, cfg, out_dir, metadata, params=list(hybrid.module.parameters()),
                  save_keys=hybrid.module_keys(), **train_kwargs)


def train_assembled(target_cfg: ViTConfig, module_checkpoints: Sequence[str], train_set, eval_set, cfg,
                    out_dir: str, *, meta_checkpoint: Optional[str] = None,
                    sizes: Optional[Sequence[int]] = None, **train_kwargs):
    """Stage 3: assemble the incubated modules (checked against `meta_checkpoint` if given) and
    fine-tune the target end to end. The assembled model is evaluated before the first step too
    (metrics line of step 0): how well the modules fit together before any fine-tuning."""
    cfg = dataclasses.replace(cfg, eval_at_start=True)
    meta_sha = load_meta(meta_checkpoint, target_cfg)[2] if meta_checkpoint is not None else None
    model, meta_sha, module_shas = _assemble(target_cfg, module_checkpoints, sizes, meta_sha)
    spans = split_modules(target_cfg, len(module_checkpoints), sizes)
    metadata = stage_metadata("assemble", target_cfg, spans, meta_sha256=meta_sha, module_sha256=module_shas)
    return _train(model, train_set, eval_set, cfg, out_dir, metadata, **train_kwargs)


def train_e2e(target_cfg: ViTConfig, train_set, eval_set, cfg, out_dir: str, *,
              initial_checkpoint: Optional[str] = None, **train_kwargs):
    """The baseline: the same target trained directly (or fine-tuned from `initial_checkpoint`)."""
    torch.manual_seed(cfg.seed)
    model = VisionTransformer(target_cfg)
    metadata = {"stage": "e2e", "target_config": target_cfg.to_dict()}
    _start_from(model, initial_checkpoint, metadata)
    return _train(model, train_set, eval_set, cfg, out_dir, metadata, **train_kwargs)
