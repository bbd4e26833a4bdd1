"""Orbax checkpoints of a run: train state + grain iterator position + the config, resumed from the workdir.

A checkpoint is written atomically (orbax commits a finished temporary directory), so a run killed mid-save resumes
from the previous one. Resuming restores the data iterator too: a run resumed mid-epoch sees exactly the batches it
would have seen. The config of a checkpoint is kept as JSON; resuming with a different model section is refused with
the differing keys named, since the parameters would not fit.
"""
from __future__ import annotations

import json
import logging
import os

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp

# Keys whose change makes a checkpoint unusable (parameter shapes or the meaning of the state differ).
_ARCH_KEYS = ("method", "model")


def config_to_dict(config) -> dict:
  return json.loads(config.to_json_best_effort())


def _flatten(d, prefix=""):
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(_flatten(v, key + "."))
    else:
      out[key] = v
  return out


def config_differences(saved: dict, current: dict, sections=_ARCH_KEYS):
  """['model.arch: vit_small (checkpoint) != vit_tiny (this run)', ...] for the given top-level sections."""
  saved_f = _flatten({k: saved.get(k) for k in sections})
  current_f = _flatten({k: current.get(k) for k in sections})
  diffs = []
  for key in sorted(set(saved_f) | set(current_f)):
    a, b = saved_f.get(key, "<absent>"), current_f.get(key, "<absent>")
    if a != b:
      diffs.append(f"{key}: {a!r} (checkpoint) != {b!r} (this run)")
  return diffs


class Checkpoints:
  """Thin wrapper over `ocp.CheckpointManager` with the items 'state', 'data' (grain iterator) and 'config'."""

  def __init__(self, directory, *, every_steps: int = 1000, keep: int = 2, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_interval_steps=max(int(every_steps), 1), create=True,
            enable_async_checkpointing=async_save, cleanup_tmp_directories=True))

  def latest_step(self):
    return self.manager.latest_step()

  def saved_config(self, step=None):
    step = self.latest_step() if step is None else step
    return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config

  def restore(self, abstract_state, *, data_iterator=None, config=None, step=None):
    """Restore the latest (or given) step into the shapes/shardings of `abstract_state`; None if there is none.

    `data_iterator` (a grain DatasetIterator) is moved in place to the saved position.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      return None
    if config is not None:
      diffs = config_differences(self.saved_config(step), config_to_dict(config))
      if diffs:
        raise ValueError(f"checkpoint {self.directory}/{step} was written by a different model; refusing to "
                         f"resume:\n  " + "\n  ".join(diffs) + "\nUse another --workdir or the same config.")
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      data_file = os.path.join(self.directory, str(step), "data",
                               f"process_{jax.process_index()}-of-{jax.process_count()}.json")
      if os.path.exists(data_file):
        items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
      else:  # e.g. a run imported from a .pth by dino_jax.convert, or resumed on another number of processes
        logging.warning("checkpoint %s/%d has no data position for process %d of %d: the input pipeline starts "
                        "from the beginning of the data stream", self.directory, step, jax.process_index(),
                        jax.process_count())
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    logging.info("restored %s at step %d", self.directory, step)
    return restored.state

  def save(self, step: int, state, *, data_iterator=None, config=None, force: bool = False) -> bool:
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    if config is not None:
      items["config"] = ocp.args.JsonSave(config_to_dict(config))
    return self.manager.save(int(step), args=ocp.args.Composite(**items), force=force)

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def complete_config(saved: dict) -> ml_collections.ConfigDict:
  """A config saved with a checkpoint, completed with today's defaults of its method for the keys added since it
  was written (the library reads `config.x` for every key). Saved values win; JSON lists become the tuples the
  defaults hold."""
  from dino_jax import methods  # noqa: PLC0415 (methods -> convert -> this module)
  method = methods.get(saved["method"])
  config = method.defaults() if method.defaults is not None else ml_collections.ConfigDict()

  def merge(node, values):
    for key, value in values.items():
      current = node.get(key) if key in node else None
      if isinstance(value, dict) and isinstance(current, ml_collections.ConfigDict):
        merge(current, value)
      elif key in node and isinstance(current, tuple) and isinstance(value, list):
        node[key] = tuple(value)
      elif key in node:
        node[key] = value
      else:
        node[key] = ml_collections.ConfigDict(value) if isinstance(value, dict) else value

  with config.unlocked():
    merge(config, saved)
  return config


def load_run(workdir, step=None):
  """(config, state) of a run's checkpoint (latest, or `step`), the state restored on this host's devices with the
  shardings training uses. For evaluation, conversion and plots; training resumes through `Checkpoints.restore`."""
  from dino_jax import state as state_lib  # noqa: PLC0415
  checkpoints = Checkpoints(os.path.join(workdir, "checkpoints"))
  try:
    step = checkpoints.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints")
    config = complete_config(checkpoints.saved_config(step))
    state = checkpoints.restore(state_lib.build_run(config).abstract, step=step)
  finally:
    checkpoints.close()
  return config, state


def abstract_like(tree):
  """ShapeDtypeStructs (with shardings) of a pytree of arrays: the restore target."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
