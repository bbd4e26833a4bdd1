"""DINO (Caron et al. 2021, arXiv 2104.14294): a student matches an EMA teacher on multi-crop views.

One iteration, as main_dino.py `train_one_epoch` does it (on crops already augmented by the step):
  teacher on the 2 global crops (no gradient, no drop-path; BatchNorm, if any, in train mode: the official teacher
  never calls eval()) -> student on all crops (one backbone call per resolution, one head call on the crop-major
  concatenation) -> loss in float32 with the *old* centre -> per-tensor clipping, frozen last layer, AdamW/SGD/LARS
  update -> EMA teacher with the momentum of this iteration -> centre EMA from the raw teacher logits of the global
  batch. Its own state is the centre [K]; its progress-dependent values are the teacher momentum (cosine per
  iteration) and the teacher temperature (warm-up indexed by epoch); the last layer is frozen for
  `optim.freeze_last_layer` epochs.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dino_jax import losses, models, optim, steps

HAS_TEACHER = True


def defaults():
  from configs import common  # noqa: PLC0415
  return common.dino_defaults()


def build_model(config, rngs):
  """Student network: backbone + DINO head (MLP, L2-normalisation, weight-normalised last layer)."""
  m = config.model
  return models.with_head(m, rngs, lambda dim, dtype: models.DINOHead(
      dim, m.out_dim, use_bn=m.use_bn_in_head, norm_last_layer=m.norm_last_layer, nlayers=m.head_nlayers,
      hidden_dim=m.head_hidden_dim, bottleneck_dim=m.head_bottleneck_dim, dtype=dtype, rngs=rngs))


def init_state(config, params, *, n_shards):
  del params, n_shards
  return {"center": jnp.zeros([config.model.out_dim], jnp.float32)}


def schedules(config, steps_per_epoch):
  total, loss = config.epochs * steps_per_epoch, config.loss
  return {
      "teacher_momentum": lambda s: optim.cosine_schedule(s, base=config.teacher_momentum, final=1.0,
                                                          total_steps=total),
      "teacher_temp": lambda s: losses.teacher_temperature(
          s // steps_per_epoch, warmup_temp=loss.warmup_teacher_temp, temp=loss.teacher_temp,
          warmup_epochs=loss.warmup_teacher_temp_epochs),
  }


def frozen(config, steps_per_epoch):
  return {"last_layer": int(config.optim.freeze_last_layer * steps_per_epoch)}


def update(state, crops, key, *, graphdef, tx, schedules, config):
  """One DINO iteration on augmented crops: [2B, G, G, 3] (global) and optionally [N*B, L, L, 3] (local),
  crop-major. `key` drives the student's drop-path. Returns (new_state, metrics)."""
  loss_cfg = config.loss
  center = state.method_state["center"]

  # ---- teacher: global crops only, no gradient, no drop-path --------------------------------------------------------
  teacher_model = models.merge(graphdef, state.teacher, state.teacher_batch_stats)
  teacher_logits = teacher_model(crops[:1], rng=None, train=True)
  _, _, teacher_stats = models.split(teacher_model)
  teacher_logits = jax.lax.stop_gradient(teacher_logits).astype(jnp.float32)
  teacher_temp = schedules.values["teacher_temp"](state.step)
  if loss_cfg.centering == "sinkhorn":
    # DINOv2's alternative to centring: Sinkhorn-Knopp with the teacher temperature as epsilon.
    targets = losses.sinkhorn_knopp(teacher_logits, epsilon=teacher_temp, num_iters=loss_cfg.sinkhorn_iters)
  else:
    targets = losses.teacher_targets(teacher_logits, center, teacher_temp)

  # ---- student ------------------------------------------------------------------------------------------------------
  loss_fn = functools.partial(student_loss, graphdef=graphdef, batch_stats=state.batch_stats, crops=crops, key=key,
                              targets=targets, config=config)
  (loss, (student_logits, student_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  momentum = schedules.values["teacher_momentum"](state.step)
  teacher = steps.ema(state.teacher, params, momentum)
  new_center = losses.update_center(center, teacher_logits, loss_cfg.center_momentum)

  new = steps.commit(state, loss, params=params, teacher=teacher, opt_state=opt_state, batch_stats=student_stats,
                     teacher_batch_stats=teacher_stats, method_state={"center": new_center})
  metrics = {"loss": loss, **steps.optimizer_metrics(state.step, schedules, grads, updates, params),
             "teacher_momentum": momentum, "teacher_temp": teacher_temp,
             **collapse_metrics(student_logits[: targets.shape[0]], targets, new_center,
                                student_temp=loss_cfg.student_temp)}
  return new, metrics


def student_loss(params, *, graphdef, batch_stats, crops, key, targets, config):
  """(loss, (student logits, new batch stats)) of the student on the crops against the teacher's targets."""
  model = models.merge(graphdef, params, batch_stats)
  logits = model(crops, rng=key, train=True)
  loss = losses.dino_loss(logits, targets, None, student_temp=config.loss.student_temp,
                          num_global=config.crops.global_number, teacher_probs=targets)
  _, _, stats = models.split(model)
  return loss, (logits, stats)


def collapse_metrics(student_logits, teacher_probs, center, *, student_temp):
  """The paper's collapse study (Sec. 5.3, Fig. 7): teacher entropy h(P_t) and KL(P_t || P_s) on the global views.

  Also the entropy of the batch-mean teacher distribution (near 0 when every image goes to one prototype, near ln K
  when the output is uniform) and the centre norm.
  """
  log_ps = jax.nn.log_softmax(student_logits.astype(jnp.float32) / student_temp, axis=-1)
  pt = teacher_probs.astype(jnp.float32)
  log_pt = jnp.log(jnp.clip(pt, 1e-30))
  kl = jnp.mean(jnp.sum(pt * (log_pt - log_ps), axis=-1))
  return {"teacher_entropy": jnp.mean(losses.entropy(pt)), "teacher_mean_entropy": losses.entropy(jnp.mean(pt, 0)),
          "kl_teacher_student": kl, "center_norm": jnp.linalg.norm(center)}


def num_outputs(config):
  return config.model.out_dim


# ---- evaluation ---------------------------------------------------------------------------------------------------

def eval_metrics(config, state, mesh):
  """{'teacher_entropy': ...}: the collapse check on the teacher's centred, sharpened output (no augmentation)."""
  return {"teacher_entropy": output_entropy(config, jax.device_get(state.teacher),
                                            jax.device_get(state.teacher_batch_stats),
                                            jax.device_get(state.method_state["center"]), mesh=mesh)}


def output_entropy(config, params, batch_stats, center, *, mesh=None) -> dict:
  """Entropy of the teacher's centred, sharpened output on the test images.

  'per_image' is the mean entropy of each image's distribution, 'of_mean' the entropy of the average distribution.
  A collapsed model has per_image near 0 and of_mean near 0 (one dimension dominates), or both near ln K (uniform).
  """
  from flax import nnx  # noqa: PLC0415
  from dino_jax import state as state_lib  # noqa: PLC0415
  from dino_jax.data import sources  # noqa: PLC0415
  from dino_jax.evaluate import features  # noqa: PLC0415
  e = config.eval
  graphdef = state_lib.graphdef_of(config)
  dtype = models.compute_dtype(config.model)

  @jax.jit
  def logits_fn(p, s, images):
    model = nnx.merge(graphdef, p, s)
    return model([features.normalize_images(images, config.aug.mean, config.aug.std, dtype)], rng=None,
                 train=False).astype(jnp.float32)

  src = sources.get_source(e.test_source, data_dir=config.data.data_dir)
  logits, _ = features.extract_features(logits_fn, params, batch_stats, src, image_size=e.image_size,
                                        resize_size=e.resize_size, batch_size=e.batch_size, mesh=mesh,
                                        **features.data_options(config))
  probs = losses.teacher_targets(jnp.asarray(logits), jnp.asarray(center), config.loss.teacher_temp)
  return {"per_image": float(jnp.mean(losses.entropy(probs))), "of_mean": float(losses.entropy(jnp.mean(probs, 0))),
          "ln_K": math.log(probs.shape[-1])}


# ---- official checkpoints (python -m dino_jax.convert) -------------------------------------------------------------

def export(config, student, teacher, state, epoch):
  """main_dino.py's checkpoint.pth: 'student' (DDP `module.` prefix), 'teacher' (with it only when the network has
  BatchNorms, as DDP wraps it only then), 'epoch', and 'dino_loss' holding the centre [1, out_dim]."""
  from dino_jax.interop import torch as interop  # noqa: PLC0415
  out = interop.export_checkpoint(student, "dino", teacher=teacher)
  out["epoch"] = int(epoch)
  out["dino_loss"] = {"center": np.asarray(jax.device_get(state.method_state["center"]), np.float32)[None]}
  return out


def load(pth, obj, config, student, teacher):
  """A DINO training checkpoint ('student' and 'teacher') into both networks (in place), and its centre; None when
  `obj` is not one (a backbone release is loaded by the caller)."""
  from dino_jax import convert  # noqa: PLC0415
  if not (isinstance(obj, dict) and all(isinstance(obj.get(k), dict) for k in ("student", "teacher"))):
    return None
  convert.load_into(pth, "'student'", config, student, obj, checkpoint_key="student")
  convert.load_into(pth, "'teacher'", config, teacher, obj, checkpoint_key="teacher")
  c = (obj.get("dino_loss") or {}).get("center")
  if c is None:
    return {}
  c = np.asarray(c, np.float32)
  if c.size != config.model.out_dim or c.ndim > 2:
    raise ValueError(f"{pth}: dino_loss.center has shape {tuple(c.shape)}, the config's head has out_dim "
                     f"{config.model.out_dim}")
  return {"center": c.reshape(config.model.out_dim)}


# ---- configuration ------------------------------------------------------------------------------------------------

def validate(config):
  from dino_jax import config_check as check  # noqa: PLC0415
  c, m, loss = config, config.model, config.loss
  return check.problems(
      check.in_range("teacher_momentum", c.teacher_momentum, 0, 1, "0.996 (0.9995 at batch 256)"),
      check.positive("loss.student_temp", loss.student_temp, "0.1"),
      check.positive("loss.teacher_temp", loss.teacher_temp, "0.04 (0.07 with a warm-up)"),
      check.positive("loss.warmup_teacher_temp", loss.warmup_teacher_temp, "0.04"),
      check.in_range("loss.warmup_teacher_temp_epochs", loss.warmup_teacher_temp_epochs, 0, c.epochs, "0 or 30",
                     integer=True),
      check.in_range("loss.center_momentum", loss.center_momentum, 0, 1, "0.9"),
      check.one_of("loss.centering", loss.centering, ("center", "sinkhorn")),
      check.at_least("loss.sinkhorn_iters", loss.sinkhorn_iters, 1, "3", integer=True),
      check.at_least("model.out_dim", m.out_dim, 1, "65536", integer=True),
      check.at_least("model.head_nlayers", m.head_nlayers, 1, "3", integer=True),
      check.at_least("model.head_hidden_dim", m.head_hidden_dim, 1, "2048", integer=True),
      check.at_least("model.head_bottleneck_dim", m.head_bottleneck_dim, 1, "256", integer=True),
      check.in_range("optim.freeze_last_layer", c.optim.freeze_last_layer, 0, c.epochs, "1"),
      check.at_least("crops.global_number", c.crops.global_number, 1, "2", integer=True),
      check.at_least("crops.global_number + crops.local_number", c.crops.global_number + c.crops.local_number, 2,
                     "2 + 8 (the loss needs a pair of different views)", integer=True),
  )
