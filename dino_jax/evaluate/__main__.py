r"""Evaluate the latest checkpoint of a run: k-NN top-1/top-5 of the teacher and its output entropy; with --linear,
also the official linear probe (dino_jax.evaluate.linear).

  python -m dino_jax.evaluate --workdir=runs/quickstart [--compare_random_init] [--step=N]
  python -m dino_jax.evaluate --workdir=runs/quickstart --linear [--linear_lr=0.3 --linear_epochs=100 ...]

The config is read from the checkpoint (k, T, image sizes, config.eval.linear); the sources can be changed with
--train_source / --test_source (e.g. to evaluate on another labelled dataset). Results go to <workdir>/eval.json and,
with --linear, <workdir>/eval_linear.json.
"""
from __future__ import annotations

import json
import os

import jax
from absl import app, flags

from dino_jax.evaluate import linear
from dino_jax.evaluate import run as eval_run
from dino_jax.checkpoint import load_run

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory written by dino_jax.train.", required=True)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
_RANDOM = flags.DEFINE_bool("compare_random_init", False, "Also evaluate the architecture at random init.")
_TRAIN_SOURCE = flags.DEFINE_string("train_source", None, "Override config.eval.train_source.")
_TEST_SOURCE = flags.DEFINE_string("test_source", None, "Override config.eval.test_source.")
_LINEAR = flags.DEFINE_bool("linear", False, "Also train and validate the official linear probe.")
_LINEAR_EPOCHS = flags.DEFINE_integer("linear_epochs", None, "Override config.eval.linear.epochs.")
_LINEAR_LR = flags.DEFINE_float("linear_lr", None, "Override config.eval.linear.lr (at batch 256).")
_LINEAR_BATCH = flags.DEFINE_integer("linear_batch_size", None, "Override config.eval.linear.batch_size.")


def _report(results, state, filename, table):
  """Adds the checkpoint's step, writes <workdir>/<filename> and prints the table (process 0 only)."""
  results["step"] = int(jax.device_get(state.step))
  if jax.process_index() == 0:
    with open(os.path.join(_WORKDIR.value, filename), "w") as f:
      json.dump(results, f, indent=2)
    print(table(results))


def main(argv):
  del argv
  config, state = load_run(_WORKDIR.value, _STEP.value)
  if _TRAIN_SOURCE.value:
    config.eval.train_source = _TRAIN_SOURCE.value
  if _TEST_SOURCE.value:
    config.eval.test_source = _TEST_SOURCE.value
  _report(eval_run.evaluate_state(config, state, compare_random_init=_RANDOM.value), state, "eval.json",
          eval_run.format_results)
  if _LINEAR.value:
    with config.unlocked():
      lin = linear.linear_config(config)
      for key, flag in (("epochs", _LINEAR_EPOCHS), ("lr", _LINEAR_LR), ("batch_size", _LINEAR_BATCH)):
        if flag.value is not None:
          lin[key] = flag.value
      config.eval.linear = lin
    _report(eval_run.linear_probe_state(config, state, compare_random_init=_RANDOM.value), state, "eval_linear.json",
            eval_run.format_linear)


if __name__ == "__main__":
  app.run(main)
