"""Pure train steps. `make_train_step` returns `step(state, batch) -> (state, metrics)` for `jax.jit` over a mesh.

One DINO iteration, as main_dino.py `train_one_epoch` does it:
  photometric augmentation on the accelerator (randomness from fold_in(key(seed), step))
  -> teacher on the 2 global crops (no gradient, no drop-path; BatchNorm, if any, in train mode: the official
     teacher never calls eval())
  -> student on all crops (one backbone call per resolution, one head call on the crop-major concatenation)
  -> loss in float32 with the *old* centre -> per-tensor clipping, frozen last layer, AdamW/SGD/LARS update
  -> EMA teacher with the momentum of this iteration -> centre EMA from the raw teacher logits of the global batch.

One SwAV iteration, as main_swav.py `train` does it:
  the same augmentation -> prototypes L2-normalised -> the network on all crops (BatchNorm in train mode)
  -> swapped-prediction loss with Sinkhorn-Knopp codes over the global batch (and the queue once it is on)
  -> prototypes frozen for the first iterations -> LARC + SGD momentum update -> queue shifted by one batch.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from dino_jax import losses
from dino_jax.data import photometric
from dino_jax.models.layers import l2_normalize
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


def commit(state: TrainState, loss, **changes) -> TrainState:
  """The state after one step: `changes` applied and the step advanced, behind the non-finite guard.

  A non-finite loss freezes the state at its last good value (only `step` moves on) and records the first bad step
  in `nonfinite_step`; the host reads it on log steps and stops the run.
  """
  ok = jnp.isfinite(loss) & (state.nonfinite_step < 0)
  new = _select(ok, state.replace(step=state.step + 1, **changes), state.replace(step=state.step + 1))
  return new.replace(nonfinite_step=jnp.where(
      (state.nonfinite_step < 0) & ~jnp.isfinite(loss), state.step, state.nonfinite_step))


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
    targets = losses.teacher_targets(teacher_logits, state.method_state["center"], teacher_temp)

  # ---- student ------------------------------------------------------------------------------------------------------
  def loss_fn(params):
    model = merge_model(graphdef, params, state.batch_stats)
    logits = model(crops, rng=key, train=True)
    loss = losses.dino_loss(logits, teacher_logits, state.method_state["center"], student_temp=loss_cfg.student_temp,
                            num_global=num_global, teacher_probs=targets)
    _, _, stats = split_model(model)
    return loss, (logits, stats)

  (loss, (student_logits, student_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  momentum = schedules.momentum_teacher(state.step)
  teacher = ema(state.teacher, params, momentum)
  center = losses.update_center(state.method_state["center"], teacher_logits, loss_cfg.center_momentum)

  new = commit(state, loss, params=params, teacher=teacher, opt_state=opt_state, batch_stats=student_stats,
               teacher_batch_stats=teacher_stats, method_state={"center": center})

  metrics = {"loss": loss, "lr": schedules.lr(state.step), "wd": schedules.weight_decay(state.step),
             "teacher_momentum": momentum, "teacher_temp": teacher_temp,
             "grad_norm": tree_norm(grads), "update_norm": tree_norm(updates), "param_norm": tree_norm(params)}
  metrics.update(collapse_metrics(student_logits[: targets.shape[0]], targets, center,
                                  student_temp=loss_cfg.student_temp))
  return new, metrics


def normalize_prototypes(params):
  """Params with the SwAV prototypes L2-normalised: each prototype is a column of our [D, K] kernel (a row of the
  official [K, D] weight, which main_swav.py normalises in place before every iteration)."""
  head = params["head"]
  kernel = l2_normalize(head["prototypes"]["kernel"], axis=0).astype(head["prototypes"]["kernel"].dtype)
  return {**params, "head": {**head, "prototypes": {**head["prototypes"], "kernel": kernel}}}


def swav_update(state: TrainState, crops, key, *, graphdef, tx, schedules, config, steps_per_epoch):
  """One SwAV iteration on already augmented crops (main_swav.py `train`).

  Args:
    crops: list of float arrays, one per resolution group, crop-major: [n_global*B, G, G, 3] and optionally
      [N*B, L, L, 3].
    key: PRNG key (only used by a backbone with stochastic depth; the official ResNet-50 has none).
  Returns:
    (new_state, metrics). SwAV has no teacher: the state's `teacher` (and `teacher_batch_stats`) is kept equal to the
    trained network, so everything that evaluates `state.teacher` (k-NN, export) evaluates the SwAV network. (XLA may
    compute the running statistics once per output slot: the two copies can differ in the last bit.)
  """
  loss_cfg = config.loss
  epoch = state.step // steps_per_epoch
  batch = crops[0].shape[0] // config.crops.global_number
  # The queue (None unless `loss.queue_length` holds at least one global batch) is used and filled only from
  # `epoch_queue_starts` (the official creates it then); it lives in the state, so it is checkpointed.
  queue = state.method_state.get("queue")

  # The optimiser also sees the normalised prototypes (LARC's trust ratio and the weight decay use ||p|| of the
  # normalised weight); the momentum buffer is left as it is, as in the official in-place normalisation.
  params = normalize_prototypes(state.params)

  def loss_fn(params):
    model = merge_model(graphdef, params, state.batch_stats)
    # One backbone call per resolution group, the head once on all crops: the projection's BatchNorm normalises
    # over every crop of the global batch together (SyncBatchNorm), as the official forward does.
    embedding, scores = model(crops, rng=key, train=True)
    loss, new_queue, aux = losses.swav_loss(
        embedding, scores, params["head"]["prototypes"]["kernel"], queue, batch_size=batch,
        crops_for_assign=tuple(loss_cfg.crops_for_assign), temperature=loss_cfg.temperature,
        epsilon=loss_cfg.epsilon, sinkhorn_iters=loss_cfg.sinkhorn_iters,
        queue_active=epoch >= loss_cfg.epoch_queue_starts)
    _, _, stats = split_model(model)
    return loss, (new_queue, aux, stats)

  (loss, (new_queue, aux, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  # Prototypes frozen for `freeze_prototypes_niters` iterations: the optimiser's freeze function (optim.py) skips them
  # as PyTorch skips a tensor whose grad is None.
  updates, opt_state = tx.update(grads, state.opt_state, params)
  params = optax.apply_updates(params, updates)
  new = commit(state, loss, params=params, teacher=params, opt_state=opt_state, batch_stats=stats,
               teacher_batch_stats=stats,
               method_state={} if new_queue is None else {"queue": new_queue})

  metrics = {"loss": loss, "lr": schedules.lr(state.step), "wd": schedules.weight_decay(state.step),
             "grad_norm": tree_norm(grads), "update_norm": tree_norm(updates), "param_norm": tree_norm(params),
             **aux}
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
  updates = {"dino": dino_update, "swav": swav_update}
  if config.method not in updates:
    raise ValueError(f"config.method={config.method!r}; expected one of {sorted(updates)}")
  update = functools.partial(updates[config.method], graphdef=graphdef, tx=tx, schedules=schedules, config=config,
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
