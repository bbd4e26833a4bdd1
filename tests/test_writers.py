"""Metric writers and the online k-NN through a real run: TensorBoard event files read back with tensorboard's own
reader hold what metrics.jsonl holds; the online k-NN is logged at the configured epochs and equals the k-NN of the
checkpoint saved at that step, recomputed independently."""
import importlib.util
import os
import time

import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator

from dino_jax import train, writers
from dino_jax.data import sources
from dino_jax.evaluate import knn as knn_lib
from dino_jax.evaluate import features as feats_lib
from dino_jax.evaluate import online_knn
from dino_jax.checkpoint import load_run
from dino_jax.models import compute_dtype
from dino_jax.state import backbone_graphdef_of
from tests.helpers import ROOT, recipe, run_metrics


def _plot_module():
  spec = importlib.util.spec_from_file_location("plot_run", os.path.join(ROOT, "experiments", "plot_run.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _events(workdir):
  acc = event_accumulator.EventAccumulator(str(workdir), size_guidance={event_accumulator.SCALARS: 0})
  acc.Reload()
  return acc


def test_run_logs_to_tensorboard_and_online_knn_at_each_epoch(tmp_path):
  # 32 synthetic images at batch 16: 2 steps per epoch, online k-NN after steps 2 and 4 on digit subsets.
  c = recipe("quickstart", **{"data.source": "synthetic:32x32", "eval.every_epochs": 1, "checkpoint_every_steps": 2,
                               "eval.train_source": "digits:test",
                               "eval.compare_random_init": False,
                               "eval.online_train_samples": 64, "eval.online_test_samples": 40})
  out = train.train_and_evaluate(c, str(tmp_path))
  rows = run_metrics(tmp_path, train_only=False)
  knn_rows = [r for r in rows if "knn/k5/top1" in r]
  assert [r["step"] for r in knn_rows] == [2, 4] and [r["epoch"] for r in knn_rows] == [1.0, 2.0]
  assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]

  acc = _events(tmp_path)
  tags = set(acc.Tags()["scalars"])
  assert {"loss", "lr", "teacher_entropy", "knn/k5/top1", "knn/k5/top5", "eval/teacher/k5/top1"} <= tags
  for key in ("loss", "lr", "knn/k5/top1"):
    logged = [(r["step"], r[key]) for r in rows if key in r]
    np.testing.assert_allclose([(e.step, e.value) for e in acc.Scalars(key)], logged, rtol=1e-6, err_msg=key)
  final = acc.Scalars("eval/teacher/k5/top1")
  assert [e.step for e in final] == [4]
  np.testing.assert_allclose(final[0].value, out["eval"]["teacher"]["k=5"]["top1"], rtol=1e-6)
  assert "_hparams_/session_start_info" in acc.PluginTagToContent("hparams")          # written once, at step 0
  assert acc.Tags()["images"] == ["attention"]
  picture = acc.Images("attention")[0]
  assert picture.step == 4 and (picture.height, picture.width) == (4 * 16, 3 * 16)   # 4 images x (image + 2 heads)

  # experiments/plot_run.py draws those values as "k-NN over training".
  panels = {ax.get_title(): ax for ax in _plot_module().curves_figure(str(tmp_path)).axes}
  np.testing.assert_array_equal(panels["k-NN over training"].lines[0].get_xydata(),
                                [[r["step"], r["knn/k5/top1"]] for r in knn_rows])

  # Independently: the k-NN of the teacher in the checkpoint of step 2, on the same subsets.
  config, state = load_run(str(tmp_path), step=2)
  train_src = online_knn.subsample(sources.get_source("digits:test"), 64, config.seed)
  test_src = online_knn.subsample(sources.get_source("digits:test"), 40, config.seed + 1)
  assert len(train_src) == 64 and len(test_src) == 40 and len(set(train_src.indices)) == 64
  fn = feats_lib.make_feature_fn(backbone_graphdef_of(config), config.aug.mean, config.aug.std,
                                 compute_dtype(config.model))
  kw = dict(image_size=16, resize_size=16, batch_size=256)
  f_tr, y_tr = feats_lib.extract_features(fn, state.teacher["backbone"], {}, train_src, **kw)
  f_te, y_te = feats_lib.extract_features(fn, state.teacher["backbone"], {}, test_src, **kw)
  np.testing.assert_array_equal(y_te, [sources.get_source("digits:test")[int(i)]["label"] for i in test_src.indices])
  top1, top5 = knn_lib.knn_classifier(f_tr, y_tr, f_te, y_te, k=5, num_classes=10)
  assert knn_rows[0]["knn/k5/top1"] == pytest.approx(top1) and knn_rows[0]["knn/k5/top5"] == pytest.approx(top5)


def test_writers_without_tensorboard_and_wandb_error(tmp_path):
  c = recipe("quickstart", **{"log.tensorboard": False})
  w = writers.create(c, str(tmp_path))
  w.write_hparams(writers.flat_config(c))
  w.write_scalars(3, {"loss": 1.5})
  w.close()
  assert run_metrics(tmp_path) == [{"step": 3, "loss": 1.5}]
  assert not any(p.name.startswith("events.") for p in tmp_path.iterdir())
  assert writers.flat_config(c)["optim.lr"] == c.optim.lr
  try:
    import wandb  # noqa: F401
  except ImportError:
    with pytest.raises(ImportError, match="pip install wandb"):
      writers.create(recipe("quickstart", **{"log.wandb_project": "x"}), str(tmp_path))


def test_wandb_offline_run_is_resumed_by_its_workdir(tmp_path, monkeypatch):
  import wandb  # noqa: F401, PLC0415 (a dev requirement: its absence fails this test)
  monkeypatch.setenv("WANDB_MODE", "offline")
  monkeypatch.setenv("WANDB_SILENT", "true")
  c = recipe("quickstart", **{"log.tensorboard": False, "log.wandb_project": "dino_jax_test"})
  for step in (1, 2):                       # a run, then its resumption from the same workdir
    w = writers.create(c, str(tmp_path))
    w.write_hparams(writers.flat_config(c))
    w.write_scalars(step, {"loss": 1.0 / step})
    w.write_images(step, {"attention": np.full((8, 8, 3), 200, np.uint8)})
    w.close()
    time.sleep(1.1)   # W&B names a run's directory offline-run-<date>_<hhmmss>-<id>: a resume in the same second
    #                   would write into the first one's directory
  run_id = (tmp_path / "wandb_id").read_text()
  runs = sorted(p.name for p in (tmp_path / "wandb").glob("offline-run-*"))
  assert len(runs) == 2 and all(name.endswith("-" + run_id) for name in runs)   # both under the one W&B run id
  images = sorted((tmp_path / "wandb").glob("offline-run-*/files/media/images/attention_*.png"))
  assert len(images) == 2
  assert run_metrics(tmp_path) == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}]
