"""Vision Transformer built only on `incubation.ops`, with timm's constructor arguments and
state_dict keys identical to `timm.models.vision_transformer.VisionTransformer`.

Fusions used in a block (pre-norm):
    h         = layer_norm(x)                                   (norm1)
    branch    = linear(attn(h), proj, layer_scale=ls1)          (bias + layer scale epilogue)
    h, x      = add_layer_norm(drop_path(branch), x)            (residual add fused with norm2)
    x         = linear(linear(h, fc1, "gelu"), fc2, layer_scale=ls2, residual=x)
When dropout or drop-path is active the last residual add is done outside the kernel.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, fields
from typing import Optional, Sequence, Union

import torch
from timm.data import IMAGENET_DEFAULT_MEAN as IMAGENET_MEAN
from timm.data import IMAGENET_DEFAULT_STD as IMAGENET_STD
from torch import nn
from torch.utils.checkpoint import checkpoint

from .. import ops
from ..utils import memory_bytes

__all__ = ["ViTConfig", "VisionTransformer", "train_flops_per_image", "TRAIN_FLOPS_PER_FORWARD", "Block", "Attention", "Mlp", "LayerScale",
           "PatchEmbed", "LayerNorm", "DropPath"]

POOLS = ("", "token", "avg", "avgmax", "max")


def _pair(v) -> tuple[int, int]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _int_pair(v) -> Optional[tuple[int, int]]:
    """(h, w) from an int or a pair of ints (a JSON list too) all >= 1, else None."""
    pair = (v, v) if _is_int(v) else tuple(v) if isinstance(v, (tuple, list)) and len(v) == 2 else ()
    return tuple(int(i) for i in pair) if pair and all(_is_int(i) and i >= 1 for i in pair) else None


@dataclass
class ViTConfig:
    """The constructor arguments of VisionTransformer (a subset of timm's), serialisable."""
    img_size: Union[int, tuple] = 224
    patch_size: Union[int, tuple] = 16
    in_chans: int = 3
    num_classes: int = 1000
    global_pool: str = "token"
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    proj_bias: bool = True
    init_values: Optional[float] = None
    class_token: bool = True
    no_embed_class: bool = False
    reg_tokens: int = 0
    pre_norm: bool = False
    final_norm: bool = True
    fc_norm: Optional[bool] = None
    pool_include_prefix: bool = False
    drop_rate: float = 0.0
    pos_drop_rate: float = 0.0
    proj_drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    norm_eps: float = 1e-6

    def __post_init__(self):
        errors = []
        sizes = {name: _int_pair(getattr(self, name)) for name in ("img_size", "patch_size")}
        for name, pair in sizes.items():
            if pair is None:
                errors.append(f"{name} must be a positive int or a pair of them, got {getattr(self, name)!r}")
            else:
                setattr(self, name, pair)
        for name in ("in_chans", "embed_dim", "depth", "num_heads"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                errors.append(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("num_classes", "reg_tokens"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 0:
                errors.append(f"{name} must be an integer >= 0, got {getattr(self, name)!r}")
        for name in ("qkv_bias", "proj_bias", "class_token", "no_embed_class", "pre_norm", "final_norm",
                     "pool_include_prefix"):
            if not isinstance(getattr(self, name), bool):   # a string "False" would be truthy
                errors.append(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.fc_norm is not None and not isinstance(self.fc_norm, bool):
            errors.append(f"fc_norm must be None, True or False, got {self.fc_norm!r}")
        if _is_int(self.embed_dim) and _is_int(self.num_heads) and self.num_heads > 0 \
                and self.embed_dim % self.num_heads:
            errors.append(f"embed_dim ({self.embed_dim}) must be divisible by num_heads ({self.num_heads})")
        if None not in sizes.values():
            for i, s in zip(self.img_size, self.patch_size):
                if s < 1 or i < s or i % s:
                    errors.append(f"img_size {self.img_size} must be a positive multiple of patch_size "
                                  f"{self.patch_size}")
                    break
        if not isinstance(self.global_pool, str) or self.global_pool not in POOLS:
            errors.append(f"global_pool must be one of {POOLS} (timm's 'map'/'prr' are not supported), "
                          f"got {self.global_pool!r}")
        if self.global_pool == "token" and self.class_token is False:
            errors.append("global_pool='token' needs class_token=True")
        if not _is_real(self.mlp_ratio) or self.mlp_ratio <= 0:
            errors.append(f"mlp_ratio must be a finite number > 0, got {self.mlp_ratio!r}")
        elif _is_int(self.embed_dim) and int(self.embed_dim * self.mlp_ratio) < 1:
            # timm would build a 0-unit MLP that cannot hold weights (to_timm then fails)
            errors.append(f"mlp_ratio {self.mlp_ratio} gives int(embed_dim * mlp_ratio) = "
                          f"{int(self.embed_dim * self.mlp_ratio)} hidden units; it needs at least 1")
        if self.init_values is not None and not _is_real(self.init_values):
            errors.append(f"init_values must be None or a finite number, got {self.init_values!r}")
        if not _is_real(self.norm_eps) or self.norm_eps <= 0:
            errors.append(f"norm_eps must be a finite number > 0, got {self.norm_eps!r}")
        for name in ("drop_rate", "pos_drop_rate", "proj_drop_rate", "attn_drop_rate", "drop_path_rate"):
            value = getattr(self, name)
            if not _is_real(value) or not 0.0 <= value < 1.0:
                errors.append(f"{name} must be a number in [0, 1), got {value!r}")
        if _is_real(self.attn_drop_rate) and self.attn_drop_rate > 0:
            errors.append("attn_drop_rate > 0 is not supported (the fused attention has no dropout)")
        if errors:
            raise ValueError("invalid ViT config: " + "; ".join(errors))

    def check_fits_in_memory(self) -> None:
        """Refuse sizes whose float32 parameters alone exceed this machine's memory, naming the
        sizes, rather than fail in the allocator (VisionTransformer calls it, except on meta)."""
        memory, count = memory_bytes(), self.num_params()
        if memory is None or 4 * count <= memory:
            return
        d, grid = self.embed_dim, "x".join(map(str, self.grid_size))
        parts = {f"embed_dim={d}, depth={self.depth}, mlp_ratio={self.mlp_ratio} (the blocks)": self.depth * d * d,
                 f"num_classes={self.num_classes} (the head)": self.num_classes * d,
                 f"img_size={self.img_size}, patch_size={self.patch_size} ({grid} patches, pos_embed)":
                     self.num_patches * d,
                 f"in_chans={self.in_chans}, patch_size={self.patch_size} (patch_embed)":
                     self.in_chans * math.prod(self.patch_size) * d}
        raise ValueError(f"invalid ViT config: {count:.3g} parameters, {4 * count / 2 ** 30:.3g} GiB in float32, "
                         f"more than this machine's memory ({memory / 2 ** 30:.3g} GiB); most of them from "
                         f"{max(parts, key=parts.get)}")

    def num_params(self) -> int:
        """The parameter count of VisionTransformer(self), from the sizes alone (nothing built)."""
        d, h, bias = self.embed_dim, self.mlp_hidden_dim, int(self.proj_bias)
        block = (4 * d + 3 * d * d + 3 * d * int(self.qkv_bias) + d * d + d * bias   # norms, attention
                 + 2 * d * h + (h + d) * bias + 2 * d * int(bool(self.init_values)))  # mlp, layer scales
        embed_len = self.num_patches + (0 if self.no_embed_class else self.num_prefix_tokens)
        stem = d * (self.in_chans * math.prod(self.patch_size) + int(not self.pre_norm)
                    + self.num_prefix_tokens + embed_len)
        norms = 2 * d * (int(self.pre_norm) + int(self.final_norm))
        return self.depth * block + stem + norms + (d + 1) * self.num_classes

    @property
    def use_fc_norm(self) -> bool:
        return self.global_pool in ("avg", "avgmax", "max") if self.fc_norm is None else self.fc_norm

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.class_token) + self.reg_tokens

    @property
    def grid_size(self) -> tuple[int, int]:
        """Patches per column and per row."""
        return self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1]

    @property
    def num_patches(self) -> int:
        return math.prod(self.grid_size)

    @property
    def mlp_hidden_dim(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)

    def flops_per_image(self) -> int:
        """2 x multiply-adds of one forward pass (the matmuls and attention)."""
        n = self.num_patches + self.num_prefix_tokens
        d, h = self.embed_dim, self.mlp_hidden_dim
        per_block = 2 * n * (3 * d * d + d * d + 2 * d * h) + 4 * n * n * d
        stem = 2 * self.num_patches * d * self.in_chans * math.prod(self.patch_size)
        return self.depth * per_block + stem + 2 * d * self.num_classes

    def to_dict(self) -> dict:
        d = asdict(self)
        d["img_size"], d["patch_size"] = list(self.img_size), list(self.patch_size)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ViTConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown ViT config keys: {unknown}")
        return cls(**d)

    def replace(self, **changes) -> "ViTConfig":
        return ViTConfig.from_dict({**self.to_dict(), **changes})


def default_pretrained_cfg(config: ViTConfig) -> dict:
    """timm's `pretrained_cfg` for a model trained here: its own input size, and the ImageFolder
    evaluation transform of `incubation.data` (bilinear resize, 0.875 centre crop, ImageNet
    mean/std; for other than 3 channels the channel average of those, once per channel)."""
    c = config.in_chans
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if c == 3 else \
        ((sum(IMAGENET_MEAN) / 3,) * c, (sum(IMAGENET_STD) / 3,) * c)
    return dict(input_size=(c, *config.img_size), fixed_input_size=True, interpolation="bilinear",
                crop_pct=0.875, crop_mode="center", mean=tuple(mean), std=tuple(std),
                first_conv="patch_embed.proj", classifier="head")


def _take_indices(n: int, indices: Union[int, Sequence[int], None]) -> tuple[list[int], int]:
    """Block indices for forward_intermediates (timm's rule): None = all, an int k = the last k,
    a sequence = those (negative ones count from the end). Returns (indices, the largest)."""
    if indices is None:
        indices = n
    if isinstance(indices, int):
        if not 0 < indices <= n:
            raise ValueError(f"last-n indices ({indices}) must be in 1..{n}")
        take = list(range(n - indices, n))
    else:
        take = [i + n if i < 0 else i for i in indices]
        if not take or any(not 0 <= i < n for i in take):
            raise ValueError(f"block indices {list(indices)} must be in -{n}..{n - 1} (and not empty)")
    return take, max(take)


# A training image costs its forward pass plus a backward pass of about twice that (gradients
# with respect to the inputs and to the weights).
TRAIN_FLOPS_PER_FORWARD = 3


def train_flops_per_image(model) -> float:
    """Training FLOPs of one image for a model (or a ViTConfig): its own
    train_flops_per_image() where it knows better (a hybrid's frozen blocks skip the weight
    gradients), else TRAIN_FLOPS_PER_FORWARD x its forward FLOPs."""
    own = getattr(model, "train_flops_per_image", None)
    if callable(own):
        return float(own())
    return float(TRAIN_FLOPS_PER_FORWARD * model.flops_per_image())


def _trunc_normal_(t: torch.Tensor, std: float = 0.02) -> torch.Tensor:
    return nn.init.trunc_normal_(t, std=std, a=-2.0, b=2.0)


def _init_linear(m: nn.Linear) -> None:
    _trunc_normal_(m.weight)
    if m.bias is not None:
        nn.init.zeros_(m.bias)


class DropPath(nn.Module):
    """Stochastic depth per sample (timm semantics: survivors scaled by 1/keep_prob)."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f}"


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm (same parameters) computed by `ops.layer_norm`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.layer_norm(x, self.weight, self.bias, self.eps)


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_values: float = 1e-5):
        super().__init__()
        self.init_values = init_values
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


def _gamma(ls: nn.Module) -> Optional[torch.Tensor]:
    return ls.gamma if isinstance(ls, LayerScale) else None


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens: a conv with stride = kernel, as timm's. (Run as a GEMM
    over unfolded patches through `ops.linear` it was slower on the CPU: the unfold copy and a
    GEMM against oneDNN's convolution, 0.75 ms of the demo's 40 ms forward at batch 128.)"""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, bias=True):
        super().__init__()
        self.img_size, self.patch_size = _pair(img_size), _pair(patch_size)
        self.grid_size = (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, self.patch_size, stride=self.patch_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.proj.in_channels or tuple(x.shape[2:]) != self.img_size:
            raise ValueError(f"expected images of shape (B, {self.proj.in_channels}, {self.img_size[0]}, "
                             f"{self.img_size[1]}), got {tuple(x.shape)}")
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, proj_bias: bool = True,
                 proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        """Multi-head attention up to (not including) the output projection: (B, N, C)."""
        B, N, C = x.shape
        qkv = ops.linear(x, self.qkv.weight, self.qkv.bias)
        q, k, v = qkv.reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        # q, k, v are strided views the kernels read in place; on the Triton backend the output's
        # memory is (B, N, H, D), so merging the heads back is a view, not a copy
        return ops.attention(q, k, v).transpose(1, 2).reshape(B, N, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj_drop(ops.linear(self.attend(x), self.proj.weight, self.proj.bias))


class Mlp(nn.Module):
    def __init__(self, in_features: int, hidden_features: int, bias: bool = True, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_features, in_features, bias=bias)
        self.drop2 = nn.Dropout(drop)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop1(ops.linear(x, self.fc1.weight, self.fc1.bias, "gelu"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(ops.linear(self.hidden(x), self.fc2.weight, self.fc2.bias))


class Block(nn.Module):
    """timm's pre-norm block: x + drop_path(ls1(attn(norm1(x)))), then the same with the MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = False,
                 proj_bias: bool = True, proj_drop: float = 0.0, init_values: Optional[float] = None,
                 drop_path: float = 0.0, norm_eps: float = 1e-6):
        super().__init__()
        self.norm1 = LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias, proj_drop=proj_drop)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), bias=proj_bias, drop=proj_drop)  # timm: proj_bias too
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path)

    def _stochastic(self) -> bool:
        return self.training and (self.drop_path1.drop_prob > 0 or self.attn.proj_drop.p > 0)   # else: identities, not called

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attn, mlp, stochastic = self.attn, self.mlp, self._stochastic()
        branch = ops.linear(attn.attend(self.norm1(x)), attn.proj.weight, attn.proj.bias,
                            layer_scale=_gamma(self.ls1))
        h, x = ops.add_layer_norm(self.drop_path1(attn.proj_drop(branch)) if stochastic else branch, x,
                                  self.norm2.weight, self.norm2.bias, self.norm2.eps)
        hidden = mlp.hidden(h)
        if stochastic:
            out = ops.linear(hidden, mlp.fc2.weight, mlp.fc2.bias, layer_scale=_gamma(self.ls2))
            return x + self.drop_path2(mlp.drop2(out))
        return ops.linear(hidden, mlp.fc2.weight, mlp.fc2.bias, layer_scale=_gamma(self.ls2), residual=x)


class VisionTransformer(nn.Module):
    """ViT with timm's arguments and state_dict keys (see `ViTConfig` for what is supported).

    Stages, used by Deep Incubation to cut the model into modules:
        embed(images) -> tokens (B, N, D); blocks (nn.Sequential); head(tokens) -> logits
    """

    def __init__(self, config: Optional[ViTConfig] = None, **kwargs):
        super().__init__()
        if config is not None and kwargs:
            raise TypeError("pass either a ViTConfig or keyword arguments, not both")
        if config is None:
            unknown = sorted(set(kwargs) - {f.name for f in fields(ViTConfig)})
            if unknown:
                raise TypeError(f"VisionTransformer got unsupported arguments {unknown}; "
                                f"supported: {[f.name for f in fields(ViTConfig)]}")
            config = ViTConfig(**kwargs)
        if torch.empty(0).device.type != "meta":
            config.check_fits_in_memory()
        self.config = c = config
        self.num_classes, self.embed_dim, self.global_pool = c.num_classes, c.embed_dim, c.global_pool
        self.num_prefix_tokens = c.num_prefix_tokens

        self.patch_embed = PatchEmbed(c.img_size, c.patch_size, c.in_chans, c.embed_dim, bias=not c.pre_norm)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.embed_dim)) if c.class_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, c.reg_tokens, c.embed_dim)) if c.reg_tokens else None
        embed_len = c.num_patches + (0 if c.no_embed_class else c.num_prefix_tokens)
        self.pos_embed = nn.Parameter(torch.zeros(1, embed_len, c.embed_dim))
        self.pos_drop = nn.Dropout(c.pos_drop_rate)
        self.norm_pre = LayerNorm(c.embed_dim, eps=c.norm_eps) if c.pre_norm else nn.Identity()
        # timm's stochastic depth rule (on the CPU: the model may be built under torch.device('meta'))
        rates = torch.linspace(0, c.drop_path_rate, c.depth, device="cpu").tolist()
        self.blocks = nn.Sequential(*[
            Block(c.embed_dim, c.num_heads, c.mlp_ratio, c.qkv_bias, c.proj_bias, c.proj_drop_rate,
                  c.init_values, rates[i], c.norm_eps) for i in range(c.depth)])
        use_fc_norm = c.use_fc_norm
        self.norm = LayerNorm(c.embed_dim, eps=c.norm_eps) if c.final_norm and not use_fc_norm else nn.Identity()
        self.fc_norm = LayerNorm(c.embed_dim, eps=c.norm_eps) if c.final_norm and use_fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(c.drop_rate)
        self.head = nn.Linear(c.embed_dim, c.num_classes) if c.num_classes > 0 else nn.Identity()
        self.grad_checkpointing = False
        self.pretrained_cfg = default_pretrained_cfg(c)  # from_timm copies the timm model's
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """timm's default ('') init: trunc-normal(0.02) linears and pos embed, tiny tokens."""
        _trunc_normal_(self.pos_embed)
        for token in (self.cls_token, self.reg_token):
            if token is not None:
                nn.init.normal_(token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                _init_linear(m)
            elif isinstance(m, nn.Conv2d):
                m.reset_parameters()
            elif isinstance(m, nn.LayerNorm):
                m.reset_parameters()
            elif isinstance(m, LayerScale):
                nn.init.constant_(m.gamma, m.init_values)

    # -- stages -------------------------------------------------------------------------
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> tokens (B, prefix + patches, D), before the first block."""
        x = self.patch_embed(x)
        prefix = [t.expand(x.shape[0], -1, -1) for t in (self.cls_token, self.reg_token) if t is not None]
        if self.config.no_embed_class:
            x = torch.cat(prefix + [x + self.pos_embed], dim=1)
        else:
            x = torch.cat(prefix + [x], dim=1) + self.pos_embed
        return self.norm_pre(self.pos_drop(x))

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        pool = self.global_pool
        if pool == "token":
            return x[:, 0]
        if pool:
            x = x if self.config.pool_include_prefix else x[:, self.num_prefix_tokens:]
            if pool == "avg":
                return x.mean(dim=1)
            if pool == "max":
                return x.amax(dim=1)
            return 0.5 * (x.amax(dim=1) + x.mean(dim=1))  # avgmax
        return x

    def head_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens after the last block -> logits (final norm, pooling, fc_norm, head)."""
        return self.forward_head(self.norm(x))

    def forward_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens through every block (each one checkpointed after `set_grad_checkpointing()`)."""
        if not (self.grad_checkpointing and torch.is_grad_enabled()):
            return self.blocks(x)
        for block in self.blocks:
            x = self._run_block(block, x)
        return x

    def _run_block(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled():
            # non-reentrant; the RNG state is restored for the recompute, so drop-path masks repeat
            return checkpoint(block, x, use_reentrant=False, preserve_rng_state=True)
        return block(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.forward_blocks(self.embed(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(self.fc_norm(self.pool(x)))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def flops_per_image(self) -> int:
        return self.config.flops_per_image()

    # -- timm's model interface ---------------------------------------------------------
    @property
    def default_cfg(self) -> dict:
        """timm's older name for `pretrained_cfg`."""
        return self.pretrained_cfg

    @default_cfg.setter
    def default_cfg(self, cfg: dict) -> None:
        self.pretrained_cfg = cfg

    def no_weight_decay(self) -> set[str]:
        """Names of the parameters kept out of weight decay: the position embedding and the prefix
        tokens this model has (timm's set also names tokens it lacks, which changes nothing)."""
        return {name for name in ("pos_embed", "cls_token", "reg_token") if getattr(self, name, None) is not None}

    def group_matcher(self, coarse: bool = False) -> dict:
        """Parameter-name patterns for timm's layer-wise groups (the same as timm's ViT): the stem,
        one group per block, the final norm last; the head falls into timm's trailing group."""
        return dict(stem=r"^cls_token|reg_token|pos_embed|patch_embed|norm_pre",
                    blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass instead of keeping its activations."""
        self.grad_checkpointing = enable

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """A fresh head of `num_classes` outputs (0: none), initialised like ours, and optionally a new
        pooling. `config` records both; the final norm stays where it was (as in timm)."""
        changes = dict(num_classes=num_classes)
        if global_pool is not None:
            changes.update(global_pool=global_pool, fc_norm=not isinstance(self.fc_norm, nn.Identity))
        self.config = self.config.replace(**changes)  # raises before anything changes
        self.num_classes, self.global_pool = self.config.num_classes, self.config.global_pool
        p = next(self.parameters())
        head = nn.Identity()
        if num_classes > 0:
            head = nn.Linear(self.embed_dim, num_classes, device=p.device, dtype=p.dtype)
            _init_linear(head)
        self.head = head.train(self.training)

    def forward_intermediates(self, x: torch.Tensor, indices: Union[int, Sequence[int], None] = None,
                              return_prefix_tokens: bool = False, norm: bool = False, stop_early: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False,
                              output_dict: bool = False):
        """timm's forward_intermediates: the outputs of the blocks picked by `indices` (None: all, an int
        k: the last k, a list: those), patch tokens only, as (B, D, H, W) or (B, L, D) (`output_fmt`);
        with `return_prefix_tokens` each is a (patches, prefix tokens) pair; `norm` applies the final
        norm to them. Returns (final features, intermediates), or only the list, or timm's dict."""
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take, last = _take_indices(len(self.blocks), indices)
        B = x.shape[0]
        x = self.embed(x)
        intermediates = []
        for i, block in enumerate(self.blocks[:last + 1] if stop_early else self.blocks):
            x = self._run_block(block, x)
            if i in take:
                intermediates.append(self.norm(x) if norm else x)
        n = self.num_prefix_tokens
        prefix = [y[:, :n] for y in intermediates] if n else None
        intermediates = [y[:, n:] for y in intermediates]
        if output_fmt == "NCHW":
            h, w = self.patch_embed.grid_size
            intermediates = [y.reshape(B, h, w, y.shape[-1]).permute(0, 3, 1, 2).contiguous()
                             for y in intermediates]
        if output_dict:
            out = {"image_intermediates": intermediates}
            if prefix is not None and return_prefix_tokens:
                out["image_intermediates_prefix"] = prefix
            if not intermediates_only:
                out["image_features"] = self.norm(x)
            return out
        if return_prefix_tokens and prefix is not None:
            intermediates = list(zip(intermediates, prefix))
        return intermediates if intermediates_only else (self.norm(x), intermediates)

    def prune_intermediate_layers(self, indices: Union[int, Sequence[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the blocks after the last of `indices` (and the final norm / the head if asked), as
        timm does; `config` is updated to describe what is left. Returns the absolute indices."""
        take, last = _take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:last + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.fc_norm = nn.Identity()
            self.reset_classifier(0, "")
        no_norm, no_fc_norm = isinstance(self.norm, nn.Identity), isinstance(self.fc_norm, nn.Identity)
        # the kept blocks' drop-path rates are linspace(0, r_last, last + 1), the config's rule
        self.config = self.config.replace(depth=last + 1, drop_path_rate=self.blocks[-1].drop_path1.drop_prob,
                                          final_norm=not (no_norm and no_fc_norm), fc_norm=not no_fc_norm)
        return take
