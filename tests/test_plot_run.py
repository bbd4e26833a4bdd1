"""experiments/plot_run.py on a two-step run: curves and attention maps are written; the maps are attention
(dino_jax.evaluate.attention) and equal the PyTorch reference ViT's last self-attention on the same weights."""
import importlib.util
import json
import os

import numpy as np
import torch
from flax import nnx

from dino_jax import train
from dino_jax.evaluate.attention import cls_attention_maps
from dino_jax.checkpoint import load_run
from dino_jax.interop import torch as interop
from dino_jax.state import backbone_graphdef_of
from tests.helpers import ROOT, recipe
from tests.torch_ref import vit as ref_vit


def _plot_module():
  spec = importlib.util.spec_from_file_location("plot_run", os.path.join(ROOT, "experiments", "plot_run.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_plot_run_writes_curves_and_attention_maps(tmp_path):
  c = recipe("quickstart", max_steps=2, **{"eval.test_source": None})
  run = str(tmp_path / "run")
  train.train_and_evaluate(c, run)
  plot_run = _plot_module()
  written = plot_run.main([f"--workdir={run}", f"--out={tmp_path}/fig", "--images=3"])
  assert [os.path.basename(p) for p in written] == ["fig_curves.png", "fig_attention.png"]
  from PIL import Image  # noqa: PLC0415
  for path in written:
    pixels = np.asarray(Image.open(path).convert("L"), np.float32)
    assert min(pixels.shape) > 100 and pixels.std() > 5, path        # a picture, not a blank page

  # What the figures draw: the logged curves, step by step, and the attention maps of the images shown.
  metrics = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
  fig = plot_run.curves_figure(run)
  panels = {ax.get_title(): ax.lines[0].get_xydata() for ax in fig.axes}
  for key, label in plot_run.CURVES:
    if key in metrics[0]:
      np.testing.assert_array_equal(panels[label], [[m["step"], m[key]] for m in metrics], err_msg=key)
  assert {"loss", "teacher entropy (nats)"} <= set(panels)
  config, state = load_run(run)
  fig, shown, shown_maps = plot_run.attention_figure(config, state, 3)
  for r in range(3):
    np.testing.assert_array_equal(fig.axes[r * 3].images[0].get_array(), shown[r])
    for hd in range(2):
      np.testing.assert_array_equal(fig.axes[r * 3 + 1 + hd].images[0].get_array(), shown_maps[r, hd])
  np.testing.assert_allclose(shown_maps, cls_attention_maps(config, state.teacher["backbone"], {}, shown), rtol=1e-6)

  images = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
  maps = cls_attention_maps(config, state.teacher["backbone"], {}, images)
  assert maps.shape == (3, 2, 4, 4)                      # 2 heads, 16 px / patch 4
  totals = maps.sum(axis=(2, 3))                        # the [CLS] row sums to 1 with its own (cls->cls) weight
  assert np.all(maps >= 0) and np.all(totals > 0) and np.all(totals < 1)
  assert not np.allclose(maps[0], maps[1])              # the maps depend on the image

  # The same weights in the PyTorch reference of the official ViT: its last self-attention, [CLS] row, patches.
  graphdef = backbone_graphdef_of(config)
  ours = nnx.merge(graphdef, state.teacher["backbone"], {})
  ref = ref_vit.VisionTransformer(patch_size=4, embed_dim=32, depth=1, num_heads=2, img_size=16)
  ref.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in interop.state_dict(ours).items()}, strict=True)
  mean, std = np.array(config.aug.mean, np.float32), np.array(config.aug.std, np.float32)
  x = torch.from_numpy(((images / np.float32(255.0) - mean) / std).astype(np.float32).transpose(0, 3, 1, 2))
  with torch.no_grad():
    expected = ref.get_last_selfattention(x).numpy()[:, :, 0, 1:].reshape(3, 2, 4, 4)
  np.testing.assert_allclose(maps, expected, rtol=1e-5, atol=1e-7)
