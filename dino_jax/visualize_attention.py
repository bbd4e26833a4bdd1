r"""Self-attention maps of a ViT on any photo, as the official visualize_attention.py draws them.

  python -m dino_jax.visualize_attention --workdir=runs/x --image=photo.jpg --out=attention/
  python -m dino_jax.visualize_attention --pth=dino_deitsmall16_pretrain.pth --config=configs/dino_vit_small16.py \
      --image=photo.jpg --out=attention/ [--image_size=480 --threshold=0.6]

The photo is resized to --image_size (bilinear, torchvision's Resize default) and cropped to a multiple of the patch
size; the backbone (the run's teacher, or the official file's weights) gives the [CLS] token's attention over the
patches in each head of its last block. Written to --out:
  img.png                     the image the network saw
  attn-head<j>.png            head j's map, each patch upsampled to its pixels (nearest)
  mask_th<t>_head<j>.png      the image with head j's mask overlaid: the patches of largest attention holding a
                              fraction t (--threshold, 0.6 officially) of the head's attention mass, and its outline
  heads.png                   all of the above in one figure
"""
from __future__ import annotations

import os

import numpy as np
from absl import app, flags
from ml_collections import config_flags

def _define_flags():
  # Defined when run as a program, not on import: dino_jax.train defines --config and --workdir in the same process.
  flags.DEFINE_string("workdir", None, "Run directory written by dino_jax.train (its teacher is drawn).")
  flags.DEFINE_integer("step", None, "With --workdir: checkpoint step (default: latest).")
  flags.DEFINE_string("pth", None, "An official .pth (backbone or training checkpoint); needs --config.")
  config_flags.DEFINE_config_file("config", None, "With --pth: the recipe of the weights (configs/*.py).",
                                  lock_config=True)
  flags.DEFINE_string("checkpoint_key", "teacher", "With --pth: the network of a training file.")
  flags.DEFINE_string("image", None, "The photo (any format PIL reads).", required=True)
  flags.DEFINE_string("out", "attention", "Output folder.")
  flags.DEFINE_list("image_size", ["480"], "Resize to S (square) or H,W before cropping to the patch.")
  flags.DEFINE_float("threshold", 0.6, "Fraction of each head's attention mass the mask keeps (0: none).")


def load_image(path, size, patch):
  """uint8 [H, W, 3]: the photo resized to `size` ((H, W), bilinear) and cropped to multiples of `patch`."""
  from PIL import Image  # noqa: PLC0415
  h, w = size
  image = np.asarray(Image.open(path).convert("RGB").resize((w, h), Image.BILINEAR))
  return image[:h - h % patch, :w - w % patch]


def threshold_masks(maps, threshold):
  """[heads, h, w] bool: per head, the patches of largest attention whose mass, as a fraction of the head's total,
  reaches `threshold`: in ascending order, a patch is kept when the cumulative share up to it exceeds 1 - threshold
  (the official rule)."""
  heads = maps.shape[0]
  flat = maps.reshape(heads, -1).astype(np.float64)
  order = np.argsort(flat, axis=1, kind="stable")
  share = np.take_along_axis(flat, order, axis=1)
  share /= share.sum(axis=1, keepdims=True)
  keep_sorted = np.cumsum(share, axis=1) > 1.0 - threshold
  keep = np.zeros_like(keep_sorted)
  np.put_along_axis(keep, order, keep_sorted, axis=1)
  return keep.reshape(maps.shape)


def upsample(maps, patch):
  """[..., h, w] -> [..., h*p, w*p], each patch's value over its pixels (nearest)."""
  return np.repeat(np.repeat(maps, patch, axis=-2), patch, axis=-1)


def overlay(image, mask, colour, alpha=0.5):
  """uint8 image with `colour` blended at `alpha` where `mask` holds."""
  out = image.astype(np.float32)
  m = mask[..., None].astype(np.float32) * alpha
  return np.clip(out * (1 - m) + np.asarray(colour, np.float32) * 255.0 * m, 0, 255).astype(np.uint8)


def backbone_from_pth(pth, config, checkpoint_key="teacher"):
  """(params, batch_stats) of `config`'s backbone with the official file's weights."""
  from flax import nnx  # noqa: PLC0415
  from dino_jax import models  # noqa: PLC0415
  from dino_jax.interop import torch as interop  # noqa: PLC0415
  backbone = models.backbone_from_config(config.model, nnx.Rngs(0), student=False)
  interop.import_checkpoint(backbone, interop.load_pth(pth), checkpoint_key=checkpoint_key)
  _, params, stats = models.split(backbone)
  return params, stats


def backbone_from_run(workdir, step=None):
  """(config, params, batch_stats) of the backbone a run's evaluations read (the teacher of DINO)."""
  from dino_jax.checkpoint import load_run  # noqa: PLC0415
  from dino_jax.evaluate import run as eval_run  # noqa: PLC0415
  config, state = load_run(workdir, step)
  params, stats = eval_run.backbones(config, state, compare_random_init=False)["teacher"]
  return config, params, stats


def visualize(config, params, stats, image_path, out, *, image_size=(480, 480), threshold=0.6):
  """Writes the PNGs of the module docstring into `out`; returns (image, maps [heads, h, w], masks or None, paths)."""
  from dino_jax.evaluate.attention import cls_attention_maps  # noqa: PLC0415
  import matplotlib  # noqa: PLC0415
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  patch = config.model.patch_size
  image = load_image(image_path, image_size, patch)
  maps = cls_attention_maps(config, params, stats, image[None])[0]           # [heads, h, w]
  masks = threshold_masks(maps, threshold) if threshold else None
  os.makedirs(out, exist_ok=True)
  paths = [os.path.join(out, "img.png")]
  plt.imsave(paths[0], image)
  colours = plt.get_cmap("tab10").colors
  heads = maps.shape[0]
  rows = 3 if masks is not None else 2
  fig, axes = plt.subplots(rows, heads, figsize=(2.2 * heads, 2.2 * rows), squeeze=False)
  for j in range(heads):
    big = upsample(maps[j], patch)
    paths.append(os.path.join(out, f"attn-head{j}.png"))
    plt.imsave(paths[-1], big, format="png")
    axes[0, j].imshow(image)
    axes[1, j].imshow(big)
    axes[1, j].set_title(f"head {j}", fontsize=8)
    if masks is not None:
      big_mask = upsample(masks[j], patch)
      shown = overlay(image, big_mask, colours[j % len(colours)])
      single = plt.figure(figsize=(image.shape[1] / 100, image.shape[0] / 100), dpi=100)
      ax = single.add_axes((0, 0, 1, 1))
      for a in (ax, axes[2, j]):
        a.imshow(shown)
        a.contour(big_mask.astype(float), levels=[0.5], colors=[colours[j % len(colours)]], linewidths=1)
      ax.axis("off")
      paths.append(os.path.join(out, f"mask_th{threshold:g}_head{j}.png"))
      single.savefig(paths[-1])
      plt.close(single)
  for a in axes.ravel():
    a.axis("off")
  fig.suptitle(f"[CLS] attention of the last block{f', masks keeping {threshold:.0%} of the mass' if threshold else ''}",
               fontsize=9)
  fig.tight_layout()
  paths.append(os.path.join(out, "heads.png"))
  fig.savefig(paths[-1], dpi=100)
  plt.close(fig)
  return image, maps, masks, paths


def writer_images(config, state, n_images=4) -> dict:
  """{'attention': uint8 [H, W, 3]} for the metric writers at the end of training: a row per evaluation image (of
  eval.test_source), the image then each head's [CLS] map of the evaluated network's last block; {} for a non-ViT."""
  if not config.model.arch.startswith("vit") or not (config.eval.test_source or config.eval.train_source):
    return {}
  import matplotlib  # noqa: PLC0415
  from dino_jax.evaluate.attention import evaluation_maps  # noqa: PLC0415
  images, maps = evaluation_maps(config, state, n_images)
  maps = maps / np.maximum(maps.max(axis=(2, 3), keepdims=True), 1e-12)
  coloured = (matplotlib.colormaps["inferno"](upsample(maps, config.model.patch_size))[..., :3] * 255).astype(np.uint8)
  rows = [np.concatenate([images[r], *coloured[r]], axis=1) for r in range(len(images))]
  return {"attention": np.concatenate(rows, axis=0)}


def main(argv):
  del argv
  from dino_jax import console  # noqa: PLC0415
  console.quiet_logging()
  f = flags.FLAGS
  if bool(f.workdir) == bool(f.pth):
    raise app.UsageError("give either --workdir=RUN or --pth=FILE --config=configs/<recipe>.py")
  if f.pth:
    if f.config is None:
      raise app.UsageError("--pth needs --config=configs/<recipe>.py (the architecture of the weights)")
    config = f.config
    params, stats = backbone_from_pth(f.pth, config, f.checkpoint_key)
  else:
    config, params, stats = backbone_from_run(f.workdir, f.step)
  if not config.model.arch.startswith("vit"):
    raise app.UsageError(f"config.model.arch={config.model.arch!r}: attention maps need a ViT")
  size = [int(s) for s in f.image_size]
  size = (size[0], size[0]) if len(size) == 1 else tuple(size)
  *_, paths = visualize(config, params, stats, f.image, f.out, image_size=size, threshold=f.threshold)
  for p in paths:
    print(p)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
