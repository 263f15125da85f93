"""incubation: train large Vision Transformers cheaply by divide and conquer.

Deep Incubation (meta model -> modules incubated independently -> assembled), model growth
(LEMON, Apollo), on fused Triton / CUDA / C++ kernels reached through `incubation.ops`.
"""
__version__ = "0.1.0"  # before the imports: incubation.dispatch reads it

from . import ops
from .nn import Attention, Block, LayerScale, Mlp, PatchEmbed, VisionTransformer, ViTConfig
from .timm_compat import from_timm, to_timm

__all__ = ["ops", "Attention", "Block", "LayerScale", "Mlp", "PatchEmbed", "ViTConfig",
           "VisionTransformer", "from_timm", "to_timm", "__version__"]
