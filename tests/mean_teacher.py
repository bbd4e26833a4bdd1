"""A third method defined outside `dino_jax/`, to prove the method interface: a mean teacher (Tarvainen & Valpola
2017) on two augmented views.

The student's projection of one global crop regresses, by cosine distance, the EMA teacher's projection of the other
(both directions averaged). Its own state is a running average of the loss, kept in `TrainState.method_state` and
checkpointed like DINO's centre. Selected with `config.method = "tests.mean_teacher"` (an importable module path) or
with `dino_jax.methods.register("mean_teacher", tests.mean_teacher)`; its keys live under `config.mean_teacher`.
"""
from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from dino_jax import config_check, models, optim, steps

HAS_TEACHER = True


def add_defaults(config):
  """`config` with this method's keys (a copy of it, unlocked)."""
  config = copy.deepcopy(config)   # keeps the placeholders' types (--config.max_steps=N stays settable)
  with config.unlocked():
    config.method = __name__
    config.mean_teacher = ml_collections.ConfigDict(dict(momentum=0.99, dim=16, loss_ema=0.9))
  return config


class Projection(nnx.Module):
  def __init__(self, in_dim, dim, *, dtype, rngs):
    self.fc = nnx.Linear(in_dim, dim, dtype=dtype, rngs=rngs)

  def __call__(self, x, *, train=True):
    del train
    return self.fc(x)


def build_model(config, rngs):
  return models.with_head(config.model, rngs,
                          lambda dim, dtype: Projection(dim, config.mean_teacher.dim, dtype=dtype, rngs=rngs))


def init_state(config, params, *, n_shards):
  del config, params, n_shards
  return {"loss_ema": jnp.zeros([], jnp.float32)}


def schedules(config, steps_per_epoch):
  total = config.epochs * steps_per_epoch
  return {"momentum": lambda s: optim.cosine_schedule(s, base=config.mean_teacher.momentum, final=1.0,
                                                      total_steps=total)}


def frozen(config, steps_per_epoch):
  del config, steps_per_epoch
  return {}


def cosine_loss(student, teacher):
  """2 - 2 cos between the student's view i and the teacher's other view, averaged over both directions."""
  s = student.astype(jnp.float32).reshape(2, -1, student.shape[-1])
  t = jax.lax.stop_gradient(teacher.astype(jnp.float32)).reshape(2, -1, teacher.shape[-1])
  s = s / jnp.linalg.norm(s, axis=-1, keepdims=True)
  t = t / jnp.linalg.norm(t, axis=-1, keepdims=True)
  return jnp.mean(2.0 - 2.0 * jnp.sum(s * t[::-1], axis=-1))


def update(state, crops, key, *, graphdef, tx, schedules, config):
  teacher_model = models.merge(graphdef, state.teacher, state.teacher_batch_stats)
  teacher_out = teacher_model(crops[:1], rng=None, train=True)
  _, _, teacher_stats = models.split(teacher_model)

  def loss_fn(params):
    model = models.merge(graphdef, params, state.batch_stats)
    loss = cosine_loss(model(crops[:1], rng=key, train=True), teacher_out)
    _, _, stats = models.split(model)
    return loss, stats

  (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  momentum = schedules.values["momentum"](state.step)
  decay = config.mean_teacher.loss_ema
  loss_ema = decay * state.method_state["loss_ema"] + (1 - decay) * loss
  new = steps.commit(state, loss, params=params, teacher=steps.ema(state.teacher, params, momentum),
                     opt_state=opt_state, batch_stats=stats, teacher_batch_stats=teacher_stats,
                     method_state={"loss_ema": loss_ema})
  metrics = {"loss": loss, "loss_ema": loss_ema, "teacher_momentum": momentum,
             **steps.optimizer_metrics(state.step, schedules, grads, updates, params)}
  return new, metrics


def validate(config):
  mt = config.get("mean_teacher")
  if mt is None:
    return ["config.mean_teacher: missing; build the config with tests.mean_teacher.add_defaults(config)"]
  return config_check.problems(
      config_check.in_range("mean_teacher.momentum", mt.momentum, 0, 1, "0.99"),
      config_check.at_least("mean_teacher.dim", mt.dim, 1, "16", integer=True),
      config_check.in_range("mean_teacher.loss_ema", mt.loss_ema, 0, 1, "0.9"))
