"""The jitted train step: augmentation on the accelerator, then the method's update, behind the non-finite guard.

`make_train_step(run)` returns `step(state, batch) -> (state, metrics)` for `jax.jit` over the run's mesh. The method
(`dino_jax.methods`) owns the iteration itself; this module holds what every method shares: the crop-major layout,
the EMA, the guard that freezes the state on a non-finite loss (or, with loss.on_nonfinite='skip', drops that step's
update and stops only after loss.max_consecutive_nonfinite in a row), and the optimiser metrics.
"""
from __future__ import annotations

import collections
import json

import jax
import jax.numpy as jnp
import optax

from dino_jax import sharding
from dino_jax.data import photometric
from dino_jax.data import resize


def crop_major(images):
  """[B, n, H, W, C] -> [n * B, H, W, C]: all of crop 0, then all of crop 1, ... (the official crop order)."""
  b, n = images.shape[:2]
  return jnp.swapaxes(images, 0, 1).reshape((n * b,) + images.shape[2:])


def ema(teacher, student, momentum):
  """teacher <- m * teacher + (1 - m) * student, for every parameter (the official zip over all parameters)."""
  return jax.tree.map(lambda t, s: t * momentum + (1.0 - momentum) * s.astype(t.dtype), teacher, student)


def tree_norm(tree):
  return optax.global_norm(jax.tree.map(lambda x: x.astype(jnp.float32), tree))


def optimizer_metrics(step, schedules, grads, updates, params):
  """lr and weight decay of this step, and the global norms of the gradients, the updates and the parameters."""
  return {"lr": schedules.lr(step), "wd": schedules.weight_decay(step), "grad_norm": tree_norm(grads),
          "update_norm": tree_norm(updates), "param_norm": tree_norm(params)}


def _select(ok, new, old):
  return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)


def commit(state, loss, **changes):
  """The state after one step: `changes` applied and the step advanced, behind the non-finite guard.

  A non-finite loss freezes the state at its last good value (only `step` moves on) and records the first bad step
  in `nonfinite_step`; the host reads it on log steps and stops the run.
  """
  ok = jnp.isfinite(loss) & (state.nonfinite_step < 0)
  new = _select(ok, state.replace(step=state.step + 1, **changes), state.replace(step=state.step + 1))
  return new.replace(nonfinite_step=jnp.where(
      (state.nonfinite_step < 0) & ~jnp.isfinite(loss), state.step, state.nonfinite_step))


def all_finite(tree):
  """True when every floating-point leaf of `tree` is finite (one scalar reduction per leaf)."""
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else jnp.bool_(True)


def skip_nonfinite(old, new, loss, max_consecutive):
  """loss.on_nonfinite='skip': a step whose loss, or any updated parameter, optimiser or method state, is not
  finite is dropped (the state stays `old`, only `step` moves on) and counted; the `max_consecutive`-th skip in a
  row sets `nonfinite_step`, which freezes the state and stops the run as 'stop' does."""
  ok = jnp.isfinite(loss) & all_finite((new.params, new.teacher, new.opt_state, new.method_state, new.batch_stats))
  stopped = old.nonfinite_step >= 0
  streak = jnp.where(ok, 0, old.skipped_streak + 1)
  kept = _select(ok & ~stopped, new, old.replace(step=old.step + 1))
  return kept.replace(
      skipped_streak=jnp.where(stopped, old.skipped_streak, streak),
      skipped_total=old.skipped_total + jnp.where(ok | stopped, 0, 1).astype(jnp.int32),
      nonfinite_step=jnp.where(stopped, old.nonfinite_step, jnp.where(streak >= max_consecutive, old.step, -1)))


def make_train_step(run):
  """step(state, batch) -> (state, metrics); batch holds uint8 crops {'global': [B,2,G,G,3], 'local': [B,N,L,L,3]}.

  `run` is a `dino_jax.state.Run` (config, method, graph, optimiser, schedules).
  """
  config, update = run.config, run.method.update
  on_nonfinite = config.loss.get("on_nonfinite", "stop")

  def step(state, batch):
    key = jax.random.fold_in(jax.random.key(config.seed), state.step)
    aug_key, drop_key = jax.random.split(key)
    if "image" in batch:  # config.data.crop_on = 'device': the crops are cut here (data/resize.py)
      batch = resize.device_crops(batch, config.crops)
    views = photometric.augment(batch, aug_key, config.aug)
    crops = [crop_major(views["global"])]
    if "local" in views:
      crops.append(crop_major(views["local"]))
    new, metrics = update(state, crops, drop_key, graphdef=run.graphdef, tx=run.tx, schedules=run.schedules,
                          config=config)
    if on_nonfinite == "skip":
      new = skip_nonfinite(state, new, metrics["loss"], int(config.loss.max_consecutive_nonfinite))
      metrics = {**metrics, "skipped_steps": new.skipped_total}
    return new, metrics

  return step


class DevicePrefetch:
  """The host batches of `iterator` put on the mesh `size` steps ahead of the step that uses them.

  jax dispatches a step asynchronously, so the host-to-device copy of the next batch overlaps the running step and
  the loop never waits on a transfer. `get_state()` is the wrapped iterator's position as of the next batch handed
  out (not of the ones already read ahead), as bytes, the form grain's checkpoint handler writes for an iterator
  that is not a grain DatasetIterator: a checkpoint then resumes at the batch the next step would have used, as
  without prefetching. Restore the wrapped iterator itself, before wrapping it.
  """

  def __init__(self, iterator, mesh, size=2):
    self._it, self._mesh, self._size = iterator, mesh, max(int(size), 1)
    self._queue = collections.deque()   # (state of `iterator` before this batch, batch on the device)
    self._exhausted = False

  def _position(self):
    get = getattr(self._it, "get_state", None)
    return None if get is None else get()

  def _fill(self):
    while not self._exhausted and len(self._queue) < self._size:
      position = self._position()
      try:
        batch = next(self._it)
      except StopIteration:
        self._exhausted = True
        break
      self._queue.append((position, sharding.global_batch(batch, self._mesh)))

  def __iter__(self):
    return self

  def __next__(self):
    self._fill()
    if not self._queue:
      raise StopIteration
    _, batch = self._queue.popleft()
    self._fill()   # the next batch's copy starts now, while the caller's step runs
    return batch

  def get_state(self) -> bytes:
    position = self._queue[0][0] if self._queue else self._position()
    return position if isinstance(position, bytes) else json.dumps(position, indent=4).encode()

  def close(self):
    self._queue.clear()
    if hasattr(self._it, "close"):
      self._it.close()
