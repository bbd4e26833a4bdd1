"""What a run does when something breaks, so that a fault costs at most the steps since the last checkpoint.

- An unwritable workdir is refused before anything is trained (`check_workdir`); a save that fails later (disk
  full) stops the run with the operating system's reason (`checkpoint.SaveError`), the earlier checkpoints intact.
- An unreadable newest checkpoint is moved aside and the previous one restored (`checkpoint.Checkpoints.restore`).
- Unreadable images skipped by any dataset of the run are listed once in <workdir>/bad_files.txt and summarised at
  the end (`BadFiles`), not logged again every epoch.
- A non-finite loss stops the run, or with loss.on_nonfinite='skip' drops the step (`steps.skip_nonfinite`) and
  stops after loss.max_consecutive_nonfinite in a row (`nonfinite_error`).
- A dead peer in a multi-process run (killed, out of memory, lost node) ends every survivor with one paragraph and
  exit code 1 (`PeerMonitor`): at once when a collective fails, within multihost.heartbeat_timeout_s / 2 + 2 s
  when the peer simply stops answering, within multihost.step_timeout_s when a step hangs with every peer alive.
  Rerunning the same command resumes from the last checkpoint, which a dead peer cannot damage (orbax commits a
  checkpoint only when every process has written its part).
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time

import jax

from dino_jax import checkpoint as ckpt_lib
from dino_jax import sharding
from dino_jax.data import pipeline


class NonFiniteLoss(RuntimeError):
  pass


def check_workdir(workdir):
  """SaveError now, before the data or the model is built, if `workdir` cannot be written."""
  ckpt_lib.check_writable(workdir)


def nonfinite_error(config, state, steps_per_epoch, last) -> NonFiniteLoss | None:
  """The error that stops the run once the step has set `state.nonfinite_step`, or None (read on log steps)."""
  bad = int(jax.device_get(state.nonfinite_step))
  if bad < 0:
    return None
  advice = "Lower the lr, raise the teacher temperature warm-up, or set model.dtype=float32."
  if config.loss.get("on_nonfinite", "stop") == "skip":
    n = int(config.loss.max_consecutive_nonfinite)
    return NonFiniteLoss(
        f"{n} consecutive steps had a non-finite loss or update (the last at step {bad}, epoch "
        f"{bad // steps_per_epoch}; loss.on_nonfinite='skip' skipped {int(jax.device_get(state.skipped_total))} "
        f"steps in all); the state was frozen at its last finite value and the run stops. Last metrics: {last}. "
        f"{advice}")
  return NonFiniteLoss(
      f"loss is not finite at step {bad} (epoch {bad // steps_per_epoch}); the state was frozen at its last finite "
      f"value and the run stops. Last metrics: {last}. {advice} (loss.on_nonfinite='skip' drops such steps "
      f"instead.)")


class _OrbaxWriteErrors(logging.Filter):
  """Drops orbax's own error logs (with their tracebacks, one per writer thread) of a write the OS refused: the
  SaveError that follows says it once, with the reason."""

  _OS_REFUSALS = ("os_error_code", "No space left on device", "Read-only file system", "Permission denied",
                  "Disk quota exceeded")

  def filter(self, record):
    if record.levelno < logging.ERROR or (f"{os.sep}orbax{os.sep}" not in (record.pathname or "") and
                                          record.name != "asyncio"):
      return True
    text = record.getMessage() + (logging.Formatter().formatException(record.exc_info) if record.exc_info else "")
    return not any(r in text for r in self._OS_REFUSALS)


def _closed_loop(exc_type, value):
  return exc_type is RuntimeError and str(value) == "Event loop is closed"


def quiet_orbax_write_errors():
  """For the command line: one paragraph for a failed save, not orbax's page of tracebacks.

  Three sources: orbax's error logs through absl's logger, one per writer thread; asyncio's log of the tasks that
  failed the same way, at exit; and, once the failed save's event
  loop is closed, TensorStore's completion callbacks of the other pending writes, each printing 'RuntimeError: Event
  loop is closed' through sys.excepthook (nothing else raises that error in a training run).
  """
  for name in ("absl", "asyncio"):   # asyncio: 'Task exception was never retrieved' for the other writes, at exit
    logger = logging.getLogger(name)
    if not any(isinstance(f, _OrbaxWriteErrors) for f in logger.filters):
      logger.addFilter(_OrbaxWriteErrors())
  previous = sys.excepthook
  if getattr(previous, "_dino_jax", False):
    return

  def excepthook(exc_type, value, tb):
    if not _closed_loop(exc_type, value):
      previous(exc_type, value, tb)

  excepthook._dino_jax = True
  sys.excepthook = excepthook
  previous_unraisable = sys.unraisablehook

  def unraisablehook(info):
    if not _closed_loop(info.exc_type, info.exc_value):
      previous_unraisable(info)

  sys.unraisablehook = unraisablehook


# ============ unreadable images ============

class BadFiles:
  """Collects the unreadable images that the run's datasets skip (grain workers included) into
  <workdir>/bad_files.txt, one 'path<TAB>error' line per file, kept across resumptions.

  The datasets append to the file named by `pipeline.BAD_FILES_ENV` (inherited by spawned grain workers) and log
  each file once per process at INFO only; `summary()` dedups the list and says how many there are.
  """

  def __init__(self, workdir, is_main=True):
    self.path = os.path.join(os.path.abspath(workdir), "bad_files.txt")
    self.is_main = is_main
    self._previous = os.environ.get(pipeline.BAD_FILES_ENV)

  def start(self):
    os.environ[pipeline.BAD_FILES_ENV] = self.path
    pipeline.forget_reported_bad_files()
    return self

  def stop(self):
    if self._previous is None:
      os.environ.pop(pipeline.BAD_FILES_ENV, None)
    else:
      os.environ[pipeline.BAD_FILES_ENV] = self._previous
    return self

  def files(self) -> dict:
    """{path: error} of every file listed so far (by this run and the runs it resumes)."""
    out = {}
    if os.path.exists(self.path):
      with open(self.path) as f:
        for line in f:
          path, _, error = line.rstrip("\n").partition("\t")
          if path:
            out.setdefault(path, error)
    return out

  def summary(self) -> str | None:
    """Rewrites the list sorted and without repeats; a one-line summary, or None when no file was skipped."""
    files = self.files()
    if not files:
      return None
    if self.is_main:
      tmp = self.path + ".tmp"
      with open(tmp, "w") as f:
        f.writelines(f"{p}\t{e}\n" for p, e in sorted(files.items()))
      os.replace(tmp, self.path)
    return (f"{len(files)} unreadable image file(s) were skipped (data.on_bad_image='skip'), listed in {self.path}; "
            f"e.g. {next(iter(sorted(files)))}")


# ============ multi-process: dead peers and hung steps ============

def initialize_distributed(config):
  """jax.distributed.initialize with the run's heartbeat and start-up timeouts, when launched as several processes."""
  m = config.get("multihost")
  kwargs = {} if m is None else {"heartbeat_timeout_seconds": int(m.heartbeat_timeout_s),
                                 "initialization_timeout": int(m.init_timeout_s)}
  sharding.maybe_initialize_distributed(**kwargs)


def _client():
  from jax._src import distributed  # noqa: PLC0415 (the coordination service's key-value store)
  return distributed.global_state.client


class PeerMonitor:
  """In a multi-process run, a daemon thread that ends this process with a clear message when a peer is gone.

  Every process bumps its own counter in the coordination service's key-value store every `interval` seconds and
  watches the others': a peer whose counter has not moved for heartbeat_timeout_s / 2 (half jax.distributed's own
  heartbeat timeout, so that we speak before its abort), or a coordination service that no longer answers, means a
  dead peer. A training loop that has not finished a step for step_timeout_s (after the first, which compiles)
  means a hung collective. Either way: one paragraph on stderr and `os._exit(1)` (a clean exit would wait on the
  dead peer at the next barrier). `fail(error)` does the same for a collective that raised in the main thread.
  """

  def __init__(self, config, checkpoint_dir, interval=1.0):
    self.active = jax.process_count() > 1
    m = config.get("multihost")
    self.peer_timeout = (float(m.heartbeat_timeout_s) if m is not None else 100.0) / 2
    self.step_timeout = float(m.step_timeout_s) if m is not None else 600.0
    self.checkpoint_dir, self.interval = checkpoint_dir, interval
    self.me, self.count = jax.process_index(), jax.process_count()
    self._last_step, self._last_progress = None, None
    self._stop = threading.Event()
    self._thread = None

  def start(self):
    if self.active:
      self._thread = threading.Thread(target=self._watch, name="dino_jax-peer-monitor", daemon=True)
      self._thread.start()
    return self

  def stop(self):
    """This process is done: its peers stop watching it (it may leave before they do)."""
    if self._thread is not None and not self._stop.is_set():
      self._stop.set()
      self._thread.join()
      try:
        _client().key_value_set(self._key(self.me), _DONE, allow_overwrite=True)
      except Exception:  # noqa: BLE001
        pass

  def idle(self):
    """No more training steps: the step timeout no longer applies (an evaluation may take long); peers are still
    watched until `stop`."""
    self._last_progress = None

  @contextlib.contextmanager
  def watching(self):
    """Work after training (the evaluation) under the monitor: a collective that fails on a lost peer ends the
    process with the paragraph (`fail`), and this process is marked done when the block ends, however it ends."""
    try:
      yield
    except Exception as e:
      self.fail(e)
      raise
    finally:
      self.stop()

  def progress(self, step):
    """The training loop finished dispatching `step`."""
    self._last_step, self._last_progress = step, time.monotonic()

  def _key(self, p):
    return f"dino_jax/alive/{p}"

  def _watch(self):
    client = _client()
    beats = 0
    seen = {p: (None, time.monotonic()) for p in range(self.count) if p != self.me}
    while not self._stop.wait(self.interval):
      beats += 1
      try:
        client.key_value_set(self._key(self.me), str(beats), allow_overwrite=True)
      except Exception as e:  # noqa: BLE001
        self._die(f"the coordination service (run by process 0) no longer answers ({_short(e)}): process 0 is "
                  f"probably dead")
      now = time.monotonic()
      for p, (value, since) in seen.items():
        try:
          current = client.key_value_try_get(self._key(p))
        except Exception:  # noqa: BLE001 (not written yet, or the service is gone: caught by the set above)
          current = value
        if current == _DONE:
          continue
        if current != value:
          seen[p] = (current, now)
        elif value is not None and now - since > self.peer_timeout:
          self._die(f"process {p} stopped answering {now - since:.0f} s ago (killed, out of memory or its node "
                    f"lost)")
      last = self._last_progress   # read once: `idle()` may clear it meanwhile
      if last is not None and now - last > self.step_timeout:
        self._die(f"no training step finished for {now - last:.0f} s after step {self._last_step} "
                  f"(multihost.step_timeout_s={self.step_timeout:g}): a collective is hung, most likely on a dead "
                  f"or stuck peer")

  def fail(self, error):
    """Called with an exception from the main thread: ends the process if it looks like a lost peer."""
    if isinstance(error, ckpt_lib.SaveError) and error.__cause__ is not None:
      error = error.__cause__      # a save that failed on the dead peer (orbax synchronises the processes)
    if self.active and _looks_like_lost_peer(error):
      self._die(f"a collective failed, most likely on a dead peer ({_short(error)})")

  def _die(self, what):
    latest = _latest_step(self.checkpoint_dir)
    resume = (f"the last checkpoint, step {latest} in {self.checkpoint_dir}, is intact" if latest is not None else
              "no checkpoint had been written yet")
    message = (f"ERROR: process {self.me} of {self.count}: {what}. The run stops on every surviving process "
               f"(exit code 1); {resume}. Restart the lost process or node, then rerun the same command on every "
               f"host to resume. Timeouts: multihost.heartbeat_timeout_s, multihost.step_timeout_s.")
    try:
      sys.stdout.flush()
      print("\n" + message, file=sys.stderr, flush=True)
    finally:
      os._exit(1)


_DONE = "done"
_LOST_PEER_HINTS = ("gloo", "connection reset", "connection refused", "broken pipe", "unavailable", "deadline",
                    "coordination", "heartbeat", "nccl", "socket closed", "barrier", "peer")


def _looks_like_lost_peer(error):
  text = f"{type(error).__name__} {error}".lower()
  return any(h in text for h in _LOST_PEER_HINTS)


def _short(error, limit=200):
  text = " ".join(f"{type(error).__name__}: {error}".split())
  return text if len(text) <= limit else text[:limit] + " ..."


def _latest_step(directory):
  try:
    steps = [int(n) for n in os.listdir(directory) if n.isdigit()]
  except OSError:
    return None
  return max(steps) if steps else None


def log_summary(bad_files, state=None):
  """End-of-run notes: the unreadable files, the skipped non-finite steps."""
  note = bad_files.summary()
  if note and bad_files.is_main:
    logging.warning("%s", note)
  if state is not None:
    skipped = int(jax.device_get(state.skipped_total))
    if skipped and bad_files.is_main:
      logging.warning("%d step(s) with a non-finite loss or update were skipped (loss.on_nonfinite='skip')", skipped)
