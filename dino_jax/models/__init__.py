"""Backbones (ViT-T/S/B, ResNet-50) and heads (DINO, SwAV) with the official architectures."""
import jax.numpy as jnp
from flax import nnx

from dino_jax.models.heads import DINOHead, SwAVHead
from dino_jax.models.resnet import ResNet, resnet50
from dino_jax.models.vit import REMAT_POLICIES, VisionTransformer, vit_base, vit_small, vit_tiny
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

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def compute_dtype(model_config):
  """The compute dtype named by `config.model.dtype` (parameters stay float32)."""
  if model_config.dtype not in DTYPES:
    raise ValueError(f"config.model.dtype={model_config.dtype!r}; expected one of {sorted(DTYPES)}")
  return DTYPES[model_config.dtype]


def backbone_from_config(model_config, rngs, *, student: bool):
  """The backbone `config.model` names; stochastic depth only on the student (official)."""
  m = model_config
  return build_backbone(m.arch, patch_size=m.patch_size, drop_path_rate=m.drop_path_rate if student else 0.0,
                        dtype=compute_dtype(m), rngs=rngs, remat=m.get("remat", "none"), **dict(m.overrides))


def with_head(model_config, rngs, head):
  """MultiCropWrapper(backbone from `config.model`, head(embed_dim, dtype)): a method's trained network."""
  backbone = backbone_from_config(model_config, rngs, student=True)
  return MultiCropWrapper(backbone, head(backbone.embed_dim, compute_dtype(model_config)))


def split(module):
  """(graphdef, params, batch_stats) with params and batch_stats as pure dicts."""
  graphdef, params, stats = nnx.split(module, nnx.Param, nnx.BatchStat)
  return graphdef, params.to_pure_dict(), stats.to_pure_dict()


def merge(graphdef, params, batch_stats):
  return nnx.merge(graphdef, params, batch_stats)


__all__ = ["BACKBONES", "DTYPES", "backbone_from_config", "compute_dtype", "merge", "split", "with_head", "DINOHead", "MultiCropWrapper", "ResNet", "SwAVHead", "VisionTransformer",
           "build_backbone", "resnet50", "vit_base", "vit_small", "vit_tiny"]
