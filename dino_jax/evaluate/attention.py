"""Self-attention maps of a trained ViT: the [CLS] token's attention over the patches in the last block.

What the DINO paper shows (and the official visualize_attention.py draws): one map per head, [n, heads, h, w], from
the teacher's backbone in eval mode.
"""
from __future__ import annotations

import numpy as np
from flax import nnx

from dino_jax.evaluate.features import normalize_images
from dino_jax.models import compute_dtype
from dino_jax.state import backbone_graphdef_of


def cls_attention_maps(config, backbone_params, backbone_stats, images) -> np.ndarray:
  """[n, heads, H/p, W/p] float32 attention weights of [CLS] over the patches (uint8 images [n, H, W, 3]).

  Each map sums to 1 minus the [CLS] token's attention to itself.
  """
  graphdef = backbone_graphdef_of(config)
  model = nnx.merge(graphdef, backbone_params, backbone_stats)
  if not hasattr(model, "get_last_selfattention"):
    raise ValueError(f"config.model.arch={config.model.arch!r}: attention maps need a ViT backbone")
  x = normalize_images(images, config.aug.mean, config.aug.std, compute_dtype(config.model))
  attn = np.asarray(model.get_last_selfattention(x), np.float32)      # [n, heads, 1+N, 1+N]
  p = config.model.patch_size
  h, w = images.shape[1] // p, images.shape[2] // p
  return attn[:, :, 0, 1:].reshape(attn.shape[0], attn.shape[1], h, w)
