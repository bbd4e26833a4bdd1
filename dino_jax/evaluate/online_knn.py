"""k-NN accuracy during training, every `config.eval.every_epochs` epochs, so a collapsing run shows early.

The same evaluation as at the end of training (`evaluate.run.knn_eval`: the evaluated network's backbone in eval
mode, the official weighted k-NN, the jitted feature function sharded over the mesh), on fixed random subsets of
`config.eval.{train,test}_source` of at most `eval.online_train_samples` / `eval.online_test_samples` images (0: all),
drawn once from `config.seed`. The numbers are logged as 'knn/k<k>/top1' and 'knn/k<k>/top5' (e.g. 'knn/k20/top1') to every writer.
Off (`every_epochs=0`) in the ImageNet recipes, where one pass costs minutes; on in the quickstarts.
"""
from __future__ import annotations

import numpy as np

from dino_jax import methods
from dino_jax.data import sources
from dino_jax.evaluate import features as feats_lib
from dino_jax.models import compute_dtype
from dino_jax.state import backbone_graphdef_of


class Subset:
  """Records `indices` of `source`, in that order (a source itself: len, getitem, num_classes, a stable repr)."""

  def __init__(self, source, indices):
    self.source, self.indices = source, np.asarray(indices, np.int64)
    self.num_classes = getattr(source, "num_classes", None)

  def __len__(self):
    return len(self.indices)

  def __getitem__(self, i):
    return self.source[int(self.indices[i])]

  def __repr__(self):
    return f"Subset({self.source!r}, n={len(self.indices)})"


def subsample(source, n, seed):
  """At most `n` records of `source` (0 or n >= len: all of them), the same for the same seed, in source order."""
  if not n or n >= len(source):
    return source
  return Subset(source, np.sort(np.random.default_rng(seed).choice(len(source), int(n), replace=False)))


class OnlineKnn:
  """`due(step)` at the end of every `every_epochs`-th epoch; `__call__(state)` -> {'knn/k20/top1': .., ...}."""

  def __init__(self, config, steps_per_epoch, mesh=None):
    e = config.eval
    self.config, self.mesh = config, mesh
    self.every = int(e.get("every_epochs", 0) or 0) * steps_per_epoch if e.test_source else 0
    self._data = None

  def due(self, step) -> bool:
    return bool(self.every) and step % self.every == 0

  def _prepare(self):
    c, e = self.config, self.config.eval
    train = subsample(sources.get_source(e.train_source, data_dir=c.data.data_dir), e.online_train_samples, c.seed)
    test = subsample(sources.get_source(e.test_source, data_dir=c.data.data_dir), e.online_test_samples, c.seed + 1)
    feature_fn = feats_lib.make_feature_fn(backbone_graphdef_of(c), c.aug.mean, c.aug.std, compute_dtype(c.model))
    ks = tuple(k for k in e.knn_k if k <= len(train))
    self._data = train, test, feature_fn, ks

  def __call__(self, state) -> dict:
    from dino_jax.evaluate import run as eval_run  # noqa: PLC0415 (run imports linear, not needed before)
    if self._data is None:
      self._prepare()
    train, test, feature_fn, ks = self._data
    params, stats = methods.get(self.config.method).evaluated(state)
    results = eval_run.knn_eval(self.config, params["backbone"], (stats or {}).get("backbone", {}), mesh=self.mesh,
                                sources_=(train, test), feature_fn=feature_fn, ks=ks, show_progress=False)
    # 'k20', not eval.json's 'k=20': TensorBoard tags cannot hold '='
    return {f"knn/{k.replace('=', '')}/{m}": v[m] for k, v in results.items() for m in ("top1", "top5")}


def describe(epoch, scalars) -> str:
  """'epoch 5: online k-NN top-1 k=10 71.4%, k=20 70.8%' for the console."""
  parts = [f"k={key.split('/')[1][1:]} {v:.1f}%" for key, v in scalars.items() if key.startswith("knn/") and
           key.endswith("/top1")]
  return f"epoch {epoch:g}: online k-NN top-1 " + ", ".join(parts)
