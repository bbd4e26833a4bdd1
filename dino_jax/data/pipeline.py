"""grain pipelines: the infinite multi-crop training stream and the one-pass evaluation stream.

Training order, like the official `DistributedSampler(shuffle=True)` + `DataLoader(drop_last=True)`:
every epoch is a fresh permutation of the whole source (grain's `shuffle` folds the epoch into
its seed); its first `steps_per_epoch * batch_size` elements are used and the rest dropped, so
epochs line up with steps. Global step t reads stream positions [t*B, (t+1)*B); JAX process p
of P reads the contiguous block [t*B + p*b, t*B + (p+1)*b), b = B/P. `jax.make_array_from_
process_local_data` on a process-major batch axis (the mesh of `jax.devices()`) puts process p's
rows at [p*b, (p+1)*b), so the global batch array is the single-process one, row for row: the
per-row photometric randomness the step draws for [B, ...] is the same on any number of
processes, and a P-process run sees exactly the augmented batches of a 1-process run.

Every element is a pure function of (seed, stream position): same seed => same batches, and the
grain iterator state (a position) is all a checkpoint needs to resume mid-epoch exactly. Save it
with orbax next to the train state:

    ocp.args.Composite(state=..., data=grain.checkpoint.CheckpointSave(iterator))
    ocp.args.Composite(state=..., data=grain.checkpoint.CheckpointRestore(iterator))

Unreadable images (`config.data.on_bad_image`): 'fail' raises an error naming the file; 'skip'
logs the path and deterministically substitutes the next stream position's image (crops still
drawn from the original position's randomness); batches carry `skipped` [b] int32, the number of
files replaced to fill each slot, so the trainer can sum and report them.

Workers (`config.data.num_workers` > 0) are spawned processes (grain `mp_prefetch`): scripts
guard `if __name__ == '__main__'`, absl flags must be parsed (inside `app.run`, or call
`flags.FLAGS.mark_as_parsed()`), iterators should be closed, and a checkpointed iterator state
restores only into a pipeline with the same number of workers. Batches are identical to the
in-process ones (tested).
"""
import math
import os
import sys

from absl import logging
import grain
import numpy as np

from dino_jax.data import decode
from dino_jax.data import multicrop

# More consecutive unreadable files than this means a broken dataset, not a few bad files.
MAX_CONSECUTIVE_BAD = 16

# When set (dino_jax.faults.BadFiles: <workdir>/bad_files.txt), skipped files are appended there, one
# 'path<TAB>error' line each, and logged at INFO; otherwise logged as warnings. Either way once per file and process
# (not again every epoch). An environment variable, because grain's worker processes are spawned.
BAD_FILES_ENV = 'DINO_JAX_BAD_FILES'
_reported = set()


def forget_reported_bad_files():
  _reported.clear()


def _report_bad(error, what):
  path = getattr(error, 'path', None) or str(error)
  if path in _reported:
    return
  _reported.add(path)
  target = os.environ.get(BAD_FILES_ENV)
  if not target:
    logging.warning('%s unreadable image (on_bad_image=skip): %s', what, error)
    return
  logging.info('%s unreadable image (on_bad_image=skip): %s', what, error)
  reason = ' '.join(str(getattr(error, 'reason', error)).split())
  try:
    with open(target, 'a') as f:   # one short line per write: appends of several processes do not interleave
      f.write(f'{path}\t{reason}\n')
  except OSError as e:
    logging.warning('could not record %s in %s (%s): %s', path, target, e, error)


def _derived_seed(seed, purpose):
  """A 32-bit seed for one random stage; different stages never share a stream."""
  return int(np.random.SeedSequence([int(seed), purpose]).generate_state(1)[0])


def steps_per_epoch(source, config, process_count=1):
  """Full global batches in one pass over `source` (the official `drop_last=True`).

  The official count is ceil(N / world) // per_gpu_batch, which pads the last process share with
  repeated images; ours never repeats an image within an epoch and equals it whenever
  world divides N (always on one process).
  """
  del process_count  # the global batch already accounts for the processes
  steps = len(source) // int(config.batch_size)
  if steps == 0:
    raise ValueError(f'{source!r} has {len(source)} images, fewer than one global batch of '
                     f'{config.batch_size}: lower config.batch_size')
  return steps


class _EpochStream(grain.MapDataset):
  """Infinite stream over a shuffled source: epoch e's first `used` shuffled elements, e = 0, 1, ..."""

  def __init__(self, shuffled, num_records, used):
    super().__init__(shuffled)
    self._num_records, self._used = num_records, used

  def __len__(self):
    return sys.maxsize

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    epoch, offset = divmod(index, self._used)
    # ShuffleMapDataset reads index // len as the epoch and reshuffles with seed + epoch.
    return self._parent[epoch * self._num_records + offset]

  def __str__(self):
    return f'_EpochStream(used={self._used} of {self._num_records})'


class _ProcessBlocks(grain.MapDataset):
  """Process p's part of a batched stream: element j is position (j // b) * B + p * b + j % b."""

  def __init__(self, parent, *, global_batch, process_index, process_count):
    super().__init__(parent)
    self._B = global_batch
    self._b = global_batch // process_count
    self._offset = process_index * self._b

  def __len__(self):
    return sys.maxsize

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    step, row = divmod(index, self._b)
    return self._parent[step * self._B + self._offset + row]

  def __str__(self):
    return f'_ProcessBlocks(rows {self._offset}:{self._offset + self._b} of {self._B})'


class _MultiCropStream(grain.MapDataset):
  """Applies `MultiCrop` with an rng seeded by (seed, position); substitutes unreadable images."""

  def __init__(self, parent, transform, *, seed, on_bad_image):
    super().__init__(parent)
    if on_bad_image not in ('skip', 'fail'):
      raise ValueError(f"config.data.on_bad_image must be 'skip' or 'fail', got {on_bad_image!r}")
    self._transform, self._seed, self._skip = transform, seed, on_bad_image == 'skip'

  def __len__(self):
    return len(self._parent)

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    rng = np.random.default_rng([self._seed, index])
    for skipped in range(MAX_CONSECUTIVE_BAD + 1):
      record = self._parent[index + skipped]
      try:
        element = self._transform(record, rng)
      except multicrop.BadImageError as e:
        if not self._skip:
          raise
        _report_bad(e, 'Skipping')
        continue
      element['skipped'] = np.int32(skipped)
      return element
    raise RuntimeError(f'{MAX_CONSECUTIVE_BAD + 1} consecutive unreadable images from stream '
                       f'position {index} (last: {record.get("path")}): is the dataset readable?')

  def __str__(self):
    return '_MultiCropStream'


def _read_options(threads=2, prefetch=2):
  # Elements here are whole batches: a large grain buffer would hold gigabytes.
  return grain.ReadOptions(num_threads=int(threads), prefetch_buffer_size=int(prefetch))


def _prefetch(ds, workers):
  if workers > 0:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
  return ds


def make_train_dataset(source, config, *, seed, process_index=0, process_count=1):
  """The infinite multi-crop training stream of this process, batched.

  Yields dicts of numpy arrays: 'global' uint8 [b, n_global, G, G, 3], 'local' uint8
  [b, n_local, L, L, 3] (absent without local crops), 'label' int32 [b], 'skipped' int32 [b],
  with b = config.batch_size // process_count: rows [p*b, (p+1)*b) of each global batch.
  With `config.data.crop_on = 'device'` the crops are replaced by 'image' uint8 [b, D, D, 3] and
  '<group>_box' float32 [b, n, 2, 4], '<group>_flip' bool [b, n] (decode.py), which the train step
  turns into the same crops (resize.device_crops).
  """
  if config.batch_size % process_count:
    raise ValueError(f'config.batch_size={config.batch_size} is not divisible by the '
                     f'{process_count} JAX processes')
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} not in [0, {process_count})')
  data, crops = config.data, config.crops
  crop_on = data.get('crop_on', 'cpu')
  if crop_on == 'device':  # the workers decode and draw; the step cuts and resizes (resize.device_crops)
    transform = decode.DeviceMultiCrop(
        multicrop.crop_groups(crops),
        image_size=data.device_image_size,
        flip=crops.flip,
        draft=data.jpeg_draft,
        exif_transpose=data.exif_transpose)
  elif crop_on == 'cpu':
    transform = multicrop.MultiCrop(
        multicrop.crop_groups(crops),
        interpolation=crops.interpolation,
        flip=crops.flip,
        draft=data.jpeg_draft,
        exif_transpose=data.exif_transpose)
  else:
    raise ValueError(f"config.data.crop_on must be 'cpu' or 'device', got {crop_on!r}")
  used = steps_per_epoch(source, config) * config.batch_size
  ds = grain.MapDataset.source(source).shuffle(seed=_derived_seed(seed, 0))
  ds = _EpochStream(ds, len(source), used)
  ds = _MultiCropStream(ds, transform, seed=_derived_seed(seed, 1),
                        on_bad_image=data.on_bad_image)
  ds = _ProcessBlocks(ds, global_batch=config.batch_size, process_index=process_index,
                      process_count=process_count)
  ds = ds.batch(config.batch_size // process_count, drop_remainder=True)
  return _prefetch(ds.to_iter_dataset(_read_options(data.threads_per_worker, data.prefetch_batches)),
                   int(data.num_workers))


class _EvalElement:
  """Row i of batch k on process p holds image (k*P + p)*b + i, so the processes' batches laid
  side by side (process-major, as `make_array_from_process_local_data` and a tiled allgather lay
  them) are the source in order; slots past the end are padding (mask False)."""

  def __init__(self, source, transform, batch_size, process_index, process_count, on_bad_image):
    self._source, self._transform, self._b = source, transform, batch_size
    self._p, self._P, self._skip = process_index, process_count, on_bad_image == 'skip'
    size = transform.image_size
    self._blank = np.zeros((size, size, 3), np.uint8)

  def __call__(self, slot):
    batch, row = divmod(slot, self._b)
    index = (batch * self._P + self._p) * self._b + row
    if index < len(self._source):
      try:
        element = self._transform(self._source[index])
        return {**element, 'index': np.int32(index), 'mask': np.bool_(True)}
      except multicrop.BadImageError as e:
        if not self._skip:
          raise
        _report_bad(e, 'Leaving out')
    return {'image': self._blank, 'label': np.int32(-1), 'index': np.int32(-1),
            'mask': np.bool_(False)}


def eval_batches(source, batch_size, process_count=1):
  """Number of batches every process yields in `make_eval_dataset`."""
  return math.ceil(len(source) / (batch_size * process_count))


def make_eval_dataset(source, *, image_size, resize_size, batch_size, process_index=0,
                      process_count=1, num_workers=0, on_bad_image='fail',
                      interpolation='bicubic'):
  """One deterministic pass over `source` with the official evaluation geometry.

  Yields `eval_batches(...)` batches per process (the same count on every process):
  'image' uint8 [b, S, S, 3], 'label' int32 [b], 'index' int32 [b] (position in `source`, -1 for
  padding) and 'mask' bool [b]. The last batches are padded rather than dropped, so every image
  is evaluated exactly once over all processes: weight or filter results by 'mask'. Batch k of
  process p holds images [(k*P + p)*b, (k*P + p + 1)*b): gathered process-major, the masked rows
  are the source in order, whatever the number of processes.
  """
  slots = eval_batches(source, batch_size, process_count) * batch_size
  transform = multicrop.CenterCrop(image_size, resize_size, interpolation=interpolation)
  element = _EvalElement(source, transform, batch_size, process_index, process_count, on_bad_image)
  ds = grain.MapDataset.range(slots).map(element).batch(batch_size)
  return _prefetch(ds.to_iter_dataset(_read_options()), int(num_workers))
