r"""The raw-pixel baseline: the same weighted k-NN as the features' (T, k, L2-normalised, the evaluation transform
at config.eval.image_size), on the flattened images instead of a network's features. What a table's trained
network must beat for its features to add anything.

  python -m dino_jax.evaluate.pixels --config=configs/quickstart.py [--nonormalize]

By default the pixels are normalised with config.aug's mean and std, as the network sees them; --nonormalize uses
the images in [0, 1].
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from absl import app, flags

from dino_jax.evaluate import features as feats_lib


def make_pixel_fn(mean, std, normalize: bool = True):
  """A feature function with the backbones' signature, (params, batch_stats, uint8 images) -> [B, H*W*C] float32;
  params and batch_stats are ignored."""

  @jax.jit
  def pixels(params, batch_stats, images):
    del params, batch_stats
    x = feats_lib.normalize_images(images, mean, std) if normalize else images.astype(jnp.float32) / 255.0
    return x.reshape(x.shape[0], -1)

  return pixels


def pixel_knn(config, *, mesh=None, normalize: bool = True) -> dict:
  """{'k=20': {'top1', 'top5'}, ...}: config.eval's k-NN on the raw pixels of config.eval.{train,test}_source."""
  from dino_jax.evaluate import run as eval_run  # noqa: PLC0415 (run imports this module)
  fn = make_pixel_fn(config.aug.mean, config.aug.std, normalize)
  return eval_run.knn_eval(config, {}, {}, mesh=mesh, desc="pixels", feature_fn=fn)


_CONFIG = None


def main(argv):
  del argv
  from dino_jax.evaluate import run as eval_run  # noqa: PLC0415
  config = _CONFIG.value
  results = {"pixels": pixel_knn(config, normalize=_NORMALIZE.value)}
  print(eval_run.format_results(results))


if __name__ == "__main__":
  from ml_collections import config_flags  # noqa: PLC0415
  _CONFIG = config_flags.DEFINE_config_file("config", None, "Recipe file (configs/*.py).", lock_config=True)
  _NORMALIZE = flags.DEFINE_bool("normalize", True, "Normalise the pixels with config.aug.mean/std.")
  flags.mark_flags_as_required(["config"])
  app.run(main)
