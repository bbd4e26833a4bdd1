"""Training and evaluation streams: determinism, epochs, process shards, resume, workers."""
import numpy as np
import pytest

from dino_jax.data import make_eval_dataset, make_train_dataset, steps_per_epoch
from dino_jax.data.sources import get_source
from tests.helpers import pipeline_config


class IndexSource:
  """Image i is a flat grey square of value i % 256 and label i: batches reveal which images they hold."""

  def __init__(self, n, size=12):
    self.n, self.size = n, size
    self.num_classes = None

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    return {'image': np.full((self.size, self.size, 3), i % 256, np.uint8), 'label': i,
            'path': f'index[{i}]'}

  def __repr__(self):
    return f'IndexSource({self.n}, {self.size})'


def make_config(batch_size=8, local_number=2, **data):
  return pipeline_config(batch_size, data={'on_bad_image': 'skip', **data},
                         crops={'global_size': 8, 'global_scale': (0.4, 1.0), 'local_size': 4,
                                'local_number': local_number, 'local_scale': (0.05, 0.4),
                                'interpolation': 'bicubic', 'flip': True})


def take(ds, n):
  it = iter(ds)
  batches = [next(it) for _ in range(n)]
  if hasattr(it, 'close'):
    it.close()
  return batches


def assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_batches_have_the_documented_shapes_and_types():
  src = get_source('digits:train')
  (batch,) = take(make_train_dataset(src, make_config(local_number=3), seed=0), 1)
  assert batch['global'].shape == (8, 2, 8, 8, 3) and batch['global'].dtype == np.uint8
  assert batch['local'].shape == (8, 3, 4, 4, 3) and batch['local'].dtype == np.uint8
  assert batch['label'].dtype == np.int32 and batch['skipped'].dtype == np.int32
  assert set(batch['label']) <= set(range(10)) and not batch['skipped'].any()
  (no_local,) = take(make_train_dataset(src, make_config(local_number=0), seed=0), 1)
  assert 'local' not in no_local


def test_same_seed_same_batches_other_seed_other_batches():
  src = get_source('digits:train')
  a = take(make_train_dataset(src, make_config(), seed=3), 3)
  b = take(make_train_dataset(src, make_config(), seed=3), 3)
  c = take(make_train_dataset(src, make_config(), seed=4), 3)
  assert_same_batches(a, b)
  assert not np.array_equal(a[0]['label'], c[0]['label'])
  assert not np.array_equal(a[0]['global'], c[0]['global'])


def test_epochs_are_fresh_permutations_with_the_remainder_dropped():
  src, config = IndexSource(45), make_config(batch_size=8)
  steps = steps_per_epoch(src, config)
  assert steps == 5  # 45 // 8, drop_last
  batches = take(make_train_dataset(src, config, seed=0), 3 * steps)
  epochs = [np.concatenate([b['label'] for b in batches[e * steps:(e + 1) * steps]]) for e in range(3)]
  for labels in epochs:
    assert len(set(labels)) == 40 and set(labels) <= set(range(45))  # no repeats within an epoch
  assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])
  with pytest.raises(ValueError, match='fewer than one global batch'):
    steps_per_epoch(IndexSource(7), config)


def test_processes_read_contiguous_blocks_that_are_the_single_process_batch():
  """Process p holds rows [p*b, (p+1)*b) of the 1-process global batch (images and crops), so the
  process-major global array, and with it the per-row augmentation randomness, is topology-free."""
  src, config = IndexSource(64), make_config(batch_size=8)
  single = take(make_train_dataset(src, config, seed=1), 9)  # 9 steps: crosses an epoch (8 steps)
  for count in (2, 4):
    shards = [take(make_train_dataset(src, config, seed=1, process_index=p, process_count=count), 9)
              for p in range(count)]
    for t in range(9):
      assert all(len(s[t]['label']) == 8 // count for s in shards)
      for key in single[t]:
        np.testing.assert_array_equal(np.concatenate([s[t][key] for s in shards]), single[t][key],
                                      err_msg=f'{key} at step {t}, {count} processes')
    # Not the interleaved split: process 0 holds the first rows, not every count-th one.
    assert not np.array_equal(shards[0][0]['label'], single[0]['label'][::count])
  with pytest.raises(ValueError, match='not divisible'):
    make_train_dataset(src, config, seed=1, process_index=0, process_count=3)


def test_process_shard_resumes_from_its_iterator_state():
  src, config = IndexSource(64), make_config(batch_size=8)
  it = iter(make_train_dataset(src, config, seed=1, process_index=1, process_count=2))
  for _ in range(5):
    next(it)
  fresh = iter(make_train_dataset(src, config, seed=1, process_index=1, process_count=2))
  fresh.set_state(it.get_state())
  assert_same_batches([next(fresh) for _ in range(4)], [next(it) for _ in range(4)])


def test_resume_from_iterator_state_gives_the_same_next_batches():
  src, config = get_source('digits:train'), make_config()
  it = iter(make_train_dataset(src, config, seed=0))
  for _ in range(7):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(3)]
  fresh = iter(make_train_dataset(src, config, seed=0))
  fresh.set_state(state)
  assert_same_batches([next(fresh) for _ in range(3)], expected)


def test_eval_covers_every_image_once_and_gathers_in_source_order():
  src = IndexSource(23, size=10)
  single = list(make_eval_dataset(src, image_size=8, resize_size=10, batch_size=10))
  assert len(single) == 3
  per_process = [list(make_eval_dataset(src, image_size=8, resize_size=10, batch_size=5,
                                        process_index=p, process_count=2)) for p in range(2)]
  assert [len(b) for b in per_process] == [3, 3]  # ceil(23 / (5 * 2)) on every process
  for k in range(3):
    for b in (single[k], per_process[0][k], per_process[1][k]):
      assert b['image'].shape[1:] == (8, 8, 3) and b['mask'].dtype == bool
      assert np.all(b['index'][b['mask']] == b['label'][b['mask']])
      assert np.all(b['index'][~b['mask']] == -1) and np.all(b['label'][~b['mask']] == -1)
      np.testing.assert_array_equal(b['image'][b['mask']][:, 0, 0, 0], b['label'][b['mask']] % 256)
    # A tiled allgather of the two processes' batch k is the 1-process batch k of twice the size.
    for key in single[k]:
      np.testing.assert_array_equal(np.concatenate([per_process[0][k][key], per_process[1][k][key]]),
                                    single[k][key], err_msg=f'{key} of batch {k}')
  gathered = np.concatenate([b['index'][b['mask']] for b in single])
  np.testing.assert_array_equal(gathered, np.arange(23))  # every image once, in source order


def _orbax_save_and_restore(directory, iterator, fresh):
  """Saves `iterator` with orbax the way a train loop does, restores the state into `fresh`."""
  import grain
  import orbax.checkpoint as ocp

  with ocp.CheckpointManager(directory) as manager:
    manager.save(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator)))
    manager.wait_until_finished()
  with ocp.CheckpointManager(directory) as manager:
    manager.restore(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))


def test_orbax_checkpoint_resumes_mid_epoch(tmp_path):
  src, config = get_source('digits:train'), make_config()
  it = iter(make_train_dataset(src, config, seed=0))
  for _ in range(5):
    next(it)
  fresh = iter(make_train_dataset(src, config, seed=0))
  _orbax_save_and_restore(tmp_path / 'ckpt', it, fresh)
  assert_same_batches([next(fresh) for _ in range(3)], [next(it) for _ in range(3)])


def test_worker_processes_give_the_in_process_batches_and_resume(tmp_path):
  """mp_prefetch: same batches as num_workers=0, errors from workers reach the caller, and the
  multi-worker iterator state round-trips through an orbax checkpoint."""
  from absl import flags
  import gc

  flags.FLAGS.mark_as_parsed()  # grain's worker processes read absl flags
  src = get_source('digits:train')
  expected = take(make_train_dataset(src, make_config(), seed=0), 6)
  it = iter(make_train_dataset(src, make_config(num_workers=2), seed=0))
  got = [next(it) for _ in range(3)]
  fresh = iter(make_train_dataset(src, make_config(num_workers=2), seed=0))
  _orbax_save_and_restore(tmp_path / 'ckpt', it, fresh)
  got += [next(it) for _ in range(3)]
  resumed = [next(fresh) for _ in range(3)]
  it.close()
  fresh.close()
  assert_same_batches(got, expected)
  assert_same_batches(resumed, expected[3:])
  del got, resumed
  gc.collect()  # release the workers' shared-memory arrays now, not at interpreter exit
