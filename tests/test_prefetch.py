"""Nothing but the batches crosses between host and device in the training loop: steps run under
jax.transfer_guard('disallow') on batches that `steps.DevicePrefetch` put ahead, and its checkpointed position is the
batch the next step would use."""
import json

import grain
import jax
import numpy as np

from dino_jax import sharding, steps
from dino_jax import state as state_lib
from tests.helpers import recipe


def _host_batches(config, n, seed=0):
  rng = np.random.default_rng(seed)
  c, b = config.crops, config.batch_size
  for _ in range(n):
    yield {"global": rng.integers(0, 256, (b, c.global_number, c.global_size, c.global_size, 3), np.uint8),
           "local": rng.integers(0, 256, (b, c.local_number, c.local_size, c.local_size, 3), np.uint8)}


def test_steps_run_under_transfer_guard():
  config = recipe("quickstart", batch_size=8)
  mesh = sharding.make_mesh(jax.devices()[:1])
  run = state_lib.build_run(config, steps_per_epoch=4, mesh=mesh)
  train_step = jax.jit(steps.make_train_step(run), in_shardings=(run.shardings, sharding.batch_sharding(mesh)),
                       out_shardings=(run.shardings, sharding.replicated(mesh)), donate_argnums=(0,))
  state = jax.jit(run.init, out_shardings=run.shardings)()
  batches = steps.DevicePrefetch(_host_batches(config, 4), mesh, size=2)
  with jax.transfer_guard("disallow"):
    # Compilation included: no constant, key or schedule value is copied implicitly either.
    for _ in range(3):
      state, metrics = train_step(state, next(batches))
    metrics = jax.device_get(metrics)   # explicit, as the loop does it on log steps
  assert np.isfinite(metrics["loss"])
  assert int(jax.device_get(state.step)) == 3


def test_prefetch_position_is_the_next_unused_batch():
  mesh = sharding.make_mesh(jax.devices()[:1])
  ds = grain.MapDataset.range(10).map(lambda i: {"x": np.full((2, 3), i, np.int32)}).to_iter_dataset()
  it = iter(ds)
  batches = steps.DevicePrefetch(it, mesh, size=2)
  seen = [int(jax.device_get(next(batches)["x"])[0, 0]) for _ in range(3)]
  assert seen == [0, 1, 2]
  fresh = iter(ds)
  fresh.set_state(json.loads(batches.get_state()))   # what grain's checkpoint handler writes and reads back
  assert int(next(fresh)["x"][0, 0]) == 3
