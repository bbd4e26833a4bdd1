"""Small helpers shared by the end-to-end tests: recipe variants with dotted overrides, a run's state and metrics."""
import importlib
import json
import os

import jax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def recipe(name, arg="test", **overrides):
  """configs/<name>.py's get_config(arg) with {'a.b': value} overrides applied (ConfigDict type checks included)."""
  c = importlib.import_module(f"configs.{name}").get_config(arg)
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def run_state(workdir):
  """The latest checkpoint's train state of a run, on the host."""
  from dino_jax.evaluate.run import load_run  # noqa: PLC0415
  return jax.device_get(load_run(workdir)[1])


def run_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]
