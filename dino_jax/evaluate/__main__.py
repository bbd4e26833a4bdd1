r"""Evaluate the latest checkpoint of a run: k-NN top-1/top-5 of the teacher and its output entropy.

  python -m dino_jax.evaluate --workdir=runs/quickstart [--compare_random_init] [--eval.knn_k=10,20]

The config is read from the checkpoint; --config.* style overrides are not needed for evaluation, but the sources
can be changed with --train_source / --test_source (e.g. to evaluate on another labelled dataset).
"""
from __future__ import annotations

import json
import os

import jax
from absl import app, flags
from ml_collections import ConfigDict

from dino_jax import checkpoint as ckpt_lib
from dino_jax import optim, sharding
from dino_jax.evaluate import run as eval_run
from dino_jax.state import make_init_fn

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory written by dino_jax.train.", required=True)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
_RANDOM = flags.DEFINE_bool("compare_random_init", False, "Also evaluate the architecture at random init.")
_TRAIN_SOURCE = flags.DEFINE_string("train_source", None, "Override config.eval.train_source.")
_TEST_SOURCE = flags.DEFINE_string("test_source", None, "Override config.eval.test_source.")


def load_run(workdir, step=None):
  """(config, state) of a run's checkpoint, the state restored on this host's devices."""
  checkpoints = ckpt_lib.Checkpoints(os.path.join(workdir, "checkpoints"))
  step = checkpoints.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints")
  config = ConfigDict(checkpoints.saved_config(step))
  # The optimiser state's structure does not depend on the schedule values: any steps_per_epoch builds it.
  schedules = optim.make_schedules(config, 1)
  tx = optim.make_optimizer(config, schedules, optim.make_freeze_fn(config, 1))
  mesh = sharding.make_mesh()
  abstract = jax.eval_shape(make_init_fn(config, tx))
  state_sh = sharding.state_shardings(mesh, abstract)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_sh)
  state = checkpoints.restore(abstract, step=step)
  checkpoints.close()
  return config, state


def main(argv):
  del argv
  config, state = load_run(_WORKDIR.value, _STEP.value)
  if _TRAIN_SOURCE.value:
    config.eval.train_source = _TRAIN_SOURCE.value
  if _TEST_SOURCE.value:
    config.eval.test_source = _TEST_SOURCE.value
  results = eval_run.evaluate_state(config, state, compare_random_init=_RANDOM.value)
  results["step"] = int(jax.device_get(state.step))
  if jax.process_index() == 0:
    with open(os.path.join(_WORKDIR.value, "eval.json"), "w") as f:
      json.dump(results, f, indent=2)
    print(eval_run.format_results(results))


if __name__ == "__main__":
  app.run(main)
