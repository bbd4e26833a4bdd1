"""Backbones (ViT-T/S/B, ResNet-50) and heads (DINO, SwAV) with the official architectures."""
import jax.numpy as jnp

from dino_jax.models.heads import DINOHead, SwAVHead
from dino_jax.models.resnet import ResNet, resnet50
from dino_jax.models.vit import VisionTransformer, vit_base, vit_small, vit_tiny
from dino_jax.models.wrapper import MultiCropWrapper

_VITS = {"vit_tiny": vit_tiny, "vit_small": vit_small, "vit_base": vit_base}
BACKBONES = (*_VITS, "resnet50", "resnet")


def build_backbone(name, *, patch_size=16, drop_path_rate=0.0, dtype=jnp.float32, rngs, **overrides):
  """Backbone by name. `overrides` (depth, embed_dim, num_heads, img_size, attention_impl, ...)
  shrink or tune a ViT. ResNet-50 has no stochastic depth: like main_dino.py, which passes
  --drop_path_rate only to ViTs, it ignores `drop_path_rate` (and `patch_size`)."""
  if name in _VITS:
    return _VITS[name](patch_size=patch_size, drop_path_rate=drop_path_rate, dtype=dtype, rngs=rngs,
                       **overrides)
  if name == "resnet50":
    return resnet50(dtype=dtype, rngs=rngs, **overrides)
  if name == "resnet":  # any depth/width of the same bottleneck family, e.g. small CPU models
    return ResNet(dtype=dtype, rngs=rngs, **overrides)
  raise ValueError(f"unknown backbone {name!r}; valid names: {', '.join(BACKBONES)}")


__all__ = ["BACKBONES", "DINOHead", "MultiCropWrapper", "ResNet", "SwAVHead", "VisionTransformer",
           "build_backbone", "resnet50", "vit_base", "vit_small", "vit_tiny"]
