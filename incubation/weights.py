"""Weights from files: one place that reads a state_dict from any common format, fits it to our
`VisionTransformer`, and converts the Deep Incubation authors' released checkpoints.

    load_state_dict_file(path)   -> (state_dict, metadata or None) from
                                    - our checkpoint (`<prefix>`, `.safetensors` or `.json`, see
                                      incubation.train.checkpoint), verified, with its metadata;
                                    - a plain safetensors file (timm / Hugging Face hub format);
                                    - a torch file (.pth / .pt / .bin / ...), read with
                                      torch.load(weights_only=True) only, its usual containers
                                      ('state_dict', 'model', 'model_ema', ...) unwrapped and the
                                      'module.' / '_orig_mod.' prefixes of DDP / torch.compile
                                      removed (timm's clean_state_dict);
                                    - an official Deep Incubation checkpoint (below), as one flat
                                      state_dict in timm's keys.
    resample_pos_embed(sd, cfg)  -> sd with `pos_embed` resampled to cfg's patch grid (bicubic,
                                    prefix tokens kept), when the grids differ.
    load_into(model, path)       -> LoadReport: any of the above into a VisionTransformer; a head
                                    for another number of classes is left fresh (with a warning),
                                    any other missing / unexpected / misshapen key is an error.
(`incubation.official.import_official` writes the authors' checkpoints in our format.)

The authors' format (github.com/LeapLabTHU/Deep-Incubation; timm 0.3.2 vendored in
timm/models/vision_transformer.py, checkpoints written by utils.save_model):
- the ViT keeps `stages`, an nn.ModuleList of K modules with `divided_depths[i]` blocks each, that
  share their tensors with the model's own: stage 0 holds `pos_embed`, `cls_token`,
  `patch_embed.proj.*` and its blocks under local indices `blocks.<j>.*`; the last stage also
  holds `norm.*` and `head.*`. A meta model is the same ViT with divided_depths [1] * K.
- a checkpoint is a torch-saved dict: 'model' (the whole model's state_dict, in which every
  tensor appears twice: `blocks.<n>...` and `stages.<i>.blocks.<j>...`), 'model_stages' (a list of
  the K stages' state_dicts, local block indices; an empty list in files written before the
  authors fixed a typo in save_model), 'optimizer', 'lr_scheduler', 'epoch', 'scaler'. Their
  scripts read 'model_stages' (fine-tuning, incubation, assembly) and 'model' (resuming).
- architectures: vit_base_* and vit_large_* have qkv_bias=True and LayerNorm eps 1e-6;
  vit_huge_* have no qkv bias and nn.LayerNorm's default eps 1e-5; attention projections and
  MLPs always have biases; mlp_ratio 4. Heads (not readable from the weights): base 12,
  large 16, huge 16. Depths: base 12, large 24, huge 32.
"""
from __future__ import annotations

import json
import math
import os
import re
import warnings
import zipfile
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .nn import VisionTransformer, ViTConfig
from .train.checkpoint import FORMAT, CheckpointError, load_checkpoint, refuse_non_float, torch_load

__all__ = ["load_state_dict_file", "resample_pos_embed", "load_into", "LoadReport",
           "read_official", "OfficialCheckpoint", "official_config", "OFFICIAL_MODELS"]

# (embed_dim, depth, num_heads, qkv_bias, norm_eps) of the authors' ViT families
_FAMILIES = {
    "base": (768, 12, 12, True, 1e-6),
    "large": (1024, 24, 16, True, 1e-6),
    "huge": (1280, 32, 16, False, 1e-5),
}
_VARIANTS = {"base": ((16, 224), (16, 384), (32, 384)), "large": ((16, 224), (16, 384), (32, 384)),
             "huge": ((14, 224), (14, 392), (32, 384))}
# their registered model names (and the bare family names) -> (family, patch, img or None)
OFFICIAL_MODELS = {
    **{f"vit_{f}_patch{p}_{i}": (f, p, i) for f, variants in _VARIANTS.items() for p, i in variants},
    **{f: (f, None, None) for f in _FAMILIES},
}
_BY_WIDTH = {spec[0]: family for family, spec in _FAMILIES.items()}
_STEM, _HEAD = ("pos_embed", "cls_token", "patch_embed"), ("norm", "head")
_STAGE_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)")
_MAX_LISTED = 20


def _listed(keys: Sequence[str]) -> str:
    keys = list(keys)
    more = f" ... ({len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else ""
    return "[" + ", ".join(keys[:_MAX_LISTED]) + more + "]"


# ----------------------------------------------------------------------------------------------
# reading files
# ----------------------------------------------------------------------------------------------
@dataclass
class _Weights:
    state_dict: dict
    metadata: Optional[dict]
    format: str                      # "incubation", "safetensors", "torch" or "deep-incubation"
    official: Optional["OfficialCheckpoint"] = None


def _has_our_record(json_path: str) -> bool:
    """Whether `json_path` is our checkpoint record, or a damaged one (load_checkpoint then says
    what is wrong, rather than the weights loading unverified)."""
    if not os.path.exists(json_path):
        return False
    try:
        with open(json_path) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return True
    return isinstance(record, dict) and record.get("format") == FORMAT


def _kind(path: str) -> str:
    """Which reader a path needs: "incubation", "safetensors" or "torch"."""
    if os.path.isdir(path):
        raise CheckpointError(f"{path} is a directory, not a weights file")
    if not os.path.exists(path):
        if os.path.exists(path + ".json") or os.path.exists(path + ".json.pending"):
            return "incubation"          # a checkpoint prefix (load_checkpoint reports a pending write)
        raise CheckpointError(f"{path} does not exist")
    if path.endswith(".json"):
        return "incubation"
    if path.endswith(".safetensors") and _has_our_record(path[: -len(".safetensors")] + ".json"):
        return "incubation"
    with open(path, "rb") as f:
        head = f.read(9)
    # safetensors: an 8-byte little-endian header length, then the JSON header
    if len(head) == 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") <= os.path.getsize(path):
        return "safetensors"
    return "torch"


def _torch_load(path: str):
    """torch.load(weights_only=True) of `path`, every failure a CheckpointError naming the file.
    Nothing is ever unpickled beyond what weights_only allows."""
    return torch_load(path, "is not a readable weights file (our checkpoint, safetensors or a torch file)",
                      "; re-save the file with just its state_dict, or as safetensors", mmap=zipfile.is_zipfile(path))


def _tensor_dict(obj, path: str, what: str) -> dict:
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{path}: {what} is {'an empty dict' if isinstance(obj, dict) else type(obj).__name__}, "
                              f"not a state_dict")
    bad = [str(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: {what} holds entries that are not named tensors: {_listed(bad)}")
    return obj


def _unwrap(obj, path: str, use_ema: bool) -> dict:
    """The state_dict inside a torch-saved object (timm's and DeiT's containers)."""
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    if isinstance(obj, dict):
        ema, plain = ("state_dict_ema", "model_ema"), ("state_dict", "model")
        for key in (ema + plain) if use_ema else (plain + ema):
            if isinstance(obj.get(key), dict) and obj[key]:
                return _tensor_dict(obj[key], path, f"its {key!r} entry")
        raise CheckpointError(f"{path} holds a dict without a state_dict: no tensors at the top level and none "
                              f"of 'state_dict', 'model', 'model_ema', 'state_dict_ema' (it has "
                              f"{_listed(sorted(map(str, obj)))})")
    raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state_dict")


def _clean(state_dict: dict) -> dict:
    from timm.models import clean_state_dict  # strips 'module.' (DDP) and '_orig_mod.' (torch.compile)
    return clean_state_dict(state_dict)


def _is_official(obj) -> bool:
    """A Deep Incubation checkpoint: 'model_stages', or a 'model' with the stages' copies."""
    if not isinstance(obj, dict):
        return False
    model = obj.get("model")
    return "model_stages" in obj or (isinstance(model, dict) and any(
        isinstance(k, str) and k.startswith("stages.") for k in model))


def _read(path, use_ema: bool = False) -> _Weights:
    path = os.fspath(path)
    kind = _kind(path)
    if kind == "incubation":
        state_dict, metadata = load_checkpoint(path)
        return _Weights(state_dict, metadata, kind)
    if kind == "safetensors":
        try:
            state_dict = load_file(path)
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{path} is not a readable safetensors file: {exc}") from None
        state_dict = _tensor_dict(state_dict, path, "the file")
    else:
        obj = _torch_load(path)
        if _is_official(obj):
            official = _official(obj, path)   # refuses non-float weights itself
            return _Weights(official.state_dict, None, "deep-incubation", official)
        state_dict = _unwrap(obj, path, use_ema)
    refuse_non_float(state_dict, path)
    return _Weights(_clean(state_dict), None, kind)


def load_state_dict_file(path, *, use_ema: bool = False) -> tuple[dict, Optional[dict]]:
    """(state_dict on the CPU, metadata or None) from any weights file: our checkpoint (a prefix,
    `.safetensors` or `.json`; verified; its metadata), a plain safetensors file, a torch file
    (torch.load(weights_only=True) only; 'state_dict' / 'model' unwrapped, or with `use_ema` the
    EMA weights 'state_dict_ema' / 'model_ema' when present; DDP / torch.compile prefixes removed)
    or an official Deep Incubation checkpoint (converted to timm's keys). Metadata is None except
    for our checkpoints. Raises CheckpointError naming the file when it cannot be read."""
    w = _read(path, use_ema)
    return w.state_dict, w.metadata


# ----------------------------------------------------------------------------------------------
# position embeddings
# ----------------------------------------------------------------------------------------------
def _guess_grid(positions: int, like: tuple[int, int]) -> tuple[int, int]:
    """The patch grid of a pos_embed with `positions` patch positions: square if it can be, else
    with the aspect ratio of `like`."""
    side = math.isqrt(positions)
    if side * side == positions:
        return side, side
    h = round(math.sqrt(positions * like[0] / like[1]))
    if h >= 1 and positions % h == 0:
        return h, positions // h
    raise ValueError(f"pos_embed holds {positions} patch positions, which is no square grid and not one of the "
                     f"model's aspect ratio {like[0]}:{like[1]}: give its grid (old_grid)")


def resample_pos_embed(state_dict: dict, config: Union[ViTConfig, VisionTransformer], *,
                       old_grid: Optional[Sequence[int]] = None, antialias: bool = True) -> dict:
    """A copy of `state_dict` whose `pos_embed` fits `config`'s patch grid (img_size / patch_size).

    When the grids differ, the patch positions are resampled bicubically with timm's
    `resample_abs_pos_embed` and the prefix tokens (class / register) are kept as they are.
    `antialias=True` is timm's default (torch's antialiased bicubic, a PIL-like kernel, differs
    from plain bicubic even when enlarging); `antialias=False` is the plain bicubic
    F.interpolate(align_corners=False) of the authors' fine-tuning code (their main.py). The
    checkpoint's grid is `old_grid` if given, else square, else of the model's aspect ratio. A
    pos_embed that already fits, or that has another width (a shape error for the loader to
    report), is returned untouched (the same tensor)."""
    from timm.layers import resample_abs_pos_embed

    cfg = config.config if isinstance(config, VisionTransformer) else config
    out = dict(state_dict)
    pos = out.get("pos_embed")
    if not isinstance(pos, torch.Tensor) or pos.ndim != 3 or pos.shape[0] != 1 or pos.shape[2] != cfg.embed_dim:
        return out
    prefix = 0 if cfg.no_embed_class else cfg.num_prefix_tokens
    new_grid = cfg.grid_size
    positions = pos.shape[1] - prefix
    if positions < 1:
        raise ValueError(f"pos_embed has {pos.shape[1]} tokens, no patch positions after the model's {prefix} "
                         f"prefix token(s)")
    if old_grid is None:
        if pos.shape[1] == prefix + new_grid[0] * new_grid[1]:
            return out
        old_grid = _guess_grid(positions, new_grid)
    old_grid = tuple(int(g) for g in old_grid)
    if len(old_grid) != 2 or old_grid[0] * old_grid[1] != positions:
        raise ValueError(f"old_grid {old_grid} does not hold the {positions} patch positions of pos_embed")
    if old_grid == new_grid:
        return out
    out["pos_embed"] = resample_abs_pos_embed(pos.detach(), new_size=list(new_grid), old_size=list(old_grid),
                                              num_prefix_tokens=prefix, interpolation="bicubic",
                                              antialias=antialias)
    return out


# ----------------------------------------------------------------------------------------------
# fitting a state_dict to a model
# ----------------------------------------------------------------------------------------------
def _expected_shapes(cfg: ViTConfig) -> dict:
    """{key: shape} of VisionTransformer(cfg)'s state_dict, from a one-block model (cheap)."""
    one = VisionTransformer(cfg.replace(depth=1, drop_path_rate=0.0)).state_dict()
    shapes = {}
    for key, t in one.items():
        if key.startswith("blocks.0."):
            shapes.update({f"blocks.{b}.{key[len('blocks.0.'):]}": tuple(t.shape) for b in range(cfg.depth)})
        else:
            shapes[key] = tuple(t.shape)
    return shapes


def _misfits(expected: dict, state_dict: dict, skip=()) -> list[str]:
    missing = sorted(set(expected) - set(state_dict) - set(skip))
    unexpected = sorted(set(state_dict) - set(expected) - set(skip))
    shapes = [f"{k} {tuple(state_dict[k].shape)} (model {tuple(expected[k])})"
              for k in sorted(set(expected) & set(state_dict)) if tuple(state_dict[k].shape) != tuple(expected[k])]
    return [f"{what} {_listed(keys)}" for what, keys in
            (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)) if keys]


def _classes(shapes: dict) -> int:
    return shapes["head.weight"][0] if "head.weight" in shapes else 0


def _metadata_grid(md: Optional[dict]) -> Optional[tuple[int, int]]:
    """The patch grid of the whole model in our checkpoint metadata, if it names one."""
    if not md:
        return None
    key = "meta_config" if md.get("stage") == "meta" else "target_config"
    try:
        return ViTConfig.from_dict(md[key]).grid_size
    except (KeyError, TypeError, ValueError):
        return None


@dataclass
class LoadReport:
    """What `load_into` did."""
    path: str
    format: str                                   # "incubation", "safetensors", "torch", "deep-incubation"
    loaded: list = field(default_factory=list)    # the keys copied into the model
    pos_embed_resampled: Optional[tuple] = None   # (checkpoint grid, model grid) when resampled
    fresh_head: bool = False                      # the head was left as initialised (other class count)
    metadata: Optional[dict] = None               # our checkpoint's metadata, else None


def load_into(model: VisionTransformer, path, *, strict_head: bool = False, use_ema: bool = False,
              antialias: bool = True) -> LoadReport:
    """Load the weights in `path` (any format `load_state_dict_file` reads) into `model`.

    pos_embed is resampled to the model's patch grid when it differs (`resample_pos_embed`; the
    checkpoint's grid from its metadata when it has one). A classifier head for another number of
    classes is not loaded: the model keeps its fresh head and a warning names both class counts
    (with `strict_head`, a CheckpointError instead). Any other missing, unexpected or misshapen
    key is a CheckpointError listing them, raised before anything is copied."""
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"load_into loads into a VisionTransformer, got {type(model).__name__}")
    path = os.fspath(path)
    w = _read(path, use_ema)
    if w.metadata and w.metadata.get("stage") == "incubate":
        raise CheckpointError(f"{path} holds one incubated module, not a whole model: assemble the modules "
                              f"first (incubation assemble)")
    grid = _metadata_grid(w.metadata)
    try:
        state_dict = resample_pos_embed(w.state_dict, model.config, old_grid=grid, antialias=antialias)
    except ValueError as exc:
        if grid is None:
            raise ValueError(f"{path}: {exc}") from None
        state_dict = resample_pos_embed(w.state_dict, model.config, antialias=antialias)  # metadata disagrees
    report = LoadReport(path, w.format, metadata=w.metadata)
    pos = w.state_dict.get("pos_embed")
    if pos is not None and state_dict["pos_embed"] is not pos:
        prefix = 0 if model.config.no_embed_class else model.config.num_prefix_tokens
        report.pos_embed_resampled = (grid or _guess_grid(pos.shape[1] - prefix, model.config.grid_size),
                                      model.config.grid_size)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    given = {k: tuple(v.shape) for k, v in state_dict.items()}
    head = sorted(k for k in set(expected) | set(given) if k.split(".")[0] == "head")
    if {k: expected.get(k) for k in head} != {k: given.get(k) for k in head}:
        theirs, ours = _classes(given), _classes(expected)
        message = (f"{path}: its classifier head is for {theirs} classes, the model's for {ours}"
                   + (" (or a head of another kind)" if theirs == ours else ""))
        if strict_head:
            raise CheckpointError(message)
        warnings.warn(message + ": the model keeps its freshly initialised head", stacklevel=2)
        state_dict = {k: v for k, v in state_dict.items() if k not in head}
        report.fresh_head = True
    problems = _misfits(expected, state_dict, skip=head if report.fresh_head else ())
    if problems:
        raise CheckpointError(f"{path} does not fit the model: " + "; ".join(problems))
    with torch.no_grad():
        model.load_state_dict(state_dict, strict=False)   # every key checked above
    report.loaded = sorted(state_dict)
    return report


# ----------------------------------------------------------------------------------------------
# the authors' checkpoints
# ----------------------------------------------------------------------------------------------
@dataclass
class OfficialCheckpoint:
    """An official Deep Incubation checkpoint, its weights in timm's (= our) keys."""
    path: str
    state_dict: dict        # flat: cls_token, pos_embed, patch_embed.proj.*, blocks.<n>.*, norm.*, head.*
    sizes: Optional[list]   # blocks per stage (divided_depths), None when the file does not tell
    source: str             # the entry the weights came from: "model_stages" or "model"
    keys: dict              # {our key: their key}
    entries: list           # the file's top-level entries


def _from_stages(stages, path: str) -> tuple[dict, list, dict]:
    """(flat state_dict, blocks per stage, {our key: their key}) of a 'model_stages' list."""
    if not isinstance(stages, (list, tuple)) or not stages:
        raise CheckpointError(f"{path}: 'model_stages' is {type(stages).__name__}"
                              f"{' (empty)' if isinstance(stages, (list, tuple)) else ''}, not a list of stages")
    K = len(stages)
    flat, keys, sizes, stray = {}, {}, [], []
    for i, stage in enumerate(stages):
        stage = _tensor_dict(stage, path, f"model_stages[{i}]")
        owns = (_STEM if i == 0 else ()) + (_HEAD if i == K - 1 else ())
        blocks = {}
        for key, tensor in stage.items():
            m = _STAGE_BLOCK.fullmatch(key)
            if m:
                blocks.setdefault(int(m.group(1)), []).append((key, m.group(2), tensor))
            elif key.split(".")[0] in owns:
                flat[key], keys[key] = tensor, f"model_stages[{i}].{key}"
            else:
                stray.append(f"model_stages[{i}].{key}")
        if sorted(blocks) != list(range(len(blocks))) or not blocks:
            raise CheckpointError(f"{path}: model_stages[{i}] has blocks {sorted(blocks)}, expected 0..n-1 "
                                  f"with n >= 1")
        offset = sum(sizes)
        for j, entries in sorted(blocks.items()):
            for key, rest, tensor in entries:
                ours = f"blocks.{offset + j}.{rest}"
                flat[ours], keys[ours] = tensor, f"model_stages[{i}].{key}"
        sizes.append(len(blocks))
    if stray:
        raise CheckpointError(f"{path}: keys outside what a stage of the authors' ViT holds: {_listed(stray)}")
    return flat, sizes, keys


def _from_model(model, path: str) -> tuple[dict, Optional[list], dict]:
    """(flat state_dict, blocks per stage or None, {our key: their key}) of a 'model' entry; the
    `stages.*` copies must hold the very same tensors as the model's own keys."""
    model = _tensor_dict(model, path, "its 'model' entry")
    flat = {k: v for k, v in model.items() if not k.startswith("stages.")}
    staged = {}
    for key, tensor in model.items():
        if key.startswith("stages."):
            index, _, rest = key[len("stages."):].partition(".")
            if not index.isdigit() or not rest:
                raise CheckpointError(f"{path}: unexpected key {key!r} in 'model'")
            staged.setdefault(int(index), {})[rest] = tensor
    sizes = None
    if staged:
        if sorted(staged) != list(range(len(staged))):
            raise CheckpointError(f"{path}: 'model' has stages {sorted(staged)}, expected 0..K-1")
        copies, sizes, _ = _from_stages([staged[i] for i in range(len(staged))], path)
        differ = sorted(set(copies) ^ set(flat)) or [k for k in sorted(flat) if not _same(flat[k], copies[k])]
        if differ:
            raise CheckpointError(f"{path}: 'model' holds stage copies (stages.*) that differ from its own "
                                  f"tensors at {_listed(differ)}")
    return flat, sizes, {k: f"model.{k}" for k in flat}


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.numel() and a.data_ptr() == b.data_ptr() and a.stride() == b.stride():
        return True   # one tensor saved under two keys (torch.save keeps shared storage shared)
    return torch.equal(a, b)


def _official(obj: dict, path: str) -> OfficialCheckpoint:
    stages, model = obj.get("model_stages"), obj.get("model")
    entries = sorted(map(str, obj))
    from_stages = from_model = None
    if stages:  # an empty list: written by the authors' code before save_model read `stages`
        from_stages = _from_stages(stages, path)
    if model is not None:
        from_model = _from_model(model, path)
    if from_stages is None and from_model is None:
        raise CheckpointError(f"{path}: an official Deep Incubation checkpoint needs a non-empty 'model_stages' "
                              f"or a 'model' entry; it has {_listed(entries)}")
    if from_stages is not None and from_model is not None:
        (a, sizes_a, _), (b, sizes_b, _) = from_stages, from_model
        differ = sorted(set(a) ^ set(b)) or [k for k in sorted(a) if not _same(a[k], b[k])]
        if differ or sizes_b not in (None, sizes_a):
            raise CheckpointError(f"{path}: its 'model_stages' and 'model' entries disagree (at "
                                  f"{_listed(differ) if differ else f'the split {sizes_a} vs {sizes_b}'})")
    flat, sizes, keys = from_stages if from_stages is not None else from_model
    refuse_non_float(flat, path)
    return OfficialCheckpoint(path, flat, sizes, "model_stages" if from_stages is not None else "model", keys,
                              entries)


def read_official(path) -> OfficialCheckpoint:
    """An official Deep Incubation checkpoint (a torch-saved dict with 'model_stages' and / or
    'model'), read with torch.load(weights_only=True), its weights in timm's keys. 'model_stages'
    is used when present (what the authors' scripts load), checked against 'model' when both are
    there."""
    path = os.fspath(path)
    if _kind(path) != "torch":
        raise CheckpointError(f"{path} is not a torch file: official Deep Incubation checkpoints are .pth files")
    obj = _torch_load(path)
    if not _is_official(obj):
        what = f"a dict of {_listed(sorted(map(str, obj)))}" if isinstance(obj, dict) else f"a {type(obj).__name__}"
        raise CheckpointError(f"{path} is not a Deep Incubation checkpoint: it holds {what}, without "
                              f"'model_stages' or a 'model' with the stages' keys (stages.<i>...)")
    return _official(obj, path)


def official_config(state_dict: dict, *, model: Optional[str] = None, num_heads: Optional[int] = None,
                    norm_eps: Optional[float] = None, path: str = "the checkpoint") -> tuple[ViTConfig, Optional[str]]:
    """(our ViTConfig of the authors' ViT whose weights are `state_dict` (timm keys), its family
    "base" / "large" / "huge" or None). Width, depth, patch, image size (square patch grid),
    channels, classes, MLP ratio and qkv bias come from the weights; heads and LayerNorm eps from
    `num_heads` / `norm_eps`, else from the family: `model` (their --model name), else guessed
    from the width (768 base, 1024 large, 1280 huge)."""
    need = ("patch_embed.proj.weight", "pos_embed", "cls_token", "blocks.0.mlp.fc1.weight")
    missing = [k for k in need if k not in state_dict]
    if missing:
        raise CheckpointError(f"{path}: not the authors' ViT: no {_listed(missing)}")
    proj, pos = state_dict["patch_embed.proj.weight"], state_dict["pos_embed"]
    if proj.ndim != 4 or pos.ndim != 3:
        raise CheckpointError(f"{path}: patch_embed.proj.weight {tuple(proj.shape)} / pos_embed "
                              f"{tuple(pos.shape)} are not a conv patch embedding and a position table")
    embed_dim, in_chans, patch = proj.shape[0], proj.shape[1], (proj.shape[2], proj.shape[3])
    grid = math.isqrt(pos.shape[1] - 1)
    if grid < 1 or grid * grid != pos.shape[1] - 1:
        raise CheckpointError(f"{path}: pos_embed has {pos.shape[1]} tokens: not a class token and a square "
                              f"patch grid")
    depth = 1 + max(int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k)))
    hidden = state_dict["blocks.0.mlp.fc1.weight"].shape[0]
    qkv_bias = "blocks.0.attn.qkv.bias" in state_dict
    num_classes = state_dict["head.weight"].shape[0] if "head.weight" in state_dict else 0
    found = {"embed_dim": embed_dim, "qkv_bias": qkv_bias, "mlp_ratio": hidden / embed_dim}

    family = None
    if model is not None:
        if model not in OFFICIAL_MODELS:
            raise ValueError(f"unknown official model {model!r}: one of {sorted(OFFICIAL_MODELS)}")
        family, want_patch, want_img = OFFICIAL_MODELS[model]
        width, _, _, bias, _ = _FAMILIES[family]
        wrong = [f"{k} {found[k]} (the model has {v})" for k, v in
                 (("embed_dim", width), ("qkv_bias", bias), ("mlp_ratio", 4.0)) if found[k] != v]
        if want_patch is not None and patch != (want_patch, want_patch):
            wrong.append(f"patch size {patch} (the model has {want_patch})")
        if want_img is not None and grid * patch[0] != want_img:
            wrong.append(f"image size {grid * patch[0]} (the model has {want_img})")
        if wrong:
            raise ValueError(f"{path} is not a {model}: the weights have " + ", ".join(wrong))
    elif embed_dim in _BY_WIDTH:
        guess = _BY_WIDTH[embed_dim]
        if (qkv_bias, hidden) == (_FAMILIES[guess][3], 4 * embed_dim):
            family = guess
    if family is not None:
        num_heads = _FAMILIES[family][2] if num_heads is None else num_heads
        norm_eps = _FAMILIES[family][4] if norm_eps is None else norm_eps
    if num_heads is None or norm_eps is None:
        raise ValueError(f"{path}: a ViT of width {embed_dim} (qkv bias {qkv_bias}) is none of the authors' "
                         f"base / large / huge: give its number of heads and LayerNorm eps (--num-heads, --norm-eps)")
    cfg = ViTConfig(img_size=grid * patch[0] if patch[0] == patch[1] else (grid * patch[0], grid * patch[1]),
                    patch_size=patch, in_chans=in_chans, num_classes=num_classes, embed_dim=embed_dim,
                    depth=depth, num_heads=num_heads, mlp_ratio=hidden / embed_dim, qkv_bias=qkv_bias,
                    norm_eps=norm_eps)
    if cfg.mlp_hidden_dim != hidden:
        raise CheckpointError(f"{path}: an MLP of {hidden} units on width {embed_dim} is no ratio our ViT builds")
    return cfg, family
