"""SwAV swapped-prediction loss with the online-clustering queue (Caron et al. 2020, Sec. 3.1-3.2).

Semantics follow `train` in the official main_swav.py, including its per-GPU queue: the global batch
of B samples is split into `n_shards` contiguous blocks (the devices of the mesh's data axis); each
block prepends its own queue before Sinkhorn-Knopp, whose sums then run over all blocks. With
n_shards = 1 this is the single-device recipe. The functions are pure: the queue comes in and the new
queue goes out, to be kept in the train state (and checkpointed) by the caller.

Sinkhorn-Knopp treats samples symmetrically (its sums are over all samples or per sample), so the codes
depend only on the SET of queued embeddings, not on their order: n_shards queues of Qd rows give the
same loss as one queue of n_shards * Qd rows (up to summation order). The per-shard layout is kept so
that each device's queue rows stay next to its batch block when the queue is sharded on axis 1.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from dino_jax.losses.sinkhorn import sinkhorn_knopp


def queue_rows_per_shard(queue_length, *, batch_size, n_shards):
  """Rows of the queue each shard holds, as the official code sizes it (0 means no queue).

  The official trims `queue_length` to a multiple of the global batch (batch_size_per_gpu *
  world_size) and gives each GPU `queue_length // world_size` rows, a multiple of its batch.
  `batch_size` here is the global batch (per crop).
  """
  if batch_size <= 0 or n_shards <= 0 or batch_size % n_shards:
    raise ValueError(f"batch_size={batch_size} must be a positive multiple of n_shards={n_shards}")
  if queue_length < 0:
    raise ValueError(f"queue_length={queue_length} must be >= 0")
  queue_length -= queue_length % batch_size
  return queue_length // n_shards


def init_queue(queue_length, *, batch_size, n_shards, n_assign, dim, dtype=jnp.float32):
  """An empty (all-zero) queue [n_assign, n_shards, rows, dim], or None when it would have no rows."""
  rows = queue_rows_per_shard(queue_length, batch_size=batch_size, n_shards=n_shards)
  if rows == 0:
    return None
  return jnp.zeros((n_assign, n_shards, rows, dim), dtype)


def _entropy(p, axis=-1):
  return -jnp.sum(p * jnp.log(jnp.clip(p, 1e-30)), axis=axis)


def swav_loss(embedding, scores, prototypes, queue=None, *, batch_size, crops_for_assign=(0, 1), temperature=0.1,
              epsilon=0.05, sinkhorn_iters=3, queue_active=True):
  """Swapped prediction: each assigned crop's Sinkhorn codes are predicted from every other crop.

  Args:
    embedding: [n_crops * B, D] L2-normalised embeddings, crop-major (all of crop 0, then crop 1, ...).
    scores: [n_crops * B, K] = embedding @ prototypes (the prototype layer's output).
    prototypes: [D, K] prototype matrix (flax layout, columns L2-normalised); only used to re-score
      the queue with the current prototypes.
    queue: [len(crops_for_assign), n_shards, Qd, D] stored embeddings (Qd a multiple of B / n_shards,
      see `init_queue`), or None for no queue.
    batch_size: B, the global batch per crop.
    crops_for_assign: crops whose assignments serve as targets (the two global crops by default).
    temperature: softmax temperature of the predictions (0.1).
    epsilon, sinkhorn_iters: Sinkhorn-Knopp parameters (0.05, 3).
    queue_active: bool (may be traced): False before `epoch_queue_starts`, when the official code has
      no queue yet; the queue is then neither used nor filled.

  Returns:
    (loss, new_queue, aux): the float32 scalar loss; the updated queue (None when `queue` is None);
    aux, a dict of scalar metrics: `queue_used` (1.0 when the last assigned crop used the queue),
    `assign_entropy` (mean per-sample entropy of the codes) and `cluster_entropy` (entropy of the
    batch-mean code, log K at perfect equipartition), both averaged over the assigned crops.
  """
  n_rows, num_prototypes = scores.shape
  if batch_size <= 0 or n_rows % batch_size or embedding.shape[0] != n_rows:
    raise ValueError(f"swav_loss: scores {scores.shape} and embedding {embedding.shape} must have "
                     f"n_crops * batch_size rows (batch_size={batch_size})")
  n_crops = n_rows // batch_size
  if n_crops < 2 or not crops_for_assign or any(not 0 <= c < n_crops for c in crops_for_assign):
    raise ValueError(f"swav_loss: crops_for_assign={tuple(crops_for_assign)} must name crops of {n_crops}")
  if prototypes.shape != (embedding.shape[1], num_prototypes):
    raise ValueError(f"swav_loss: prototypes {prototypes.shape} must be [D, K] = "
                     f"{(embedding.shape[1], num_prototypes)}")
  if queue is not None:
    n_assign, n_shards, queue_rows, dim = queue.shape
    if (n_assign, dim) != (len(crops_for_assign), embedding.shape[1]) or batch_size % n_shards:
      raise ValueError(f"swav_loss: queue {queue.shape} must be [{len(crops_for_assign)}, n_shards, Qd, "
                       f"{embedding.shape[1]}] with n_shards dividing batch_size={batch_size}")
    local = batch_size // n_shards
    if queue_rows < local or queue_rows % local:
      raise ValueError(f"swav_loss: queue rows per shard {queue_rows} must be a positive multiple of the "
                       f"per-shard batch {local}")

  scores = scores.astype(jnp.float32)
  log_probs = jax.nn.log_softmax(scores.reshape(n_crops, batch_size, num_prototypes) / temperature, axis=-1)
  codes_scores = jax.lax.stop_gradient(scores).reshape(n_crops, batch_size, num_prototypes)
  embedding = jax.lax.stop_gradient(embedding).reshape(n_crops, batch_size, -1)
  prototypes = jax.lax.stop_gradient(prototypes).astype(jnp.float32)
  sinkhorn = lambda s: sinkhorn_knopp(s, epsilon=epsilon, num_iters=sinkhorn_iters)

  loss = 0.0
  used = jnp.asarray(False)
  new_queue = []
  assign_entropy = cluster_entropy = 0.0
  for i, crop in enumerate(crops_for_assign):
    out = codes_scores[crop]
    if queue is None:
      q = sinkhorn(out)
    else:
      queue_i = queue[i]
      # Official: `use_the_queue or not torch.all(queue[i, -1, :] == 0)`, i.e. the queue is full, and
      # once true it stays true for the remaining crops. Each GPU tests its own queue; they fill in
      # lockstep, so the test is taken over all shards at once.
      full = jnp.all(jnp.any(queue_i[:, -1, :] != 0, axis=-1))
      used = jnp.logical_and(queue_active, jnp.logical_or(used, full))

      # Stored embeddings are re-scored with the current prototypes, each shard's queue goes in front
      # of its own block of the batch, and the codes are read from the last `local` rows per shard.
      stored = jnp.einsum("sqd,dk->sqk", queue_i.astype(jnp.float32), prototypes)
      joint = jnp.concatenate([stored, out.reshape(n_shards, local, num_prototypes)], axis=1)
      q_queue = sinkhorn(joint)[:, -local:].reshape(batch_size, num_prototypes)
      # Both versions are computed and one is selected: Sinkhorn costs little next to the network,
      # and a lax.cond would make XLA:GPU copy the predicate to the host and wait on it every step.
      q = jnp.where(used, q_queue, sinkhorn(out))
      # Shift by one batch and put the current embeddings first (newest first), per shard.
      current = embedding[crop].reshape(n_shards, local, -1).astype(queue.dtype)
      shifted = jnp.concatenate([current, queue_i[:, :-local]], axis=1)
      new_queue.append(jnp.where(queue_active, shifted, queue_i))

    # ce[v] = mean_b -sum_k q log p_v for every crop v; the assigned crop itself is left out.
    ce = -jnp.einsum("bk,vbk->v", q, log_probs) / batch_size
    loss += jnp.sum(jnp.where(jnp.arange(n_crops) == crop, 0.0, ce)) / (n_crops - 1)
    assign_entropy += jnp.mean(_entropy(q / jnp.sum(q, axis=-1, keepdims=True)))
    cluster_entropy += _entropy(jnp.mean(q, axis=0) / jnp.sum(jnp.mean(q, axis=0)))

  n_assign = len(crops_for_assign)
  aux = {
      "queue_used": used.astype(jnp.float32),
      "assign_entropy": assign_entropy / n_assign,
      "cluster_entropy": cluster_entropy / n_assign,
  }
  return loss / n_assign, (None if queue is None else jnp.stack(new_queue)), aux
