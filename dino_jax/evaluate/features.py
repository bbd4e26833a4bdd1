"""Frozen-backbone features of a labelled source, for k-NN (and linear) evaluation.

Images go through the official evaluation transform (resize the shorter side, centre crop; done on CPU by
`data.pipeline.make_eval_dataset`), are normalised on the accelerator, and the backbone runs in eval mode (ResNet
BatchNorm uses its running statistics, as `model.eval()` does in eval_knn.py).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from dino_jax import sharding
from dino_jax.data import pipeline


def normalize_images(images, mean, std, dtype=jnp.float32):
  x = images.astype(jnp.float32) / 255.0
  return ((x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)).astype(dtype)


def make_feature_fn(graphdef, mean, std, dtype=jnp.float32):
  """jitted (params, batch_stats, uint8 images) -> float32 features of the backbone in eval mode."""

  @jax.jit
  def features(params, batch_stats, images):
    model = nnx.merge(graphdef, params, batch_stats)
    return model(normalize_images(images, mean, std, dtype), rng=None, train=False).astype(jnp.float32)

  return features


def data_options(config) -> dict:
  """The input settings of `config.data` that every evaluation dataset honours (workers, unreadable images)."""
  return {"num_workers": config.data.num_workers, "on_bad_image": config.data.on_bad_image}


def extract_features(feature_fn, params, batch_stats, source, *, image_size, resize_size, batch_size, mesh=None,
                     progress=None, num_workers=0, on_bad_image="fail"):
  """(features [N, D] float32 numpy, labels [N] int numpy) for every readable image of `source`, each exactly once
  (with on_bad_image='skip', unreadable ones are left out and named in the log)."""
  mesh = mesh or sharding.make_mesh()
  ds = pipeline.make_eval_dataset(source, image_size=image_size, resize_size=resize_size, batch_size=batch_size,
                                  process_index=jax.process_index(), process_count=jax.process_count(),
                                  num_workers=num_workers, on_bad_image=on_bad_image)
  feats, labels = [], []
  it = iter(ds)
  try:
    for batch in (progress(it) if progress else it):
      images = sharding.global_batch({"image": batch["image"]}, mesh)["image"]
      out = feature_fn(params, batch_stats, images)
      valid = np.asarray(batch.get("mask", np.ones(len(batch["label"]), bool)), bool)
      label = np.asarray(batch["label"])
      if jax.process_count() > 1:  # every process gets every feature, in the global batch order
        out, valid, label = (multihost_utils.process_allgather(x, tiled=True) for x in (out, valid, label))
      feats.append(np.asarray(out)[valid])
      labels.append(label[valid])
  finally:
    if hasattr(it, "close"):
      it.close()
  return np.concatenate(feats), np.concatenate(labels)
