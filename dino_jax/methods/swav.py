"""SwAV (Caron et al. 2020, arXiv 2006.09882): online clustering, codes of one view predicted from the others.

One iteration, as main_swav.py `train` does it (on crops already augmented by the step):
  prototypes L2-normalised -> the network on all crops (BatchNorm in train mode) -> swapped-prediction loss with
  Sinkhorn-Knopp codes over the global batch (and the queue once it is on) -> prototypes frozen for the first
  iterations -> LARC + SGD momentum update -> queue shifted by one batch.
SwAV has no teacher (`TrainState.teacher` is None): the evaluations and exports read the trained network. Its own
state is the queue (per device, [n_assign, n_shards, rows, D]; absent without one); its progress-dependent value is
whether the queue is on (from `loss.epoch_queue_starts`); the prototypes are frozen for
`optim.freeze_prototypes_niters` iterations.
"""
from __future__ import annotations

import jax
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from dino_jax import losses, models, steps
from dino_jax.models.layers import l2_normalize

HAS_TEACHER = False


def defaults():
  from configs import common  # noqa: PLC0415
  return common.swav_defaults()


def build_model(config, rngs):
  """Backbone + SwAV head (projection, L2-normalised embedding, prototypes)."""
  m = config.model
  return models.with_head(m, rngs, lambda dim, dtype: models.SwAVHead(
      dim, hidden_mlp=m.hidden_mlp, output_dim=m.feat_dim, nmb_prototypes=m.nmb_prototypes, dtype=dtype, rngs=rngs))


def init_state(config, params, *, n_shards):
  """{'queue': zeros [n_assign, n_shards, rows per shard, D]}, or {} when `loss.queue_length` is below one batch."""
  queue = losses.init_queue(config.loss.queue_length, batch_size=config.batch_size, n_shards=n_shards,
                            n_assign=len(config.loss.crops_for_assign),
                            dim=params["head"]["prototypes"]["kernel"].shape[0])
  return {} if queue is None else {"queue": queue}


def state_shardings(mesh, method_state):
  """The queue is per device: its shard axis is split over the mesh's data axis (the official per-GPU queue)."""
  from dino_jax import sharding  # noqa: PLC0415
  return {k: NamedSharding(mesh, P(None, sharding.DATA)) for k in method_state}


def schedules(config, steps_per_epoch):
  # The official creates the queue at `epoch_queue_starts`; before that it is neither used nor filled.
  start = config.loss.epoch_queue_starts * steps_per_epoch
  return {"queue_active": lambda s: s >= start}


def frozen(config, steps_per_epoch):
  del steps_per_epoch  # the official counts this one in iterations
  return {"prototypes": int(config.optim.freeze_prototypes_niters)}


def normalize_prototypes(params):
  """Params with the SwAV prototypes L2-normalised: each prototype is a column of our [D, K] kernel (a row of the
  official [K, D] weight, which main_swav.py normalises in place before every iteration)."""
  head = params["head"]
  kernel = l2_normalize(head["prototypes"]["kernel"], axis=0).astype(head["prototypes"]["kernel"].dtype)
  return {**params, "head": {**head, "prototypes": {**head["prototypes"], "kernel": kernel}}}


def update(state, crops, key, *, graphdef, tx, schedules, config):
  """One SwAV iteration on augmented crop-major groups. `key` is only used by a backbone with stochastic depth (the
  official ResNet-50 has none). Returns (new_state, metrics)."""
  loss_cfg = config.loss
  batch = crops[0].shape[0] // config.crops.global_number
  queue = state.method_state.get("queue")

  # The optimiser also sees the normalised prototypes (LARC's trust ratio and the weight decay use ||p|| of the
  # normalised weight); the momentum buffer is left as it is, as in the official in-place normalisation.
  params = normalize_prototypes(state.params)

  def loss_fn(params):
    model = models.merge(graphdef, params, state.batch_stats)
    # One backbone call per resolution group, the head once on all crops: the projection's BatchNorm normalises
    # over every crop of the global batch together (SyncBatchNorm), as the official forward does.
    embedding, scores = model(crops, rng=key, train=True)
    loss, new_queue, aux = losses.swav_loss(
        embedding, scores, params["head"]["prototypes"]["kernel"], queue, batch_size=batch,
        crops_for_assign=tuple(loss_cfg.crops_for_assign), temperature=loss_cfg.temperature,
        epsilon=loss_cfg.epsilon, sinkhorn_iters=loss_cfg.sinkhorn_iters,
        queue_active=schedules.values["queue_active"](state.step))
    _, _, stats = models.split(model)
    return loss, (new_queue, aux, stats)

  (loss, (new_queue, aux, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  # Prototypes frozen for `freeze_prototypes_niters` iterations: the optimiser skips them as PyTorch skips a tensor
  # whose grad is None.
  updates, opt_state = tx.update(grads, state.opt_state, params)
  params = optax.apply_updates(params, updates)
  new = steps.commit(state, loss, params=params, opt_state=opt_state, batch_stats=stats,
                     method_state={} if new_queue is None else {"queue": new_queue})
  metrics = {"loss": loss, **steps.optimizer_metrics(state.step, schedules, grads, updates, params), **aux}
  return new, metrics


def num_outputs(config):
  return config.model.nmb_prototypes


# ---- official checkpoints (python -m dino_jax.convert) -------------------------------------------------------------

def export(config, student, teacher, state, epoch):
  """main_swav.py's checkpoint.pth.tar: {'epoch', 'state_dict'} with `module.` keys (backbone, projection head,
  prototypes). The queue (queue{rank}.pth) is not written: it refills within queue_length / batch iterations."""
  from dino_jax.interop import torch as interop  # noqa: PLC0415
  return {"epoch": int(epoch), "state_dict": interop.export_checkpoint(student, "swav")}


def load(pth, obj, config, student, teacher):
  """A SwAV checkpoint or release with its prototypes into the network (in place); None for anything else."""
  from dino_jax import convert  # noqa: PLC0415
  sd = obj.get("state_dict", obj) if isinstance(obj, dict) else {}
  if not (isinstance(sd, dict) and any(str(k).replace("module.", "").startswith("prototypes.") for k in sd)):
    return None
  convert.load_into(pth, "the SwAV network", config, student, obj)
  return {}


# ---- configuration ------------------------------------------------------------------------------------------------

def validate(config):
  from dino_jax import config_check as check  # noqa: PLC0415
  c, m, loss = config, config.model, config.loss
  n_crops = c.crops.global_number + c.crops.local_number
  bad_assign = [i for i in loss.crops_for_assign if not (isinstance(i, int) and 0 <= i < n_crops)]
  return check.problems(
      check.positive("loss.temperature", loss.temperature, "0.1"),
      check.positive("loss.epsilon", loss.epsilon, "0.05 (0.03 against collapse)"),
      check.at_least("loss.sinkhorn_iters", loss.sinkhorn_iters, 1, "3", integer=True),
      check.at_least("loss.queue_length", loss.queue_length, 0, "0 or 3840", integer=True),
      check.at_least("loss.epoch_queue_starts", loss.epoch_queue_starts, 0, "15", integer=True),
      check.at_least("optim.freeze_prototypes_niters", c.optim.freeze_prototypes_niters, 0, "313", integer=True),
      check.at_least("model.nmb_prototypes", m.nmb_prototypes, 1, "3000", integer=True),
      check.at_least("model.feat_dim", m.feat_dim, 0, "128", integer=True),
      check.at_least("model.hidden_mlp", m.hidden_mlp, 0, "2048", integer=True),
      check.at_least("crops.global_number + crops.local_number", n_crops, 2, "2 + 6", integer=True),
      (f"config.loss.crops_for_assign={tuple(loss.crops_for_assign)!r}: {bad_assign} not crop indices of the "
       f"{n_crops} crops (0..{n_crops - 1}); the official uses (0, 1)") if bad_assign or not loss.crops_for_assign
      else None,
  )
