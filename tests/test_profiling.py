"""--config.profile_steps=(a,b): a jax.profiler trace of exactly those steps, written where TensorBoard/XProf look."""
import glob
import os

import jax
import jax.numpy as jnp
import pytest
from absl import flags
from ml_collections import config_flags

from dino_jax import profiling
from tests.helpers import ROOT


def test_profile_steps_override_parses():
  argv = ["prog", f"--config={ROOT}/configs/quickstart.py", "--config.profile_steps=(3,5)"]
  fv = flags.FlagValues()
  holder = config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True, sys_argv=argv)
  fv(argv)
  assert tuple(holder.value.profile_steps) == (3, 5)


def test_trace_of_the_chosen_steps(tmp_path):
  f = jax.jit(lambda x: jnp.sin(x) @ x)
  prof = profiling.StepProfiler((2, 3), str(tmp_path))
  x = jnp.ones((64, 64))
  started = []
  for step in range(1, 6):
    prof.before(step)
    started.append(prof.active)
    x = f(x)
    prof.after(step, x)
  assert started == [False, True, True, False, False] and not prof.active
  traces = glob.glob(os.path.join(tmp_path, "plugins", "profile", "*", "*.xplane.pb"))
  assert len(traces) == 1 and os.path.getsize(traces[0]) > 0
  with pytest.raises(ValueError, match="profile_steps"):
    profiling.StepProfiler((5, 2), str(tmp_path))


def test_config_check_refuses_bad_tool_settings():
  from dino_jax import config_check  # noqa: PLC0415
  from tests.helpers import recipe  # noqa: PLC0415
  c = recipe("quickstart", profile_steps=(4,), **{"eval.every_epochs": -1, "eval.online_test_samples": -5})
  with pytest.raises(config_check.ConfigError) as e:
    config_check.validate(c)
  for key in ("config.profile_steps=(4,)", "config.eval.every_epochs=-1", "config.eval.online_test_samples=-5"):
    assert key in str(e.value), key
  config_check.validate(recipe("quickstart", profile_steps=(2, 3)))
