"""Small helpers shared by the end-to-end tests: recipe variants with dotted overrides, a run's state and metrics."""
import importlib
import json
import os

import jax
import numpy as np

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


def method_step(config, model, *, steps_per_epoch):
  """(graphdef, initial TrainState, jitted update) for `config`'s method on the network `model` (a MultiCropWrapper
  whose weights the test chose): `update(state, crops, key) -> (state, metrics)` is the method's update on already
  augmented crop-major groups, exactly as the train step calls it. The one place where the parity tests build our
  side, so that they test the update and not the way it is assembled."""
  import functools  # noqa: PLC0415
  from dino_jax import losses, optim, steps  # noqa: PLC0415
  from dino_jax.state import TrainState, split_model  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  graphdef, params, stats = split_model(model)
  schedules = optim.make_schedules(config, steps_per_epoch)
  tx = optim.make_optimizer(config, schedules, optim.make_freeze_fn(config, steps_per_epoch))
  if config.method == "dino":
    method_state = {"center": jnp.zeros([config.model.out_dim], jnp.float32)}
  else:
    queue = losses.init_queue(config.loss.queue_length, batch_size=config.batch_size, n_shards=1,
                              n_assign=len(config.loss.crops_for_assign), dim=config.model.feat_dim)
    method_state = {} if queue is None else {"queue": queue}
  state = TrainState(step=jnp.int32(0), params=params, teacher=params, opt_state=tx.init(params), batch_stats=stats,
                     teacher_batch_stats=stats, method_state=method_state, nonfinite_step=jnp.int32(-1))
  update = {"dino": steps.dino_update, "swav": steps.swav_update}[config.method]
  update = jax.jit(functools.partial(update, graphdef=graphdef, tx=tx, schedules=schedules, config=config,
                                     steps_per_epoch=steps_per_epoch))
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
