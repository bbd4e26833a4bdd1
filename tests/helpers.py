"""Small helpers shared by the end-to-end tests: recipe variants with dotted overrides, a run's state and metrics."""
import importlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def recipe(name, arg="test", **overrides):
  """configs/<name>.py's get_config(arg) (arg 'test': tests/configs/<name>_test.py, its seconds-long variant) with
  {'a.b': value} overrides applied (ConfigDict type checks included)."""
  if arg == "test":
    c = importlib.import_module(f"tests.configs.{name}_test").get_config()
  else:
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
  from dino_jax.checkpoint import load_run  # noqa: PLC0415
  return jax.device_get(load_run(workdir)[1])


def run_metrics(workdir, *, train_only=True):
  """metrics.jsonl's rows: those of the training log steps (the online k-NN rows left out), or all of them."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return [r for r in rows if "loss" in r] if train_only else rows


def method_step(config, model, *, steps_per_epoch):
  """(graphdef, initial TrainState, jitted update) for `config`'s method on the network `model` (a MultiCropWrapper
  whose weights the test chose): `update(state, crops, key) -> (state, metrics)` is the method's update on already
  augmented crop-major groups, exactly as the train step calls it. The one place where the parity tests build our
  side, so that they test the update and not the way it is assembled."""
  import functools  # noqa: PLC0415
  from dino_jax import state as state_lib  # noqa: PLC0415

  run = state_lib.build_run(config, steps_per_epoch=steps_per_epoch, mesh=state_lib.sharding.make_mesh(
      jax.devices()[:1]))
  graphdef, params, stats = state_lib.split_model(model)
  fresh = jax.eval_shape(run.init)   # the structure; the weights are the test's
  teacher = (params, stats) if run.method.HAS_TEACHER else (None, None)
  state = fresh.replace(step=jnp.int32(0), params=params, batch_stats=stats, opt_state=run.tx.init(params),
                        teacher=teacher[0], teacher_batch_stats=teacher[1], nonfinite_step=jnp.int32(-1),
                        skipped_streak=jnp.int32(0), skipped_total=jnp.int32(0),
                        method_state=run.method.init_state(config, params, n_shards=1))
  update = jax.jit(functools.partial(run.method.update, graphdef=graphdef, tx=run.tx, schedules=run.schedules,
                                     config=config))
  return graphdef, state, update


def assert_drift_matches(where, mine, theirs, start, *, tol, rounding):
  """Every tensor's change since `start` ({torch name: array}), ours against the reference's: within `tol` of the
  reference's largest change plus `rounding` x max(|w|, 1) (float32 rounding), and exactly zero where the reference's
  is (frozen or fixed tensors). A tolerance on the weights themselves would pass a tensor that did not move."""
  assert set(theirs) <= set(mine), (where, sorted(set(theirs) - set(mine)))
  for key, value in theirs.items():
    if key.endswith("num_batches_tracked"):
      assert int(mine[key]) == int(value), (where, key)
      continue
    d_ref = np.asarray(value, np.float64) - start[key]
    d_ours = np.asarray(mine[key], np.float64) - start[key]
    if not np.any(d_ref):
      assert not np.any(d_ours), (where, key, "moved where the reference did not")
      continue
    diff, drift, size = np.max(np.abs(d_ours - d_ref)), np.max(np.abs(d_ref)), max(np.max(np.abs(value)), 1.0)
    assert diff <= tol * drift + rounding * size, (where, key, diff / drift, drift / size)


def pipeline_config(batch_size, *, data=None, crops=None, seed=0):
  """The DINO defaults' `data` and `crops` (configs/common.py, the one source of defaults) with test overrides, for
  the input-pipeline tests that need no model; crops cut on the CPU (the path these tests read) unless `data`
  says otherwise."""
  from configs import common  # noqa: PLC0415
  c = common.dino_defaults()
  c.batch_size, c.seed = batch_size, seed
  c.data.update({"source": "unused", "num_workers": 0, "crop_on": "cpu", **(data or {})})
  c.crops.update(crops or {})
  return c
