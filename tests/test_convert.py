"""python -m dino_jax.convert: our runs <-> official .pth files, through the functions the command line calls.

Round trips must be bit-identical; exports must load with strict=True into our PyTorch references of the official
modules; an imported file must give, through dino_jax.evaluate, the features the PyTorch reference computes on the
same images (fp32, relative error <= 1e-5); a file of another architecture must be refused with the file named.
Tiny configs (tests/configs/quickstart_test.py, a width-8 ResNet-50 for SwAV) keep the file fast.
"""
import argparse
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
from flax import nnx

from configs import common
from dino_jax import checkpoint as ckpt_lib
from dino_jax import convert
from dino_jax.data import pipeline, sources
from dino_jax.evaluate import features as feats_lib
from dino_jax.checkpoint import load_run
from dino_jax.interop import torch as interop
from dino_jax import state as state_lib
from dino_jax.state import backbone_graphdef_of
from tests.configs import quickstart_test
from tests.torch_ref import heads as ref_heads
from tests.torch_ref.resnet import SwAVResNet50
from tests.torch_ref.vit import VisionTransformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def dino_config():
  return quickstart_test.get_config()  # ViT patch 4, depth 1, width 32, 2 heads, 16 px; head 64 -> 32 -> 64


def swav_config():
  c = common.swav_defaults()
  c.epochs, c.batch_size = 2, 16
  c.model.overrides = {"width": 8}  # ResNet-50 layout (every key), 8 channels wide: 256 features
  c.model.hidden_mlp, c.model.feat_dim, c.model.nmb_prototypes = 64, 16, 20
  c.model.dtype = "float32"
  c.crops.global_size, c.crops.local_size, c.crops.local_number = 16, 8, 2
  c.data.source, c.data.num_workers = "digits:train", 0
  return c


def torch_dino(seed):
  """Our PyTorch reference of the quickstart_test network (official DINO modules and key names)."""
  torch.manual_seed(seed)
  return ref_heads.MultiCropWrapper(VisionTransformer(patch_size=4, embed_dim=32, depth=1, num_heads=2, img_size=16),
                                    ref_heads.DINOHead(32, 64, hidden_dim=64, bottleneck_dim=32))


def tree(x):
  return {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
          for path, v in jax.tree_util.tree_flatten_with_path(jax.device_get(x))[0]}


def assert_bit_identical(a, b):
  a, b = tree(a), tree(b)
  assert a.keys() == b.keys()
  for k in a:
    assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and np.array_equal(a[k], b[k]), k


def random_run(config, workdir, step, seed=0):
  """A run directory whose checkpoint at `step` holds random values everywhere (student != teacher, BatchNorm
  statistics and centre non-trivial), written as dino_jax.train writes it."""
  abstract = jax.eval_shape(state_lib.build_run(config).init)
  rng = np.random.default_rng(seed)

  def fill(path, a):
    name = str(getattr(path[-1], "key", path[-1]))
    if np.issubdtype(a.dtype, np.integer):
      return np.asarray(rng.integers(0, 100, a.shape), a.dtype)
    x = rng.standard_normal(a.shape, dtype=np.float32)
    return np.abs(x) + 0.5 if name in ("var", "g") else x

  state = jax.tree_util.tree_map_with_path(fill, abstract).replace(step=np.asarray(step, np.int32))
  checkpoints = ckpt_lib.Checkpoints(os.path.join(workdir, "checkpoints"), async_save=False)
  checkpoints.save(step, state, config=config, force=True)
  checkpoints.close()
  return state


def strip(sd, prefix="module."):
  return {k.removeprefix(prefix): torch.as_tensor(np.asarray(v)) for k, v in sd.items()}


def test_dino_full_export_loads_in_torch_and_round_trips(tmp_path):
  config = dino_config()
  per_epoch = len(sources.get_source(config.data.source)) // config.batch_size  # 1437 // 16 = 89
  ours = random_run(config, tmp_path / "run", step=2 * per_epoch + 5)
  obj = convert.export_run(str(tmp_path / "run"), str(tmp_path / "checkpoint.pth"), kind="full")
  assert set(obj) == {"student", "teacher", "epoch", "dino_loss"} and obj["epoch"] == 2

  # What main_dino.py's restart_from_checkpoint reads, loaded strictly into the official modules.
  loaded = interop.load_pth(tmp_path / "checkpoint.pth")
  assert all(k.startswith("module.") for k in loaded["student"])       # DDP student
  assert not any(k.startswith("module.") for k in loaded["teacher"])   # no BatchNorm: the teacher is not DDP-wrapped
  for who in ("student", "teacher"):
    torch_dino(0).load_state_dict(strip(loaded[who]), strict=True)
  assert tuple(loaded["dino_loss"]["center"].shape) == (1, 64) and loaded["epoch"] == 2

  back = convert.import_pth(str(tmp_path / "checkpoint.pth"), config, str(tmp_path / "back"))
  config2, restored = load_run(str(tmp_path / "back"))
  assert int(restored.step) == 0 and ckpt_lib.config_to_dict(config2) == ckpt_lib.config_to_dict(config)
  for part in ("params", "teacher", "batch_stats", "teacher_batch_stats", "method_state"):
    assert_bit_identical(getattr(restored, part), getattr(ours, part))
  assert_bit_identical(restored, back)
  # The data iterator's start is saved too, so dino_jax.train can resume from the imported run.
  assert os.path.isdir(tmp_path / "back" / "checkpoints" / "0" / "data")


def test_swav_export_layout_and_round_trip_with_batchnorm(tmp_path):
  config = swav_config()
  ours = random_run(config, tmp_path / "run", step=7)
  obj = convert.export_run(str(tmp_path / "run"), str(tmp_path / "ckp.pth.tar"), kind="full", epoch=3)
  assert set(obj) == {"epoch", "state_dict"} and obj["epoch"] == 3
  assert all(k.startswith("module.") for k in obj["state_dict"])
  SwAVResNet50(hidden_mlp=64, output_dim=16, nmb_prototypes=20, width=8).load_state_dict(
      strip(interop.load_pth(tmp_path / "ckp.pth.tar")["state_dict"]), strict=True)

  convert.import_pth(str(tmp_path / "ckp.pth.tar"), config, str(tmp_path / "back"))
  _, restored = load_run(str(tmp_path / "back"))
  assert_bit_identical(restored.params, ours.params)
  assert_bit_identical(restored.batch_stats, ours.batch_stats)  # running stats and num_batches_tracked
  assert restored.teacher is None and restored.teacher_batch_stats is None   # SwAV has no teacher


def test_backbone_exports_and_backbone_only_import(tmp_path):
  config = dino_config()
  ours = random_run(config, tmp_path / "run", step=1)
  for kind, part in (("teacher_backbone", ours.teacher), ("backbone", ours.params)):
    path = str(tmp_path / f"{kind}.pth")
    convert.export_run(str(tmp_path / "run"), path, kind=kind)
    sd = interop.load_pth(path)
    VisionTransformer(patch_size=4, embed_dim=32, depth=1, num_heads=2, img_size=16).load_state_dict(sd, strict=True)
    assert_bit_identical({k: v.numpy() for k, v in sd.items()},
                         interop.state_dict(convert.networks(config, ours)[0].backbone,
                                            nnx.State(part["backbone"])))

  # A bare backbone goes into both networks; the heads keep the config's initialisation.
  convert.import_pth(str(tmp_path / "teacher_backbone.pth"), config, str(tmp_path / "back"))
  _, restored = load_run(str(tmp_path / "back"))
  init = state_lib.build_run(config).init
  fresh_heads = jax.jit(lambda: (init().params["head"], init().teacher["head"]))()  # what dino_jax.train starts from
  assert_bit_identical(restored.params["backbone"], ours.teacher["backbone"])
  assert_bit_identical(restored.teacher["backbone"], ours.teacher["backbone"])
  assert_bit_identical((restored.params["head"], restored.teacher["head"]), fresh_heads)


@torch.no_grad()
def test_imported_official_checkpoint_evaluates_like_torch(tmp_path):
  """A main_dino.py-style file made by the PyTorch reference (student and teacher differ, argparse args included)
  -> import -> dino_jax.evaluate's feature extraction (eval transform, normalisation, teacher backbone in eval mode)
  gives the reference teacher's features on the same images."""
  config = dino_config()
  student, teacher = torch_dino(1), torch_dino(2)
  torch.save({"student": {"module." + k: v for k, v in student.state_dict().items()},
              "teacher": teacher.state_dict(), "epoch": 5, "args": argparse.Namespace(arch="vit_tiny")},
             tmp_path / "official.pth")
  convert.import_pth(str(tmp_path / "official.pth"), config, str(tmp_path / "run"))
  config, state = load_run(str(tmp_path / "run"))

  e = config.eval
  graphdef = backbone_graphdef_of(config)
  feature_fn = feats_lib.make_feature_fn(graphdef, config.aug.mean, config.aug.std)
  source = sources.get_source(e.test_source)
  feats, _ = feats_lib.extract_features(feature_fn, state.teacher["backbone"], {}, source,
                                        image_size=e.image_size, resize_size=e.resize_size, batch_size=e.batch_size)
  batches = pipeline.make_eval_dataset(source, image_size=e.image_size, resize_size=e.resize_size,
                                      batch_size=e.batch_size)
  images = np.concatenate([b["image"][np.asarray(b.get("mask", np.ones(len(b["image"]))), bool)] for b in batches])
  x = (torch.from_numpy(images).float() / 255 - torch.tensor(config.aug.mean)) / torch.tensor(config.aug.std)
  want = teacher.backbone.eval()(x.permute(0, 3, 1, 2)).numpy()
  assert feats.shape == want.shape == (len(source), 32)
  assert np.abs(feats - want).max() / np.abs(want).max() <= 1e-5
  # The student went to params, not the teacher's weights.
  assert_bit_identical(state.params["backbone"]["cls_token"], student.backbone.cls_token.numpy())


def test_wrong_architecture_is_refused_naming_the_file(tmp_path):
  wider = VisionTransformer(patch_size=4, embed_dim=48, depth=2, num_heads=2, img_size=16)
  path = str(tmp_path / "vit_wider_pretrain.pth")
  torch.save(wider.state_dict(), path)
  with pytest.raises(interop.StateDictMismatchError) as err:
    convert.import_pth(path, dino_config(), str(tmp_path / "run"))
  msg = str(err.value)
  assert msg.startswith(f"{path}: the backbone does not fit the config's model (dino vit_tiny/4")
  assert "unexpected keys (12): blocks.1." in msg
  assert "cls_token: checkpoint (1, 1, 48) vs model (1, 1, 32)" in msg
  assert not os.path.exists(tmp_path / "run" / "checkpoints")  # nothing written

  # A full checkpoint whose head differs (out_dim 128 here, 64 in the config) is refused, not half-loaded.
  t = ref_heads.MultiCropWrapper(VisionTransformer(patch_size=4, embed_dim=32, depth=1, num_heads=2, img_size=16),
                                 ref_heads.DINOHead(32, 128, hidden_dim=64, bottleneck_dim=32))
  torch.save({"student": t.state_dict(), "teacher": t.state_dict()}, tmp_path / "other_head.pth")
  with pytest.raises(interop.StateDictMismatchError, match=r"other_head.pth: 'student' does not fit(.|\n)*"
                     r"head.last_layer.weight_v: checkpoint \(128, 32\) vs model \(64, 32\)"):
    convert.import_pth(str(tmp_path / "other_head.pth"), dino_config(), str(tmp_path / "run"))


def test_command_line(tmp_path):
  """The entry point parses its flags and writes the file; an import into a used workdir is refused."""
  random_run(dino_config(), tmp_path / "run", step=1)
  out = tmp_path / "exported" / "vit.pth"
  proc = subprocess.run([sys.executable, "-m", "dino_jax.convert", f"--workdir={tmp_path / 'run'}", f"--out={out}",
                         "--kind=teacher_backbone"], cwd=ROOT, capture_output=True, text=True,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "cls_token" in interop.load_pth(out)
  with pytest.raises(FileExistsError, match="already holds checkpoints"):
    convert.import_pth(str(out), dino_config(), str(tmp_path / "run"))
