"""DINO loss, centring and teacher temperature: hand-derived values and the PyTorch reference."""
import math

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from dino_jax import losses
from tests.torch_ref import dino as ref


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_uniform_student_gives_ln_k():
  # log_softmax of constant logits is -ln K everywhere, so every cross-entropy term equals ln K.
  k, b = 7, 3
  student = jnp.zeros((4 * b, k))
  teacher = jnp.asarray(np.random.default_rng(0).normal(size=(2 * b, k)), jnp.float32)
  loss = losses.dino_loss(student, teacher, jnp.zeros(k), student_temp=0.1, teacher_temp=0.04)
  assert float(loss) == pytest.approx(math.log(k), rel=1e-6)


def test_pairs_skip_same_view_hand_computed():
  # B = 1, K = 2, 3 crops. Teacher targets are one-hot-like with a huge logit gap, so q0 = [1, 0], q1 = [0, 1].
  # Loss = (CE(q0, p1) + CE(q0, p2) + CE(q1, p0) + CE(q1, p2)) / 4 with CE(q, p) = -sum q log p.
  s = np.array([[0.3, -0.2], [1.0, 0.5], [-0.4, 0.9]], np.float32)      # crops 0, 1, 2 (one image each)
  t = np.array([[100.0, 0.0], [0.0, 100.0]], np.float32)
  lp = _log_softmax(s / 0.1)
  expected = -(lp[1, 0] + lp[2, 0] + lp[0, 1] + lp[2, 1]) / 4
  loss = losses.dino_loss(jnp.asarray(s), jnp.asarray(t), jnp.zeros(2), student_temp=0.1, teacher_temp=0.04)
  assert float(loss) == pytest.approx(expected, rel=1e-6)
  # Including the same-view pairs would give a different value: the skipping is what is tested.
  with_same = -(lp[0, 0] + lp[1, 0] + lp[2, 0] + lp[0, 1] + lp[1, 1] + lp[2, 1]) / 6
  assert abs(with_same - expected) > 1e-2


def test_centre_uses_old_value_then_updates_from_raw_logits():
  t = np.array([[1.0, 3.0], [5.0, -1.0]], np.float32)
  c0 = np.array([0.5, 0.5], np.float32)
  new = losses.update_center(jnp.asarray(c0), jnp.asarray(t), 0.9)
  # mean of raw logits (no temperature): [3, 1]; 0.9 * 0.5 + 0.1 * [3, 1] = [0.75, 0.55]
  np.testing.assert_allclose(np.asarray(new), [0.75, 0.55], rtol=1e-6)
  q = losses.teacher_targets(jnp.asarray(t), jnp.asarray(c0), 0.5)
  expected = np.exp(_log_softmax((t - c0) / 0.5))
  np.testing.assert_allclose(np.asarray(q), expected, rtol=1e-6)


@pytest.mark.parametrize("warmup_epochs", [0, 1, 3, 30])
def test_teacher_temperature_indexed_by_epoch(warmup_epochs):
  epochs = 40
  table = np.concatenate([np.linspace(0.04, 0.07, warmup_epochs), np.full(epochs - warmup_epochs, 0.07)])
  ours = [float(losses.teacher_temperature(e, warmup_temp=0.04, temp=0.07, warmup_epochs=warmup_epochs))
          for e in range(epochs)]
  np.testing.assert_allclose(ours, table, rtol=1e-6)


@pytest.mark.parametrize("ncrops,batch,k", [(2, 4, 16), (10, 3, 64)])
def test_loss_and_centre_match_pytorch_over_steps(ncrops, batch, k):
  rng = np.random.default_rng(1)
  tref = ref.DINOLoss(k, ncrops, 0.04, 0.07, 2, 5)
  center = jnp.zeros(k)
  for epoch in range(4):
    s = rng.normal(size=(ncrops * batch, k)).astype(np.float32) * 3
    t = rng.normal(size=(2 * batch, k)).astype(np.float32) * 3
    expected = float(tref(torch.from_numpy(s), torch.from_numpy(t), epoch))
    temp = losses.teacher_temperature(epoch, warmup_temp=0.04, temp=0.07, warmup_epochs=2)
    loss = losses.dino_loss(jnp.asarray(s), jnp.asarray(t), center, student_temp=0.1, teacher_temp=temp)
    center = losses.update_center(center, jnp.asarray(t), 0.9)
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    np.testing.assert_allclose(np.asarray(center), tref.center.numpy()[0], rtol=1e-5, atol=1e-7)


def test_loss_is_float32_for_bf16_inputs():
  s = jnp.ones((6, 8), jnp.bfloat16)
  t = jnp.ones((4, 8), jnp.bfloat16)
  loss = losses.dino_loss(s, t, jnp.zeros(8), teacher_temp=0.04)
  assert loss.dtype == jnp.float32
  assert float(loss) == pytest.approx(math.log(8), rel=1e-6)


def test_entropy_hand_values():
  p = jnp.asarray([[0.5, 0.5, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
  np.testing.assert_allclose(np.asarray(losses.entropy(p)), [math.log(2), 0.0], atol=1e-7)
