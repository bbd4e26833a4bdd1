"""Weighted k-NN classification of frozen features, with the semantics of the official eval_knn.py.

Features are L2-normalised; each test image takes its k most cosine-similar training images, each neighbour votes
for its label with weight exp(similarity / T), and the class with the largest sum wins (Wu et al. 2018, used by DINO
with k = 20, T = 0.07). Top-5 counts the five largest sums (min(5, k) when k < 5).

Differences from the official script, on purpose: test images are processed in fixed-size chunks (the official
`num_test_images // 100` chunk becomes 0 and crashes below 100 test images), and everything stays on the accelerator.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def l2_normalize(x, eps=1e-12):
  """x / max(||x||, eps) along the last axis, like torch.nn.functional.normalize."""
  x = jnp.asarray(x, jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


@functools.partial(jax.jit, static_argnames=("k", "num_classes"))
def _knn_chunk(test_feats, train_feats, train_labels, *, k, num_classes, temperature):
  sim = test_feats @ train_feats.T                          # [n, N]
  dist, idx = jax.lax.top_k(sim, k)                          # sorted, largest first
  neighbours = train_labels[idx]                             # [n, k]
  weights = jnp.exp(dist / temperature)
  votes = jnp.sum(jax.nn.one_hot(neighbours, num_classes) * weights[..., None], axis=1)   # [n, C]
  return jax.lax.top_k(votes, min(5, k, num_classes))[1]     # predicted classes, best first


def knn_classifier(train_features, train_labels, test_features, test_labels, k=20, temperature=0.07,
                   num_classes=None, chunk_size=256, normalize=True):
  """Returns (top1, top5) accuracy in percent.

  Args:
    train_features: [N, D]; train_labels: [N] ints in [0, num_classes); test_features: [M, D]; test_labels: [M].
    normalize: L2-normalise the features first (the official pipeline normalises once after extraction).
  """
  train_labels = np.asarray(train_labels)
  test_labels = np.asarray(test_labels)
  if num_classes is None:
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
  if k > len(train_labels):
    raise ValueError(f"k={k} exceeds the number of training features ({len(train_labels)})")
  train = l2_normalize(train_features) if normalize else jnp.asarray(train_features, jnp.float32)
  test = l2_normalize(test_features) if normalize else jnp.asarray(test_features, jnp.float32)
  train_labels_d = jnp.asarray(train_labels, jnp.int32)
  top1 = top5 = 0
  n5 = min(5, k)
  for start in range(0, len(test_labels), chunk_size):
    preds = np.asarray(_knn_chunk(test[start:start + chunk_size], train, train_labels_d, k=k,
                                  num_classes=num_classes, temperature=temperature))
    target = test_labels[start:start + chunk_size, None]
    top1 += int(np.sum(preds[:, :1] == target))
    top5 += int(np.sum(preds[:, :n5] == target))
  total = len(test_labels)
  return 100.0 * top1 / total, 100.0 * top5 / total
