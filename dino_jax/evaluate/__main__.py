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

from dino_jax.evaluate import run as eval_run
from dino_jax.evaluate.run import load_run

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory written by dino_jax.train.", required=True)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
_RANDOM = flags.DEFINE_bool("compare_random_init", False, "Also evaluate the architecture at random init.")
_TRAIN_SOURCE = flags.DEFINE_string("train_source", None, "Override config.eval.train_source.")
_TEST_SOURCE = flags.DEFINE_string("test_source", None, "Override config.eval.test_source.")


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
