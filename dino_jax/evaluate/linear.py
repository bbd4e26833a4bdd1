"""Linear probe on frozen features, with the semantics of the official eval_linear.py.

- Features: for a ViT, the [CLS] token after each of the last `n_last_blocks` blocks (each through the final norm),
  concatenated; with `avgpool` (the official choice for ViT-B, n_last_blocks = 1) the mean of the last block's patch
  tokens is added, interleaved element by element with the [CLS] features exactly as the official
  `cat((cls[..., None], avg[..., None]), -1).reshape(B, -1)` lays them out (so official linear weights line up). A
  ResNet gives its pooled 2048-d output. The backbone is in eval mode and gets no gradient.
- Classifier: one Linear layer, weight ~ N(0, 0.01), bias 0 (the official LinearClassifier).
- Training: cross-entropy, SGD momentum 0.9 without weight decay, lr = `lr` x batch / 256, cosine annealing to 0
  stepped once per epoch (torch CosineAnnealingLR), `epochs` epochs of RandomResizedCrop(image_size) (scale
  `crop_scale`, 0.08-1 by default, bilinear, as torchvision's defaults) + horizontal flip (`flip`); validation on the
  centre crop (resize `resize_size`, bicubic) every `val_freq` epochs and after the last; the official script
  reports the best top-1 over those validations ('top1_best' here), the last one is 'top1'.

Differences kept on purpose: each epoch drops the last incomplete batch (the official DistributedSampler pads it);
the validation features are computed once, since the backbone is frozen and the centre crop deterministic (same
numbers, one backbone pass instead of one per validation).
"""
from __future__ import annotations

import copy
import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from dino_jax import sharding
from dino_jax.data import pipeline, sources
from dino_jax.evaluate import features as feats_lib
from dino_jax.models import compute_dtype
from dino_jax.state import backbone_graphdef_of

def linear_config(config) -> ml_collections.ConfigDict:
  """config.eval.linear checked against the official eval_linear.py defaults (configs/common.linear_defaults: batch
  128 per GPU x 8 GPUs, ...) and completed with those it lacks."""
  from configs import common  # noqa: PLC0415 (the one source of defaults)
  c = common.linear_defaults()
  for key, value in config.eval.linear.items():
    if key not in c:
      raise ValueError(f"config.eval.linear.{key}: unknown key (valid: {', '.join(sorted(c))})")
    c[key] = tuple(value) if isinstance(c[key], tuple) else value
  return c


def probe_features(model, images, *, n_last_blocks: int, avgpool: bool):
  """[B, D'] float32 probe features of normalised images [B, H, W, 3] (see the module docstring)."""
  if not hasattr(model, "get_intermediate_layers"):
    return model(images, rng=None, train=False).astype(jnp.float32)
  outs = model.get_intermediate_layers(images, n_last_blocks)
  cls = jnp.concatenate([o[:, 0] for o in outs], axis=-1)
  if avgpool:
    if n_last_blocks != 1:
      raise ValueError(f"avgpool=True needs n_last_blocks=1 (got {n_last_blocks}): the official concatenation of the "
                       "pooled patch tokens only works for one block")
    pooled = jnp.mean(outs[-1][:, 1:], axis=1)
    cls = jnp.stack([cls, pooled], axis=-1).reshape(cls.shape[0], -1)
  return cls.astype(jnp.float32)


def init_classifier(key, dim: int, num_labels: int) -> dict:
  """{'kernel': [dim, num_labels] ~ N(0, 0.01), 'bias': zeros} (the official LinearClassifier)."""
  return {"kernel": 0.01 * jax.random.normal(key, (dim, num_labels), jnp.float32),
          "bias": jnp.zeros((num_labels,), jnp.float32)}


def classifier_lr(peak_lr: float, epochs: int, steps_per_epoch: int):
  """step -> the lr of CosineAnnealingLR(T_max=epochs, eta_min=0), held constant within each epoch."""
  def lr(step):
    epoch = jnp.minimum(step // steps_per_epoch, epochs)
    return peak_lr * 0.5 * (1.0 + jnp.cos(jnp.pi * epoch / epochs))
  return lr


def classifier_tx(peak_lr: float, epochs: int, steps_per_epoch: int) -> optax.GradientTransformation:
  """SGD momentum 0.9 (PyTorch's: buffer = m * buffer + g, the first buffer = g), no weight decay, on
  `classifier_lr`."""
  return optax.sgd(classifier_lr(peak_lr, epochs, steps_per_epoch), momentum=0.9)


def classifier_update(classifier, opt_state, feats, labels, tx):
  """One SGD step of the classifier on features [B, D] and integer labels [B]: (classifier, opt_state, loss)."""
  def loss_fn(p):
    logits = feats @ p["kernel"] + p["bias"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  loss, grads = jax.value_and_grad(loss_fn)(classifier)
  updates, opt_state = tx.update(grads, opt_state, classifier)
  return optax.apply_updates(classifier, updates), opt_state, loss


def accuracy(logits: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
  """(top-1, top-5) in percent; top-5 is top-min(5, classes)."""
  k = min(5, logits.shape[1])
  top = np.argsort(-logits, axis=1)[:, :k]
  hit = top == labels[:, None]
  return 100.0 * float(hit[:, 0].mean()), 100.0 * float(hit.any(axis=1).mean())


def _probe_geometry(config, lin, image_size):
  """The training config of the probe's data stream: one RandomResizedCrop(image_size) + flip per image."""
  c = copy.deepcopy(config)
  with c.unlocked():
    c.batch_size = int(lin.batch_size)
    c.crops.global_number, c.crops.global_size, c.crops.global_scale = 1, int(image_size), tuple(lin.crop_scale)
    c.crops.local_number = 0
    c.crops.interpolation = "bilinear"
    c.crops.flip = bool(lin.flip)
    c.data.crop_on = "cpu"  # the probe's step reads crops, not images
  return c


def linear_probe(config, backbone_params, backbone_stats, *, mesh=None, progress=None, feature_fn=None) -> dict:
  """Trains the official linear classifier on config.eval.train_source and validates on config.eval.test_source.

  `feature_fn(params, stats, uint8 images) -> [B, D]` replaces the backbone's probe features (the raw pixels of
  evaluate.pixels: the baseline a table's features must beat).

  Returns {'top1', 'top5' (after the last epoch), 'top1_best' (the official report), 'epochs', 'lr', 'batch_size',
  'n_last_blocks', 'avgpool', 'feature_dim', 'history': [{'epoch', 'lr' (the classifier's lr in that epoch),
  'loss', 'top1', 'top5'}, ...]}.
  """
  e, lin = config.eval, linear_config(config)
  mesh = mesh or sharding.make_mesh()
  train_src = sources.get_source(e.train_source, data_dir=config.data.data_dir)
  test_src = sources.get_source(e.test_source, data_dir=config.data.data_dir)
  num_labels = train_src.num_classes
  if not num_labels:
    raise ValueError(f"linear probe: {e.train_source!r} has no class labels (config.eval.train_source must be "
                     "labelled, e.g. an imagefolder with class sub-folders)")

  graphdef = backbone_graphdef_of(config)
  mean, std, dtype = config.aug.mean, config.aug.std, compute_dtype(config.model)
  kw = dict(n_last_blocks=int(lin.n_last_blocks), avgpool=bool(lin.avgpool))

  @jax.jit
  def features(params, stats, images):
    model = nnx.merge(graphdef, params, stats)
    return probe_features(model, feats_lib.normalize_images(images, mean, std, dtype), **kw)

  if feature_fn is not None:
    features = feature_fn

  test_f, test_y = feats_lib.extract_features(features, backbone_params, backbone_stats, test_src,
                                              image_size=e.image_size, resize_size=e.resize_size,
                                              batch_size=e.batch_size, mesh=mesh, progress=progress,
                                              **feats_lib.data_options(config))
  dim = test_f.shape[1]

  probe_cfg = _probe_geometry(config, lin, e.image_size)
  spe = pipeline.steps_per_epoch(train_src, probe_cfg)
  peak_lr = float(lin.lr) * int(lin.batch_size) / 256.0
  tx = classifier_tx(peak_lr, int(lin.epochs), spe)
  lr_at = classifier_lr(peak_lr, int(lin.epochs), spe)
  classifier = init_classifier(jax.random.key(int(lin.seed)), dim, num_labels)
  opt_state = tx.init(classifier)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(classifier, opt_state, params, stats, images, labels):
    f = jax.lax.stop_gradient(features(params, stats, images))
    return classifier_update(classifier, opt_state, f, labels, tx)

  ds = pipeline.make_train_dataset(train_src, probe_cfg, seed=int(lin.seed), process_index=jax.process_index(),
                                   process_count=jax.process_count())
  history, val_freq = [], max(int(lin.val_freq), 1)
  it = iter(ds)
  try:
    epochs = range(int(lin.epochs))
    for epoch in (progress(epochs) if progress else epochs):
      losses = []
      for _ in range(spe):
        batch = next(it)
        g = sharding.global_batch({"image": batch["global"][:, 0], "label": batch["label"]}, mesh)
        classifier, opt_state, loss = step(classifier, opt_state, backbone_params, backbone_stats, g["image"],
                                           g["label"])
        losses.append(loss)
      record = {"epoch": epoch, "lr": float(lr_at(epoch * spe)), "loss": float(np.mean(jax.device_get(losses)))}
      if epoch % val_freq == 0 or epoch == int(lin.epochs) - 1:
        c = jax.device_get(classifier)
        record["top1"], record["top5"] = accuracy(test_f @ c["kernel"] + c["bias"], test_y)
      history.append(record)
  finally:
    if hasattr(it, "close"):
      it.close()
  validated = [h for h in history if "top1" in h]
  if not validated:
    raise ValueError(f"config.eval.linear.epochs={lin.epochs}: nothing was trained")
  last = validated[-1]
  if not math.isfinite(last["loss"]):
    raise FloatingPointError(f"linear probe: non-finite loss at epoch {last['epoch']}")
  return {"top1": last["top1"], "top5": last["top5"], "top1_best": max(h["top1"] for h in validated),
          "epochs": int(lin.epochs), "lr": float(lin.lr), "batch_size": int(lin.batch_size),
          "n_last_blocks": int(lin.n_last_blocks), "avgpool": bool(lin.avgpool), "feature_dim": int(dim),
          "history": history}
