"""Lossless conversion between timm's VisionTransformer and ours (same state_dict keys);
`pretrained_cfg` (timm's data config: input size, mean/std, crop, interpolation) goes along."""
from __future__ import annotations

import copy
import functools

import torch
from torch import nn

from .nn.vit import VisionTransformer, ViTConfig

__all__ = ["from_timm", "to_timm", "timm_config"]


def _timm():
    try:
        from timm.layers import Attention, LayerScale, Mlp, PatchEmbed
        from timm.models.vision_transformer import Block
        from timm.models.vision_transformer import VisionTransformer as TimmViT
    except ImportError as exc:  # pragma: no cover - timm is a dependency
        raise ImportError(f"timm is needed for conversion: {exc}") from exc
    return TimmViT, Block, Attention, Mlp, PatchEmbed, LayerScale


def _is_identity(m) -> bool:
    return m is None or isinstance(m, nn.Identity)


def _unsupported_model(model: nn.Module) -> list[str]:
    """Model-level timm options our ViT does not have (subclasses, pooling, patch embedding)."""
    TimmViT, _, _, _, TimmPatchEmbed, _ = _timm()
    bad = []
    if type(model) is not TimmViT:
        bad.append(f"subclass {type(model).__name__}")
    if getattr(model, "attn_pool", None) is not None:
        bad.append(f"global_pool={model.global_pool!r} (attention pooling)")
    if model.global_pool not in ("", "token", "avg", "avgmax", "max"):
        bad.append(f"global_pool={model.global_pool!r}")
    if getattr(model, "dynamic_img_size", False):
        bad.append("dynamic_img_size=True")
    pe = model.patch_embed
    if type(pe) is not TimmPatchEmbed:
        bad.append(f"embed_layer={type(pe).__name__}")
    else:
        if not _is_identity(pe.norm):
            bad.append("embed_norm_layer")
        if getattr(pe, "dynamic_img_pad", False) or not getattr(pe, "flatten", True) \
                or not getattr(pe, "strict_img_size", True):
            bad.append("dynamic_img_pad / non-flattening / non-strict patch embed")
    if model.pos_embed is None:
        bad.append("pos_embed='none'")
    if not _is_identity(getattr(model, "patch_drop", None)):
        bad.append("patch_drop_rate > 0")
    return bad


def _unsupported_layers(model: nn.Module) -> list[str]:
    """Norm, attention, MLP and layer-scale options our blocks do not have."""
    _, TimmBlock, TimmAttention, TimmMlp, _, TimmLayerScale = _timm()
    bad = []
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    other_norms = [type(m).__name__ for name, m in model.named_modules()
                   if "norm" in type(m).__name__.lower() and not isinstance(m, nn.LayerNorm)]
    if other_norms:
        bad.append(f"norm_layer={sorted(set(other_norms))}")
    eps = {m.eps for m in norms} or {1e-6}
    if len(eps) > 1 or any(not m.elementwise_affine or m.bias is None for m in norms):
        bad.append("LayerNorms with mixed eps or without affine weight and bias")

    blocks = list(model.blocks)
    if not blocks:
        bad.append("depth=0")
    for i, blk in enumerate(blocks):
        if type(blk) is not TimmBlock:
            bad.append(f"blocks[{i}] is {type(blk).__name__}")
            continue
        a, m = blk.attn, blk.mlp
        if type(a) is not TimmAttention or not (_is_identity(a.q_norm) and _is_identity(a.k_norm)
                                                 and _is_identity(getattr(a, "norm", None))):
            bad.append(f"blocks[{i}].attn: {type(a).__name__} with qk_norm/scale_attn_norm")
        elif a.attn_drop.p:
            bad.append(f"attn_drop_rate={a.attn_drop.p}")
        if type(m) is not TimmMlp or not isinstance(m.act, nn.GELU) or m.act.approximate != "none" \
                or not _is_identity(m.norm):
            bad.append(f"blocks[{i}].mlp: only Mlp with exact GELU and no scale_mlp_norm is supported")
        for ls in (blk.ls1, blk.ls2):
            if not (_is_identity(ls) or type(ls) is TimmLayerScale):
                bad.append(f"blocks[{i}] layer scale {type(ls).__name__}")
    return bad


def timm_config(model: nn.Module) -> ViTConfig:
    """Read our ViTConfig off a timm VisionTransformer; raise listing every unsupported option."""
    TimmViT, _, _, _, _, TimmLayerScale = _timm()
    if not isinstance(model, TimmViT):
        raise TypeError(f"from_timm expects a timm VisionTransformer, got {type(model).__name__}")
    bad = _unsupported_model(model) + _unsupported_layers(model)
    if bad:
        raise ValueError("timm VisionTransformer options not supported by incubation: " + "; ".join(bad))
    blocks, pe = list(model.blocks), model.patch_embed
    eps = {m.eps for m in model.modules() if isinstance(m, nn.LayerNorm)} or {1e-6}
    b0 = blocks[0]
    hidden = b0.mlp.fc1.out_features
    mlp_ratio = hidden / model.embed_dim
    if int(model.embed_dim * mlp_ratio) != hidden:
        raise ValueError(f"MLP hidden size {hidden} is not int(embed_dim * mlp_ratio) for any ratio")
    head = model.head
    return ViTConfig(
        img_size=tuple(pe.img_size), patch_size=tuple(pe.patch_size), in_chans=pe.proj.in_channels,
        num_classes=head.out_features if isinstance(head, nn.Linear) else 0,
        global_pool=model.global_pool, embed_dim=model.embed_dim, depth=len(blocks),
        num_heads=b0.attn.num_heads, mlp_ratio=mlp_ratio,
        qkv_bias=b0.attn.qkv.bias is not None, proj_bias=b0.attn.proj.bias is not None,
        init_values=b0.ls1.init_values if isinstance(b0.ls1, TimmLayerScale) else None,
        class_token=model.cls_token is not None, no_embed_class=model.no_embed_class,
        reg_tokens=model.num_reg_tokens, pre_norm=not _is_identity(model.norm_pre),
        final_norm=not (_is_identity(model.norm) and _is_identity(model.fc_norm)),
        fc_norm=not _is_identity(model.fc_norm), pool_include_prefix=model.pool_include_prefix,
        drop_rate=model.head_drop.p, pos_drop_rate=model.pos_drop.p, proj_drop_rate=b0.attn.proj_drop.p,
        drop_path_rate=getattr(blocks[-1].drop_path1, "drop_prob", 0.0), norm_eps=eps.pop(),
    )


def _like(dst: nn.Module, src: nn.Module) -> nn.Module:
    p = next(src.parameters())
    dst.to(device=p.device, dtype=p.dtype)
    dst.train(src.training)
    return dst


def from_timm(model: nn.Module) -> VisionTransformer:
    """Our VisionTransformer with the same config and weights as a timm VisionTransformer."""
    ours = VisionTransformer(timm_config(model))
    _like(ours, model).load_state_dict(model.state_dict(), strict=True)
    if getattr(model, "pretrained_cfg", None) is not None:  # a timm model built directly has none
        ours.pretrained_cfg = copy.deepcopy(model.pretrained_cfg)
    ours.set_grad_checkpointing(bool(getattr(model, "grad_checkpointing", False)))
    return ours


def to_timm(model: VisionTransformer) -> nn.Module:
    """A timm VisionTransformer with the same config and weights as ours."""
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"to_timm expects incubation.VisionTransformer, got {type(model).__name__}")
    TimmViT, _, _, _, _, _ = _timm()
    from timm.layers import LayerNorm as TimmLayerNorm

    c = model.config
    kwargs = {k: v for k, v in c.to_dict().items() if k != "norm_eps"}
    kwargs["img_size"], kwargs["patch_size"] = tuple(c.img_size), tuple(c.patch_size)
    theirs = TimmViT(**kwargs, norm_layer=functools.partial(TimmLayerNorm, eps=c.norm_eps), weight_init="skip")
    with torch.no_grad():
        _like(theirs, model).load_state_dict(model.state_dict(), strict=True)
    theirs.pretrained_cfg = copy.deepcopy(model.pretrained_cfg)
    theirs.default_cfg = theirs.pretrained_cfg  # the alias timm's model factory sets
    theirs.set_grad_checkpointing(model.grad_checkpointing)
    return theirs
