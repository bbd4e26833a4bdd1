"""Image retrieval: mAP / recall@k / precision@k against values computed by hand, the self-match left out, and the
command on two class folders."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from dino_jax.evaluate import retrieval
from dino_jax.models import compute_dtype
from dino_jax.state import backbone_graphdef_of
from tests.helpers import ROOT, recipe


def test_metrics_equal_the_hand_computed_values():
  # 2-D features; similarity = cosine. Query 0 (class 0) ranks the gallery g1 (0), g0 (1), g3 (0), g2 (1):
  # relevant at ranks 1 and 3 -> AP = (1/1 + 2/3) / 2 = 5/6. Query 1 (class 1) ranks g3 (0), g2 (1), g0 (1), g1 (0):
  # relevant at ranks 2 and 3 -> AP = (1/2 + 2/3) / 2 = 7/12. mAP = (5/6 + 7/12) / 2 = 17/24.
  angles = {"g0": 20, "g1": 5, "g2": 100, "g3": 60}
  gallery = np.array([[np.cos(np.radians(a)), np.sin(np.radians(a))] for a in angles.values()]) * [[1], [3], [2], [5]]
  g_labels = [1, 0, 1, 0]
  queries = np.array([[1.0, 0.0], [np.cos(np.radians(70)), np.sin(np.radians(70))]]) * 4
  out = retrieval.retrieval_metrics(queries, [0, 1], gallery, g_labels, ks=(1, 2, 4))
  assert out["mAP"] == pytest.approx(100 * 17 / 24)
  assert out["recall@1"] == pytest.approx(50.0) and out["recall@2"] == pytest.approx(100.0)
  assert out["precision@1"] == pytest.approx(50.0) and out["precision@2"] == pytest.approx(50.0)
  assert out["precision@4"] == pytest.approx(50.0) and out["queries"] == 2

  # Same set: each item's own match is left out. Items (angle, class): a 0/0, b 10/0, c 50/1, d 85/1. Each finds
  # its one same-class item first (a: b at 10 deg; b: a at 10; c: d at 35; d: c at 35) -> every AP is 1.
  feats = np.array([[np.cos(np.radians(a)), np.sin(np.radians(a))] for a in (0, 10, 50, 85)])
  labels = [0, 0, 1, 1]
  out = retrieval.retrieval_metrics(feats, labels, feats, labels, ks=(1, 3), same_set=True)
  assert out["mAP"] == pytest.approx(100.0) and out["recall@1"] == pytest.approx(100.0)
  assert out["precision@3"] == pytest.approx(100 / 3)
  # Without leaving the self-match out, every query would find itself first: precision@3 = 2/3 instead.
  assert retrieval.retrieval_metrics(feats, labels, feats, labels, ks=(3,))["precision@3"] == pytest.approx(200 / 3)


def test_multiscale_features_average_the_rescaled_images():
  config = recipe("quickstart")
  from dino_jax import models  # noqa: PLC0415
  backbone = models.backbone_from_config(config.model, nnx.Rngs(1), student=False)
  _, params, stats = models.split(backbone)
  images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
  fn = retrieval.make_multiscale_feature_fn(backbone_graphdef_of(config), config.aug.mean, config.aug.std,
                                            compute_dtype(config.model), multiple=4)
  x = jnp.asarray((images / np.float32(255) - np.array(config.aug.mean, np.float32)) / np.array(config.aug.std,
                                                                                                 np.float32))
  apply = jax.jit(lambda x: nnx.merge(backbone_graphdef_of(config), params, stats)(x))
  parts = [apply(x), apply(jax.image.resize(x, (2, 20, 20, 3), "linear", antialias=False)),
           apply(jax.image.resize(x, (2, 16, 16, 3), "linear", antialias=False))]
  # 32 / sqrt(2) = 22.6 -> 20 (a multiple of the patch, 4); 32 / 2 = 16
  np.testing.assert_allclose(fn(params, stats, images), sum(parts) / 3, rtol=1e-5, atol=1e-6)


def test_command_on_class_folders(tmp_path):
  # A run to evaluate (random weights imported as step 0), and two folders of 2 classes of digits.
  from dino_jax import convert, state as state_lib  # noqa: PLC0415
  from dino_jax.data import sources  # noqa: PLC0415
  from dino_jax.interop import torch as interop  # noqa: PLC0415
  config = recipe("quickstart")
  pth = str(tmp_path / "b.pth")
  interop.save_pth(interop.export_checkpoint(state_lib.build_model(config, nnx.Rngs(0)), "backbone"), pth)
  convert.import_pth(pth, config, str(tmp_path / "run"))
  digits = sources.get_source("digits:test")
  for split, picks in (("query", range(0, 40)), ("gallery", range(40, 200))):
    for i in picks:
      item = digits[i]
      if item["label"] < 2:
        folder = tmp_path / split / f"class{item['label']}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(item["image"]).save(folder / f"{i}.png")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, "-m", "dino_jax.evaluate", f"--workdir={tmp_path}/run", "--retrieval",
                      f"--query={tmp_path}/query", f"--gallery={tmp_path}/gallery", "--retrieval_k=1,5"],
                     cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "mAP" in r.stdout and "orbax" not in r.stderr.lower()          # quiet: no library INFO lines
  out = json.load(open(tmp_path / "run" / "eval_retrieval.json"))
  n_query = sum(1 for _ in (tmp_path / "query").rglob("*.png"))
  assert out["teacher"]["queries"] == n_query and out["step"] == 0
  assert 0 < out["teacher"]["mAP"] <= 100 and set(out["teacher"]) >= {"recall@1", "recall@5", "precision@5"}
