"""The train state, and what a config turns into: schedules, optimiser, graph, abstract sharded state.

Parameters are plain nested dicts of arrays (`nnx.State.to_pure_dict()`), so the state is readable, the EMA teacher
is a `tree_map`, and `nnx.merge(graphdef, params, batch_stats)` rebuilds a module inside the step.
Randomness is not carried: every step draws from `fold_in(key(seed), step)`, so a resumed run draws the same numbers.

`build_run(config, steps_per_epoch=..., mesh=...)` is the one place where a run's pieces are assembled; training,
evaluation, conversion and the benchmarks use it (with steps_per_epoch=1 when only the state's structure matters).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from dino_jax import methods, models, optim, sharding


class TrainState(struct.PyTreeNode):
  step: jax.Array                 # int32, global iteration (the schedules' index)
  params: Any                     # the trained network's parameters (pure dict)
  batch_stats: Any                # its BatchNorm running statistics ({} without BatchNorm)
  opt_state: Any                  # optax state of its optimiser
  teacher: Any                    # the teacher's parameters (EMA of the student), same structure; None without one
  teacher_batch_stats: Any        # the teacher's own running statistics (it runs in train mode, never EMA'd); or None
  method_state: Any               # the method's own state: {'center': [K]} (DINO), {'queue': [...]} or {} (SwAV)
  nonfinite_step: jax.Array       # -1, or the first step whose loss was not finite (the state then stops changing)
  skipped_streak: jax.Array       # loss.on_nonfinite='skip': consecutive non-finite steps just skipped (int32)
  skipped_total: jax.Array        # ... and all steps skipped so far (int32)


# Fields added to TrainState after checkpoints were written with it, and the value such a checkpoint restores them
# with (dino_jax.checkpoint fills them in; an older run resumes instead of being refused).
ADDED_FIELDS = {"skipped_streak": 0, "skipped_total": 0}


split_model, merge_model = models.split, models.merge


def count_params(params) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(params))


def build_model(config, rngs=None):
  """The trained network of `config.method` (the teacher, if any, has the same graph)."""
  return methods.get(config.method).build_model(config, rngs if rngs is not None else nnx.Rngs(config.seed))


def graphdef_of(config):
  """The static graph of the trained network, without allocating parameters."""
  return nnx.split(nnx.eval_shape(lambda: build_model(config, nnx.Rngs(config.seed))))[0]


def backbone_graphdef_of(config):
  """The static graph of the teacher's backbone (no drop-path), without allocating parameters: what the evaluations
  (k-NN, linear probe, attention maps) merge a backbone's parameters into."""
  return nnx.split(nnx.eval_shape(lambda: models.backbone_from_config(config.model, nnx.Rngs(0), student=False)))[0]


def make_init_fn(config, tx, *, n_shards):
  """() -> TrainState. A teacher starts from the student's weights (the official teacher loads the student's);
  `n_shards` is the size of the mesh's data axis (the SwAV queue is per device)."""
  method = methods.get(config.method)

  def init():
    _, params, stats = split_model(method.build_model(config, nnx.Rngs(config.seed)))
    has_teacher = method.HAS_TEACHER
    return TrainState(step=jnp.zeros([], jnp.int32), params=params, batch_stats=stats, opt_state=tx.init(params),
                      teacher=params if has_teacher else None, teacher_batch_stats=stats if has_teacher else None,
                      method_state=method.init_state(config, params, n_shards=n_shards),
                      nonfinite_step=jnp.full([], -1, jnp.int32), skipped_streak=jnp.zeros([], jnp.int32),
                      skipped_total=jnp.zeros([], jnp.int32))

  return init


def state_shardings(mesh, abstract_state, method):
  """Everything replicated except what the method shards (the SwAV queue is split over the data axis)."""
  rep = sharding.replicated(mesh)
  shardings = jax.tree.map(lambda _: rep, abstract_state)
  return shardings.replace(method_state=method.state_shardings(mesh, abstract_state.method_state))


@dataclasses.dataclass(frozen=True)
class Run:
  """A config's pieces: what training, evaluation, conversion and the benchmarks build from it."""
  config: Any
  method: methods.Method
  mesh: jax.sharding.Mesh
  steps_per_epoch: int
  schedules: optim.Schedules
  tx: optax.GradientTransformation
  graphdef: Any
  init: Callable[[], TrainState]          # the fresh state (jit it with out_shardings=shardings)
  shardings: TrainState                    # a NamedSharding per leaf
  abstract: TrainState                     # ShapeDtypeStructs carrying those shardings: the restore target


def build_run(config, *, steps_per_epoch: int = 1, mesh=None) -> Run:
  """Schedules, optimiser, graph and abstract sharded state for `config`. steps_per_epoch only sets the schedules'
  values: the state's structure does not depend on it."""
  mesh = mesh if mesh is not None else sharding.make_mesh()
  method = methods.get(config.method)
  schedules = optim.make_schedules(config, steps_per_epoch, method)
  tx = optim.make_optimizer(config, schedules)
  init = make_init_fn(config, tx, n_shards=mesh.shape[sharding.DATA])
  abstract = jax.eval_shape(init)
  shardings = state_shardings(mesh, abstract, method)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  return Run(config=config, method=method, mesh=mesh, steps_per_epoch=steps_per_epoch, schedules=schedules, tx=tx,
             graphdef=graphdef_of(config), init=init, shardings=shardings, abstract=abstract)
