"""The whole DINO step against an independent PyTorch implementation of the official step (tests/torch_ref/dino.py).

Identical initial weights and identical (already augmented) crops; the schedules are short enough that the run
crosses the unfreezing of the last layer (after epoch 0) and the end of the teacher-temperature warm-up (epoch 2).
"""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
from flax import nnx

from configs import common
from dino_jax import models, optim, steps
from dino_jax.interop import torch as interop
from dino_jax.state import TrainState, merge_model, split_model
from tests.torch_ref import dino as ref
from tests.torch_ref import heads as ref_heads
from tests.torch_ref import vit as ref_vit

B, EPOCHS, NITER, N_LOCAL = 4, 4, 2, 3
VIT = dict(depth=2, embed_dim=32, num_heads=2, img_size=16)
HEAD = dict(out_dim=64, hidden_dim=48, bottleneck_dim=16)


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12)


def _config(optimizer, norm_last_layer):
  c = common.dino_defaults()
  c.epochs, c.batch_size = EPOCHS, B
  c.model.out_dim, c.model.norm_last_layer = HEAD["out_dim"], norm_last_layer
  c.optim.name = optimizer
  c.optim.lr = 0.05 if optimizer == "adamw" else 2.0   # large enough that every step moves the weights visibly
  c.optim.warmup_epochs = 1
  c.optim.freeze_last_layer = 1
  c.optim.clip_grad = 0.3                               # small: clipping is active on most tensors
  c.loss.warmup_teacher_temp, c.loss.teacher_temp, c.loss.warmup_teacher_temp_epochs = 0.04, 0.07, 2
  c.crops.global_size, c.crops.local_size, c.crops.local_number = 16, 8, N_LOCAL
  return c


def _models(norm_last_layer):
  rngs = nnx.Rngs(0)
  backbone = models.vit_tiny(patch_size=4, rngs=rngs, **VIT)
  head = models.DINOHead(VIT["embed_dim"], HEAD["out_dim"], hidden_dim=HEAD["hidden_dim"],
                         bottleneck_dim=HEAD["bottleneck_dim"], norm_last_layer=norm_last_layer, rngs=rngs)
  ours = models.MultiCropWrapper(backbone, head)

  def torch_net(norm):
    return ref_heads.MultiCropWrapper(
        ref_vit.VisionTransformer(patch_size=4, **VIT),
        ref_heads.DINOHead(VIT["embed_dim"], HEAD["out_dim"], hidden_dim=HEAD["hidden_dim"],
                           bottleneck_dim=HEAD["bottleneck_dim"], norm_last_layer=norm))

  student = torch_net(norm_last_layer)
  teacher = torch_net(True)   # official: the teacher head is built with the default norm_last_layer
  student.load_state_dict({k: torch.from_numpy(v) for k, v in interop.state_dict(ours).items()}, strict=True)
  return ours, student, teacher


def _state_and_update(config, ours):
  """(graphdef, params, initial TrainState, jitted dino_update) for our network `ours`."""
  graphdef, params, stats = split_model(ours)
  schedules = optim.make_schedules(config, NITER)
  tx = optim.make_optimizer(config, schedules, optim.make_freeze_fn(config, NITER))
  state = TrainState(step=jnp.int32(0), params=params, teacher=params, opt_state=tx.init(params), batch_stats=stats,
                     teacher_batch_stats=stats, center=jnp.zeros(HEAD["out_dim"]), queue=jnp.zeros(0),
                     nonfinite_step=jnp.int32(-1))
  update = jax.jit(functools.partial(steps.dino_update, graphdef=graphdef, tx=tx, schedules=schedules,
                                     config=config, steps_per_epoch=NITER))
  return graphdef, params, state, update


def _crops(step):
  rng = np.random.default_rng(step)
  g = rng.normal(size=(2 * B, 16, 16, 3)).astype(np.float32)
  l = rng.normal(size=(N_LOCAL * B, 8, 8, 3)).astype(np.float32)
  return g, l


def _torch_images(g, l):
  t = lambda x: torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
  return [t(g[i * B:(i + 1) * B]) for i in range(2)] + [t(l[i * B:(i + 1) * B]) for i in range(N_LOCAL)]


def _without_key_bias(qkv_bias):
  """The query and value thirds of a qkv bias.

  The key bias adds q.b_k to every logit of a query's row, which the softmax ignores: its exact gradient is 0, and
  both frameworks return rounding noise (~1e-10) instead. Adam divides by sqrt(v) + 1e-8, turning that noise into
  updates of order lr with an arbitrary sign, so those entries are not comparable between any two implementations
  (with SGD they are, and the SGD case compares them).
  """
  d = qkv_bias.shape[0] // 3
  return np.concatenate([qkv_bias[:d], qkv_bias[2 * d:]])


@pytest.mark.parametrize("optimizer,norm_last_layer", [("adamw", False), ("adamw", True), ("sgd", True)])
def test_dino_step_matches_official_step(optimizer, norm_last_layer):
  config = _config(optimizer, norm_last_layer)
  ours, student, teacher = _models(norm_last_layer)
  official = ref.Trainer(student, teacher, out_dim=HEAD["out_dim"], ncrops=2 + N_LOCAL, epochs=EPOCHS,
                         niter_per_ep=NITER, batch_size=B, optimizer=optimizer, lr=config.optim.lr,
                         warmup_epochs=1, clip_grad=config.optim.clip_grad, freeze_last_layer=1,
                         warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=2,
                         weight_decay=0.04, weight_decay_end=0.4)

  graphdef, params, state, update = _state_and_update(config, ours)
  initial_last = np.asarray(params["head"]["last_layer"]["v"])
  for it in range(EPOCHS * NITER):
    g, l = _crops(it)
    loss_ref = official.step(_torch_images(g, l))
    state, metrics = update(state, [jnp.asarray(g), jnp.asarray(l)], jax.random.key(it))
    assert _rel(metrics["loss"], loss_ref) <= 1e-5, (it, float(metrics["loss"]), loss_ref)
    assert _rel(state.center, official.loss.center.numpy()[0]) <= 1e-5, it
    for name, theirs, mine in (("student", student, state.params), ("teacher", teacher, state.teacher)):
      sd = interop.state_dict(merge_model(graphdef, mine, state.batch_stats))
      for key, value in theirs.state_dict().items():
        a, b = sd[key], value.numpy()
        if key.endswith("attn.qkv.bias") and optimizer == "adamw":
          a, b = _without_key_bias(a), _without_key_bias(b)
        assert _rel(a, b) <= 1e-4, (it, name, key, _rel(a, b))
    frozen = it < NITER
    moved = not np.allclose(np.asarray(state.params["head"]["last_layer"]["v"]), initial_last)
    assert moved != frozen, f"last layer frozen={frozen} but moved={moved} at iteration {it}"
  assert float(metrics["teacher_temp"]) == pytest.approx(0.07)


def test_collapse_guard_freezes_state_on_nonfinite_loss():
  config = _config("adamw", True)
  ours, _, _ = _models(True)
  _, _, state, update = _state_and_update(config, ours)
  g, l = _crops(0)
  state, _ = update(state, [jnp.asarray(g), jnp.asarray(l)], jax.random.key(0))
  good = jax.device_get(state)
  g[0, 0, 0, 0] = np.nan
  state, metrics = update(state, [jnp.asarray(g), jnp.asarray(l)], jax.random.key(1))
  assert not np.isfinite(float(metrics["loss"]))
  assert int(state.nonfinite_step) == 1 and int(state.step) == 2
  g, l = _crops(2)
  state, _ = update(state, [jnp.asarray(g), jnp.asarray(l)], jax.random.key(2))   # later good steps change nothing
  for a, b in zip(jax.tree.leaves((good.params, good.teacher, good.opt_state, good.center)),
                  jax.tree.leaves((state.params, state.teacher, state.opt_state, state.center))):
    np.testing.assert_array_equal(a, np.asarray(b))
  assert int(state.nonfinite_step) == 1


def test_drop_path_on_the_student_only():
  """With drop-path 0.5, two different step keys change the student's output (the loss) but not the teacher's: the
  centre, an EMA of the teacher's raw logits, comes out bit-identical."""
  config = _config("adamw", True)
  rngs = nnx.Rngs(0)
  backbone = models.vit_tiny(patch_size=4, rngs=rngs, drop_path_rate=0.5, **VIT)
  head = models.DINOHead(VIT["embed_dim"], HEAD["out_dim"], hidden_dim=HEAD["hidden_dim"],
                         bottleneck_dim=HEAD["bottleneck_dim"], rngs=rngs)
  _, _, state, update = _state_and_update(config, models.MultiCropWrapper(backbone, head))
  g, l = _crops(0)
  one, m1 = update(state, [jnp.asarray(g), jnp.asarray(l)], jax.random.key(1))
  two, m2 = update(state, [jnp.asarray(g), jnp.asarray(l)], jax.random.key(2))
  np.testing.assert_array_equal(np.asarray(one.center), np.asarray(two.center))
  assert abs(float(m1["loss"]) - float(m2["loss"])) > 1e-4
