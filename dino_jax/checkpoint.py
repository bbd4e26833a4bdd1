"""Orbax checkpoints of a run: train state + grain iterator position + the config, resumed from the workdir.

A checkpoint is written atomically (orbax commits a finished temporary directory), so a run killed mid-save resumes
from the previous one. A checkpoint that is complete but cannot be read (a truncated or damaged file) is moved aside
to `<step>.corrupt-<time>` (never deleted) with a warning naming it and the error, and the next newest one is tried
(`Checkpoints.restore`). A save that cannot be written (disk full, read-only directory) raises `SaveError` with the
operating system's reason; the earlier checkpoints stay as they were. Resuming restores the data iterator too: a run resumed mid-epoch sees exactly the batches it
would have seen.

Saving costs the training loop a copy of the state on its own devices and nothing else (single-process runs): the
copy is dispatched asynchronously like a step, the data position is read at once, and orbax's whole save (the
device-to-host transfer, its bookkeeping, then the file writes) runs on a background thread while training goes on.
Several processes save in the background too when orbax's barriers go through the coordination service (turned on
here; it needs absl's flags parsed, as under `python -m dino_jax.train`); otherwise orbax's barriers are device
collectives, which must not interleave with the training step's, and its save runs on the main thread, stalling
the step by orbax's synchronous part, the device-to-host copy included.

The config of a checkpoint is kept as JSON; resuming with a different model section is refused with the differing
keys named, since the parameters would not fit.
"""
from __future__ import annotations

import ast
import concurrent.futures
import dataclasses
import errno
import json
import logging
import os
import re
import time
import types

import grain
from absl import flags as absl_flags
import jax
import jax.numpy as jnp
import numpy as np
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

# The handler of each item of a checkpoint (the manager's registry, by item name).
_HANDLERS = {"state": ocp.StandardCheckpointHandler, "config": ocp.JsonCheckpointHandler,
             "data": grain.checkpoint.CheckpointHandler}

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


class _ArchitectureMismatch(ValueError):
  pass


class RestoreError(RuntimeError):
  """No checkpoint of the workdir could be read; the message lists each one tried and its error."""


class SaveError(RuntimeError):
  """A checkpoint could not be written; the message gives the operating system's reason (e.g. ENOSPC)."""


def _chain(error):
  """`error` and every exception in its chain of causes and contexts (orbax wraps errors in asyncio and its own)."""
  seen, stack, out = set(), [error], []
  while stack:
    e = stack.pop()
    if e is None or id(e) in seen:
      continue
    seen.add(id(e))
    out.append(e)
    stack.extend([e.__cause__, e.__context__] + list(getattr(e, "exceptions", ())))
  return out


def _os_cause(error):
  """(errno, file name or None) of the operating-system error behind `error`, or None: an OSError in its chain, or
  TensorStore's "[os_error_code='28']" in a message (tensorstore raises ValueError, not OSError)."""
  for e in _chain(error):
    if isinstance(e, OSError) and e.errno is not None:
      return e.errno, e.filename
  for e in _chain(error):
    code = re.search(r"os_error_code='?(\d+)", str(e))
    if code:
      name = re.search(r'(?:local file|Failed writing:) "([^"]+)"', str(e))
      return int(code.group(1)), name.group(1) if name else None
  return None


def _one_line(error, limit=300):
  text = " ".join(f"{type(error).__name__}: {error}".split())
  return text if len(text) <= limit else text[:limit] + " ..."


def save_error(directory, step, error) -> SaveError:
  """A SaveError for a failed save of `step`: the OS reason when one is in the chain, what to do, what is kept."""
  cause = _os_cause(error)
  if cause is not None:
    code, filename = cause
    reason = f"{os.strerror(code)} ({errno.errorcode.get(code, code)}{', ' + filename if filename else ''})"
    hint = {errno.ENOSPC: "free space on that disk (or use a --workdir on a larger one)",
            errno.EDQUOT: "free space within your disk quota",
            errno.EROFS: "the file system is mounted read-only: use another --workdir",
            errno.EACCES: "the directory is not writable by this user: fix its permissions or use another --workdir"
            }.get(code, "fix the directory")
  else:
    reason, hint = _one_line(error), "fix the cause"
  return SaveError(f"could not write the checkpoint of step {step} in {directory}: {reason}. The run stops; the "
                   f"checkpoints written before it are intact. {hint[0].upper() + hint[1:]}, then rerun the same "
                   f"command to resume from the latest one.")


class Checkpoints:
  """Thin wrapper over `ocp.CheckpointManager` with the items 'state', 'data' (grain iterator) and 'config'."""

  def __init__(self, directory, *, every_steps: int = 1000, keep: int = 2, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self.every_steps = max(int(every_steps), 1)
    self._pending = None   # the step of orbax's asynchronous save in flight (written by `_write`)
    self._future = None    # the background thread's `_write` of the latest save
    self._config_json = (None, None)
    # Background saving only where orbax's barriers do not run device collectives (see the module docstring).
    self.background = bool(async_save) and (jax.process_count() == 1 or _distributed_barriers())
    logging.info("checkpoints in %s: %s saves", self.directory,
                 "background" if self.background else "asynchronous" if async_save else "synchronous")
    self._executor = (concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-save")
                      if self.background else None)
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_interval_steps=max(int(every_steps), 1), create=True,
            enable_async_checkpointing=async_save, cleanup_tmp_directories=True))

  def latest_step(self):
    return self.manager.latest_step()

  def saved_config(self, step=None):
    step = self.latest_step() if step is None else step
    return self._read(step, config=ocp.args.JsonRestore()).config

  def _read(self, step, **items):
    """The named items of checkpoint `step`, each read by its orbax item handler. Not `manager.restore`: it ends in
    a barrier of all processes, which a process that failed to read would never reach, so the others would wait
    forever; `newest_readable` gathers every process's outcome instead."""
    out = {}
    for name, args in items.items():
      handler = _HANDLERS[name]()
      try:
        out[name] = handler.restore(epath.Path(self.directory) / str(step) / name, args=args)
      finally:
        handler.close()
    return types.SimpleNamespace(**out)

  def restore(self, abstract_state, *, data_iterator=None, config=None, step=None):
    """Restore the latest (or given) step into the shapes/shardings of `abstract_state`; None if there is none.

    `data_iterator` (a grain DatasetIterator) is moved in place to the saved position. Without `step`, a checkpoint
    that fails to read is moved aside (`move_aside`) with a warning and the next newest is tried; RestoreError if
    none reads. A checkpoint written by another model is refused (ValueError) and never moved.
    """
    if step is not None:
      return self._restore_step(step, abstract_state, data_iterator, config)
    return self.newest_readable(lambda candidate: self._restore_step(candidate, abstract_state, data_iterator,
                                                                       config))

  def newest_readable(self, read, *, move=True):
    """`read(step)` of the newest checkpoint it succeeds on, or None if there is none.

    Each one that fails gets a warning naming it and the error and, with `move`, is moved aside (`move_aside`).
    RestoreError lists every one tried if none reads. With several processes, every process reads and all must
    succeed on the same step (a flag gathered from each): a checkpoint one process cannot read is skipped by all,
    so they never resume from different steps. `read` raising _ArchitectureMismatch stops the search (ValueError).
    """
    tried = []
    for candidate in sorted(self.manager.all_steps(), reverse=True):
      try:
        value, error = read(candidate), None
      except _ArchitectureMismatch as e:
        raise ValueError(str(e)) from None
      except Exception as e:  # noqa: BLE001 (orbax, tensorstore and grain raise many kinds; each is reported)
        value, error = None, e
      failed = _failed_processes(error is not None)
      if not failed:
        return value
      reason = _one_line(error) if error is not None else f"process {', '.join(map(str, failed))} could not read it"
      moved = self.move_aside(candidate) if move else None
      tried.append(f"{self.directory}/{candidate}: {reason}" + (f" (moved to {moved})" if moved else ""))
      logging.warning("checkpoint %s/%d cannot be read (%s); %s and trying the previous one", self.directory,
                      candidate, reason, f"moved it to {moved}" if moved else "leaving it in place")
    if tried:
      raise RestoreError("no checkpoint of this run can be read; tried, newest first:\n  " + "\n  ".join(tried) +
                         ("\nThe unreadable ones were moved aside, not deleted. Rerunning the same command starts "
                          "from scratch; to keep them, move them back or use another --workdir." if move else ""))
    return None

  def move_aside(self, step):
    """Renames checkpoint `step` to `<step>.corrupt-<UTC time>` (outside orbax's step names: never listed, restored
    or deleted by it) and returns the new path; only process 0 renames (the directory is shared)."""
    src = os.path.join(self.directory, str(step))
    stamp = time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())
    if jax.process_count() > 1:   # every process has given up on it, and all use process 0's name
      from jax.experimental import multihost_utils  # noqa: PLC0415
      stamp = bytes(multihost_utils.broadcast_one_to_all(np.frombuffer(stamp.encode(), np.uint8))).decode()
    dst = f"{src}.corrupt-{stamp}"
    moved = True
    if jax.process_index() == 0 and os.path.isdir(src):
      try:
        os.rename(src, dst)
      except OSError as e:
        logging.warning("could not move %s aside: %s", src, e)
        moved = False
    if jax.process_count() > 1:   # the others look at the directory after the rename
      from jax.experimental import multihost_utils  # noqa: PLC0415
      multihost_utils.sync_global_devices(f"dino_jax_move_aside_{step}")
    self.manager.reload()
    return dst if moved else None

  def _restore_step(self, step, abstract_state, data_iterator, config):
    if config is not None:
      diffs = config_differences(self.saved_config(step), config_to_dict(config))
      if diffs:
        raise _ArchitectureMismatch(
            f"checkpoint {self.directory}/{step} was written by a different model; refusing to resume:\n  " +
            "\n  ".join(diffs) + "\nUse another --workdir or the same config.")
    missing = self._fields_added_since(step, abstract_state)
    target = abstract_state
    if missing:   # written before these fields existed: restore the others, fill these with their initial values
      target = {f.name: getattr(abstract_state, f.name) for f in dataclasses.fields(abstract_state)
                if f.name not in missing}
    items = {"state": ocp.args.StandardRestore(target)}
    if data_iterator is not None:
      data_file = os.path.join(self.directory, str(step), "data",
                               f"process_{jax.process_index()}-of-{jax.process_count()}.json")
      if os.path.exists(data_file):
        items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
      else:  # e.g. a run imported from a .pth by dino_jax.convert, or resumed on another number of processes
        logging.warning("checkpoint %s/%d has no data position for process %d of %d: the input pipeline starts "
                        "from the beginning of the data stream", self.directory, step, jax.process_index(),
                        jax.process_count())
    restored = self._read(step, **items)
    logging.info("restored %s at step %d", self.directory, step)
    if not missing:
      return restored.state
    from dino_jax import state as state_lib  # noqa: PLC0415
    logging.info("checkpoint %s/%d predates %s: restored with their initial values", self.directory, step,
                 ", ".join(missing))
    filled = {name: jax.device_put(np.full(getattr(abstract_state, name).shape, state_lib.ADDED_FIELDS[name],
                                           getattr(abstract_state, name).dtype),
                                   getattr(abstract_state, name).sharding) for name in missing}
    return type(abstract_state)(**restored.state, **filled)

  def _fields_added_since(self, step, abstract_state):
    """The TrainState fields of state.ADDED_FIELDS that checkpoint `step` does not hold (read from its metadata)."""
    from dino_jax import state as state_lib  # noqa: PLC0415
    if not dataclasses.is_dataclass(abstract_state):
      return []
    try:
      with open(os.path.join(self.directory, str(step), "state", "_METADATA")) as f:
        saved = {ast.literal_eval(key)[0] for key in json.load(f)["tree_metadata"]}
    except (OSError, ValueError, KeyError, SyntaxError, IndexError):
      return []   # unreadable metadata: the restore itself reports what is wrong
    return [name for name in state_lib.ADDED_FIELDS if name not in saved and hasattr(abstract_state, name)]

  def save(self, step: int, state, *, data_iterator=None, config=None, force: bool = False) -> bool:
    """Starts an asynchronous save of `step` when it is a multiple of `every_steps` or `force` (the last step, a
    stop request). Only those: orbax alone would also save the first step it sees, which the up-front
    `check_writable` makes unnecessary. SaveError if an earlier save could not be written (or, for a synchronous
    save, this one).

    In the background (`self.background`), the state is first copied on its devices: the caller may donate `state`
    to its next step while the copy is written."""
    if not (force or step % self.every_steps == 0):
      return False
    self._raise_failed()
    if self.background:
      state = _device_copy(state)
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:   # its position now, not when the background thread gets to it
      items["data"] = grain.checkpoint.CheckpointSave(_Position(data_iterator))
    if config is not None:
      if self._config_json[0] is not config:   # a run's config does not change: converted once
        self._config_json = (config, config_to_dict(config))
      items["config"] = ocp.args.JsonSave(self._config_json[1])
    args = ocp.args.Composite(**items)
    if self.background:
      self._future = self._executor.submit(self._write, int(step), args)
    else:
      self._write(int(step), args)
    return True

  def _write(self, step, args):
    """orbax's save of `step`: first the end of the previous asynchronous save, so that an error is charged to the
    step it belongs to."""
    self._finish_previous()
    try:
      self.manager.save(step, args=args, force=True)
    except Exception as e:  # noqa: BLE001
      raise save_error(self.directory, step, e) from e
    self._pending = step

  def _finish_previous(self):
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001
      failed, self._pending = self._pending, None
      raise save_error(self.directory, failed, e) from e
    self._pending = None

  def _raise_failed(self):
    """Raise (once) the SaveError of the last background save, if it failed; wait for it to be handed to orbax."""
    future, self._future = self._future, None
    if future is not None:
      future.result()

  def wait(self):
    """Blocks until every save started is written; SaveError if one was not."""
    self._raise_failed()
    self._finish_previous()

  def close(self):
    try:
      self.wait()
    finally:
      if self._executor is not None:
        self._executor.shutdown(wait=True)
      try:
        self.manager.close()
      except Exception:  # noqa: BLE001 (a failed save was already reported by wait())
        logging.debug("closing the checkpoint manager", exc_info=True)


class _Position:
  """A data iterator's position read now, for a checkpoint written later (grain's handler calls `get_state()`)."""

  def __init__(self, iterator):
    state = iterator.get_state()
    self._state = state if isinstance(state, bytes) else json.dumps(state, indent=4).encode()

  def get_state(self) -> bytes:
    return self._state


@jax.jit
def _device_copy(tree):
  """A copy of `tree` in new buffers on the same devices and shardings."""
  return jax.tree.map(jnp.copy, tree)


def _distributed_barriers() -> bool:
  """Turns on orbax's barriers through the coordination service (its flag experimental_orbax_use_distributed_barrier)
  in place of its default, a device collective; True if they are on. Off where absl's flags are not parsed (the
  library used outside `absl.app.run`): orbax then reads its default."""
  try:
    absl_flags.FLAGS.experimental_orbax_use_distributed_barrier = True
    return bool(absl_flags.FLAGS.experimental_orbax_use_distributed_barrier)
  except (AttributeError, absl_flags.Error):
    return False


def _failed_processes(failed: bool) -> list[int]:
  """The indices of the processes for which `failed` is true (this one's flag, gathered from every process)."""
  if jax.process_count() == 1:
    return [0] if failed else []
  from jax.experimental import multihost_utils  # noqa: PLC0415
  flags = np.asarray(multihost_utils.process_allgather(np.asarray([failed], np.int32))).reshape(-1)
  return [i for i, f in enumerate(flags) if f]


def check_writable(directory):
  """Raise SaveError at once if `directory` (created if missing) cannot hold a file: before training, not at the
  first checkpoint."""
  try:
    os.makedirs(directory, exist_ok=True)
    probe = os.path.join(directory, f".write_test.{os.getpid()}")
    with open(probe, "wb") as f:
      f.write(b"0" * 4096)
      f.flush()
      os.fsync(f.fileno())
    os.remove(probe)
  except OSError as e:
    name = errno.errorcode.get(e.errno, str(e.errno))
    raise SaveError(f"the workdir {directory} is not writable: {e.strerror or e} ({name}). Nothing was trained. "
                    f"Use another --workdir, or fix its permissions or free space.") from None


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
  shardings training uses. For evaluation, conversion and plots; training resumes through `Checkpoints.restore`.

  Without `step`, a latest checkpoint that cannot be read is reported and the previous one is used; it is left in
  place (the run may still be writing beside this reader; resuming the run moves it aside)."""
  from dino_jax import state as state_lib  # noqa: PLC0415
  checkpoints = Checkpoints(os.path.join(workdir, "checkpoints"))

  def read(at):
    config = complete_config(checkpoints.saved_config(at))
    return config, checkpoints.restore(state_lib.build_run(config).abstract, step=at)

  try:
    if step is not None:
      if step not in checkpoints.manager.all_steps():
        raise FileNotFoundError(f"no checkpoint of step {step} in {workdir}/checkpoints; it holds steps "
                                f"{checkpoints.manager.all_steps() or 'none'}")
      try:
        return read(step)
      except Exception as e:  # noqa: BLE001
        raise RestoreError(f"checkpoint {checkpoints.directory}/{step} cannot be read: {_one_line(e)}") from e
    loaded = checkpoints.newest_readable(read, move=False)
    if loaded is None:
      raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints")
    return loaded
  finally:
    checkpoints.close()


def abstract_like(tree):
  """ShapeDtypeStructs (with shardings) of a pytree of arrays: the restore target."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
