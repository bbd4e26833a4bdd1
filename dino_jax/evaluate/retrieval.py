"""Image retrieval with frozen features: mean average precision and recall@k, relevance = the same class folder.

  python -m dino_jax.evaluate --workdir=runs/x --retrieval --query=DIR --gallery=DIR [--multiscale]

Each image goes through the evaluation transform (resize the shorter side to eval.resize_size, centre crop
eval.image_size), the backbone in eval mode gives its features, L2-normalised. With `multiscale`, as the official
eval_image_retrieval.py, the features of the image rescaled by 1, 1/sqrt(2) and 1/2 (bilinear, no antialiasing, like
F.interpolate) are averaged and then normalised; for a ViT each rescaled side is rounded down to a multiple of the
patch size (the official patch embedding drops the remainder the same way, pixel rows at the border aside).
Gallery images are ranked by cosine similarity to each query.

- AP of a query: the mean, over its relevant gallery images, of the precision at the rank of each; mAP averages it
  over the queries that have at least one relevant image.
- recall@k: the share of queries with at least one relevant image among the k most similar (the metric-learning
  convention, e.g. R@1 on CUB), and precision@k (mP@k): the mean share of relevant images among the k most similar.
When the query and gallery sets are the same source, each query's own image is left out of its ranking.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dino_jax.evaluate import features as feats_lib
from dino_jax.evaluate.knn import l2_normalize
from dino_jax.models import compute_dtype
from dino_jax.state import backbone_graphdef_of

MULTISCALE = (1.0, 1 / math.sqrt(2), 0.5)


def make_multiscale_feature_fn(graphdef, mean, std, dtype=jnp.float32, scales=MULTISCALE, multiple=1):
  """jitted (params, batch_stats, uint8 images) -> the average of the features at each scale, float32 [B, D]."""

  @jax.jit
  def features(params, batch_stats, images):
    model = nnx.merge(graphdef, params, batch_stats)
    x = feats_lib.normalize_images(images, mean, std, jnp.float32)
    b, h, w, c = x.shape
    total = 0.0
    for s in scales:
      size = (max(multiple, int(h * s) // multiple * multiple), max(multiple, int(w * s) // multiple * multiple))
      xs = x if size == (h, w) else jax.image.resize(x, (b, *size, c), "linear", antialias=False)
      total = total + model(xs.astype(dtype), rng=None, train=False).astype(jnp.float32)
    return total / len(scales)

  return features


@functools.partial(jax.jit, static_argnames=("ks",))
def _rank_chunk(queries, gallery, query_labels, gallery_labels, query_ids, gallery_ids, *, ks):
  sim = queries @ gallery.T                                             # [q, G]
  sim = jnp.where(query_ids[:, None] == gallery_ids[None, :], -jnp.inf, sim)  # self-matches out (ids -1: none)
  order = jnp.argsort(-sim, axis=1, stable=True)
  valid = jnp.take_along_axis(sim, order, axis=1) > -jnp.inf
  hits = (gallery_labels[order] == query_labels[:, None]) & valid      # relevance in rank order
  n_rel = hits.sum(axis=1)
  precision = jnp.cumsum(hits, axis=1) / jnp.arange(1, hits.shape[1] + 1)
  ap = jnp.sum(precision * hits, axis=1) / jnp.maximum(n_rel, 1)
  recall = jnp.stack([jnp.any(hits[:, :k], axis=1) for k in ks], axis=1)
  hits_k = jnp.stack([jnp.sum(hits[:, :k], axis=1) for k in ks], axis=1)     # counts: exact percentages below
  return ap, n_rel, recall, hits_k


def retrieval_metrics(query_features, query_labels, gallery_features, gallery_labels, *, ks=(1, 5, 10),
                      same_set=False, chunk_size=256, normalize=True) -> dict:
  """{'mAP', 'recall@k', 'precision@k' (percent), 'queries' (with a relevant image)} for the ranking of the gallery
  by cosine similarity; `same_set`: queries and gallery are the same images, each query's own left out."""
  q = l2_normalize(query_features) if normalize else jnp.asarray(query_features, jnp.float32)
  g = l2_normalize(gallery_features) if normalize else jnp.asarray(gallery_features, jnp.float32)
  ql, gl = jnp.asarray(query_labels, jnp.int32), jnp.asarray(gallery_labels, jnp.int32)
  n = len(query_labels)
  qid = jnp.arange(n, dtype=jnp.int32) if same_set else jnp.full((n,), -1, jnp.int32)
  gid = jnp.arange(len(gallery_labels), dtype=jnp.int32) if same_set else jnp.full((len(gallery_labels),), -2,
                                                                                        jnp.int32)
  ks = tuple(k for k in ks if k <= len(gallery_labels))
  parts = [jax.device_get(_rank_chunk(q[i:i + chunk_size], g, ql[i:i + chunk_size], gl, qid[i:i + chunk_size], gid,
                                      ks=ks)) for i in range(0, n, chunk_size)]
  ap, n_rel, recall, prec = (np.concatenate(x).astype(np.float64) for x in zip(*parts))
  n_rel = n_rel.astype(np.int64)
  has = n_rel > 0
  if not has.any():
    raise ValueError("no query has a relevant gallery image (same class): check the class folders")
  out = {"mAP": 100.0 * float(ap[has].mean()), "queries": int(has.sum()), "gallery": int(len(gallery_labels))}
  for j, k in enumerate(ks):
    out[f"recall@{k}"] = 100.0 * float(recall[has, j].mean())
    out[f"precision@{k}"] = 100.0 * float(prec[has, j].mean()) / k
  return out


def retrieval_eval(config, backbone_params, backbone_stats, query_source, gallery_source, *, multiscale=False,
                   same_set=False, ks=(1, 5, 10), mesh=None, progress=None) -> dict:
  """retrieval_metrics of the backbone's features of two labelled sources (see the module docstring)."""
  e = config.eval
  graphdef = backbone_graphdef_of(config)
  dtype = compute_dtype(config.model)
  if multiscale:
    multiple = config.model.patch_size if config.model.arch.startswith("vit") else 1
    feature_fn = make_multiscale_feature_fn(graphdef, config.aug.mean, config.aug.std, dtype, multiple=multiple)
  else:
    feature_fn = feats_lib.make_feature_fn(graphdef, config.aug.mean, config.aug.std, dtype)
  kw = dict(image_size=e.image_size, resize_size=e.resize_size, batch_size=e.batch_size, mesh=mesh,
            **feats_lib.data_options(config))
  bar = progress or (lambda desc: None)
  fq, yq = feats_lib.extract_features(feature_fn, backbone_params, backbone_stats, query_source,
                                      progress=bar("features query"), **kw)
  if same_set:
    fg, yg = fq, yq
  else:
    fg, yg = feats_lib.extract_features(feature_fn, backbone_params, backbone_stats, gallery_source,
                                        progress=bar("features gallery"), **kw)
  out = retrieval_metrics(fq, yq, fg, yg, ks=ks, same_set=same_set)
  out["multiscale"] = bool(multiscale)
  return out


def format_retrieval(results: dict) -> str:
  models = [m for m in ("teacher", "random_init") if m in results]
  cols = [k for k in results[models[0]] if k == "mAP" or k.startswith(("recall@", "precision@"))]
  head = f"{'retrieval (%)':<16}" + "".join(f"{c:>14}" for c in cols)
  lines = [head, "-" * len(head)]
  for m in models:
    lines.append(f"{m:<16}" + "".join(f"{results[m][c]:>14.2f}" for c in cols))
  r = results[models[0]]
  lines.append(f"({r['queries']} queries, {r['gallery']} gallery images{', multi-scale' if r['multiscale'] else ''})")
  return "\n".join(lines)
