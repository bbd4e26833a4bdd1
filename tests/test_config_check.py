"""dino_jax.config_check: every out-of-range or unknown value is refused before any data is read or anything is
compiled, the message naming the key, the value and what would work; nothing is written."""
import os
import subprocess
import sys
import time

import pytest

from dino_jax import config_check, train
from tests.helpers import ROOT, recipe

# (recipe, {key: bad value}, text the message must hold besides "config.<key>=<value>")
REFUSED = [
    ("quickstart", {"optim.lr": -1.0}, "must be > 0"),
    ("quickstart", {"batch_size": 0}, ">= 1"),
    ("quickstart", {"optim.name": "adagrad"}, "'adamw', 'sgd', 'lars', 'larc'"),
    ("quickstart", {"optim.weight_decay": -0.1}, "[0, 1]"),
    ("quickstart", {"optim.momentum": 1.5}, "[0, 1]"),
    ("quickstart", {"loss.student_temp": 0.0}, "must be > 0"),
    ("quickstart", {"loss.teacher_temp": -0.04}, "must be > 0"),
    ("quickstart", {"teacher_momentum": 1.2}, "[0, 1]"),
    ("quickstart", {"loss.center_momentum": -0.5}, "[0, 1]"),
    ("quickstart", {"crops.global_size": 18}, "multiple of the patch size model.patch_size=4"),
    ("quickstart", {"crops.local_size": 10}, "multiple of the patch size"),
    ("quickstart", {"epochs": 0}, ">= 1"),
    ("quickstart", {"optim.warmup_epochs": 5}, "[0, 2]"),
    ("quickstart", {"loss.warmup_teacher_temp_epochs": 3}, "[0, 2]"),
    ("quickstart", {"model.out_dim": 0}, ">= 1"),
    ("quickstart", {"method": "byol"}, "registered: dino, swav"),
    ("quickstart", {"data.source": "imgfolder:/data/train"}, "imagefolder"),
    ("quickstart", {"data.on_bad_image": "ignore"}, "'skip', 'fail'"),
    ("swav_quickstart", {"loss.queue_length": -32}, ">= 0"),
    ("swav_quickstart", {"loss.epsilon": 0.0}, "must be > 0"),
    ("swav_quickstart", {"loss.temperature": -0.1}, "must be > 0"),
    ("swav_quickstart", {"loss.crops_for_assign": (0, 7)}, "not crop indices"),
]


@pytest.mark.parametrize("name,override,hint", REFUSED, ids=[next(iter(o)) + "=" + repr(next(iter(o.values())))
                                                             for _, o, _ in REFUSED])
def test_bad_value_is_refused_naming_key_and_value_before_anything_runs(tmp_path, name, override, hint):
  config = recipe(name, **override)
  (key, value), = override.items()
  workdir = tmp_path / "run"
  start = time.perf_counter()
  with pytest.raises(config_check.ConfigError) as e:
    train.train_and_evaluate(config, str(workdir))
  assert time.perf_counter() - start < 5.0
  message = str(e.value)
  if key == "method":
    assert f"config.method={value!r}" in message
  elif key == "data.source":
    assert "config.data.source" in message and value in message
  else:
    assert f"config.{key}={value!r}" in message, message
  assert hint in message, message
  assert not workdir.exists()   # nothing written


def test_batch_must_split_over_the_devices():
  config = recipe("quickstart", batch_size=6)
  with pytest.raises(config_check.ConfigError, match=r"config.batch_size=6: must be divisible by the 4 devices"):
    config_check.validate(config, device_count=4)
  config_check.validate(recipe("quickstart", batch_size=8), device_count=4)


def test_every_problem_is_listed_at_once_and_good_recipes_pass():
  with pytest.raises(config_check.ConfigError) as e:
    config_check.validate(recipe("quickstart", **{"optim.lr": 0.0, "loss.teacher_temp": 0.0}))
  assert "config.optim.lr=0.0" in str(e.value) and "config.loss.teacher_temp=0.0" in str(e.value)
  for name in ("quickstart", "swav_quickstart"):
    config_check.validate(recipe(name, None))
  for name in ("dino_vit_small16", "dino_vit_base16", "dino_resnet50", "swav_resnet50", "swav_resnet50_bs256"):
    config_check.validate(recipe(name, None, **{"data.source": "imagefolder:/data/imagenet/train"}))


def test_command_line_prints_the_problem_without_a_traceback(tmp_path):
  r = subprocess.run([sys.executable, "-m", "dino_jax.train", f"--config={ROOT}/tests/configs/quickstart_test.py",
                      f"--workdir={tmp_path}/run", "--config.optim.lr=-1"], cwd=ROOT, capture_output=True, text=True,
                     env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=120)
  assert r.returncode == 1
  assert "config.optim.lr=-1.0: must be > 0" in r.stderr and "Traceback" not in r.stderr
  assert not os.path.exists(tmp_path / "run")


def test_device_image_size_is_checked_where_crops_are_cut_on_the_device():
  small = {"data.device_image_size": 8}   # below crops.global_size (16 in the test recipe)
  config_check.validate(recipe("quickstart", **small))             # crop_on='cpu': the key is not used
  with pytest.raises(config_check.ConfigError, match=r"config.data.device_image_size=8: must be an integer >= 16"):
    config_check.validate(recipe("quickstart", **small, **{"data.crop_on": "device"}))
