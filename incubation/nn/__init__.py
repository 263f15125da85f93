"""Model building blocks on `incubation.ops`, state_dict-compatible with timm."""
from .vit import (
                  Attention,
                  Block,
                  DropPath,
                  LayerNorm,
                  LayerScale,
                  Mlp,
                  PatchEmbed,
                  VisionTransformer,
                  ViTConfig,
                  train_flops_per_image,
)

__all__ = ["Attention", "Block", "DropPath", "LayerNorm", "LayerScale", "Mlp", "PatchEmbed",
           "ViTConfig", "VisionTransformer", "train_flops_per_image"]
