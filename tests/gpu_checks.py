"""GPU-only checks, outside the default test run (the file name does not start with test_); experiments/device_check.sh
runs them on the GPU machine:
cuDNN flash attention against XLA's attention in bf16 on ViT-S/16 shapes, and the bf16 training step's loss against
the float32 step's on the same weights and batch. DINO_JAX_GPU_TESTS_ON_CPU=1 runs the second on a CPU (a check of
the test itself)."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dino_jax import sharding, steps
from dino_jax import state as state_lib
from dino_jax.models.vit import padded_attention
from tests.helpers import recipe

ON_GPU = jax.default_backend() == "gpu"
FORCED = os.environ.get("DINO_JAX_GPU_TESTS_ON_CPU") == "1"


@pytest.mark.skipif(not ON_GPU, reason="cuDNN attention needs a GPU")
@pytest.mark.parametrize("tokens", [197, 37])
def test_cudnn_attention_matches_xla_bf16(tokens):
  q, k, v = (jax.random.normal(jax.random.key(i), (8, tokens, 6, 64), jnp.float32).astype(jnp.bfloat16)
             for i in range(3))
  ref = jax.nn.dot_product_attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
                                     implementation="xla")
  xla = jax.nn.dot_product_attention(q, k, v, implementation="xla")
  cudnn = padded_attention(q, k, v, implementation="cudnn")
  err = lambda a: float(jnp.max(jnp.abs(a.astype(jnp.float32) - ref)) / jnp.max(jnp.abs(ref)))  # noqa: E731
  # bf16 rounding of the output alone is 2^-8 ~ 0.4 %: cuDNN must be as close to the fp32 result as XLA's bf16 path.
  assert err(cudnn) <= max(2 * err(xla), 1e-2), (err(cudnn), err(xla))

  def grads(impl):
    f = lambda q, k, v: jnp.sum(jnp.sin((padded_attention(q, k, v, implementation="cudnn") if impl == "cudnn" else  # noqa: E731
                                         jax.nn.dot_product_attention(q, k, v, implementation="xla")
                                         ).astype(jnp.float32)))
    return jax.grad(f, argnums=(0, 1, 2))(q, k, v)

  for gc, gx in zip(grads("cudnn"), grads("xla")):
    gc, gx = gc.astype(jnp.float32), gx.astype(jnp.float32)
    assert float(jnp.max(jnp.abs(gc - gx)) / jnp.max(jnp.abs(gx))) <= 3e-2


@pytest.mark.skipif(not (ON_GPU or FORCED), reason="the bf16 step is the GPU's; DINO_JAX_GPU_TESTS_ON_CPU=1 forces it")
def test_bf16_step_loss_matches_fp32():
  losses = {}
  for dtype in ("float32", "bfloat16"):
    config = recipe("quickstart", batch_size=8, **{"model.dtype": dtype})
    mesh = sharding.make_mesh(jax.devices()[:1])
    run = state_lib.build_run(config, steps_per_epoch=4, mesh=mesh)
    step = jax.jit(steps.make_train_step(run))
    state = jax.jit(run.init)()   # the same seed: the same float32 weights for both dtypes
    rng = np.random.default_rng(0)
    c = config.crops
    batch = {"global": rng.integers(0, 256, (8, 2, c.global_size, c.global_size, 3), np.uint8),
             "local": rng.integers(0, 256, (8, c.local_number, c.local_size, c.local_size, 3), np.uint8)}
    batch = jax.device_put(batch)
    out = []
    for _ in range(2):
      state, metrics = step(state, batch)
      out.append(float(metrics["loss"]))
    losses[dtype] = np.array(out)
  np.testing.assert_allclose(losses["bfloat16"], losses["float32"], rtol=2e-2)
