"""End to end: a two-step run, resume, config overrides and the errors a user sees first."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from dino_jax import train
from dino_jax.evaluate import run as eval_run
from tests.helpers import ROOT, recipe, run_metrics, run_state

QUICKSTART = os.path.join(ROOT, "configs", "quickstart.py")
TINY = os.path.join(ROOT, "tests", "configs", "quickstart_test.py")


def _config(**overrides):
  return recipe("quickstart", **overrides)


def test_two_step_run_writes_metrics_checkpoint_and_evaluates(tmp_path):
  out = train.train_and_evaluate(_config(max_steps=2), str(tmp_path))
  lines = run_metrics(tmp_path)
  assert [l["step"] for l in lines] == [1, 2]
  for key in ("loss", "lr", "wd", "teacher_momentum", "teacher_temp", "teacher_entropy", "kl_teacher_student",
              "center_norm", "img_per_sec"):
    assert np.isfinite(lines[-1][key]), key
  assert lines[0]["lr"] == 0.0                                  # linear warm-up starts from 0 (official)
  assert os.path.isdir(tmp_path / "checkpoints" / "2")
  ev = json.load(open(tmp_path / "eval.json"))
  assert "random_init" in ev and "teacher_entropy" in ev
  assert out["train"]["step"] == 2
  # The table is the teacher's k-NN: recomputed from the checkpoint with the student's weights zeroed (an evaluation
  # that read the student would fall to chance), it gives the same numbers.
  config = recipe("quickstart", max_steps=2)
  state = run_state(tmp_path)
  state = state.replace(params=jax.tree.map(np.zeros_like, state.params))
  again = eval_run.evaluate_state(config, state)
  assert again["teacher"] == ev["teacher"] and ev["teacher"]["k=5"]["top1"] > 20.0   # chance: 10 %


def test_resume_mid_epoch_gives_the_same_run(tmp_path):
  straight, resumed = tmp_path / "straight", tmp_path / "resumed"
  train.train_and_evaluate(_config(max_steps=3, **{"eval.test_source": None}), str(straight))
  train.train_and_evaluate(_config(max_steps=1, **{"eval.test_source": None}), str(resumed))
  train.train_and_evaluate(_config(max_steps=3, **{"eval.test_source": None}), str(resumed))
  a, b = run_state(straight), run_state(resumed)
  assert int(a.step) == int(b.step) == 3
  for x, y in zip(jax.tree.leaves((a.params, a.teacher, a.opt_state, a.method_state)),
                  jax.tree.leaves((b.params, b.teacher, b.opt_state, b.method_state))):
    np.testing.assert_array_equal(x, y)
  losses_a = [m["loss"] for m in run_metrics(straight)]
  losses_b = [m["loss"] for m in run_metrics(resumed)]
  assert losses_a == losses_b


def test_resume_refuses_another_architecture(tmp_path):
  train.train_and_evaluate(_config(max_steps=1, **{"eval.test_source": None}), str(tmp_path))
  other = _config(max_steps=2, **{"eval.test_source": None, "model.out_dim": 32})
  with pytest.raises(ValueError, match=r"model.out_dim: 64 \(checkpoint\) != 32 \(this run\)"):
    train.train_and_evaluate(other, str(tmp_path))


def _parse(path, *overrides):
  """Parse `--config=path --config.x=y ...` the way `python -m dino_jax.train` does (config_flags, locked)."""
  argv = ["prog", f"--config={path}", *overrides]
  fv = flags.FlagValues()
  holder = config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True, sys_argv=argv)
  fv(argv)
  return holder.value


def test_config_overrides_from_the_command_line():
  c = _parse(QUICKSTART, "--config.model.out_dim=4096", "--config.optim.lr=0.002",
             "--config.crops.local_number=0", "--config.data.source=imagefolder:/data/x")
  assert c.model.out_dim == 4096 and c.optim.lr == 0.002 and c.crops.local_number == 0
  assert c.data.source == "imagefolder:/data/x"
  assert _parse(TINY).model.overrides.depth == 1


def test_unknown_config_key_fails_naming_it():
  with pytest.raises(Exception, match="not_a_key"):
    _parse(QUICKSTART, "--config.optim.not_a_key=1")


def _run_cli(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "dino_jax.train", *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=300)


def test_cli_unknown_key_and_missing_dataset_fail_at_once(tmp_path):
  r = _run_cli(f"--config={TINY}", f"--workdir={tmp_path}/a", "--config.modle.arch=vit_small")
  assert r.returncode != 0 and "modle" in r.stderr
  missing = tmp_path / "no_such_dir"
  r = _run_cli(f"--config={TINY}", f"--workdir={tmp_path}/b", f"--config.data.source=imagefolder:{missing}")
  assert r.returncode != 0 and str(missing) in r.stderr
  assert not os.path.exists(tmp_path / "b" / "checkpoints")   # nothing half-made
