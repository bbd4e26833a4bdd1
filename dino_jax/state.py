"""The train state: one pytree, donated to the jitted step and saved whole by orbax.

Parameters are plain nested dicts of arrays (`nnx.State.to_pure_dict()`), so the state is readable, the EMA teacher
is a `tree_map`, and `nnx.merge(graphdef, params, batch_stats)` rebuilds a module inside the step.
Randomness is not carried: every step draws from `fold_in(key(seed), step)`, so a resumed run draws the same numbers.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct

from dino_jax import losses, models

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class TrainState(struct.PyTreeNode):
  step: jax.Array                 # int32, global iteration (the schedules' index)
  params: Any                     # student parameters (pure dict)
  teacher: Any                    # teacher parameters (EMA of the student), same structure
  opt_state: Any                  # optax state of the student's optimiser
  batch_stats: Any                # student BatchNorm running statistics ({} for a ViT with a BN-free head)
  teacher_batch_stats: Any        # the teacher's own running statistics: it runs in train mode, never EMA'd
  method_state: Any               # the method's own state: {'center': [K]} (DINO), {'queue': [...]} or {} (SwAV)
  nonfinite_step: jax.Array       # -1, or the first step whose loss was not finite (the state then stops changing)


def compute_dtype(config):
  name = config.model.get("dtype", "float32")
  if name not in _DTYPES:
    raise ValueError(f"config.model.dtype={name!r}; expected one of {sorted(_DTYPES)}")
  return _DTYPES[name]


def build_backbone(config, rngs, *, student: bool):
  """The backbone named by config.model.arch; stochastic depth only on the student (official)."""
  m = config.model
  return models.build_backbone(
      m.arch, patch_size=m.get("patch_size", 16), drop_path_rate=m.get("drop_path_rate", 0.0) if student else 0.0,
      dtype=compute_dtype(config), rngs=rngs, **dict(m.get("overrides", {})))


def build_model(config, rngs=None):
  """Student network (backbone + head in a MultiCropWrapper) for `config.method` ('dino' or 'swav').

  The teacher has the same graph; its parameters are a second pytree in the train state.
  """
  rngs = rngs if rngs is not None else nnx.Rngs(config.seed)
  m = config.model
  backbone = build_backbone(config, rngs, student=True)
  dtype = compute_dtype(config)
  if config.method == "dino":
    head = models.DINOHead(
        backbone.embed_dim, m.out_dim, use_bn=m.get("use_bn_in_head", False),
        norm_last_layer=m.get("norm_last_layer", True), nlayers=m.get("head_nlayers", 3),
        hidden_dim=m.get("head_hidden_dim", 2048), bottleneck_dim=m.get("head_bottleneck_dim", 256),
        dtype=dtype, rngs=rngs)
  elif config.method == "swav":
    head = models.SwAVHead(backbone.embed_dim, hidden_mlp=m.get("hidden_mlp", 2048), output_dim=m.feat_dim,
                           nmb_prototypes=m.nmb_prototypes, dtype=dtype, rngs=rngs)
  else:
    raise ValueError(f"config.method={config.method!r}; expected 'dino' or 'swav'")
  return models.MultiCropWrapper(backbone, head)


def split_model(model):
  """(graphdef, params, batch_stats) with params and batch_stats as pure dicts."""
  graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  return graphdef, params.to_pure_dict(), stats.to_pure_dict()


def merge_model(graphdef, params, batch_stats):
  return nnx.merge(graphdef, params, batch_stats)


def count_params(params) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(params))


def graphdef_of(config):
  """The static graph of the student network, without allocating parameters."""
  return nnx.split(nnx.eval_shape(lambda: build_model(config, nnx.Rngs(config.seed))))[0]


def backbone_graphdef_of(config):
  """The static graph of the teacher's backbone (no drop-path), without allocating parameters: what the evaluations
  (k-NN, linear probe, attention maps) merge a backbone's parameters into."""
  return nnx.split(nnx.eval_shape(lambda: build_backbone(config, nnx.Rngs(0), student=False)))[0]


def make_init_fn(config, tx, *, n_shards=None):
  """() -> TrainState. Student and teacher start from the same weights (the official teacher loads the student's).

  SwAV has no teacher: `teacher` stays equal to `params` (see steps.swav_update). Its queue is allocated here, empty
  (all zeros), as [n_assign, n_shards, rows per shard, D] with n_shards the size of the mesh's data axis (default:
  every device, as sharding.make_mesh builds it); it is None when `loss.queue_length` is below one global batch.
  """
  if config.method == "swav":
    n_shards = jax.device_count() if n_shards is None else n_shards
    losses.queue_rows_per_shard(config.loss.queue_length, batch_size=config.batch_size, n_shards=n_shards)  # checks

  def init():
    _, params, stats = split_model(build_model(config, nnx.Rngs(config.seed)))
    method_state = {}
    if config.method == "dino":
      method_state["center"] = jnp.zeros([config.model.out_dim], jnp.float32)
    else:
      queue = losses.init_queue(config.loss.queue_length, batch_size=config.batch_size, n_shards=n_shards,
                                n_assign=len(config.loss.crops_for_assign),
                                dim=params["head"]["prototypes"]["kernel"].shape[0])
      if queue is not None:
        method_state["queue"] = queue
    return TrainState(step=jnp.zeros([], jnp.int32), params=params, teacher=params, opt_state=tx.init(params),
                      batch_stats=stats, teacher_batch_stats=stats, method_state=method_state,
                      nonfinite_step=jnp.full([], -1, jnp.int32))

  return init
