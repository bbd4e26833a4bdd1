"""python -m dino_jax.visualize_attention on a real photo (scikit-learn's china.jpg saved as a JPEG), from a run's
workdir and from an official-format .pth of the same weights: the PNGs are written, hold the maps, and the masks keep
the official share of each head's attention mass."""
import os
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx
from PIL import Image
from sklearn.datasets import load_sample_image

from dino_jax import convert, visualize_attention as va
from dino_jax.evaluate.attention import cls_attention_maps
from dino_jax.interop import torch as interop
from dino_jax.state import build_model
from tests.helpers import ROOT, recipe

TINY = os.path.join(ROOT, "tests", "configs", "quickstart_test.py")


def test_threshold_masks_by_hand():
  maps = np.array([[[0.1, 0.4], [0.2, 0.3]]])          # shares 0.1, 0.2, 0.3, 0.4
  # ascending cumulative shares 0.1, 0.3, 0.6, 1.0 > 1 - 0.6 = 0.4 keep 0.3 and 0.4 (0.7 of the mass)
  np.testing.assert_array_equal(va.threshold_masks(maps, 0.6), [[[False, True], [False, True]]])
  np.testing.assert_array_equal(va.threshold_masks(maps, 0.75), [[[False, True], [True, True]]])
  rng = np.random.default_rng(0)
  many = rng.random((3, 5, 7)) ** 4
  for mask, m in zip(va.threshold_masks(many, 0.6), many):
    share = m / m.sum()
    kept = share[mask]
    assert kept.sum() >= 0.6 and kept.sum() - kept.min() < 0.6        # the fewest largest patches reaching 60 %
    assert kept.min() >= share[~mask].max()


def _cli(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, "-m", "dino_jax.visualize_attention", *args], cwd=ROOT, env=env,
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  return r.stdout.split()


def test_attention_pngs_of_a_photo_from_a_workdir_and_a_pth(tmp_path):
  photo = tmp_path / "china.jpg"
  Image.fromarray(load_sample_image("china.jpg")).save(photo, quality=90)
  config = recipe("quickstart")
  model = build_model(config, nnx.Rngs(3))
  pth = str(tmp_path / "backbone.pth")
  interop.save_pth(interop.export_checkpoint(model, "backbone"), pth)
  run = str(tmp_path / "run")
  convert.import_pth(pth, config, run)               # a run holding the same weights, as step 0

  names = {"img.png", "heads.png", "attn-head0.png", "attn-head1.png", "mask_th0.6_head0.png", "mask_th0.6_head1.png"}
  from_pth = _cli(f"--pth={pth}", f"--config={TINY}", f"--image={photo}", f"--out={tmp_path}/a", "--image_size=48,64")
  from_run = _cli(f"--workdir={run}", f"--image={photo}", f"--out={tmp_path}/b", "--image_size=48,64")
  assert {os.path.basename(p) for p in from_pth} == {os.path.basename(p) for p in from_run} == names
  for name in names - {"heads.png"}:
    a, b = (np.asarray(Image.open(os.path.join(tmp_path, d, name)).convert("RGB")) for d in "ab")
    assert a.shape == (48, 64, 3), name
    np.testing.assert_array_equal(a, b, err_msg=name)            # same weights, same pictures
  assert np.asarray(Image.open(tmp_path / "a" / "attn-head0.png")).std() > 5

  # What they draw: the [CLS] attention of the loaded photo, 12x16 patches of 4 px, and its 60 % masks.
  params, stats = va.backbone_from_pth(pth, config)
  image, maps, masks, _ = va.visualize(config, params, stats, str(photo), str(tmp_path / "c"), image_size=(48, 64))
  np.testing.assert_array_equal(image, np.asarray(Image.open(tmp_path / "a" / "img.png").convert("RGB")))
  expected = cls_attention_maps(config, nnx.state(model.backbone, nnx.Param).to_pure_dict(), {}, image[None])[0]
  np.testing.assert_allclose(maps, expected, rtol=1e-5, atol=1e-7)
  assert maps.shape == (2, 12, 16)
  for m, mask in zip(maps, masks):
    assert (m[mask].sum() / m.sum()) >= 0.6 - 1e-6
  shown = np.asarray(Image.open(tmp_path / "a" / "mask_th0.6_head0.png").convert("RGB")).astype(int)
  inside = va.upsample(masks[0], 4)
  assert np.abs(shown - image)[~inside].mean() < np.abs(shown - image)[inside].mean()   # the mask is overlaid


def test_refuses_both_or_neither_source(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, "-m", "dino_jax.visualize_attention", "--image=x.jpg"], cwd=ROOT, env=env,
                     capture_output=True, text=True, timeout=120)
  assert r.returncode != 0 and "--workdir" in r.stderr
