"""SwAV loss and queue: parity with our PyTorch version of the official `train` loop (tests/torch_ref/swav.py),
with and without the queue, on 1 and 2 shards, over consecutive calls as the queue starts, fills and is used."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from dino_jax.losses.swav import init_queue, queue_rows_per_shard, swav_loss
from tests.torch_ref.swav import LARC, SwAVLossReference, split_ranks


def normalise(x, axis):
  return x / np.linalg.norm(x, axis=axis, keepdims=True)


def make_batch(rng, n_crops, batch, dim, k):
  """Crop-major L2-normalised embeddings, column-normalised prototypes [D, K] and scores."""
  z = normalise(rng.standard_normal((n_crops * batch, dim)), 1).astype(np.float32)
  c = normalise(rng.standard_normal((dim, k)), 0).astype(np.float32)
  return z, c, z @ c


def reference_loss_and_grad(ref, z, c, scores, n_crops, world):
  """Official loss (mean over simulated ranks) and its gradient w.r.t. the global scores."""
  scores_t = torch.from_numpy(scores).requires_grad_(True)
  outputs = split_ranks(scores_t, n_crops, world)
  loss = ref(split_ranks(torch.from_numpy(z), n_crops, world), outputs, torch.from_numpy(c.T.copy()))
  loss.backward()
  return float(loss.detach()), scores_t.grad.numpy()


def rel(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b)))


@functools.partial(jax.jit, static_argnames=("batch_size", "crops_for_assign"))
def loss_and_grad(z, scores, c, queue, queue_active, *, batch_size, crops_for_assign):
  def f(s):
    loss, new_queue, aux = swav_loss(z, s, c, queue, batch_size=batch_size, crops_for_assign=crops_for_assign,
                                     queue_active=queue_active)
    return loss, (new_queue, aux)
  (loss, (new_queue, aux)), grad = jax.value_and_grad(f, has_aux=True)(scores)
  return loss, grad, new_queue, aux


@pytest.mark.parametrize("nmb_crops,crops_for_assign,batch,k", [((2,), (0, 1), 8, 12), ((2, 4), (0, 1), 6, 20),
                                                                 ((2, 3), (1,), 4, 30)])
def test_without_queue_matches_official(nmb_crops, crops_for_assign, batch, k):
  n_crops = sum(nmb_crops)
  z, c, scores = make_batch(np.random.default_rng(batch * k), n_crops, batch, 16, k)
  ref = SwAVLossReference(nmb_crops, crops_for_assign)
  expected_loss, expected_grad = reference_loss_and_grad(ref, z, c, scores, n_crops, 1)
  loss, grad, new_queue, aux = loss_and_grad(z, scores, c, None, True, batch_size=batch,
                                             crops_for_assign=crops_for_assign)
  assert new_queue is None and float(aux["queue_used"]) == 0.0
  assert abs(float(loss) - expected_loss) <= 1e-4 * abs(expected_loss)
  assert rel(grad, expected_grad) <= 1e-4


@pytest.mark.parametrize("n_shards", [1, 2])
def test_queue_over_consecutive_calls_matches_official(n_shards):
  """Calls 0-1: before `epoch_queue_starts` (no queue: neither used nor filled). From call 2 the queue is on;
  it holds 2 batches per shard, so it fills during calls 2-3 and is used from call 4 on. An epoch boundary
  (the official resets `use_the_queue`) falls between calls 4 and 5. Prototypes change every call, so the
  queue must be re-scored with the current ones."""
  nmb_crops, crops_for_assign, batch, dim, k = (2, 3), (0, 1), 8, 6, 10
  n_crops, local = sum(nmb_crops), batch // n_shards
  queue_length = 2 * batch + 3  # trimmed to 2 * batch like the official
  rng = np.random.default_rng(n_shards)
  ref = SwAVLossReference(nmb_crops, crops_for_assign, world_size=n_shards)
  queue = init_queue(queue_length, batch_size=batch, n_shards=n_shards, n_assign=2, dim=dim)
  assert queue.shape == (2, n_shards, 2 * local, dim)
  used = []
  for call in range(7):
    active = call >= 2
    if call == 2:
      ref.start_queue(queue_length, local, dim)
    if call == 5:
      ref.new_epoch()
    z, c, scores = make_batch(rng, n_crops, batch, dim, k)
    expected_loss, expected_grad = reference_loss_and_grad(ref, z, c, scores, n_crops, n_shards)
    loss, grad, queue, aux = loss_and_grad(z, scores, c, queue, jnp.asarray(active), batch_size=batch,
                                           crops_for_assign=crops_for_assign)
    assert abs(float(loss) - expected_loss) <= 1e-4 * abs(expected_loss), call
    assert rel(grad, expected_grad) <= 1e-4, call
    expected_queue = np.zeros(queue.shape, np.float32) if ref.queue is None else np.stack(
        [q.numpy() for q in ref.queue], axis=1)
    np.testing.assert_array_equal(queue, expected_queue)
    assert float(aux["queue_used"]) == float(all(ref.use_the_queue)), call
    used.append(float(aux["queue_used"]))
  assert used == [0, 0, 0, 0, 1, 1, 1]


def test_queue_changes_the_loss():
  """A full queue must matter (otherwise the parity above could hold with the queue ignored)."""
  rng = np.random.default_rng(7)
  z, c, scores = make_batch(rng, 2, 8, 6, 10)
  queue = normalise(rng.standard_normal((2, 2, 8, 6)), -1).astype(np.float32)
  with_queue, new_queue, aux = swav_loss(z, scores, c, queue, batch_size=8)
  inactive, same_queue, aux_off = swav_loss(z, scores, c, queue, batch_size=8, queue_active=False)
  no_queue, _, _ = swav_loss(z, scores, c, None, batch_size=8)
  assert float(aux["queue_used"]) == 1 and float(aux_off["queue_used"]) == 0
  assert abs(float(with_queue) - float(no_queue)) > 1e-3
  assert float(inactive) == float(no_queue)
  np.testing.assert_array_equal(same_queue, queue)
  np.testing.assert_array_equal(new_queue[:, :, 4:], queue[:, :, :4])  # shifted by the per-shard batch
  np.testing.assert_array_equal(new_queue[:, 1, :4], z.reshape(2, 2, 4, 6)[:, 1])  # newest first


def test_shard_count_only_changes_the_queue_layout():
  """Sinkhorn is symmetric in the samples, so 2 shard queues of 8 rows = 1 queue of the same 16 rows."""
  rng = np.random.default_rng(12)
  z, c, scores = make_batch(rng, 3, 8, 6, 10)
  queue2 = normalise(rng.standard_normal((2, 2, 8, 6)), -1).astype(np.float32)
  loss2, _, _ = swav_loss(z, scores, c, queue2, batch_size=8)
  loss1, _, _ = swav_loss(z, scores, c, queue2.reshape(2, 1, 16, 6), batch_size=8)
  assert abs(float(loss1) - float(loss2)) <= 1e-6 * abs(float(loss2))


def test_no_gradient_through_codes_queue_or_prototypes():
  rng = np.random.default_rng(8)
  z, c, scores = make_batch(rng, 3, 4, 5, 6)
  queue = normalise(rng.standard_normal((2, 1, 4, 5)), -1).astype(np.float32)
  grads = jax.grad(lambda z, c, q: swav_loss(z, jnp.asarray(scores), c, q, batch_size=4)[0],
                   argnums=(0, 1, 2))(z, c, queue)
  for g in grads:
    np.testing.assert_array_equal(g, 0.0)


def test_aux_entropies():
  """Codes from Sinkhorn spread mass over prototypes: the batch-mean code is near uniform (entropy ~ log K)."""
  z, c, scores = make_batch(np.random.default_rng(9), 2, 64, 8, 16)
  _, _, aux = swav_loss(z, scores, c, batch_size=64)
  assert 0.9 * np.log(16) < float(aux["cluster_entropy"]) <= np.log(16) + 1e-5
  assert 0.0 < float(aux["assign_entropy"]) < float(aux["cluster_entropy"])


def test_queue_rows_per_shard_follows_official_trimming():
  # bs256 recipe: queue 3840, 64 per GPU on 4 GPUs -> 3840 % 256 = 0, 960 rows per GPU.
  assert queue_rows_per_shard(3840, batch_size=256, n_shards=4) == 960
  # 3000 with a global batch of 256: trimmed to 2816 (11 batches), 1408 per shard on 2 shards.
  assert queue_rows_per_shard(3000, batch_size=256, n_shards=2) == 1408
  assert queue_rows_per_shard(100, batch_size=256, n_shards=1) == 0
  assert init_queue(100, batch_size=256, n_shards=1, n_assign=2, dim=128) is None
  with pytest.raises(ValueError, match="n_shards"):
    queue_rows_per_shard(3840, batch_size=256, n_shards=3)


def test_bad_shapes_raise_clear_errors():
  z, c, scores = make_batch(np.random.default_rng(10), 2, 4, 5, 6)
  with pytest.raises(ValueError, match="batch_size=3"):
    swav_loss(z, scores, c, batch_size=3)
  with pytest.raises(ValueError, match="crops_for_assign"):
    swav_loss(z, scores, c, batch_size=4, crops_for_assign=(2,))
  with pytest.raises(ValueError, match="per-shard batch"):
    swav_loss(z, scores, c, np.zeros((2, 2, 3, 5), np.float32), batch_size=4)
  with pytest.raises(ValueError, match="queue"):
    swav_loss(z, scores, c, np.zeros((1, 1, 4, 5), np.float32), batch_size=4)


def test_larc_reference_matches_hand_derived_steps():
  """The LARC + SGD reference (for the optax LARS parity tests) against the formulas written out in numpy:
  if ||p|| != 0 and ||g|| != 0, g <- (g + wd p) * 0.001 ||p|| / (||g|| + wd ||p|| + 1e-8); then torch SGD:
  buf = g on the first step, else 0.9 buf + g; p -= lr buf. A zero tensor (here a bias starting at 0) gets
  the plain gradient on its first step; a tensor without gradient is untouched."""
  lr, wd = 0.5, 1e-4
  rng = np.random.default_rng(11)
  start = [rng.standard_normal((3, 4)), np.zeros(4), rng.standard_normal(5)]
  params = [torch.tensor(x, requires_grad=True) for x in start]  # float64
  opt = LARC(torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=wd), trust_coefficient=0.001, clip=False)
  expected, bufs = [x.copy() for x in start[:2]], [None, None]
  for _ in range(3):
    grads = [rng.standard_normal(x.shape) for x in start[:2]]
    opt.zero_grad()
    for p, g in zip(params, grads):
      p.grad = torch.tensor(g)
    opt.step()
    for j, g in enumerate(grads):
      p_norm, g_norm = np.linalg.norm(expected[j]), np.linalg.norm(g)
      if p_norm != 0 and g_norm != 0:
        g = (g + wd * expected[j]) * 0.001 * p_norm / (g_norm + wd * p_norm + 1e-8)
      bufs[j] = g if bufs[j] is None else 0.9 * bufs[j] + g
      expected[j] = expected[j] - lr * bufs[j]
  for p, e in zip(params, expected):
    np.testing.assert_allclose(p.detach().numpy(), e, rtol=1e-12)
  np.testing.assert_array_equal(params[2].detach().numpy(), start[2])
  assert opt.param_groups[0]["weight_decay"] == wd  # restored after the step
