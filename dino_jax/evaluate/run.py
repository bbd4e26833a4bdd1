"""Evaluate a train state: weighted k-NN of the teacher backbone, and the collapse check on the teacher's output.

Used at the end of training and by `python -m dino_jax.evaluate --workdir=DIR`.
"""
from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from ml_collections import ConfigDict

from dino_jax import checkpoint as ckpt_lib
from dino_jax import losses, optim, sharding
from dino_jax.data import sources
from dino_jax.evaluate import features as feats_lib
from dino_jax.evaluate import knn as knn_lib
from dino_jax.evaluate import linear
from dino_jax.state import backbone_graphdef_of, build_model, compute_dtype, graphdef_of, make_init_fn, split_model


def _progress(desc):
  from tqdm import tqdm  # noqa: PLC0415
  return lambda it: tqdm(it, desc=desc, leave=False, disable=jax.process_index() != 0)


def load_run(workdir, step=None):
  """(config, state) of a run's checkpoint, the state restored on this host's devices.

  Lives here rather than in __main__ so that other entry points (dino_jax.convert, tests) can import it without
  defining the evaluation's command-line flags.
  """
  checkpoints = ckpt_lib.Checkpoints(os.path.join(workdir, "checkpoints"))
  step = checkpoints.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints")
  config = ConfigDict(checkpoints.saved_config(step))
  # The optimiser state's structure does not depend on the schedule values: any steps_per_epoch builds it.
  schedules = optim.make_schedules(config, 1)
  tx = optim.make_optimizer(config, schedules, optim.make_freeze_fn(config, 1))
  mesh = sharding.make_mesh()
  abstract = jax.eval_shape(make_init_fn(config, tx))
  state_sh = sharding.state_shardings(mesh, abstract)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_sh)
  state = checkpoints.restore(abstract, step=step)
  checkpoints.close()
  return config, state


def knn_eval(config, backbone_params, backbone_stats, *, mesh=None, desc="") -> dict:
  """{'k=20': {'top1': .., 'top5': ..}, ...} for config.eval.knn_k on config.eval.{train,test}_source."""
  e = config.eval
  graphdef = backbone_graphdef_of(config)
  feature_fn = feats_lib.make_feature_fn(graphdef, config.aug.mean, config.aug.std, compute_dtype(config))
  kw = dict(image_size=e.image_size, resize_size=e.resize_size, batch_size=e.batch_size, mesh=mesh)
  train_src = sources.get_source(e.train_source, data_dir=config.data.get("data_dir"))
  test_src = sources.get_source(e.test_source, data_dir=config.data.get("data_dir"))
  train_f, train_y = feats_lib.extract_features(feature_fn, backbone_params, backbone_stats, train_src,
                                                progress=_progress(f"features {desc} train"), **kw)
  test_f, test_y = feats_lib.extract_features(feature_fn, backbone_params, backbone_stats, test_src,
                                              progress=_progress(f"features {desc} test"), **kw)
  num_classes = train_src.num_classes or int(max(train_y.max(), test_y.max()) + 1)
  out = {}
  for k in e.knn_k:
    top1, top5 = knn_lib.knn_classifier(train_f, train_y, test_f, test_y, k=k, temperature=e.knn_temperature,
                                        num_classes=num_classes)
    out[f"k={k}"] = {"top1": top1, "top5": top5}
  return out


def output_entropy(config, params, batch_stats, center, *, mesh=None) -> dict:
  """Entropy of the teacher's centred, sharpened output on the test images (no augmentation).

  'per_image' is the mean entropy of each image's distribution, 'of_mean' the entropy of the average distribution.
  A collapsed model has per_image near 0 and of_mean near 0 (one dimension dominates), or both near ln K (uniform).
  """
  e = config.eval
  graphdef = graphdef_of(config)
  dtype = compute_dtype(config)

  @jax.jit
  def logits_fn(p, s, images):
    model = nnx.merge(graphdef, p, s)
    return model([feats_lib.normalize_images(images, config.aug.mean, config.aug.std, dtype)], rng=None,
                 train=False).astype(jnp.float32)

  fn = lambda p, s, images: logits_fn(p, s, images)
  src = sources.get_source(e.test_source, data_dir=config.data.get("data_dir"))
  logits, _ = feats_lib.extract_features(fn, params, batch_stats, src, image_size=e.image_size,
                                         resize_size=e.resize_size, batch_size=e.batch_size, mesh=mesh)
  temp = config.loss.teacher_temp
  probs = np.asarray(losses.teacher_targets(jnp.asarray(logits), jnp.asarray(center), temp))
  return {"per_image": float(np.mean(np.asarray(losses.entropy(jnp.asarray(probs))))),
          "of_mean": float(losses.entropy(jnp.asarray(probs.mean(0)))),
          "ln_K": math.log(probs.shape[-1])}


def _backbones(config, state, compare_random_init):
  """{'teacher': (params, batch_stats)[, 'random_init': (...)]}: the backbones an evaluation compares, on the host."""
  teacher = jax.device_get(state.teacher)
  stats = jax.device_get(state.teacher_batch_stats)
  out = {"teacher": (teacher["backbone"], stats.get("backbone", {}))}
  if compare_random_init:
    _, params0, stats0 = split_model(build_model(config, nnx.Rngs(config.seed)))
    out["random_init"] = (params0["backbone"], stats0.get("backbone", {}))
  return out


def evaluate_state(config, state, *, mesh=None, compare_random_init=False) -> dict:
  """k-NN of the teacher (and optionally of the same architecture at random initialisation) + output entropy."""
  results = {name: knn_eval(config, params, stats, mesh=mesh, desc=name.replace("_", " "))
             for name, (params, stats) in _backbones(config, state, compare_random_init).items()}
  if config.method == "dino":
    results["teacher_entropy"] = output_entropy(config, jax.device_get(state.teacher),
                                                jax.device_get(state.teacher_batch_stats),
                                                jax.device_get(state.method_state["center"]), mesh=mesh)
  return results


def linear_probe_state(config, state, *, mesh=None, compare_random_init=False) -> dict:
  """The official linear probe on the teacher's backbone (and optionally on the architecture at random init)."""
  return {name: linear.linear_probe(config, params, stats, mesh=mesh,
                                    progress=_progress(f"linear probe, {name.replace('_', ' ')}"))
          for name, (params, stats) in _backbones(config, state, compare_random_init).items()}


def format_linear(results: dict) -> str:
  """One row per model: top-1 after the last epoch, the best over the validations (the official report), top-5."""
  head = f"{'linear probe (%)':<16}{'top-1':>10}{'best top-1':>12}{'top-5':>10}"
  lines = [head, "-" * len(head)]
  for m in ("teacher", "random_init"):
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
  models = [m for m in ("teacher", "random_init") if m in results]
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
