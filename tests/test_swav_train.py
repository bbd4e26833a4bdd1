"""SwAV end to end through `dino_jax.train` (tests/configs/swav_quickstart_test.py): metrics, checkpoint with the queue,
resume, evaluation of the trained network, and the same run over 2 devices (queue and batch sharded)."""
import json
import os
import subprocess
import sys

import jax
import numpy as np

from dino_jax import train
from dino_jax.evaluate import run as eval_run
from tests.helpers import ROOT, recipe, run_metrics, run_state

STEPS = 4


def _config(**overrides):
  return recipe("swav_quickstart", **overrides)


def test_swav_trains_checkpoints_the_queue_resumes_and_evaluates(tmp_path):
  """The queue (2 batches, filled from step 0) is full after 2 steps; a run stopped there and resumed must restore it
  and use it at once (a lost queue would be refilled from zeros and used only 2 steps later)."""
  run = str(tmp_path / "run")
  train.train_and_evaluate(_config(max_steps=2, **{"eval.test_source": None}), run)
  saved = run_state(run)
  assert saved.method_state["queue"].shape == (2, 1, 32, 16)
  assert np.all(np.any(saved.method_state["queue"] != 0, axis=-1))      # the checkpoint holds the full queue
  out = train.train_and_evaluate(_config(max_steps=STEPS), run)
  lines = run_metrics(run)
  assert [l["step"] for l in lines] == list(range(1, STEPS + 1))
  for key in ("loss", "lr", "grad_norm", "queue_used", "assign_entropy", "cluster_entropy"):
    assert all(np.isfinite(l[key]) for l in lines), key
  assert [l["queue_used"] for l in lines] == [0.0, 0.0, 1.0, 1.0]
  final = run_state(run)
  assert int(final.step) == STEPS and not np.array_equal(final.method_state["queue"], saved.method_state["queue"])
  ev = json.load(open(os.path.join(run, "eval.json")))
  assert "random_init" in ev
  # The table is the trained network's k-NN (SwAV has no teacher): recomputed from the checkpoint's parameters.
  config = _config(max_steps=STEPS)
  again = eval_run.knn_eval(config, final.params["backbone"], final.batch_stats.get("backbone", {}))
  assert again == ev["teacher"] and ev["teacher"]["k=5"]["top1"] > 20.0   # chance: 10 %
  assert out["train"]["step"] == STEPS

  # The same run on 2 (fake CPU) devices: batch and queue split over the data axis, SyncBatchNorm and Sinkhorn-Knopp
  # over the global batch. Only the order of the cross-device sums differs.
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_DEFAULT_MATMUL_PRECISION="highest")
  two = str(tmp_path / "two")
  proc = subprocess.run([sys.executable, "-m", "dino_jax.train", f"--config={ROOT}/tests/configs/swav_quickstart_test.py",
                         f"--workdir={two}", f"--config.max_steps={STEPS}", "--config.block_each_step=True",
                         "--config.eval.test_source="],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  two_lines = run_metrics(two)
  assert [l["step"] for l in two_lines] == [l["step"] for l in lines]
  for one_device, two_devices in zip(lines, two_lines):
    for key in ("loss", "queue_used", "cluster_entropy"):
      assert abs(one_device[key] - two_devices[key]) <= 1e-5 * max(abs(one_device[key]), 1.0), key
