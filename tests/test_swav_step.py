"""The whole SwAV step against an independent PyTorch implementation of the official one (tests/torch_ref/swav.py
`Trainer`, following main_swav.py), and DINO's `centering='sinkhorn'` against a direct computation.

Every knob the update reads is set away from its official default (temperature, epsilon, Sinkhorn iterations,
crops_for_assign, momentum, weight decay, lr schedule, queue length and start, prototype freezing), so that code which
falls back to a default fails, and weights are compared through their drift since the start (ours against the
reference's, tests/helpers.assert_drift_matches), with a tolerance small against that drift.

The 6-iteration run crosses every switch of the official loop: the lr warm-up from `start_warmup` (epoch 0), the
queue start (`epoch_queue_starts` = 1, i.e. iteration 2), the queue filling up (2 batches long: full after iteration
3, used from iteration 4, across an epoch boundary where the official resets `use_the_queue`) and the unfreezing of
the prototypes (`freeze_prototypes_niters` = 3).

Backbones: a small ViT (BatchNorm only in the projection head), where float32 follows the float64 reference
closely and the drifts are held to 1e-3 of the reference's; and the ResNet-50 trunk (SwAV's padded stem, bottleneck
blocks with their downsampling, widths 64 -> 2048) with one block per stage instead of (3, 4, 6, 3) (the full
network's forward is matched in tests/test_models_resnet.py). With 32-px global and 16-px local crops of 4 images,
layer4 sees 1x1 maps, so every BatchNorm of the trunk normalises a handful of values per channel, which amplifies
float32 rounding (a rounding difference flips a ReLU or a near-degenerate BatchNorm and LARC then normalises the
changed direction): there the drifts are held to 3x PyTorch float32's own distance from float64, measured in the same
run. The PyTorch reference runs in float64.
"""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from configs import common
from dino_jax import models
from dino_jax import state as state_lib
from dino_jax.methods import swav
from dino_jax.interop import torch as interop
from dino_jax.state import merge_model
from tests.helpers import assert_drift_matches, method_step
from tests.torch_ref import heads as ref_heads
from tests.torch_ref import resnet as ref_resnet
from tests.torch_ref import swav as ref
from tests.torch_ref import vit as ref_vit

B, NITER, EPOCHS, N_LOCAL = 4, 2, 3, 2
G, L = 32, 16   # crop sizes
VIT = dict(depth=2, embed_dim=32, num_heads=2, img_size=32)
LAYERS = (1, 1, 1, 1)
HEAD = dict(hidden_mlp=256, feat_dim=32, nmb_prototypes=40)
# Official defaults in the comments; none of them is used here.
KNOBS = dict(temperature=0.2, epsilon=0.07, sinkhorn_iters=4,   # 0.1, 0.05, 3
             crops_for_assign=(0, 2),                          # (0, 1): a global and a local crop assigned
             momentum=0.8)                                      # 0.9
ROUNDING = 1e-6


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12)


def _swav_config():
  c = common.swav_defaults()
  c.epochs, c.batch_size = EPOCHS, B
  c.model.dtype = "float32"
  c.model.hidden_mlp, c.model.feat_dim = HEAD["hidden_mlp"], HEAD["feat_dim"]
  c.model.nmb_prototypes = HEAD["nmb_prototypes"]
  c.crops.global_size, c.crops.local_size, c.crops.local_number = G, L, N_LOCAL
  c.loss.queue_length = 2 * B + 1           # trimmed to 2 batches, as the official trims it
  c.loss.epoch_queue_starts = 1
  c.optim.lr, c.optim.min_lr, c.optim.start_warmup, c.optim.warmup_epochs = 1.0, 0.1, 0.2, 1
  # 1e-3 rather than 1e-6: folding the decay into LARC then changes every update visibly, and it dominates the
  # rounding noise of the one gradient that is exactly 0 (the Linear bias in front of the projection's BatchNorm).
  c.optim.weight_decay = c.optim.weight_decay_end = 1e-3
  c.optim.freeze_prototypes_niters = 3
  c.optim.momentum = KNOBS["momentum"]
  for key in ("temperature", "epsilon", "sinkhorn_iters", "crops_for_assign"):
    c.loss[key] = KNOBS[key]
  return c


def _models(backbone):
  """Ours and the PyTorch twin (float64) with identical weights. For the ResNet trunk, BatchNorm affine parameters
  and running statistics are randomised (in PyTorch, then imported) so that no tensor starts at norm 0 (LARC's
  plain-gradient branch for a zero tensor is covered in tests/test_optim_larc.py)."""
  if backbone == "vit":
    ours_backbone, ref_backbone, dim = models.vit_tiny(patch_size=8, rngs=nnx.Rngs(0), **VIT), \
        ref_vit.VisionTransformer(patch_size=8, **VIT), VIT["embed_dim"]
  else:
    ours_backbone, ref_backbone, dim = models.ResNet(LAYERS, rngs=nnx.Rngs(0)), ref_resnet.ResNet50(swav=True), 2048
    for i, n in enumerate(LAYERS):
      setattr(ref_backbone, f"layer{i + 1}", getattr(ref_backbone, f"layer{i + 1}")[:n])
  ours = models.MultiCropWrapper(ours_backbone, models.SwAVHead(
      dim, hidden_mlp=HEAD["hidden_mlp"], output_dim=HEAD["feat_dim"], nmb_prototypes=HEAD["nmb_prototypes"],
      rngs=nnx.Rngs(1)))
  net = ref_heads.MultiCropWrapper(ref_backbone, ref_heads.SwAVHead(dim, HEAD["hidden_mlp"], HEAD["feat_dim"],
                                                                    HEAD["nmb_prototypes"]))
  net.load_state_dict({k: torch.from_numpy(v) for k, v in interop.state_dict(ours).items()}, strict=True)
  gen = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for m in net.modules():
      if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
        m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
        m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=gen))
        m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=gen))
        m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
  interop.load_state_dict(ours, {k: v.numpy() for k, v in net.state_dict().items()})
  return ours, net


def _crops(it):
  rng = np.random.default_rng(100 + it)
  return (rng.normal(size=(2 * B, G, G, 3)).astype(np.float32),
          rng.normal(size=(N_LOCAL * B, L, L, 3)).astype(np.float32))


def _torch_crops(g, l, dtype=torch.float64):
  t = lambda x: torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(dtype)
  return [t(g[i * B:(i + 1) * B]) for i in range(2)] + [t(l[i * B:(i + 1) * B]) for i in range(N_LOCAL)]


def _drift_error(mine, theirs, start):
  """max over tensors of |drift - reference drift| / max|reference drift| (tensors that moved visibly)."""
  worst = 0.0
  for key, value in theirs.items():
    d_ref = value.astype(np.float64) - start[key]
    if key.endswith("num_batches_tracked") or np.max(np.abs(d_ref)) <= 1e-4 * max(np.max(np.abs(value)), 1.0):
      continue
    worst = max(worst, np.max(np.abs(mine[key] - start[key] - d_ref)) / np.max(np.abs(d_ref)))
  return worst


@pytest.mark.parametrize("backbone", ["vit", "resnet"])
def test_swav_step_matches_official_step_over_six_iterations(backbone):
  """Against the reference in float64. ViT backbone (BatchNorm only in the projection): every tensor's drift within
  1e-3 of the reference's (measured <= 1.4e-4, and 6e-4 for the Linear bias in front of the projection's
  BatchNorm, whose exact gradient is 0: only the weight decay moves it, through LARC's noisy trust ratio). ResNet trunk in train mode: every BatchNorm normalises a handful of
  values per channel (batch 4, 1x1 maps in layer4), which amplifies float32 rounding (see test_models_resnet.py):
  PyTorch's own float32 run of the same loop leaves the float64 one by 1.6e-2 to 3.1e-2 of the drift from
  the second iteration on (ours: <= 1e-4, and 1.1e-2 at the last iteration; measured), so the drifts are held to 3x PyTorch float32's own error, measured in this run (single-threaded, so
  that run is deterministic), plus 1e-4."""
  config = _swav_config()
  ours, net = _models(backbone)
  kwargs = dict(nmb_crops=(2, N_LOCAL), batch_size=B, epochs=EPOCHS, niter_per_ep=NITER,
                feat_dim=HEAD["feat_dim"], base_lr=config.optim.lr, final_lr=config.optim.min_lr,
                warmup_epochs=1, start_warmup=config.optim.start_warmup, wd=config.optim.weight_decay,
                freeze_prototypes_niters=3, queue_length=config.loss.queue_length, epoch_queue_starts=1,
                crops_for_assign=KNOBS["crops_for_assign"], temperature=KNOBS["temperature"],
                epsilon=KNOBS["epsilon"], sinkhorn_iterations=KNOBS["sinkhorn_iters"], momentum=KNOBS["momentum"])
  fp32 = ref.Trainer(copy.deepcopy(net), **kwargs) if backbone == "resnet" else None
  official = ref.Trainer(net.double(), **kwargs)
  initial = {k: v.numpy().astype(np.float64) for k, v in net.state_dict().items()}
  graphdef, state, update = method_step(config, ours, steps_per_epoch=NITER)
  normalised = np.asarray(swav.normalize_prototypes(state.params)["head"]["prototypes"]["kernel"])
  queue_used = []
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  try:
    for it in range(EPOCHS * NITER):
      g, l = _crops(it)
      if official.loss.queue is not None:
        official.loss.queue = [q.double() for q in official.loss.queue]   # `start_queue` allocates float32
      loss_ref = official.step(_torch_crops(g, l))
      if fp32 is not None:
        fp32.step(_torch_crops(g, l, torch.float32))
      state, metrics = update(state, [jnp.asarray(g), jnp.asarray(l)], jax.random.key(it))
      assert _rel(metrics["loss"], loss_ref) <= 1e-5, (it, float(metrics["loss"]), loss_ref)
      assert _rel(metrics["lr"], official.lr[it]) <= 1e-6, it
      # Parameters and BatchNorm running statistics (both in the torch state dict), tensor by tensor, through their
      # drift since the start (the prototypes' drift includes their normalisation, as in the official in-place one).
      mine = interop.state_dict(merge_model(graphdef, state.params, state.batch_stats))
      theirs = {k: v.numpy() for k, v in official.model.state_dict().items()}
      if fp32 is None:
        assert_drift_matches(it, mine, theirs, initial, tol=1e-3, rounding=ROUNDING)
      else:
        torch32 = {k: v.numpy() for k, v in fp32.model.state_dict().items()}
        ours_err, torch_err = _drift_error(mine, theirs, initial), _drift_error(torch32, theirs, initial)
        assert ours_err <= 3 * torch_err + 1e-4, (it, ours_err, torch_err)
      queue = state.method_state["queue"]
      if official.queue is None:
        assert not np.any(queue), it
      else:
        assert _rel(queue[:, 0], official.queue) <= 1e-4, it
      assert state.teacher is None and state.teacher_batch_stats is None   # SwAV has no teacher
      frozen = it < 3
      prototypes = np.asarray(state.params["head"]["prototypes"]["kernel"])
      moved = _rel(prototypes, normalised)   # normalised in every iteration, updated only once unfrozen
      assert (moved <= 1e-6) if frozen else (moved > 1e-4), (it, moved)
      queue_used.append(float(metrics["queue_used"]))
  finally:
    torch.set_num_threads(threads)
  assert queue_used == [0, 0, 0, 0, 1, 1]
  assert np.all(np.any(state.method_state["queue"] != 0, axis=-1))
  for key, value in official.model.state_dict().items():    # every tensor moved visibly: the checks are informative
    if not key.endswith("num_batches_tracked"):
      assert np.max(np.abs(value.numpy() - initial[key])) > 1e-3 * np.max(np.abs(initial[key])), key
  if backbone == "vit":
    return

  # A non-finite loss freezes the whole state, queue and running statistics included (steps.commit).
  good = jax.device_get(state)
  g, l = _crops(6)
  g[1, 3, 3, 0] = np.nan
  state, metrics = update(state, [jnp.asarray(g), jnp.asarray(l)], jax.random.key(6))
  assert not np.isfinite(float(metrics["loss"]))
  assert int(state.nonfinite_step) == 6 and int(state.step) == 7
  for a, b in zip(jax.tree.leaves((good.params, good.opt_state, good.method_state, good.batch_stats)),
                  jax.tree.leaves((state.params, state.opt_state, state.method_state, state.batch_stats))):
    np.testing.assert_array_equal(a, np.asarray(b))


def test_init_allocates_the_queue_per_shard():
  """make_init_fn: an all-zero queue [n_assign, n_shards, rows per shard, D] sized like the official, none when the
  queue is shorter than a batch, and no teacher for SwAV."""
  config = _swav_config()
  config.model.arch, config.model.patch_size = "vit_tiny", 8
  config.model.overrides = {"depth": 1, "embed_dim": 16, "num_heads": 2, "img_size": 32}
  config.loss.queue_length, config.batch_size = 3840, 256
  tx = state_lib.build_run(config).tx
  state = jax.eval_shape(state_lib.make_init_fn(config, tx, n_shards=4))
  assert set(state.method_state) == {"queue"} and state.method_state["queue"].shape == (2, 4, 960, HEAD["feat_dim"])
  assert state.teacher is None and state.teacher_batch_stats is None
  config.loss.queue_length = 255
  assert jax.eval_shape(state_lib.make_init_fn(config, tx, n_shards=4)).method_state == {}


# ---- DINO with Sinkhorn-Knopp instead of centring (DINOv2) --------------------------------------------------------
def test_dino_sinkhorn_centering_matches_direct_computation():
  """loss.centering='sinkhorn': the teacher targets are Sinkhorn-Knopp codes of the raw teacher logits of both global
  crops together ([2B, K], epsilon = the teacher temperature of the epoch, 3 iterations), as DINOv2's
  `sinkhorn_knopp_teacher`; the student is trained with DINO's cross-entropy against them. Computed here directly:
  the teacher logits from a torch copy of the network, the codes from the official SwAV Sinkhorn (tests/torch_ref)."""
  vit = dict(depth=1, embed_dim=16, num_heads=2, img_size=16)
  c = common.dino_defaults()
  c.epochs, c.batch_size = 2, B
  c.model.dtype, c.model.out_dim, c.model.drop_path_rate = "float32", 24, 0.0
  c.model.head_hidden_dim, c.model.head_bottleneck_dim = 32, 8
  c.loss.centering = "sinkhorn"
  c.loss.warmup_teacher_temp, c.loss.teacher_temp, c.loss.warmup_teacher_temp_epochs = 0.04, 0.07, 1
  c.crops.global_size, c.crops.local_size, c.crops.local_number = 16, 8, N_LOCAL
  rngs = nnx.Rngs(0)
  ours = models.MultiCropWrapper(models.vit_tiny(patch_size=4, rngs=rngs, **vit),
                                 models.DINOHead(16, 24, hidden_dim=32, bottleneck_dim=8, rngs=rngs))
  net = ref_heads.MultiCropWrapper(ref_vit.VisionTransformer(patch_size=4, **vit),
                                   ref_heads.DINOHead(16, 24, hidden_dim=32, bottleneck_dim=8))
  net.load_state_dict({k: torch.from_numpy(v) for k, v in interop.state_dict(ours).items()}, strict=True)
  _, state, update = method_step(c, ours, steps_per_epoch=NITER)
  rng = np.random.default_rng(5)
  g = rng.normal(size=(2 * B, 16, 16, 3)).astype(np.float32)
  l = rng.normal(size=(N_LOCAL * B, 8, 8, 3)).astype(np.float32)
  _, metrics = update(state, [jnp.asarray(g), jnp.asarray(l)], jax.random.key(0))

  t = lambda x: torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
  with torch.no_grad():
    teacher = net([t(g)]).double()
    student = net([t(g), t(l)]).double()
  codes = ref.distributed_sinkhorn([teacher], epsilon=0.04, iterations=3)[0]   # epoch 0: warm-up temperature
  log_p = torch.log_softmax(student / 0.1, dim=-1).chunk(2 + N_LOCAL)
  q = codes.chunk(2)
  terms = [-(q[i] * log_p[v]).sum(-1).mean() for i in range(2) for v in range(2 + N_LOCAL) if v != i]
  expected = float(sum(terms) / len(terms))
  assert abs(float(metrics["loss"]) - expected) <= 1e-5 * abs(expected)
  # The test tells the two paths apart: centring (the centre is 0 at the first step) gives another loss.
  q = torch.softmax(teacher / 0.04, dim=-1).chunk(2)
  centred = float(sum(-(q[i] * log_p[v]).sum(-1).mean() for i in range(2) for v in range(2 + N_LOCAL) if v != i))
  assert abs(centred / len(terms) - expected) > 1e-3 * abs(expected)
