"""Which runs a sweep holds: the recipe's `sweep()` and `--grid key=v1,v2` expanded to override dicts, one workdir
per run named after its overrides, and whether a run is finished, started or new."""
from __future__ import annotations

import ast
import importlib.util
import itertools
import json
import os
import re

DONE = "done.json"          # written by the launcher when the run's process exits with status 0
SEED = "seed"


def load_config_module(path: str):
  """configs/x.py (a 'path:arg' suffix is the recipe's argument) -> (module, arg)."""
  path, _, arg = path.partition(":")
  spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module, (arg or None)


def parse_value(text: str):
  """'1e-3' -> 0.001, '(0.4, 1.0)' -> a tuple, 'True' -> True; anything else stays a string ('vit_small')."""
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def _split_values(text: str) -> list[str]:
  """'0,1,2' -> 3 values; commas inside brackets belong to the value: '(0.4,1.0),(0.5,1.0)' -> 2 tuples."""
  out, depth, cur = [], 0, ""
  for ch in text:
    depth += ch in "([{"
    depth -= ch in ")]}"
    if ch == "," and depth == 0:
      out.append(cur)
      cur = ""
    else:
      cur += ch
  return out + [cur]


def parse_grid(specs: list[str]) -> list[dict]:
  """['seed=0,1', 'optim.lr=5e-4,1e-3'] -> the 4 override dicts of their product (the first key varies slowest)."""
  axes = []
  for spec in specs:
    key, sep, values = spec.partition("=")
    if not sep or not key or not values:
      raise ValueError(f"--grid {spec!r}: expected key=v1,v2,...")
    axes.append([(key.strip(), parse_value(v.strip())) for v in _split_values(values)])
  return [dict(combo) for combo in itertools.product(*axes)]


def expand(module, arg, grid_specs: list[str] | None = None) -> list[dict]:
  """The sweep's runs: the recipe's sweep() (called with the recipe's argument when it takes one) crossed with the
  command line's grid; either alone when the other is missing. Each run's overrides, in order, seed last."""
  from_config = [{}]
  if hasattr(module, "sweep"):
    fn = module.sweep
    from_config = list(fn(arg) if fn.__code__.co_argcount else fn())
  from_grid = parse_grid(grid_specs or [])
  runs = [{**a, **b} for a in from_config for b in from_grid]
  runs = [{**{k: v for k, v in r.items() if k != SEED}, **({SEED: r[SEED]} if SEED in r else {})} for r in runs]
  names = [run_name(r) for r in runs]
  dupes = sorted({n for n in names if names.count(n) > 1})
  if dupes:
    raise ValueError(f"the sweep names the same run twice: {dupes}")
  return runs


def _format(value) -> str:
  if isinstance(value, (tuple, list)):
    return "_".join(_format(v) for v in value)
  return str(value)


def run_name(overrides: dict) -> str:
  """{'optim.lr': 0.001, 'seed': 0} -> 'optim.lr=0.001,seed=0' (characters a path cannot hold become '_'); 'default'
  for a run without overrides."""
  if not overrides:
    return "default"
  name = ",".join(f"{k}={_format(v)}" for k, v in overrides.items())
  return re.sub(r"[^A-Za-z0-9._=,+-]", "_", name)


def setting_of(overrides: dict) -> dict:
  """The overrides without the seed: runs that differ only by seed are one setting."""
  return {k: v for k, v in overrides.items() if k != SEED}


def cli_overrides(overrides: dict) -> list[str]:
  """--config.key=value flags as dino_jax.train parses them (ml_collections config_flags)."""
  return [f"--config.{k}={tuple(v) if isinstance(v, list) else v}" for k, v in overrides.items()]


def resolve(config_arg: str, overrides: dict):
  """The config `python -m dino_jax.train --config=<config_arg> <cli_overrides(overrides)>` trains with, parsed by the
  same config_flags code (so a key the command line cannot set fails here, before anything is launched)."""
  from absl import flags  # noqa: PLC0415
  from ml_collections import config_flags  # noqa: PLC0415
  argv = ["sweep", f"--config={config_arg}", *cli_overrides(overrides)]
  values = flags.FlagValues()
  holder = config_flags.DEFINE_config_file("config", None, flag_values=values, lock_config=True, sys_argv=argv)
  try:
    values(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    raise KeyError(f"overrides {overrides}: {e}") from e
  return holder.value


def status(workdir: str) -> str:
  """'done' (the launcher saw its process exit with status 0), 'started' (a checkpoint to resume from) or 'new'.
  A run trained outside the sweep has no done.json: the sweep runs it again, which resumes at its last step and only
  evaluates it."""
  if os.path.exists(os.path.join(workdir, DONE)):
    return "done"
  ckpt = os.path.join(workdir, "checkpoints")
  if os.path.isdir(ckpt) and any(n.isdigit() for n in os.listdir(ckpt)):
    return "started"
  return "new"


def read_overrides(workdir: str) -> dict:
  with open(os.path.join(workdir, "overrides.json")) as f:
    return json.load(f)
