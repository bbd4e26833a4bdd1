"""Pure train steps. `make_train_step` returns `step(state, batch) -> (state, metrics)` for `jax.jit` over a mesh.

One DINO iteration, as main_dino.py `train_one_epoch` does it:
  photometric augmentation on the accelerator (randomness from fold_in(key(seed), step))
  -> teacher on the 2 global crops (no gradient, no drop-path; BatchNorm, if any, in train mode: the official
     teacher never calls eval())
  -> student on all crops (one backbone call per resolution, one head call on the crop-major concatenation)
  -> loss in float32 with the *old* centre -> per-tensor clipping, frozen last layer, AdamW/SGD/LARS update
  -> EMA teacher with the momentum of this iteration -> centre EMA from the raw teacher logits of the global batch.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from dino_jax import losses
from dino_jax.data import photometric
from dino_jax.state import TrainState, merge_model, split_model


def crop_major(images):
  """[B, n, H, W, C] -> [n * B, H, W, C]: all of crop 0, then all of crop 1, ... (the official crop order)."""
  b, n = images.shape[:2]
  return jnp.swapaxes(images, 0, 1).reshape((n * b,) + images.shape[2:])


def ema(teacher, student, momentum):
  """teacher <- m * teacher + (1 - m) * student, for every parameter (the official zip over all parameters)."""
  return jax.tree.map(lambda t, s: t * momentum + (1.0 - momentum) * s.astype(t.dtype), teacher, student)


def tree_norm(tree):
  return optax.global_norm(jax.tree.map(lambda x: x.astype(jnp.float32), tree))


def _select(ok, new, old):
  return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)


def dino_update(state: TrainState, crops, key, *, graphdef, tx, schedules, config, steps_per_epoch):
  """One DINO iteration on already augmented crops.

  Args:
    crops: list of float arrays, one per resolution group, crop-major: [2B, G, G, 3] (global) and optionally
      [N*B, L, L, 3] (local).
    key: PRNG key for drop-path (this step's key).
  Returns:
    (new_state, metrics) where metrics are scalars for logging.
  """
  loss_cfg = config.loss
  num_global = config.crops.global_number
  epoch = state.step // steps_per_epoch

  # ---- teacher: global crops only, no gradient, no drop-path --------------------------------------------------------
  teacher_model = merge_model(graphdef, state.teacher, state.teacher_batch_stats)
  teacher_logits = teacher_model(crops[:1], rng=None, train=True)
  _, _, teacher_stats = split_model(teacher_model)
  teacher_logits = jax.lax.stop_gradient(teacher_logits).astype(jnp.float32)
  teacher_temp = losses.teacher_temperature(
      epoch, warmup_temp=loss_cfg.warmup_teacher_temp, temp=loss_cfg.teacher_temp,
      warmup_epochs=loss_cfg.warmup_teacher_temp_epochs)
  if loss_cfg.get("centering", "center") == "sinkhorn":
    # DINOv2's alternative to centring: Sinkhorn-Knopp with the teacher temperature as epsilon.
    targets = losses.sinkhorn_knopp(teacher_logits, epsilon=teacher_temp,
                                    num_iters=loss_cfg.get("sinkhorn_iters", 3))
  else:
    targets = losses.teacher_targets(teacher_logits, state.center, teacher_temp)

  # ---- student ------------------------------------------------------------------------------------------------------
  def loss_fn(params):
    model = merge_model(graphdef, params, state.batch_stats)
    logits = model(crops, rng=key, train=True)
    loss = losses.dino_loss(logits, teacher_logits, state.center, student_temp=loss_cfg.student_temp,
                            num_global=num_global, teacher_probs=targets)
    _, _, stats = split_model(model)
    return loss, (logits, stats)

  (loss, (student_logits, student_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  momentum = schedules.momentum_teacher(state.step)
  teacher = ema(state.teacher, params, momentum)
  center = losses.update_center(state.center, teacher_logits, loss_cfg.center_momentum)

  # ---- guard: a non-finite loss freezes the state at its last good value; the host stops the run -------------------
  ok = jnp.isfinite(loss) & (state.nonfinite_step < 0)
  new = state.replace(step=state.step + 1, params=params, teacher=teacher, opt_state=opt_state,
                      batch_stats=student_stats, teacher_batch_stats=teacher_stats, center=center)
  new = _select(ok, new, state.replace(step=state.step + 1))
  new = new.replace(nonfinite_step=jnp.where(
      (state.nonfinite_step < 0) & ~jnp.isfinite(loss), state.step, state.nonfinite_step))

  metrics = {"loss": loss, "lr": schedules.lr(state.step), "wd": schedules.weight_decay(state.step),
             "teacher_momentum": momentum, "teacher_temp": teacher_temp,
             "grad_norm": tree_norm(grads), "update_norm": tree_norm(updates), "param_norm": tree_norm(params)}
  metrics.update(collapse_metrics(student_logits[: targets.shape[0]], targets, center,
                                  student_temp=loss_cfg.student_temp))
  return new, metrics


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


def make_train_step(config, *, graphdef, tx, schedules, steps_per_epoch):
  """step(state, batch) -> (state, metrics); batch holds uint8 crops {'global': [B,2,G,G,3], 'local': [B,N,L,L,3]}."""
  if config.method != "dino":
    raise ValueError(f"make_train_step: method {config.method!r} not supported")
  update = functools.partial(dino_update, graphdef=graphdef, tx=tx, schedules=schedules, config=config,
                             steps_per_epoch=steps_per_epoch)

  def step(state, batch):
    key = jax.random.fold_in(jax.random.key(config.seed), state.step)
    aug_key, drop_key = jax.random.split(key)
    views = photometric.augment(batch, aug_key, config.aug)
    crops = [crop_major(views["global"])]
    if "local" in views:
      crops.append(crop_major(views["local"]))
    return update(state, crops, drop_key)

  return step
