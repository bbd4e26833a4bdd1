"""Sinkhorn-Knopp: parity with the official `distributed_sinkhorn`, its normalisation properties, the
sharded (4 fake CPU devices) run, and numerical safety for bf16 / large logits."""
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from dino_jax.losses.sinkhorn import sinkhorn_knopp
from tests.torch_ref.swav import distributed_sinkhorn


def max_rel_err(actual, expected):
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  return float(np.max(np.abs(actual - expected) / np.abs(expected)))


def cosine_scores(rng, batch, k, dim=16):
  """Scores as SwAV makes them: L2-normalised embeddings times L2-normalised prototypes, in [-1, 1]."""
  z = rng.standard_normal((batch, dim))
  c = rng.standard_normal((dim, k))
  z /= np.linalg.norm(z, axis=1, keepdims=True)
  c /= np.linalg.norm(c, axis=0, keepdims=True)
  return (z @ c).astype(np.float32)


@pytest.mark.parametrize("batch,k,epsilon,iters", [(32, 10, 0.05, 3), (24, 50, 0.05, 3), (64, 16, 0.04, 3),
                                                   (16, 8, 0.1, 1), (40, 12, 0.05, 10)])
def test_matches_official_single_device(batch, k, epsilon, iters):
  scores = cosine_scores(np.random.default_rng(batch + k), batch, k)
  expected = distributed_sinkhorn([torch.from_numpy(scores)], epsilon, iters)[0].numpy()
  actual = sinkhorn_knopp(jnp.asarray(scores), epsilon=epsilon, num_iters=iters)
  assert actual.dtype == jnp.float32 and actual.shape == (batch, k)
  assert max_rel_err(actual, expected) <= 1e-5


@pytest.mark.parametrize("world_size", [2, 4])
def test_global_batch_equals_simulated_world(world_size):
  """Without a queue, the official all-reduced version on `world_size` GPUs is the global-batch kernel."""
  scores = cosine_scores(np.random.default_rng(world_size), 48, 20)
  expected = np.concatenate([q.numpy() for q in distributed_sinkhorn(
      list(torch.from_numpy(scores).chunk(world_size)))])
  assert max_rel_err(sinkhorn_knopp(jnp.asarray(scores)), expected) <= 1e-5


def test_per_shard_layout_is_one_batch_over_all_leading_axes():
  """[n_shards, N, K] (the queue layout: each shard's queue before its batch) = the flattened batch,
  and equals the official run with one rank per shard."""
  scores = cosine_scores(np.random.default_rng(1), 3 * 12, 9).reshape(3, 12, 9)
  expected = np.stack([q.numpy() for q in distributed_sinkhorn([torch.from_numpy(s) for s in scores])])
  actual = sinkhorn_knopp(jnp.asarray(scores))
  assert actual.shape == (3, 12, 9)
  assert max_rel_err(actual, expected) <= 1e-5
  np.testing.assert_array_equal(actual.reshape(36, 9), sinkhorn_knopp(jnp.asarray(scores.reshape(36, 9))))


def test_traced_epsilon_as_dino_teacher_temperature():
  """DINO's `centering='sinkhorn'` passes the scheduled teacher temperature (a traced scalar) as epsilon,
  on raw logits of both global crops stacked."""
  logits = np.random.default_rng(2).uniform(-1, 1, (2 * 16, 32)).astype(np.float32)
  temp = 0.04
  fn = jax.jit(lambda x, t: sinkhorn_knopp(x, epsilon=t))
  actual = fn(jnp.asarray(logits), jnp.float32(temp))
  expected = distributed_sinkhorn([torch.from_numpy(logits)], temp)[0].numpy()
  assert max_rel_err(actual, expected) <= 1e-5


def test_normalisation_columns_every_run_rows_at_convergence():
  """Before the final x B: every sample's mass is 1/B after each run; every prototype's mass is 1/K once
  the iterations have converged (with the official 3 iterations the last step is the column step, so
  rows are only approximately 1/K: the test checks they are much closer after more iterations)."""
  batch, k = 64, 16
  scores = jnp.asarray(np.random.default_rng(3).uniform(-1, 1, (batch, k)).astype(np.float32))
  for iters in (1, 3):
    plan = np.asarray(sinkhorn_knopp(scores, num_iters=iters), np.float64) / batch
    np.testing.assert_allclose(plan.sum(axis=1), 1 / batch, rtol=0, atol=1e-6)
  plan3 = np.asarray(sinkhorn_knopp(scores, num_iters=3), np.float64) / batch
  converged = np.asarray(sinkhorn_knopp(scores, num_iters=300), np.float64) / batch
  np.testing.assert_allclose(converged.sum(axis=1), 1 / batch, rtol=0, atol=1e-6)
  np.testing.assert_allclose(converged.sum(axis=0), 1 / k, rtol=0, atol=1e-6)
  assert np.max(np.abs(plan3.sum(axis=0) - 1 / k)) > 10 * np.max(np.abs(converged.sum(axis=0) - 1 / k))


def test_bf16_unit_logits_are_finite_and_computed_in_fp32():
  logits = jnp.asarray(np.random.default_rng(4).uniform(-1, 1, (64, 30)), jnp.bfloat16)
  q = sinkhorn_knopp(logits, epsilon=0.05)
  assert q.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(q)))
  expected = distributed_sinkhorn([torch.from_numpy(np.array(logits.astype(jnp.float32)))])[0].numpy()
  assert max_rel_err(q, expected) <= 1e-5


def test_large_logits_overflow_without_max_subtraction_but_not_here():
  """Logits of 20 +- 1 (e.g. an unnormalised head): exp(20 / 0.05) overflows fp32 in the official code.
  The max subtraction keeps the result finite and, since a constant offset cancels exactly in the
  math, equal to the result for the centred logits (float64 reference)."""
  centred = np.random.default_rng(5).uniform(-1, 1, (32, 12)).astype(np.float32)
  logits = jnp.asarray(centred + 20.0, jnp.bfloat16)
  official = distributed_sinkhorn([torch.from_numpy(np.array(logits.astype(jnp.float32)))])[0]
  assert not torch.all(torch.isfinite(official))  # the case is real: the official code breaks here
  q = sinkhorn_knopp(logits, epsilon=0.05)
  assert bool(jnp.all(jnp.isfinite(q)))
  shifted = np.asarray(logits.astype(jnp.float32), np.float64) - 20.0  # exact in float64
  expected = distributed_sinkhorn([torch.from_numpy(shifted)])[0].numpy()
  # 1e-4, not 1e-5: fp32 x / 0.05 near 400 carries ~3e-5 absolute rounding, which exp turns into relative.
  assert max_rel_err(q, expected) <= 1e-4


def test_no_gradient_flows():
  scores = jnp.asarray(cosine_scores(np.random.default_rng(6), 8, 4))
  grad = jax.grad(lambda s: jnp.sum(sinkhorn_knopp(s) * s))(scores)
  np.testing.assert_allclose(grad, sinkhorn_knopp(scores), rtol=1e-6)  # only the explicit `* s` factor


_SHARDED_SCRIPT = textwrap.dedent("""
  import jax, jax.numpy as jnp, numpy as np
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  from dino_jax.losses.sinkhorn import sinkhorn_knopp
  from dino_jax.losses.swav import swav_loss
  jax.config.update("jax_default_matmul_precision", "highest")
  assert jax.device_count() == 4, jax.devices()
  one = lambda x: jax.device_put(x, jax.devices()[0])
  mesh = Mesh(np.array(jax.devices()), ("data",))
  rng = np.random.default_rng(0)
  scores = rng.uniform(-1, 1, (64, 24)).astype(np.float32)
  single = np.asarray(sinkhorn_knopp(one(scores)).block_until_ready())
  batch = NamedSharding(mesh, P("data"))
  sharded_in = jax.device_put(scores, batch)
  out = jax.jit(sinkhorn_knopp, out_shardings=batch)(sharded_in).block_until_ready()
  assert len(out.sharding.device_set) == 4, out.sharding
  err = np.max(np.abs(np.asarray(out) - single) / single)
  assert err <= 1e-6, err
  # The loss with a per-shard queue, sharded over the 4 devices, equals the same call on one device.
  n_crops, b, d, k = 3, 16, 8, 10
  z = rng.standard_normal((n_crops * b, d)).astype(np.float32)
  z /= np.linalg.norm(z, axis=1, keepdims=True)
  c = rng.standard_normal((d, k)).astype(np.float32)
  c /= np.linalg.norm(c, axis=0, keepdims=True)
  queue = rng.standard_normal((2, 4, 8, d)).astype(np.float32)
  fn = lambda z, s, c, q: swav_loss(z, s, c, q, batch_size=b)
  ref = jax.jit(fn)(one(z), one(z @ c), one(c), one(queue))
  jax.block_until_ready(ref)
  shard = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))
  got = jax.jit(fn)(shard(z, P("data")), shard(z @ c, P("data")), shard(c, P()), shard(queue, P(None, "data")))
  jax.block_until_ready(got)
  assert float(got[2]["queue_used"]) == 1.0
  assert abs(float(got[0]) - float(ref[0])) <= 1e-6 * abs(float(ref[0])), (got[0], ref[0])
  np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(ref[1]))
  print("OK", err)
""")


def test_sharded_over_four_devices_equals_single_device():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  result = subprocess.run([sys.executable, "-c", _SHARDED_SCRIPT], env=env, cwd=root, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0 and "OK" in result.stdout, result.stdout + result.stderr
