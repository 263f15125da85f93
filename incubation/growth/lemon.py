"""LEMON (Wang et al., ICLR 2024): lossless width and depth expansion of a VisionTransformer.

The expanded model computes exactly the source's function (in eval mode), yet its duplicated
neurons and heads are not copies of each other, so training can make them diverge.

Feature spaces of the expanded model, source width d, target width D = k*d + p (k = D // d):

    residual stream (average expansion)  [x, x, ..., x, mean(x) repeated p times]
    LayerNorm output (zero expansion)    [y, y, ..., y, 0 repeated p times]
    MLP hidden / attention heads         target unit t copies source unit t % n (head_dim kept)

How every weight is built:
  * A writer into the residual stream (patch embed, attn.proj, mlp.fc2, cls/reg tokens, pos embed)
    copies its output rows; the p pad rows produce the mean of the outputs (with layer scale, the
    mean of gamma_i * row_i, carried by a pad gamma equal to the RMS of gamma), so the pad stays
    the feature mean through every residual add.
  * A reader of duplicated inputs (qkv, fc1, proj, fc2, head) splits each source weight over the
    copies of its input into unequal random positive parts that sum to it (symmetry breaking, per
    element, so duplicates get different gradients). Columns that read LayerNorm's zero pad are
    arbitrary (random); columns that read the residual stream's mean pad are zero.
  * LayerNorm: the average-expanded vector has mean mu and variance c * var with c = k*d / D, so
    with eps * c and gamma * sqrt(c) on the copies the copies are exactly LN(x); the pad is
    (mean - mu) = 0 times gamma plus a zero beta. All LayerNorms share eps, so config.norm_eps
    becomes c * norm_eps.
  * Depth: new blocks follow their source blocks, and both of their residual branches add
    exactly zero (to rounding). Two ways (`depth_init`):
      "cancel" (default; the idea of the authors' "copymix_cancel", which cancels the copies a
        simultaneous width expansion makes; here the copies are made inside the block, so it
        works at any width): the new block's heads and MLP neurons come in groups of identical
        copies (pairs, a triple when the count is odd) of the source block's first heads /
        neurons, and the output weights of a group (the
        attn.proj / mlp.fc2 columns) are random and sum to zero over the group, so the group's
        outputs cancel while each copy sees a non-zero gradient: qkv, proj, fc1 and fc2 all
        learn from the first step, the copies with opposite gradients (symmetry broken). The
        output biases are zero.
        Cancellation alone gives the LayerNorms no gradient: a branch that is zero for every
        input has zero derivative with respect to its input. So one unit per branch (the last
        value channel of the last head group, the last MLP neuron) reads the one direction every
        LayerNorm output is blind to: with LN(x) = w * x_hat + b and sum(x_hat) = 0 exactly,
        the row r = c / w with bias -r.b outputs c * sum(x_hat) = 0 for every x, while moving w
        or b moves it; its output weights are random. (If the reading layer has no bias, the
        new block's LayerNorm bias is projected to r.b = 0 instead; a LayerNorm weight with a
        zero entry gets no such unit.) With layer scale, a branch that is zero for every input
        leaves gamma no gradient either, so the feature with the smallest |gamma| (and any
        with gamma = 0) gets gamma = 0 and plain random output weights: it outputs zero through
        gamma, and its gamma learns. With a single head, its query / key rows get no first-step
        gradient (the value channels are paired inside the head instead).
      "zero": a copy of the source block with the output projections (attn.proj and mlp.fc2,
        weights and biases) zeroed; only they get a first-step gradient (not even the layer
        scale); the rest of the block follows from the second step.

Not lossless, hence refused when the width is not a multiple of the source width (p > 0):
pre_norm (its LayerNorm would write the zero-expanded vector into the residual stream) and
max / avgmax pooling followed by fc_norm (the max of the pad is not the mean of the maxima).
"""
from __future__ import annotations

import copy
import dataclasses
import math
from typing import Optional

import torch
from torch import nn

from ..nn.vit import Block, VisionTransformer, ViTConfig

__all__ = ["lemon_expand", "expand_block", "lemon_schedule", "lemon_config", "DEPTH_INITS"]

# depth_init="zero": zeroed in a new (depth) block so that both residual branches output exactly zero.
ZERO_OUTPUT_KEYS = ("attn.proj.weight", "attn.proj.bias", "mlp.fc2.weight", "mlp.fc2.bias")
DEPTH_INITS = ("cancel", "zero")

_ARBITRARY_STD = 0.02  # columns reading LayerNorm's zero pad: the ViT's init std
_LAYER_NORMS = ("norm_pre", "norm", "fc_norm")


# --------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------
def lemon_expand(model: VisionTransformer, embed_dim: Optional[int] = None, depth: Optional[int] = None,
                 num_heads: Optional[int] = None, mlp_ratio: Optional[float] = None, *,
                 seed: int = 0, depth_init: str = "cancel") -> VisionTransformer:
    """A larger VisionTransformer whose function equals `model`'s (LEMON expansion).

    Unset sizes keep the source's; num_heads defaults to embed_dim / source head_dim (the head
    dim is kept). `depth_init` builds the new blocks ("cancel" or "zero", see the module
    docstring). `seed` fixes the random symmetry-breaking splits and output weights. Returns a
    new model in eval/train mode like the source, on its device and dtype; the source is not
    modified.
    """
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"lemon_expand needs an incubation.VisionTransformer, got {type(model).__name__}")
    _check_depth_init(depth_init)
    src = model.config
    dst = _target_config(src, embed_dim, depth, num_heads, mlp_ratio)
    dst.check_fits_in_memory()   # before the expanded tensors are allocated
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        state = _expand_width(model.state_dict(), src, dst, gen)
        state = _expand_depth(state, src.depth, dst.depth, dst.num_heads, depth_init, gen)
        ref = next(model.parameters())
        expanded = VisionTransformer(dst).to(device=ref.device, dtype=ref.dtype)
        expanded.load_state_dict(state)
    return expanded.train(model.training)


def expand_block(block: Block, n: int, *, depth_init: str = "cancel", seed: int = 0) -> list[Block]:
    """[block] followed by n - 1 new blocks whose residual branches output exactly zero (to
    rounding), built by `depth_init` ("cancel" or "zero", see the module docstring); `seed`
    fixes the cancel mode's random output weights.

    Used for growth-initialised incubation: a target module made of n blocks that computes
    the same function as one block of the meta model."""
    if not isinstance(block, Block):
        raise TypeError(f"expand_block needs an incubation Block, got {type(block).__name__}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    _check_depth_init(depth_init)
    gen = torch.Generator().manual_seed(seed)
    copies = [copy.deepcopy(block) for _ in range(n - 1)]
    with torch.no_grad():
        for new in copies:
            if depth_init == "cancel":
                new.load_state_dict(_cancel_block(block.state_dict(), block.attn.num_heads, gen))
                continue
            for key in ZERO_OUTPUT_KEYS:
                param = _get_param(new, key)
                if param is not None:
                    param.zero_()
    return [block] + copies


def _check_depth_init(depth_init) -> None:
    if depth_init not in DEPTH_INITS:
        raise ValueError(f"depth_init must be one of {DEPTH_INITS}, got {depth_init!r}")


def lemon_config(cfg):
    """The TrainConfig `cfg` with LEMON's schedule over its steps (`lemon_schedule`)."""
    return dataclasses.replace(cfg, **lemon_schedule(cfg.steps, warmup_steps=cfg.warmup_steps))


def lemon_schedule(total_steps: int, *, warmup_steps: int = 0) -> dict:
    """TrainConfig changes for training an expanded model (LEMON's learning-rate schedule, the
    paper's): keep the peak lr of training from scratch (do not change cfg.lr) and pass the
    expanded model's (shortened) budget as `total_steps`; after the warmup one cosine runs over
    the rest of the budget and ends where training ends: min_lr on the last step
    (total_steps - 1) and above min_lr on every step before it (a single post-warmup step runs
    at the peak). (Our earlier variant, decay over 60 % then hold min_lr, was dropped: no study
    showed it better.) Use as `dataclasses.replace(cfg, **lemon_schedule(steps,
    warmup_steps=cfg.warmup_steps))`."""
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"total_steps must be a positive integer, got {total_steps!r}")
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) \
            or not 0 <= warmup_steps < total_steps:
        raise ValueError(f"warmup_steps must be an integer in [0, total_steps={total_steps}), "
                         f"got {warmup_steps!r}")
    # engine.lr_at reaches min_lr at step warmup_steps + decay_steps: here the last step
    decay = max(1, total_steps - warmup_steps - 1)
    return {"steps": total_steps, "warmup_steps": warmup_steps, "decay_steps": decay}


# --------------------------------------------------------------------------------------
# target shape
# --------------------------------------------------------------------------------------
def _positive_int(name: str, value, minimum: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} ({value}) must be >= the source's {what} ({minimum}): "
                         "LEMON only expands")
    return value


def _target_config(src: ViTConfig, embed_dim, depth, num_heads, mlp_ratio) -> ViTConfig:
    width = _positive_int("embed_dim", src.embed_dim if embed_dim is None else embed_dim,
                          src.embed_dim, "embed_dim")
    depth = _positive_int("depth", src.depth if depth is None else depth, src.depth, "depth")
    head_dim = src.embed_dim // src.num_heads
    if width % head_dim:
        raise ValueError(f"embed_dim ({width}) must be a multiple of the source head_dim ({head_dim}): "
                         "LEMON duplicates heads and keeps their dimension")
    if num_heads is None:
        num_heads = width // head_dim
    elif isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"num_heads must be a positive integer, got {num_heads!r}")
    elif width % num_heads:
        raise ValueError(f"num_heads ({num_heads}) must divide embed_dim ({width})")
    elif width // num_heads != head_dim:
        raise ValueError(f"num_heads ({num_heads}) gives head_dim {width // num_heads}, but LEMON keeps "
                         f"the source head_dim {head_dim}: use num_heads={width // head_dim}")
    mlp_ratio = src.mlp_ratio if mlp_ratio is None else mlp_ratio
    if isinstance(mlp_ratio, bool) or not isinstance(mlp_ratio, (int, float)) or mlp_ratio <= 0:
        raise ValueError(f"mlp_ratio must be a positive number, got {mlp_ratio!r}")
    if int(width * mlp_ratio) < src.mlp_hidden_dim:
        raise ValueError(f"the MLP hidden width int(embed_dim * mlp_ratio) = {int(width * mlp_ratio)} must be "
                         f">= the source's ({src.mlp_hidden_dim})")
    if src.num_classes == 0:
        raise ValueError("the source has no classifier head (num_classes=0): the expanded model would "
                         "output wider features, so its function cannot equal the source's")
    if width % src.embed_dim:
        if src.pre_norm:
            raise ValueError(f"pre_norm models expand losslessly only to a multiple of the source width "
                             f"({src.embed_dim}), got embed_dim={width}")
        if src.global_pool in ("max", "avgmax") and src.final_norm and src.use_fc_norm:
            raise ValueError(f"global_pool={src.global_pool!r} with fc_norm expands losslessly only to a "
                             f"multiple of the source width ({src.embed_dim}), got embed_dim={width}")
    c = (width // src.embed_dim) * src.embed_dim / width
    return src.replace(embed_dim=width, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
                       norm_eps=src.norm_eps * c)


# --------------------------------------------------------------------------------------
# width: the expansion rules
# --------------------------------------------------------------------------------------
def _residual_map(d: int, width: int) -> torch.Tensor:
    """Source feature of each residual-stream feature; -1 marks the pad (mean / zero)."""
    src = torch.arange(width) % d
    src[(width // d) * d:] = -1
    return src


def _average_features(t: torch.Tensor, res: torch.Tensor) -> torch.Tensor:
    """Residual-stream vectors (tokens, pos embed): copies, pad = mean over features."""
    out = t[..., res.clamp(min=0)].clone()
    out[..., res < 0] = t.mean(-1, keepdim=True)
    return out


def _write_residual(weight: torch.Tensor, bias: Optional[torch.Tensor], gamma: Optional[torch.Tensor],
                    res: torch.Tensor):
    """Fan-out into the residual stream: rows (and bias, layer scale) copied, pad rows give the
    mean over features of gamma * (weight @ x + bias)."""
    idx, pad = res.clamp(min=0), res < 0
    w = weight[idx].clone()
    b = None if bias is None else bias[idx].clone()
    g = None if gamma is None else gamma[idx].clone()
    if pad.any():
        scale = torch.ones_like(weight[:, 0]) if gamma is None else gamma
        rms = scale.pow(2).mean().sqrt()
        norm = rms if rms > 0 else torch.ones_like(rms)
        w[pad] = (scale[:, None] * weight).mean(0) / norm
        if b is not None:
            b[pad] = (scale * bias).mean() / norm
        if g is not None:
            g[pad] = rms
    return w, b, g


def _split_columns(weight: torch.Tensor, src: torch.Tensor, pad: str, gen: torch.Generator) -> torch.Tensor:
    """Fan-in: target column t reads a copy of source input src[t] (-1: pad). Each source
    weight is split into unequal random positive parts over its copies, summing to it; pad
    columns are random ('random', they read zeros) or zero ('zero', they read the mean)."""
    rows, valid = weight.shape[0], src >= 0
    idx = src.clamp(min=0)
    parts = torch.rand(rows, len(src), generator=gen, dtype=torch.float64) + 0.5
    parts[:, ~valid] = 0.0
    total = torch.zeros(rows, weight.shape[1], dtype=torch.float64).index_add_(1, idx, parts)
    fractions = (parts / total[:, idx]).to(weight)
    out = weight[:, idx] * fractions
    if pad == "random" and not valid.all():
        noise = torch.randn(rows, int((~valid).sum()), generator=gen, dtype=torch.float64).clamp_(-2, 2)
        out[:, ~valid] = (noise * _ARBITRARY_STD).to(weight)
    return out


def _layer_norm(weight: torch.Tensor, bias: torch.Tensor, res: torch.Tensor, c: float):
    """LayerNorm of the average-expanded stream -> zero-expanded LN output (eps scaled by c)."""
    idx, pad = res.clamp(min=0), res < 0
    w = weight[idx] * math.sqrt(c)
    w[pad] = weight.mean() * math.sqrt(c)  # multiplies (x - mu) = 0 on the pad: free, kept average
    b = bias[idx].clone()
    b[pad] = 0.0
    return w, b


def _expand_width(state: dict, src: ViTConfig, dst: ViTConfig, gen: torch.Generator) -> dict:
    d, width = src.embed_dim, dst.embed_dim
    c = (width // d) * d / width
    res = _residual_map(d, width)
    channels = torch.arange(width) % d  # attention output channels: heads duplicated cyclically
    hidden = torch.arange(dst.mlp_hidden_dim) % src.mlp_hidden_dim
    qkv_rows = torch.cat([part * d + channels for part in range(3)])
    take = state.get
    out = {}
    for key in ("cls_token", "reg_token", "pos_embed"):
        if key in state:
            out[key] = _average_features(state[key], res)
    w = state["patch_embed.proj.weight"]
    w_new, b_new, _ = _write_residual(w.flatten(1), take("patch_embed.proj.bias"), None, res)
    out["patch_embed.proj.weight"] = w_new.reshape(width, *w.shape[1:])
    if b_new is not None:
        out["patch_embed.proj.bias"] = b_new

    for name in _LAYER_NORMS:
        if f"{name}.weight" in state:
            out[f"{name}.weight"], out[f"{name}.bias"] = _layer_norm(
                state[f"{name}.weight"], state[f"{name}.bias"], res, c)

    for i in range(src.depth):
        p = f"blocks.{i}."
        for norm in ("norm1", "norm2"):
            out[p + norm + ".weight"], out[p + norm + ".bias"] = _layer_norm(
                state[p + norm + ".weight"], state[p + norm + ".bias"], res, c)
        out[p + "attn.qkv.weight"] = _split_columns(state[p + "attn.qkv.weight"][qkv_rows], res, "random", gen)
        if p + "attn.qkv.bias" in state:
            out[p + "attn.qkv.bias"] = state[p + "attn.qkv.bias"][qkv_rows]
        out[p + "mlp.fc1.weight"] = _split_columns(state[p + "mlp.fc1.weight"][hidden], res, "random", gen)
        if p + "mlp.fc1.bias" in state:
            out[p + "mlp.fc1.bias"] = state[p + "mlp.fc1.bias"][hidden]
        for layer, scale, inputs in (("attn.proj", "ls1.gamma", channels), ("mlp.fc2", "ls2.gamma", hidden)):
            w, b, g = _write_residual(state[p + layer + ".weight"], take(p + layer + ".bias"),
                                      take(p + scale), res)
            out[p + layer + ".weight"] = _split_columns(w, inputs, "zero", gen)
            if b is not None:
                out[p + layer + ".bias"] = b
            if g is not None:
                out[p + scale] = g

    # the head reads the final LayerNorm's zero-expanded output, or the residual stream itself
    out["head.weight"] = _split_columns(state["head.weight"], res, "random" if src.final_norm else "zero", gen)
    out["head.bias"] = state["head.bias"].clone()
    unknown = sorted(set(state) - set(out))
    if unknown:  # a parameter this module does not know how to expand: never drop it silently
        raise ValueError(f"lemon_expand does not know how to expand {unknown}")
    return out


# --------------------------------------------------------------------------------------
# depth
# --------------------------------------------------------------------------------------
def _expand_depth(state: dict, depth: int, new_depth: int, num_heads: int, depth_init: str,
                  gen: torch.Generator) -> dict:
    """Source block i is followed by its new zero-output blocks; extra blocks spread evenly."""
    out = {k: v for k, v in state.items() if not k.startswith("blocks.")}
    j = 0
    for i in range(depth):
        count = (i + 1) * new_depth // depth - i * new_depth // depth
        block = {k[len(f"blocks.{i}."):]: v for k, v in state.items() if k.startswith(f"blocks.{i}.")}
        for n in range(count):
            if n and depth_init == "cancel":
                new = _cancel_block(block, num_heads, gen)
            else:
                new = {key: torch.zeros_like(value) if n and key in ZERO_OUTPUT_KEYS else value
                       for key, value in block.items()}
            out.update({f"blocks.{j}.{key}": value for key, value in new.items()})
            j += 1
    return out


def _groups(units: list) -> list[list]:
    """Consecutive pairs of `units`; an odd count ends with a triple (one unit stays alone)."""
    groups = [units[i:i + 2] for i in range(0, len(units) - 1, 2)] or [list(units)]
    if len(units) % 2 and len(units) > 1:
        groups[-1].append(units[-1])
    return [g for g in groups if g]


def _units(n: int, null: bool) -> tuple[list[list[int]], list[int], list[int]]:
    """(cancelling groups, null units, source unit of each unit) for n units. With `null`, the
    last unit (the last two when only two exist) reads the LayerNorm's blind direction; group k
    copies source unit k."""
    units, nulls = list(range(n)), []
    if null:
        units, nulls = units[:-1], [n - 1]
        if len(units) == 1:
            units, nulls = [], units + nulls
    groups = _groups(units)
    source = [0] * n
    for k, group in enumerate(groups):
        for u in group:
            source[u] = k
    return groups, nulls, source


def _null_readout(weight: torch.Tensor, bias: torch.Tensor, reader_bias: bool):
    """(row r, reader bias, LayerNorm bias): r . LN(x) + reader bias = c * sum(x_hat) = 0 for
    every x (c sets rms(r) to the init std). Without a reader bias the LayerNorm bias is
    projected to r . b = 0 instead. None if a LayerNorm weight entry is zero."""
    w, b = weight.double(), bias.double()
    if not bool((w != 0).all()):
        return None
    inv = 1.0 / w
    r = inv * (_ARBITRARY_STD / inv.pow(2).mean().sqrt())
    if reader_bias:
        return r, -(r * b).sum(), b
    return r, None, b - (r * b).sum() / r.pow(2).sum() * r


def _random(shape, gen: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * _ARBITRARY_STD).to(like)


def _cancelling_fan_out(like: torch.Tensor, groups: list[list[int]], nulls: list[int], free_rows: list[int],
                        gen: torch.Generator) -> torch.Tensor:
    """An output weight shaped like `like` (features x units): random columns that sum to zero
    over every group (the last is minus the sum of the others, in the weight's dtype; a lone
    unit gets zeros), random columns for the null units, and random rows for `free_rows` (the
    features whose layer scale is zeroed)."""
    out = torch.zeros_like(like)
    rows = like.shape[0]
    for group in groups:
        if len(group) > 1:
            part = _random((rows, len(group) - 1), gen, like)
            out[:, group[:-1]] = part
            out[:, group[-1]] = -part.sum(1)
    if nulls:
        out[:, nulls] = _random((rows, len(nulls)), gen, like)
    if free_rows:
        out[free_rows] = _random((len(free_rows), like.shape[1]), gen, like)
    return out


def _free_features(gamma: Optional[torch.Tensor]) -> list[int]:
    """Layer-scale features given gamma = 0 and uncancelled output weights: those already at
    zero and the one with the smallest |gamma|."""
    if gamma is None:
        return []
    return sorted(set((gamma == 0).nonzero().flatten().tolist()) | {int(gamma.abs().argmin())})


def _cancel_block(state: dict, num_heads: int, gen: torch.Generator) -> dict:
    """depth_init="cancel": a new block built from a block's state_dict (same shapes) whose two
    residual branches add zero for every input while every parameter tensor has a non-zero
    gradient (see the module docstring). The inputs are not modified."""
    out = dict(state)
    width = state["norm1.weight"].numel()
    head_dim = width // num_heads

    # attention: units are the proj input channels h * head_dim + c
    read = _null_readout(state["norm1.weight"], state["norm1.bias"], "attn.qkv.bias" in state)
    if num_heads > 1:  # heads in groups (each head keeps a non-zero attention-map gradient)
        head_groups, _, head_source = _units(num_heads, False)
        groups = [[h * head_dim + c for h in group] for group in head_groups for c in range(head_dim)]
        nulls = [h * head_dim + head_dim - 1 for h in head_groups[-1]] if read else []
        groups = [g for g in groups if g[0] not in nulls]
        value_source = [head_source[h] * head_dim + c for h in range(num_heads) for c in range(head_dim)]
    else:  # one head: its value channels in groups
        head_source = [0]
        groups, nulls, value_source = _units(head_dim, read is not None)
    qk = [part * width + head_source[h] * head_dim + c for part in range(2) for h in range(num_heads)
          for c in range(head_dim)]
    rows = torch.tensor(qk + [2 * width + u for u in value_source])
    out["attn.qkv.weight"] = state["attn.qkv.weight"][rows].clone()
    if "attn.qkv.bias" in state:
        out["attn.qkv.bias"] = state["attn.qkv.bias"][rows].clone()
    _write_readout(out, "norm1", "attn.qkv", read, [2 * width + u for u in nulls])
    free = _free_features(state.get("ls1.gamma"))
    out["attn.proj.weight"] = _cancelling_fan_out(state["attn.proj.weight"], groups, nulls, free, gen)

    # MLP: units are the hidden neurons
    read = _null_readout(state["norm2.weight"], state["norm2.bias"], "mlp.fc1.bias" in state)
    groups, nulls, source = _units(state["mlp.fc1.weight"].shape[0], read is not None)
    out["mlp.fc1.weight"] = state["mlp.fc1.weight"][source].clone()
    if "mlp.fc1.bias" in state:
        out["mlp.fc1.bias"] = state["mlp.fc1.bias"][source].clone()
    _write_readout(out, "norm2", "mlp.fc1", read, nulls)
    free2 = _free_features(state.get("ls2.gamma"))
    out["mlp.fc2.weight"] = _cancelling_fan_out(state["mlp.fc2.weight"], groups, nulls, free2, gen)

    for key, zeroed in (("attn.proj.bias", None), ("mlp.fc2.bias", None), ("ls1.gamma", free), ("ls2.gamma", free2)):
        if key in state:
            value = torch.zeros_like(state[key]) if zeroed is None else state[key].clone()
            if zeroed:
                value[zeroed] = 0
            out[key] = value
    return out


def _write_readout(out: dict, norm: str, reader: str, read, rows: list[int]) -> None:
    """Null units: reader rows `rows` read the LayerNorm's blind direction (see _null_readout)."""
    if read is None or not rows:
        return
    r, bias, norm_bias = read
    weight = out[reader + ".weight"]
    weight[rows] = r.to(weight)
    if bias is not None:
        out[reader + ".bias"][rows] = bias.to(weight)
    else:
        out[norm + ".bias"] = norm_bias.to(out[norm + ".bias"])


def _get_param(module: nn.Module, key: str) -> Optional[torch.Tensor]:
    owner, _, name = key.rpartition(".")
    return getattr(module.get_submodule(owner), name)
