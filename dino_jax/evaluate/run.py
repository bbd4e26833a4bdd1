"""Evaluate a train state: weighted k-NN of the trained network's backbone (the teacher's, for a method with one),
and the method's own end-of-training checks (DINO: the entropy of the teacher's output).

Used at the end of training and by `python -m dino_jax.evaluate --workdir=DIR`.
"""
from __future__ import annotations

import jax
from flax import nnx

from dino_jax import methods
from dino_jax.data import sources
from dino_jax.evaluate import features as feats_lib
from dino_jax.evaluate import knn as knn_lib
from dino_jax.evaluate import linear, pixels
from dino_jax.models import compute_dtype
from dino_jax.state import backbone_graphdef_of, build_model, split_model


def progress(desc):
  from tqdm import tqdm  # noqa: PLC0415
  return lambda it: tqdm(it, desc=desc, leave=False, disable=jax.process_index() != 0)


def knn_eval(config, backbone_params, backbone_stats, *, mesh=None, desc="", sources_=None, feature_fn=None, ks=None,
             show_progress=True) -> dict:
  """{'k=20': {'top1': .., 'top5': ..}, ...} for config.eval.knn_k on config.eval.{train,test}_source, of the
  config's backbone; or on the (train, test) `sources_` with `ks`, as the online k-NN calls it; `feature_fn(params,
  stats, images)` replaces the backbone (a prebuilt one, or the raw pixels of evaluate.pixels)."""
  e = config.eval
  if feature_fn is None:
    graphdef = backbone_graphdef_of(config)
    feature_fn = feats_lib.make_feature_fn(graphdef, config.aug.mean, config.aug.std, compute_dtype(config.model))
  kw = dict(image_size=e.image_size, resize_size=e.resize_size, batch_size=e.batch_size, mesh=mesh,
            **feats_lib.data_options(config))
  if sources_ is None:
    sources_ = (sources.get_source(e.train_source, data_dir=config.data.data_dir),
                sources.get_source(e.test_source, data_dir=config.data.data_dir))
  train_src, test_src = sources_
  bar = (lambda split: progress(f"features {desc} {split}")) if show_progress else (lambda split: None)
  train_f, train_y = feats_lib.extract_features(feature_fn, backbone_params, backbone_stats, train_src,
                                                progress=bar("train"), **kw)
  test_f, test_y = feats_lib.extract_features(feature_fn, backbone_params, backbone_stats, test_src,
                                              progress=bar("test"), **kw)
  num_classes = train_src.num_classes or int(max(train_y.max(), test_y.max()) + 1)
  out = {}
  for k in (e.knn_k if ks is None else ks):
    top1, top5 = knn_lib.knn_classifier(train_f, train_y, test_f, test_y, k=k, temperature=e.knn_temperature,
                                        num_classes=num_classes)
    out[f"k={k}"] = {"top1": top1, "top5": top5}
  return out


def backbones(config, state, compare_random_init):
  """{'teacher': (params, batch_stats)[, 'random_init': (...)]}: the backbones an evaluation compares, on the host.
  'teacher' is the network the method evaluates (the teacher of DINO, SwAV's trained network)."""
  params, stats = jax.device_get(methods.get(config.method).evaluated(state))
  out = {"teacher": (params["backbone"], (stats or {}).get("backbone", {}))}
  if compare_random_init:
    _, params0, stats0 = split_model(build_model(config, nnx.Rngs(config.seed)))
    out["random_init"] = (params0["backbone"], stats0.get("backbone", {}))
  return out


def evaluate_state(config, state, *, mesh=None, compare_random_init=False) -> dict:
  """k-NN of the trained network (and, with compare_random_init, of the same architecture at random initialisation
  and of the raw pixels: the two baselines its features must beat) + the method's own checks."""
  results = {name: knn_eval(config, params, stats, mesh=mesh, desc=name.replace("_", " "))
             for name, (params, stats) in backbones(config, state, compare_random_init).items()}
  if compare_random_init:
    results["pixels"] = pixels.pixel_knn(config, mesh=mesh)
  results.update(methods.get(config.method).eval_metrics(config, state, mesh))
  return results


def linear_probe_state(config, state, *, mesh=None, compare_random_init=False) -> dict:
  """The official linear probe on the teacher's backbone (and with `compare_random_init` on the architecture at
  random init and on the raw pixels, the two baselines its features must beat)."""
  out = {name: linear.linear_probe(config, params, stats, mesh=mesh,
                                   progress=progress(f"linear probe, {name.replace('_', ' ')}"))
         for name, (params, stats) in backbones(config, state, compare_random_init).items()}
  if compare_random_init:
    out["pixels"] = linear.linear_probe(config, {}, {}, mesh=mesh, progress=progress("linear probe, pixels"),
                                        feature_fn=pixels.make_pixel_fn(config.aug.mean, config.aug.std))
  return out


def format_linear(results: dict) -> str:
  """One row per model: top-1 after the last epoch, the best over the validations (the official report), top-5."""
  head = f"{'linear probe (%)':<16}{'top-1':>10}{'best top-1':>12}{'top-5':>10}"
  lines = [head, "-" * len(head)]
  for m in ("teacher", "random_init", "pixels"):
    if m in results:
      r = results[m]
      lines.append(f"{m:<16}{r['top1']:>10.2f}{r['top1_best']:>12.2f}{r['top5']:>10.2f}")
  first = results["teacher"]
  lines.append(f"({first['epochs']} epochs, lr {first['lr']} x {first['batch_size']} / 256, "
               f"{first['n_last_blocks']} last blocks{' + pooled patches' if first['avgpool'] else ''}, "
               f"{first['feature_dim']}-d features)")
  return "\n".join(lines)


def format_results(results: dict) -> str:
  """A small table: one row per model, one column per k."""
  models = [m for m in ("teacher", "random_init", "pixels") if m in results]
  ks = list(results[models[0]].keys())
  head = f"{'k-NN top-1 (%)':<16}" + "".join(f"{k:>10}" for k in ks)
  lines = [head, "-" * len(head)]
  for m in models:
    lines.append(f"{m:<16}" + "".join(f"{results[m][k]['top1']:>10.2f}" for k in ks))
  if "teacher_entropy" in results:
    h = results["teacher_entropy"]
    lines.append(f"teacher output entropy: per image {h['per_image']:.3f}, of the mean {h['of_mean']:.3f} "
                 f"(ln K = {h['ln_K']:.3f}; collapse = both near 0 or both near ln K)")
  return "\n".join(lines)
