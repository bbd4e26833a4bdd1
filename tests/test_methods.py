"""The method interface (dino_jax/methods): a third method defined outside the package trains, checkpoints its own
state, resumes, is evaluated by the k-NN and exported, with no edit to dino_jax/."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from dino_jax import convert, methods, train
from dino_jax.checkpoint import load_run
from dino_jax.interop import torch as interop
from tests import mean_teacher
from tests.configs import mean_teacher_test
from tests.helpers import ROOT, run_metrics

CONFIG = os.path.join(ROOT, "tests", "configs", "mean_teacher_test.py")


def test_a_method_outside_the_package_trains_resumes_evaluates_and_exports(tmp_path):
  # Two steps from the command line (a fresh process imports the method from its module path) ...
  env = dict(os.environ, PYTHONPATH=ROOT)
  cmd = [sys.executable, "-m", "dino_jax.train", f"--config={CONFIG}", f"--workdir={tmp_path}",
         "--config.max_steps=2", "--config.eval.test_source="]
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert os.path.isdir(tmp_path / "checkpoints" / "2")

  # ... then resumed in this process to three steps, with the k-NN at the end.
  config = mean_teacher_test.get_config()
  config.max_steps = 3
  out = train.train_and_evaluate(config, str(tmp_path))
  lines = run_metrics(tmp_path)
  assert [l["step"] for l in lines] == [1, 2, 3]

  # Its own state went through the checkpoint: the running loss after step 3 is the EMA of all three losses (a
  # resume that reset or dropped `method_state` would give 0.1 * loss_3).
  _, state = load_run(str(tmp_path))
  assert int(state.step) == 3 and set(state.method_state) == {"loss_ema"}
  d = config.mean_teacher.loss_ema
  expected = 0.0
  for l in lines:
    expected = d * expected + (1 - d) * l["loss"]
  np.testing.assert_allclose(float(state.method_state["loss_ema"]), expected, rtol=1e-6)
  np.testing.assert_allclose(lines[-1]["loss_ema"], expected, rtol=1e-6)
  # The teacher is an EMA of the student, not a copy (momentum 0.99 over three updates).
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(state.teacher)))

  ev = json.load(open(tmp_path / "eval.json"))
  assert ev == out["eval"] and ev["teacher"]["k=5"]["top1"] > 20.0   # chance: 10 %

  # Export: the evaluated network's backbone as an official .pth; a full training checkpoint has no official format.
  pth = str(tmp_path / "backbone.pth")
  convert.export_run(str(tmp_path), pth, kind="teacher_backbone")
  sd = {k: v.numpy() for k, v in interop.load_pth(pth).items()}
  student, _ = convert.networks(config, state)
  ours = interop.state_dict(student.backbone, nnx.State(jax.device_get(state.teacher)["backbone"]))
  assert sd.keys() == ours.keys()
  for k in sd:
    np.testing.assert_array_equal(sd[k], ours[k], err_msg=k)
  with pytest.raises(ValueError, match="no official training-checkpoint format"):
    convert.export_run(str(tmp_path), str(tmp_path / "full.pth"), kind="full")


def test_register_checks_the_module_and_names_are_listed():
  methods.register("mean_teacher", mean_teacher)
  try:
    assert "mean_teacher" in methods.names()
    m = methods.get("mean_teacher")
    assert m.HAS_TEACHER and m.export is not None and m.defaults is None
  finally:
    methods._REGISTRY.pop("mean_teacher")
  with pytest.raises(TypeError, match="lacks update"):
    methods.register("broken", type("NoUpdate", (), {f: None for f in ("build_model", "init_state", "schedules",
                                                                         "frozen")}))
  with pytest.raises(ValueError, match=r"config.method='byol'.*registered: dino, swav"):
    methods.get("byol")
  with pytest.raises(ValueError, match=r"config.method='no_such.module': cannot import"):
    methods.get("no_such.module")
