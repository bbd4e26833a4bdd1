"""Mesh, shardings and multi-host set-up.

One `data` axis over every device of every process: the batch is split along it and the train state is replicated
(room for an `fsdp` axis later), except what a method shards (dino_jax.state.state_shardings). Cross-device reductions (the DINO centre, Sinkhorn-Knopp, SyncBatchNorm) are plain
global-view `jnp.sum`/`jnp.mean` inside `jax.jit`; the compiler inserts the all-reduces.
"""
from __future__ import annotations

import inspect
import os

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

DATA = "data"


def maybe_initialize_distributed(**timeouts):
  """`jax.distributed.initialize()` when launched as one of several processes.

  Triggered by JAX_COORDINATOR_ADDRESS (with JAX_NUM_PROCESSES and JAX_PROCESS_ID) or by a cluster environment JAX
  detects itself (SLURM, Open MPI, TPU pods) when DINO_JAX_DISTRIBUTED=1. A single process needs nothing.
  `timeouts` (e.g. heartbeat_timeout_seconds, initialization_timeout) go to `jax.distributed.initialize`, those
  this JAX version accepts.
  """
  accepted = inspect.signature(jax.distributed.initialize).parameters
  timeouts = {k: v for k, v in timeouts.items() if k in accepted}
  if os.environ.get("JAX_COORDINATOR_ADDRESS"):
    jax.distributed.initialize(
        coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
        num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
        process_id=int(os.environ["JAX_PROCESS_ID"]), **timeouts)
  elif os.environ.get("DINO_JAX_DISTRIBUTED") == "1":
    jax.distributed.initialize(**timeouts)


def make_mesh(devices=None):
  """1-D mesh over all devices, grouped by process.

  Process-major order makes process p's rows of a global batch the contiguous block [p*b, (p+1)*b), which is what
  the input pipeline hands it: the global batch, and the per-sample augmentation drawn over it, are then the same
  for any number of processes.
  """
  devices = jax.devices() if devices is None else devices
  order = [d.process_index for d in devices]
  if order != sorted(order):
    raise ValueError(f"mesh devices must be grouped by process (process indices {order})")
  return jax.sharding.Mesh(np.asarray(devices), (DATA,))


def replicated(mesh):
  return NamedSharding(mesh, P())


def batch_sharding(mesh):
  return NamedSharding(mesh, P(DATA))


def global_batch(local_batch, mesh):
  """Process-local numpy batch -> global jax.Arrays sharded along the batch axis."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)
