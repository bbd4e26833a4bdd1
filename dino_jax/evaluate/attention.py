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


def _readable(src, index, crop, on_bad_image):
  """crop(src[index]), or with on_bad_image='skip' that of the next readable image (the training policy)."""
  import logging  # noqa: PLC0415
  from dino_jax.data.multicrop import BadImageError  # noqa: PLC0415
  for i in range(index, index + len(src)):
    try:
      return crop(src[i % len(src)])
    except BadImageError as e:
      if on_bad_image != "skip":
        raise
      logging.warning("attention maps: skipping unreadable image (on_bad_image=skip): %s", e)
  raise ValueError(f"no readable image in {src!r}")


def evaluation_maps(config, state, n_images):
  """(images uint8 [n, H, W, 3], maps [n, heads, h, w]): `n_images` evaluation images spread over
  eval.test_source (or train_source), centre-cropped as the k-NN sees them, unreadable ones replaced by the next
  readable one under data.on_bad_image=skip, and the [CLS] maps of the evaluated network's last block."""
  import jax  # noqa: PLC0415
  from dino_jax import methods  # noqa: PLC0415
  from dino_jax.data import sources  # noqa: PLC0415
  from dino_jax.data.multicrop import CenterCrop  # noqa: PLC0415
  e = config.eval
  src = sources.get_source(e.test_source or e.train_source, data_dir=config.data.data_dir)
  crop = CenterCrop(e.image_size, e.resize_size, interpolation=config.crops.interpolation)
  picks = np.linspace(0, len(src) - 1, n_images).astype(int)
  images = np.stack([_readable(src, int(i), crop, config.data.on_bad_image)["image"] for i in picks])
  params, stats = jax.device_get(methods.get(config.method).evaluated(state))
  return images, cls_attention_maps(config, params["backbone"], (stats or {}).get("backbone", {}), images)
