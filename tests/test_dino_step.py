"""The whole DINO step against an independent PyTorch implementation of the official step (tests/torch_ref/dino.py).

Identical initial weights and identical (already augmented) crops; the schedules are short enough that the run
crosses the unfreezing of the last layer (after epoch 0) and the end of the teacher-temperature warm-up (epoch 2).

Every knob the step reads is set away from its official default (KNOBS), so that code which ignores a config value
and falls back to the default fails; clipping is small enough to be active on most tensors at every iteration.
Weights are compared through their drift: after each iteration the change of every tensor since the start, ours
against the reference's, to a tolerance that is small against that change (a tolerance on the weights themselves
would pass a tensor that did not move at all).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from configs import common
from dino_jax import models
from dino_jax.interop import torch as interop
from dino_jax.state import merge_model
from tests.helpers import assert_drift_matches, method_step
from tests.torch_ref import dino as ref
from tests.torch_ref import heads as ref_heads
from tests.torch_ref import vit as ref_vit

B, EPOCHS, NITER, N_LOCAL = 4, 4, 2, 3
VIT = dict(depth=2, embed_dim=32, num_heads=2, img_size=16)
HEAD = dict(out_dim=64, hidden_dim=48, bottleneck_dim=16)
# Official defaults in the comments; none of them is used here.
KNOBS = dict(
    student_temp=0.2,                                    # 0.1
    center_momentum=0.7,                                 # 0.9
    teacher_momentum=0.95,                               # 0.996 (large drift: the EMA is visible in 8 steps)
    weight_decay=0.1, weight_decay_end=0.3,              # 0.04 -> 0.4
    min_lr=1e-3,                                         # 1e-6 (the cosine's end is reached at the last step)
    momentum=0.8,                                        # 0.9 (SGD / LARS)
    warmup_teacher_temp=0.05, teacher_temp=0.07, warmup_teacher_temp_epochs=2,   # 0.04, 0.04, 0
    clip_grad=0.3,                                       # 3.0: here it clips most tensors
)
LR = {"adamw": 0.05, "sgd": 2.0, "lars": 60.0}           # x batch / 256: every step moves the weights visibly
# Weights: each tensor's drift within 1e-3 of the reference's largest drift, plus 1e-6 x max(|w|, 1) for float32
# rounding (tests/helpers.assert_drift_matches). Measured: student <= 2e-4 (AdamW), <= 1e-4 (SGD, LARS) of its drift;
# the teacher's differs by up to 2.3e-3 of its drift only where that drift is ~100 float32 ulps (norm weights near 1),
# inside the rounding allowance.
DRIFT_TOL, ROUNDING = 1e-3, 1e-6


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12)


def _config(optimizer, norm_last_layer, use_bn=False):
  c = common.dino_defaults()
  c.epochs, c.batch_size = EPOCHS, B
  c.model.out_dim, c.model.norm_last_layer, c.model.use_bn_in_head = HEAD["out_dim"], norm_last_layer, use_bn
  c.model.drop_path_rate = 0.0       # the reference has no stochastic depth (drop-path is tested on its own below)
  c.model.dtype = "float32"
  c.teacher_momentum = KNOBS["teacher_momentum"]
  c.optim.name, c.optim.lr = optimizer, LR[optimizer]
  c.optim.warmup_epochs = 1
  c.optim.freeze_last_layer = 1
  for key in ("weight_decay", "weight_decay_end", "min_lr", "momentum", "clip_grad"):
    c.optim[key] = KNOBS[key]
  for key in ("student_temp", "center_momentum", "warmup_teacher_temp", "teacher_temp", "warmup_teacher_temp_epochs"):
    c.loss[key] = KNOBS[key]
  c.crops.global_size, c.crops.local_size, c.crops.local_number = 16, 8, N_LOCAL
  return c


def _ours(norm_last_layer, use_bn=False, drop_path_rate=0.0):
  rngs = nnx.Rngs(0)
  backbone = models.vit_tiny(patch_size=4, rngs=rngs, drop_path_rate=drop_path_rate, **VIT)
  head = models.DINOHead(VIT["embed_dim"], HEAD["out_dim"], hidden_dim=HEAD["hidden_dim"],
                         bottleneck_dim=HEAD["bottleneck_dim"], norm_last_layer=norm_last_layer, use_bn=use_bn,
                         rngs=rngs)
  return models.MultiCropWrapper(backbone, head)


def _models(norm_last_layer, use_bn):
  ours = _ours(norm_last_layer, use_bn)

  def torch_net(norm):
    return ref_heads.MultiCropWrapper(
        ref_vit.VisionTransformer(patch_size=4, **VIT),
        ref_heads.DINOHead(VIT["embed_dim"], HEAD["out_dim"], hidden_dim=HEAD["hidden_dim"],
                           bottleneck_dim=HEAD["bottleneck_dim"], norm_last_layer=norm, use_bn=use_bn))

  student = torch_net(norm_last_layer)
  teacher = torch_net(True)   # official: the teacher head is built with the default norm_last_layer
  student.load_state_dict({k: torch.from_numpy(v) for k, v in interop.state_dict(ours).items()}, strict=True)
  return ours, student, teacher


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
  (with SGD they are, and the SGD cases compare them).
  """
  d = qkv_bias.shape[0] // 3
  return np.concatenate([qkv_bias[:d], qkv_bias[2 * d:]])


# With BatchNorm in the head, a Linear bias in front of a BatchNorm and the backbone's final LayerNorm bias (a
# constant shift of the head's input, which the first BatchNorm removes) have an exactly zero gradient and no effect
# on the training forward; both frameworks give them rounding noise (~1e-9), which AdamW's normalisation turns into
# lr-sized steps of arbitrary sign, and which would then shift the running means. The test puts them back to zero
# after every step, on both sides.
_ZERO_GRADIENT = ("backbone.norm.bias", "head.mlp.0.bias", "head.mlp.3.bias")


def _zero_noise(params):
  def zero(path, x):
    name = interop_name(path)
    return jnp.zeros_like(x) if name in _ZERO_GRADIENT else x
  return jax.tree_util.tree_map_with_path(zero, params)


def interop_name(path):
  keys = [str(getattr(k, "key", k)) for k in path]
  if keys[:2] == ["head", "mlp"]:          # our nnx.List index -> torch's nn.Sequential index (Linear, BN, GELU)
    keys[2] = {"0": "0", "2": "3"}.get(keys[2], "?")
  return ".".join(keys)


@pytest.mark.parametrize("optimizer,norm_last_layer,use_bn", [
    ("adamw", False, False), ("adamw", True, True), ("sgd", True, False), ("lars", False, True)])
def test_dino_step_matches_official_step(optimizer, norm_last_layer, use_bn):
  config = _config(optimizer, norm_last_layer, use_bn)
  ours, student, teacher = _models(norm_last_layer, use_bn)
  official = ref.Trainer(student, teacher, out_dim=HEAD["out_dim"], ncrops=2 + N_LOCAL, epochs=EPOCHS,
                         niter_per_ep=NITER, batch_size=B, optimizer=optimizer, lr=config.optim.lr,
                         warmup_epochs=1, freeze_last_layer=1, momentum_teacher=KNOBS["teacher_momentum"],
                         **{k: KNOBS[k] for k in ("clip_grad", "warmup_teacher_temp", "teacher_temp",
                                                  "warmup_teacher_temp_epochs", "weight_decay", "weight_decay_end",
                                                  "min_lr", "student_temp", "center_momentum", "momentum")})
  start = {k: v.numpy().astype(np.float64) for k, v in student.state_dict().items()}
  start_teacher = {k: v.numpy().astype(np.float64) for k, v in teacher.state_dict().items()}
  graphdef, state, update = method_step(config, ours, steps_per_epoch=NITER)
  initial_last = np.asarray(state.params["head"]["last_layer"]["v"])
  for it in range(EPOCHS * NITER):
    g, l = _crops(it)
    loss_ref = official.step(_torch_images(g, l))
    assert 0 < official.clipped, it     # clipping is exercised (and the reference clips what we clip)
    state, metrics = update(state, [jnp.asarray(g), jnp.asarray(l)], jax.random.key(it))
    if use_bn:
      state = state.replace(params=_zero_noise(state.params), teacher=_zero_noise(state.teacher))
      with torch.no_grad():
        for net in (student, teacher):
          for key, p in net.state_dict().items():
            if key in _ZERO_GRADIENT:
              p.zero_()
    assert _rel(metrics["loss"], loss_ref) <= 1e-5, (it, float(metrics["loss"]), loss_ref)
    assert _rel(state.method_state["center"], official.loss.center.numpy()[0]) <= 1e-5, it
    assert float(metrics["lr"]) == pytest.approx(official.lr[it], rel=1e-5, abs=1e-12), it
    assert float(metrics["wd"]) == pytest.approx(official.wd[it], rel=1e-5), it
    assert float(metrics["teacher_momentum"]) == pytest.approx(official.mom[it], rel=1e-6), it
    for name, theirs, params, stats, start_sd in (
        ("student", student, state.params, state.batch_stats, start),
        ("teacher", teacher, state.teacher, state.teacher_batch_stats, start_teacher)):
      mine = interop.state_dict(merge_model(graphdef, params, stats))
      sd = {k: v.numpy() for k, v in theirs.state_dict().items()}
      if optimizer == "adamw":
        mine, sd, start_sd = ({k: _without_key_bias(v) if k.endswith("attn.qkv.bias") else v for k, v in d.items()}
                              for d in (mine, sd, start_sd))
      assert_drift_matches((it, name), mine, sd, start_sd, tol=DRIFT_TOL, rounding=ROUNDING)
    frozen = it < NITER
    moved = not np.allclose(np.asarray(state.params["head"]["last_layer"]["v"]), initial_last)
    assert moved != frozen, f"last layer frozen={frozen} but moved={moved} at iteration {it}"
  assert float(metrics["teacher_temp"]) == pytest.approx(KNOBS["teacher_temp"])


def test_collapse_guard_freezes_state_on_nonfinite_loss():
  config = _config("adamw", True)
  _, state, update = method_step(config, _ours(True), steps_per_epoch=NITER)
  g, l = _crops(0)
  state, _ = update(state, [jnp.asarray(g), jnp.asarray(l)], jax.random.key(0))
  good = jax.device_get(state)
  g[0, 0, 0, 0] = np.nan
  state, metrics = update(state, [jnp.asarray(g), jnp.asarray(l)], jax.random.key(1))
  assert not np.isfinite(float(metrics["loss"]))
  assert int(state.nonfinite_step) == 1 and int(state.step) == 2
  g, l = _crops(2)
  state, _ = update(state, [jnp.asarray(g), jnp.asarray(l)], jax.random.key(2))   # later good steps change nothing
  for a, b in zip(jax.tree.leaves((good.params, good.teacher, good.opt_state, good.method_state)),
                  jax.tree.leaves((state.params, state.teacher, state.opt_state, state.method_state))):
    np.testing.assert_array_equal(a, np.asarray(b))
  assert int(state.nonfinite_step) == 1


def test_drop_path_on_the_student_only():
  """With drop-path 0.5 the student's output (the loss) depends on the step key; the teacher's does not and has no
  drop-path at all: the centre after the first step is (1 - m) x the batch mean of the teacher network's logits on the
  global crops computed without any stochastic depth (a teacher with a fixed drop-path key would fail this)."""
  config = _config("adamw", True)
  ours = _ours(True, drop_path_rate=0.5)
  graphdef, state, update = method_step(config, ours, steps_per_epoch=NITER)
  g, l = _crops(0)
  one, m1 = update(state, [jnp.asarray(g), jnp.asarray(l)], jax.random.key(1))
  two, m2 = update(state, [jnp.asarray(g), jnp.asarray(l)], jax.random.key(2))
  np.testing.assert_array_equal(np.asarray(one.method_state["center"]), np.asarray(two.method_state["center"]))
  assert abs(float(m1["loss"]) - float(m2["loss"])) > 1e-4
  teacher = merge_model(graphdef, state.teacher, state.teacher_batch_stats)
  logits = np.asarray(teacher([jnp.asarray(g)], rng=None, train=True), np.float64)
  expected = (1 - KNOBS["center_momentum"]) * logits.mean(0)
  assert _rel(one.method_state["center"], expected) <= 1e-5
  dropped = np.asarray(teacher([jnp.asarray(g)], rng=jax.random.key(1), train=True), np.float64)
  assert _rel((1 - KNOBS["center_momentum"]) * dropped.mean(0), expected) > 1e-3   # the check can tell them apart
