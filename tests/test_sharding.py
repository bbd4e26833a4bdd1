"""The same recipe on 4 (fake CPU) devices gives the same losses as on 1 device.

The batch is sharded over the mesh's `data` axis; the centre, the loss means and the gradients become cross-device
reductions inserted by XLA. Runs in subprocesses because the device count is fixed when JAX starts. Each step is
blocked on (config.block_each_step): several fake CPU devices deadlock on 2 cores when collectives are queued.
"""
import json
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = r"""
import json, sys
import jax
from tests.configs import quickstart_test
from dino_jax import train
c = quickstart_test.get_config()
c.max_steps = 3
c.block_each_step = True
c.eval.test_source = None
c.model.drop_path_rate = 0.0
assert jax.device_count() == int(sys.argv[2]), jax.devices()
out = train.train_and_evaluate(c, sys.argv[1])
"""


def _run(workdir, devices):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             PYTHONPATH=ROOT)
  r = subprocess.run([sys.executable, "-c", SCRIPT, str(workdir), str(devices)], cwd=ROOT, env=env,
                     capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  return [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]


def test_four_devices_match_one_device(tmp_path):
  one = _run(tmp_path / "one", 1)
  four = _run(tmp_path / "four", 4)
  assert [m["step"] for m in one] == [m["step"] for m in four] == [1, 2, 3]
  for a, b in zip(one, four):
    for key in ("loss", "center_norm", "teacher_entropy", "kl_teacher_student", "grad_norm", "param_norm"):
      np.testing.assert_allclose(b[key], a[key], rtol=1e-5, err_msg=f"{key} at step {a['step']}")


def test_swav_queue_is_split_over_the_data_axis():
  """Each device holds its own queue rows (the official per-GPU queue), not a replicated copy; the rest of the state
  is replicated."""
  import jax  # noqa: PLC0415
  from jax.sharding import PartitionSpec as P  # noqa: PLC0415
  from dino_jax import sharding  # noqa: PLC0415
  from dino_jax import state as state_lib  # noqa: PLC0415
  from tests.helpers import recipe  # noqa: PLC0415

  shardings = state_lib.build_run(recipe("swav_quickstart")).shardings
  assert shardings.method_state["queue"].spec == P(None, sharding.DATA)
  assert all(s.spec == P() for s in jax.tree.leaves(shardings.params))
