r"""Train a self-supervised method (DINO, SwAV, or one registered in dino_jax.methods) from a config file.

  python -m dino_jax.train --config=configs/quickstart.py --workdir=runs/quickstart [--config.key=value ...]

The run resumes automatically from the latest checkpoint in --workdir. Metrics go to <workdir>/metrics.jsonl and to
TensorBoard event files in the workdir (and W&B with --config.log.wandb_project=NAME; dino_jax/writers.py), the online
k-NN every config.eval.every_epochs with them, the k-NN evaluation at the end to <workdir>/eval.json.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
import warnings

import jax
import jax.numpy as jnp
from absl import app, flags
from ml_collections import config_flags
from tqdm import tqdm

from dino_jax import checkpoint as ckpt_lib
from dino_jax import config_check, console, faults, profiling, sharding, steps, writers
from dino_jax import state as state_lib
from dino_jax.data import pipeline, sources
from dino_jax.evaluate import online_knn

_CONFIG = config_flags.DEFINE_config_file("config", None, "Recipe file (configs/*.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and evaluation results.")


NonFiniteLoss = faults.NonFiniteLoss


class _Stop:
  """SIGTERM/SIGINT set a flag; the loop saves a checkpoint and exits cleanly at the next step."""

  def __init__(self):
    self.requested = False
    for sig in (signal.SIGTERM, signal.SIGINT):
      signal.signal(sig, self._handler)

  def _handler(self, signum, frame):
    if self.requested:  # second Ctrl-C: give up at once
      raise KeyboardInterrupt
    self.requested = True
    logging.warning("signal %d: saving a checkpoint and stopping after this step", signum)


def train_and_evaluate(config, workdir: str) -> dict:
  """Runs (or resumes) training, then the k-NN evaluation. Returns the final metrics and evaluation results."""
  # ============ set-up: processes, config check, mesh, workdir ============
  faults.initialize_distributed(config)
  config_check.validate(config, device_count=jax.device_count())   # before any data is read or anything compiled
  mesh = sharding.make_mesh()
  is_main = jax.process_index() == 0
  faults.check_workdir(workdir)
  bad_files = faults.BadFiles(workdir, is_main).start()   # unreadable images of every dataset below, listed once

  # ============ input pipeline ============
  source = sources.get_source(config.data.source, data_dir=config.data.data_dir)
  steps_per_epoch = pipeline.steps_per_epoch(source, config, jax.process_count())
  total_steps = config.epochs * steps_per_epoch
  stop_at = min(total_steps, config.max_steps or total_steps)
  train_ds = pipeline.make_train_dataset(source, config, seed=config.seed, process_index=jax.process_index(),
                                         process_count=jax.process_count())
  data_iter = iter(train_ds)

  # ============ model, optimiser, schedules, state shapes and shardings ============
  run = state_lib.build_run(config, steps_per_epoch=steps_per_epoch, mesh=mesh)

  # ============ state: restore, or a jitted init straight into its shardings ============
  checkpoints = ckpt_lib.Checkpoints(os.path.join(workdir, "checkpoints"), every_steps=config.checkpoint_every_steps,
                                     keep=config.keep_checkpoints)
  monitor = faults.PeerMonitor(config, checkpoints.directory).start()   # multi-process: a dead peer ends the run
  state = checkpoints.restore(run.abstract, data_iterator=data_iter, config=config)
  if state is None:
    state = jax.jit(run.init, out_shardings=run.shardings)()
    start = 0
  else:
    start = int(jax.device_get(state.step))
  if is_main:
    logging.info("%s %s: %d parameters, %d steps/epoch, %d epochs, %s", config.method, config.model.arch,
                 state_lib.count_params(run.abstract.params), steps_per_epoch, config.epochs,
                 "resumed at step %d" % start if start else "from scratch")

  # ============ the update step ============
  train_step = jax.jit(steps.make_train_step(run), in_shardings=(run.shardings, sharding.batch_sharding(mesh)),
                       out_shardings=(run.shardings, sharding.replicated(mesh)), donate_argnums=(0,))

  # ============ training loop ============
  log_every = config.log_every_steps
  writer = writers.create(config, workdir, is_main=is_main)
  if start == 0:
    writer.write_hparams(writers.flat_config(config))
  online = online_knn.OnlineKnn(config, steps_per_epoch, mesh)
  profiler = profiling.StepProfiler(config.profile_steps, workdir, is_main=is_main)
  stop = _Stop()
  last = {}
  bar = tqdm(total=stop_at, initial=start, disable=not is_main, dynamic_ncols=True, desc="train")
  t0, n0 = time.perf_counter(), start
  step = start
  # Batches go to the device two steps ahead; the checkpoint records the position of the next unused one.
  batches = steps.DevicePrefetch(data_iter, mesh, size=config.data.device_prefetch)
  try:
    while step < stop_at:
      profiler.before(step + 1)
      state, metrics = train_step(state, next(batches))
      step += 1
      profiler.after(step, state)
      monitor.progress(step)
      bar.update(1)
      if config.block_each_step:  # several fake CPU devices deadlock without it (see tests)
        jax.block_until_ready(state)
      done = step == stop_at or stop.requested
      if step % log_every == 0 or done:
        metrics = jax.device_get(metrics)
        now = time.perf_counter()
        rate = (step - n0) * config.batch_size / max(now - t0, 1e-9)
        t0, n0 = now, step
        last = {"step": step, "epoch": step / steps_per_epoch, "img_per_sec": rate,
                **{k: float(v) for k, v in metrics.items()}}
        if is_main:
          writer.write_scalars(step, {k: v for k, v in last.items() if k != "step"})
          bar.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{last['lr']:.2e}", img_s=f"{rate:.0f}")
        if (error := faults.nonfinite_error(config, state, steps_per_epoch, last)) is not None:
          raise error
      if online.due(step) and not stop.requested:
        scalars = online(state)
        writer.write_scalars(step, {"epoch": step / steps_per_epoch, **scalars})
        bar.write(online_knn.describe(step / steps_per_epoch, scalars))
      checkpoints.save(step, state, data_iterator=batches, config=config, force=done)
      if stop.requested:
        break
  except BaseException as e:
    writer.close()
    if isinstance(e, Exception):
      monitor.fail(e)   # a collective failed on a dead peer: one paragraph and exit 1, no wait on barriers
    monitor.stop()
    raise
  finally:
    profiler.stop(state)
    monitor.idle()      # no more steps to time; peers are still watched through the evaluation
    bar.close()
    batches.close()
    try:
      checkpoints.close()   # waits for the last background save: a failed one raises SaveError here
    except BaseException:
      writer.close()        # now, on the same full disk: not in tensorboardX's exit hook, with a traceback
      monitor.stop()
      raise
  if stop.requested and step < stop_at:
    faults.log_summary(bad_files.stop(), state)
    logging.warning("stopped at step %d on request; rerun the same command to resume", step)
    monitor.stop()
    writer.close()
    return {"train": last, "stopped_at": step}

  # ============ evaluation ============
  results = {"train": last}
  with monitor.watching():
    _evaluate(config, workdir, state, step, mesh, writer, results, is_main)
  faults.log_summary(bad_files.stop(), state)
  writer.close()
  return results


def _evaluate(config, workdir, state, step, mesh, writer, results, is_main):
  """The end-of-run k-NN of the trained network (config.eval): eval.json, the table, the attention images."""
  if config.eval.test_source:
    from dino_jax.evaluate import run as eval_run  # noqa: PLC0415 (keeps training start-up light)
    results["eval"] = eval_run.evaluate_state(config, state, mesh=mesh, compare_random_init=config.eval.compare_random_init)
    if is_main:
      with open(os.path.join(workdir, "eval.json"), "w") as f:
        json.dump(results["eval"], f, indent=2)
      print(eval_run.format_results(results["eval"]))
      from dino_jax import visualize_attention  # noqa: PLC0415
      writer.write_images(step, visualize_attention.writer_images(config, state))
    writer.write_scalars(step, writers.eval_scalars(results["eval"]), jsonl=False)


def main(argv):
  del argv
  console.quiet_logging()
  faults.quiet_orbax_write_errors()   # a full disk: our one paragraph, not a page of orbax tracebacks
  if _WORKDIR.value is None:
    raise app.UsageError("--workdir is required")
  try:
    train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except (NonFiniteLoss, config_check.ConfigError, ckpt_lib.SaveError, ckpt_lib.RestoreError) as e:
    if isinstance(e, ckpt_lib.SaveError):   # the failed save's pending writes, dropped at exit: not news
      warnings.filterwarnings("ignore", message=r"coroutine '.*' was never awaited", category=RuntimeWarning)
    print(f"ERROR: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
