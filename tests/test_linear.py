"""Linear probe (dino_jax.evaluate.linear) against the official eval_linear.py semantics, written here in PyTorch:
the features (last-n [CLS] tokens; one block + pooled patch tokens, interleaved), the classifier's initialisation
scale, and its training (SGD momentum 0.9, no decay, lr x batch / 256, CosineAnnealingLR stepped per epoch)."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch import nn

from dino_jax import train
from dino_jax.evaluate import linear
from tests.helpers import ROOT, recipe, run_state
from tests.test_models_vit import images, rel_err, twin


def _official_features(ref, x, n, avgpool):
  """eval_linear.py's feature code, as written there."""
  with torch.no_grad():
    inter = ref.get_intermediate_layers(x, n)
    out = torch.cat([t[:, 0] for t in inter], dim=-1)
    if avgpool:
      out = torch.cat((out.unsqueeze(-1), torch.mean(inter[-1][:, 1:], dim=1).unsqueeze(-1)), dim=-1)
      out = out.reshape(out.shape[0], -1)
  return out.numpy()


@pytest.mark.parametrize("n,avgpool", [(4, False), (2, False), (1, True)])
def test_probe_features_match_official(n, avgpool):
  ref, ours = twin("vit_tiny", 8, depth=4, img_size=32)
  x_t, x_j = images(3, 32, seed=1)
  got = np.asarray(linear.probe_features(ours, x_j, n_last_blocks=n, avgpool=avgpool))
  want = _official_features(ref, x_t, n, avgpool)
  assert got.shape == want.shape == (3, 192 * (n + int(avgpool)))
  assert rel_err(got, want) <= 1e-5


def test_avgpool_needs_one_block():
  _, ours = twin("vit_tiny", 8, depth=2, img_size=16)
  with pytest.raises(ValueError, match="n_last_blocks=1"):
    linear.probe_features(ours, jnp.zeros((1, 16, 16, 3)), n_last_blocks=2, avgpool=True)


def test_classifier_training_matches_torch_sgd_with_cosine_annealing():
  epochs, spe, batch, dim, labels = 3, 2, 8, 12, 5
  peak = 0.5 * batch / 256.0 * 40          # large enough that every step visibly moves the weights
  rng = np.random.default_rng(0)
  feats = rng.normal(size=(epochs * spe, batch, dim)).astype(np.float32)
  ys = rng.integers(0, labels, size=(epochs * spe, batch))

  ours = linear.init_classifier(jax.random.key(0), dim, labels)
  assert abs(float(np.std(np.asarray(ours["kernel"]))) - 0.01) < 0.003 and not np.any(np.asarray(ours["bias"]))
  ref = nn.Linear(dim, labels)
  with torch.no_grad():
    ref.weight.copy_(torch.from_numpy(np.asarray(ours["kernel"]).T.copy()))
    ref.bias.zero_()
  opt = torch.optim.SGD(ref.parameters(), peak, momentum=0.9, weight_decay=0)
  sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs, eta_min=0)

  tx = linear.classifier_tx(peak, epochs, spe)
  state = tx.init(ours)
  update = jax.jit(lambda c, s, f, y: linear.classifier_update(c, s, f, y, tx))
  for epoch in range(epochs):
    for i in range(spe):
      k = epoch * spe + i
      loss_t = nn.CrossEntropyLoss()(ref(torch.from_numpy(feats[k])), torch.from_numpy(ys[k]))
      opt.zero_grad()
      loss_t.backward()
      opt.step()
      ours, state, loss = update(ours, state, jnp.asarray(feats[k]), jnp.asarray(ys[k]))
      assert abs(float(loss) - loss_t.item()) <= 1e-5 * abs(loss_t.item()), (epoch, i)
      assert rel_err(np.asarray(ours["kernel"]).T, ref.weight.detach().numpy()) <= 1e-5, (epoch, i)
      assert rel_err(np.asarray(ours["bias"]), ref.bias.detach().numpy()) <= 1e-5, (epoch, i)
    sched.step()


def test_accuracy_hand_values():
  logits = np.array([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5]])
  assert linear.accuracy(logits, np.array([1, 1, 0])) == (pytest.approx(100 / 3), 100.0)   # top-5 = top-3 here


def test_linear_probe_end_to_end_and_cli(tmp_path):
  """A two-step run, then `python -m dino_jax.evaluate --linear`: eval_linear.json with the official report
  (best top-1 over the validations) and the last one; an unlabelled source and an unknown key are named."""
  run = str(tmp_path / "run")
  train.train_and_evaluate(recipe("quickstart", max_steps=2, **{"eval.test_source": None}), run)
  config = recipe("quickstart", **{"eval.linear": {"epochs": 3, "lr": 0.1, "batch_size": 64, "val_freq": 2}})
  state = run_state(run)
  out = linear.linear_probe(config, state.teacher["backbone"], {})
  assert [h["epoch"] for h in out["history"]] == [0, 1, 2]
  peak = 0.1 * 64 / 256                                                          # lr x batch / 256, by hand
  np.testing.assert_allclose([h["lr"] for h in out["history"]],
                             [peak, peak * 0.5 * (1 + np.cos(np.pi / 3)), peak * 0.5 * (1 + np.cos(2 * np.pi / 3))],
                             rtol=1e-6)
  assert [("top1" in h) for h in out["history"]] == [True, False, True]          # every val_freq epochs and the last
  assert out["top1_best"] == max(out["history"][0]["top1"], out["history"][2]["top1"])
  assert out["top1"] == out["history"][2]["top1"] and out["feature_dim"] == 32 * 1   # 1 block, n_last_blocks 4
  assert all(np.isfinite(h["loss"]) for h in out["history"])

  defaults = recipe("dino_vit_small16", None).eval.linear.to_dict()
  assert defaults == dict(epochs=100, lr=0.001, batch_size=1024, n_last_blocks=4, avgpool=False, val_freq=1, seed=0,
                          crop_scale=(0.08, 1.0), flip=True)      # eval_linear.py's defaults (128 per GPU x 8 GPUs)
  assert recipe("dino_vit_base16", None).eval.linear.n_last_blocks == 1                # official ViT-B protocol
  assert recipe("dino_vit_base16", None).eval.linear.avgpool
  with pytest.raises(ValueError, match="config.eval.linear.lrr"):
    linear.linear_config(recipe("quickstart", **{"eval.linear": {"lrr": 0.1}}))
  flat = tmp_path / "flat"
  flat.mkdir()
  from PIL import Image  # noqa: PLC0415
  Image.new("RGB", (8, 8)).save(flat / "a.png")
  with pytest.raises(ValueError, match="no class labels"):
    linear.linear_probe(recipe("quickstart", **{"eval.train_source": f"imagefolder:{flat}"}),
                        state.teacher["backbone"], {})

  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", "dino_jax.evaluate", f"--workdir={run}", "--test_source=digits:test",
                         "--linear", "--linear_epochs=1", "--linear_batch_size=64"],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  saved = json.load(open(os.path.join(run, "eval_linear.json")))
  assert saved["step"] == 2 and saved["teacher"]["epochs"] == 1 and saved["teacher"]["batch_size"] == 64
  top1 = saved["teacher"]["top1"]
  assert top1 == saved["teacher"]["history"][-1]["top1"] and f"{top1:.2f}" in proc.stdout   # printed = saved
  assert "best top-1" in proc.stdout


def test_pixel_probe_is_the_same_protocol_on_raw_pixels():
  """The raw-pixel baseline of the linear table: the same classifier, schedule and crops on the normalised pixels
  (16 x 16 x 3 = 768 features); on the digits a linear layer on pixels is far above chance (10 %)."""
  from dino_jax.evaluate import pixels  # noqa: PLC0415
  config = recipe("quickstart", **{"eval.linear": {"epochs": 2, "lr": 0.3, "batch_size": 128, "val_freq": 1}})
  out = linear.linear_probe(config, {}, {}, feature_fn=pixels.make_pixel_fn(config.aug.mean, config.aug.std))
  assert out["feature_dim"] == 16 * 16 * 3 and [h["epoch"] for h in out["history"]] == [0, 1]
  assert out["top1"] > 50.0, out["top1"]
