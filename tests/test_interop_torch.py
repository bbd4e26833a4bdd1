"""Official PyTorch checkpoints in and out (dino_jax.interop.torch).

Round trips must be bit-identical; exports must load with `load_state_dict(strict=True)` into
our PyTorch references of the official modules; mismatches must be reported key by key.
"""
import argparse
import functools
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
from flax import nnx

from dino_jax.interop import torch as interop
from dino_jax.models import DINOHead, MultiCropWrapper, SwAVHead, build_backbone, resnet50
from tests.torch_ref import heads as ref_heads
from tests.torch_ref.resnet import ResNet50, SwAVResNet50
from tests.torch_ref.vit import vit as torch_vit


@functools.cache
def _shapes(make):
  return nnx.eval_shape(make)


def abstract(make):
  """A fresh abstract module (no JAX initialisation). Tracing a ResNet-50's init takes seconds, so the shapes of a
  module-level factory are traced once and cloned."""
  return nnx.clone(_shapes(make))


def randomised(make, seed=0):
  """A module whose every variable (params, running stats, counters) holds random values;
  built abstractly (no JAX initialisation) to stay fast."""
  module = abstract(make)
  rng = np.random.default_rng(seed)
  leaves = []
  for path, var in nnx.to_flat_state(nnx.state(module)):
    ref = var.get_value()
    if np.issubdtype(ref.dtype, np.integer):
      value = rng.integers(0, 1000, ref.shape).astype(ref.dtype)
    else:
      value = rng.standard_normal(ref.shape, dtype=np.float32).astype(ref.dtype)
      if path[-1] in ("var", "g"):
        value = np.abs(value) + 0.5
    leaves.append((path, jax.numpy.asarray(value)))
  nnx.update(module, nnx.from_flat_state(leaves))
  return module


def tiny_vit():
  return build_backbone("vit_tiny", depth=2, img_size=32, rngs=nnx.Rngs(0))


def dino_model(use_bn=True, norm_last_layer=False):
  return MultiCropWrapper(tiny_vit(), DINOHead(192, 256, use_bn=use_bn, norm_last_layer=norm_last_layer,
                                               hidden_dim=64, bottleneck_dim=32, rngs=nnx.Rngs(0)))


def torch_dino(use_bn=True, norm_last_layer=False):
  return ref_heads.MultiCropWrapper(torch_vit("vit_tiny", depth=2, img_size=32),
                                    ref_heads.DINOHead(192, 256, use_bn=use_bn, norm_last_layer=norm_last_layer,
                                                       hidden_dim=64, bottleneck_dim=32))


def rn50():
  return resnet50(rngs=nnx.Rngs(0))


def swav_model():
  return MultiCropWrapper(resnet50(rngs=nnx.Rngs(0)), SwAVHead(2048, nmb_prototypes=300, rngs=nnx.Rngs(0)))


def values(module):
  return {"/".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(module))}


def assert_bit_identical(a, b):
  assert a.keys() == b.keys()
  for k in a:
    assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and np.array_equal(a[k], b[k]), k


def strip(sd, prefix="module."):
  return {k.removeprefix(prefix): torch.from_numpy(v) for k, v in sd.items()}


def test_dino_import_export_import_is_bit_identical(tmp_path):
  """Student and teacher through a main_dino.py-style .pth file and back."""
  student, teacher = randomised(dino_model, 0), randomised(dino_model, 1)
  ckpt = interop.export_checkpoint(student, "dino", teacher=nnx.state(teacher))
  interop.save_pth(dict(ckpt, epoch=3, args=argparse.Namespace(arch="vit_tiny")), tmp_path / "checkpoint.pth")
  loaded = interop.load_pth(tmp_path / "checkpoint.pth")
  student2, teacher2 = abstract(dino_model), abstract(dino_model)
  interop.import_checkpoint(student2, loaded, checkpoint_key="student")
  interop.import_checkpoint(teacher2, loaded, checkpoint_key="teacher")
  assert_bit_identical(values(student2), values(student))
  assert_bit_identical(values(teacher2), values(teacher))
  again = interop.export_checkpoint(student2, "dino", teacher=teacher2)
  for who in ("student", "teacher"):
    assert_bit_identical(again[who], ckpt[who])


def test_dino_export_loads_strictly_into_official_modules():
  for use_bn in (True, False):
    student = randomised(lambda: dino_model(use_bn=use_bn, norm_last_layer=True))
    ckpt = interop.export_checkpoint(student, "dino", teacher=student)
    assert all(k.startswith("module.") for k in ckpt["student"])
    # main_dino.py wraps the teacher in DistributedDataParallel only when it has BatchNorms.
    assert all(k.startswith("module.") == use_bn for k in ckpt["teacher"])
    assert ckpt["student"]["module.head.last_layer.weight_g"].shape == (256, 1)
    for who in ("student", "teacher"):
      ref = torch_dino(use_bn=use_bn, norm_last_layer=True)
      ref.load_state_dict(strip(ckpt[who]), strict=True)
      assert ref.state_dict().keys() == strip(ckpt[who]).keys()


def test_backbone_exports_load_strictly():
  """dino_vits16_pretrain.pth-style ViT; torchvision ResNet-50 without fc (DINO's resnet release)."""
  wrapper = randomised(dino_model)
  sd = interop.export_checkpoint(wrapper, "backbone")
  assert_bit_identical(sd, interop.state_dict(wrapper.backbone))
  torch_vit("vit_tiny", depth=2, img_size=32).load_state_dict(strip(sd), strict=True)
  rn = randomised(rn50)
  sd = interop.export_checkpoint(rn, "backbone")
  ResNet50().load_state_dict(strip(sd), strict=True)
  assert sd["bn1.num_batches_tracked"].dtype == np.int64 and sd["conv1.weight"].shape == (64, 3, 7, 7)
  back = abstract(rn50)
  interop.load_state_dict(back, sd)
  assert_bit_identical(values(back), values(rn))


def test_swav_round_trip_and_strict_load(tmp_path):
  model = randomised(swav_model)
  sd = interop.export_checkpoint(model, "swav")
  assert all(k.startswith("module.") for k in sd)  # as swav_800ep_pretrain.pth.tar
  SwAVResNet50(nmb_prototypes=300).load_state_dict(strip(sd), strict=True)
  # A main_swav.py training checkpoint keeps the same dict under 'state_dict'.
  interop.save_pth({"epoch": 5, "state_dict": sd, "optimizer": {"state": {}}}, tmp_path / "ckp.pth")
  back = abstract(swav_model)
  interop.import_checkpoint(back, interop.load_pth(tmp_path / "ckp.pth"))
  assert_bit_identical(values(back), values(model))
  assert_bit_identical(interop.export_checkpoint(back, "swav"), sd)


def test_backbone_from_full_checkpoints_sets_heads_aside():
  """Like the official load_pretrained_weights: `module.`/`backbone.` stripped, teacher by default;
  head/classifier keys are set aside with a note rather than silently."""
  student, teacher = randomised(dino_model, 0), randomised(dino_model, 1)
  ckpt = interop.export_checkpoint(student, "dino", teacher=teacher)
  vit = abstract(tiny_vit)
  notes = interop.import_checkpoint(vit, ckpt)
  assert len(notes) == 1 and "head.mlp.0.weight" in notes[0] and "head.last_layer.weight_v" in notes[0]
  assert_bit_identical(values(vit), values(teacher.backbone))
  interop.import_checkpoint(vit, ckpt, checkpoint_key="student")
  assert_bit_identical(values(vit), values(student.backbone))

  # timm ViT: DINO's names plus a classifier `head.weight/bias`, dropped (DINO uses no classifier).
  timm_sd = dict(interop.state_dict(teacher.backbone), **{"head.weight": np.zeros((1000, 192), np.float32),
                                                           "head.bias": np.zeros(1000, np.float32)})
  notes = interop.import_checkpoint(vit, timm_sd)
  assert "head.weight" in notes[0] and "head.bias" in notes[0]

  # torchvision ResNet-50 with its fc; SwAV release (projection head, prototypes) into a bare ResNet.
  swav = randomised(swav_model)
  tv = dict(interop.state_dict(swav.backbone), **{"fc.weight": np.zeros((1000, 2048), np.float32),
                                                   "fc.bias": np.zeros(1000, np.float32)})
  rn = abstract(rn50)
  assert "fc.weight" in interop.import_checkpoint(rn, tv)[0]
  notes = interop.import_checkpoint(rn, interop.export_checkpoint(swav, "swav"))
  assert "projection_head.0.weight" in notes[0] and "prototypes.weight" in notes[0]
  assert_bit_identical(values(rn), values(swav.backbone))


def test_wrong_architecture_lists_missing_unexpected_and_shapes():
  sd = torch_vit("vit_small", depth=2, img_size=32).state_dict()
  sd["extra.weight"] = torch.zeros(3)
  target = randomised(lambda: build_backbone("vit_tiny", depth=3, img_size=32, rngs=nnx.Rngs(0)))
  before = values(target)
  with pytest.raises(interop.StateDictMismatchError) as err:
    interop.load_state_dict(target, sd)
  msg = str(err.value)
  assert "missing keys (12)" in msg and "blocks.2.attn.qkv.weight" in msg
  assert "unexpected keys (1): extra.weight" in msg
  assert "wrong shapes" in msg and "cls_token: checkpoint (1, 1, 384) vs model (1, 1, 192)" in msg
  assert "patch_embed.proj.weight: checkpoint (384, 3, 16, 16) vs model (192, 3, 16, 16)" in msg
  assert_bit_identical(values(target), before)  # nothing loaded from a rejected state dict

  # strict=False tolerates missing/unexpected keys (logged, returned) but never a wrong shape.
  small = randomised(lambda: build_backbone("vit_small", depth=3, img_size=32, rngs=nnx.Rngs(0)))
  report = interop.load_state_dict(small, sd, strict=False)
  assert report["unexpected"] == ["extra.weight"] and "blocks.2.norm1.weight" in report["missing"]
  sd["pos_embed"] = torch.zeros(1, 7, 384)
  with pytest.raises(interop.StateDictMismatchError,
                     match=r"pos_embed: checkpoint \(1, 7, 384\) vs model \(1, 5, 384\)"):
    interop.load_state_dict(small, sd, strict=False)


def test_weight_norm_gain_handling():
  ckpt = interop.export_checkpoint(randomised(lambda: dino_model(norm_last_layer=False)), "dino",
                                   teacher=randomised(lambda: dino_model(norm_last_layer=False)))
  fixed = nnx.eval_shape(lambda: dino_model(norm_last_layer=True))
  with pytest.raises(interop.StateDictMismatchError, match="norm_last_layer=False"):
    interop.import_checkpoint(fixed, ckpt)  # a trained gain cannot be dropped silently
  # The other way round is fine: a fixed gain is exported as ones.
  fixed = randomised(lambda: dino_model(norm_last_layer=True))
  free = nnx.eval_shape(lambda: dino_model(norm_last_layer=False))
  interop.import_checkpoint(free, interop.export_checkpoint(fixed, "dino", teacher=fixed))
  assert (np.asarray(free.head.last_layer.g[...]) == 1).all()
  # torch.nn.utils.parametrizations.weight_norm names the same tensors original0 (g) / original1 (v).
  sd = interop.state_dict(fixed)
  sd["head.last_layer.parametrizations.weight.original0"] = sd.pop("head.last_layer.weight_g")
  sd["head.last_layer.parametrizations.weight.original1"] = sd.pop("head.last_layer.weight_v")
  interop.load_state_dict(free, sd)
  assert np.array_equal(np.asarray(free.head.last_layer.v[...]), np.asarray(fixed.head.last_layer.v[...]))


def test_bad_checkpoint_objects_are_named():
  with pytest.raises(ValueError, match=r"no state dict under 'teacher'.*\['epoch', 'optimizer'\]"):
    interop.import_checkpoint(abstract(tiny_vit), {"epoch": 1, "optimizer": {}})
  with pytest.raises(TypeError, match="kind='dino' needs a MultiCropWrapper"):
    interop.export_checkpoint(abstract(tiny_vit), "dino")


def test_importing_dino_jax_does_not_import_torch():
  code = ("import sys, dino_jax.models, dino_jax.interop.torch; "
          "sys.exit(1 if 'torch' in sys.modules else 0)")
  assert subprocess.run([sys.executable, "-c", code], cwd=".").returncode == 0
