"""The Deep Incubation authors' checkpoints in this package's format: `import_official` (the
`incubation import-official` command). It sits above both `weights` (which reads their files:
`read_official`, `official_config`) and `deep` (whose meta-model metadata it writes), so that
neither of those imports the other.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

from . import deep
from .nn import ViTConfig
from .train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .utils import file_sha256
from .weights import _FAMILIES, OfficialCheckpoint, _expected_shapes, _misfits, official_config, read_official, resample_pos_embed

__all__ = ["ImportResult", "import_official"]


@dataclass
class ImportResult:
    """What `import_official` wrote."""
    kind: str                       # "meta" or "model"
    checkpoint: str                 # <output>.safetensors
    config: ViTConfig               # the stored model (the meta model for kind "meta")
    target: ViTConfig               # the target ViT (the stored model itself for kind "model")
    K: Optional[int]                # modules (stages) of the official model, if known
    sizes: Optional[list]           # blocks per module: the target's split for "meta", the file's for "model"
    source: str                     # the entry read: "model_stages" or "model"
    metadata: dict = field(default_factory=dict)

    def summary(self) -> str:
        c = self.config
        if self.kind == "meta":
            return (f"meta model ({c.embed_dim} wide, K={self.K}) for a target of depth {self.target.depth} split "
                    f"{self.sizes}, from '{self.source}' -> {self.checkpoint} (as <run>/meta/final it starts "
                    f"`incubation incubate`)")
        return (f"whole model ({c.embed_dim}x{c.depth}, {c.num_heads} heads, {c.num_classes} classes, "
                f"img {c.img_size[0]}), from '{self.source}' -> {self.checkpoint}")


def _import_target(official: OfficialCheckpoint, cfg: ViTConfig, family: Optional[str], kind: str,
                   target_depth: Optional[int], sizes) -> tuple:
    """(is it a meta model, K, the target config, the module spans) of an official checkpoint;
    refuses options that do not fit it before anything is hashed or written."""
    path, K, spans = official.path, (len(official.sizes) if official.sizes else None), None
    is_meta = kind == "meta" or (kind == "auto" and K is not None and K > 1 and official.sizes == [1] * K)
    if is_meta:   # the options first: nothing is hashed or written for a wrong command
        if official.sizes is not None and official.sizes != [1] * len(official.sizes):
            raise ValueError(f"{path} is not a meta model: its stages hold {official.sizes} blocks, a meta model "
                             f"one each")
        K = cfg.depth
        if target_depth is None:
            if family is None:
                raise ValueError(f"{path}: give the target depth of this meta model (--target-depth): its width "
                                 f"{cfg.embed_dim} is none of the authors' base / large / huge")
            target_depth = _FAMILIES[family][1]
        target = cfg.replace(depth=target_depth)
        spans = deep.split_modules(target, K, sizes)
    else:
        if target_depth is not None and target_depth != cfg.depth:
            raise ValueError(f"--target-depth {target_depth}: {path} holds a whole model of depth {cfg.depth} "
                             f"(a target depth applies to meta models)")
        if sizes is not None:
            raise ValueError(f"{path}: a split applies to meta models; this is a whole model")
        target = cfg
    return is_meta, K, target, spans


def import_official(path, output, *, model: Optional[str] = None, target_depth: Optional[int] = None,
                    num_heads: Optional[int] = None, norm_eps: Optional[float] = None,
                    img_size: Optional[Union[int, Sequence[int]]] = None, kind: str = "auto",
                    sizes: Optional[Sequence[int]] = None, antialias: bool = False) -> ImportResult:
    """Convert an official Deep Incubation checkpoint (`read_official`) into our format at
    `output` (a prefix: <output>.safetensors / .json) and check it with our loaders.

    kind="model": a whole ViT (a released pretrained model, an assembled or an E2E one), metadata
        {"stage": "import", "target_config", "source", ...}: `load_into`, `incubation expand`
        and `_model_config` read it.
    kind="meta": a meta model (one block per module), written with the metadata `deep.train_meta`
        writes (stage "meta", K, sizes, target_config, meta_config) for a target of depth
        `target_depth` (default: the family's, B 12 / L 24 / H 32) split evenly, or as `sizes`;
        put at <run>/meta/final it is what `incubation incubate` starts from.
    kind="auto": "meta" when every stage of the file holds one block, else "model".
    `img_size` resamples pos_embed to another image size (`resample_pos_embed`; by default without
    antialiasing, as the authors' fine-tuning does); `model`, `num_heads`, `norm_eps`: see
    `official_config`."""
    if kind not in ("auto", "meta", "model"):
        raise ValueError(f"kind must be 'auto', 'meta' or 'model', got {kind!r}")
    official = read_official(path)
    path = official.path
    state_dict = official.state_dict
    cfg, family = official_config(state_dict, model=model, num_heads=num_heads, norm_eps=norm_eps, path=path)
    source_grid = cfg.grid_size
    if img_size is not None:
        cfg = cfg.replace(img_size=img_size)
        state_dict = resample_pos_embed(state_dict, cfg, old_grid=source_grid, antialias=antialias)
    problems = _misfits(_expected_shapes(cfg), state_dict)
    if problems:
        raise CheckpointError(f"{path}: its weights are not the authors' ViT as read off them: " + "; ".join(problems))
    is_meta, K, target, spans = _import_target(official, cfg, family, kind, target_depth, sizes)
    provenance = {"source": os.path.abspath(path), "source_sha256": file_sha256(path),
                  "source_format": "deep-incubation", "source_entry": official.source,
                  "source_entries": official.entries, "official_model": model or family,
                  "official_sizes": official.sizes, "keys": official.keys}
    if cfg.grid_size != source_grid:
        provenance.update(pos_embed_resampled_from_grid=list(source_grid), pos_embed_antialias=antialias)
    if is_meta:
        metadata = {**deep.stage_metadata("meta", target, spans, meta_config=deep.meta_config(target, K).to_dict()),
                    "imported": provenance}
        saved = save_checkpoint(output, state_dict, metadata)
        _, md, _ = deep.load_meta(output, target)     # what `incubation incubate` does with it
        result_sizes = md["sizes"]
    else:
        metadata = {"stage": "import", "target_config": cfg.to_dict(), **provenance}
        saved = save_checkpoint(output, state_dict, metadata)
        stored, md = load_checkpoint(output)
        problems = _misfits(_expected_shapes(ViTConfig.from_dict(md["target_config"])), stored)
        if problems:   # cannot happen unless the file changed under us
            raise CheckpointError(f"{saved} does not hold the model its metadata names: " + "; ".join(problems))
        result_sizes = official.sizes
    return ImportResult("meta" if is_meta else "model", saved, cfg, target, K, result_sizes, official.source,
                        metadata)

