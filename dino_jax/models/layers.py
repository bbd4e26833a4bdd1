"""Pieces shared by the backbones and heads: PyTorch-equivalent initialisers and BatchNorm.

Our modules use Flax layouts (Linear kernel (in, out), Conv kernel (kh, kw, in, out)); the
initialisers below draw from the same distributions as the PyTorch code we mirror.
"""
import math

import jax
import jax.numpy as jnp
from flax import nnx


def trunc_normal(std=0.02, bound=2.0):
  """N(0, std) truncated at +-`bound` in absolute value (timm/DINO `trunc_normal_`).

  The official call is `trunc_normal_(w, std=.02)` with the default a=-2, b=2: the cut is at
  +-2 absolute, i.e. +-100 sigma, so in practice an untruncated normal of std .02.
  `jax.nn.initializers.truncated_normal` instead cuts at +-2 sigma and rescales: not the same.
  """
  def init(key, shape, dtype=jnp.float32):
    return std * jax.random.truncated_normal(key, -bound / std, bound / std, shape, dtype)
  return init


# PyTorch's default Linear/Conv weight init, kaiming_uniform(a=sqrt(5)), is U(-1/sqrt(fan_in), ..):
# a variance-scaling uniform with scale 1/3. Flax kernels put fan-in on axis -2 with the receptive
# field in front, exactly PyTorch's fan_in.
torch_default_kernel = jax.nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")

# torchvision / SwAV convs: kaiming_normal_(mode="fan_out", nonlinearity="relu"), not truncated.
kaiming_normal_fan_out = jax.nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def torch_default_bias(fan_in):
  """PyTorch's default bias init for Linear/Conv: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def torch_linear(in_features, out_features, *, use_bias=True, dtype=jnp.float32, rngs):
  """nnx.Linear initialised like a fresh `torch.nn.Linear`."""
  return nnx.Linear(in_features, out_features, use_bias=use_bias, dtype=dtype,
                    kernel_init=torch_default_kernel, bias_init=torch_default_bias(in_features),
                    rngs=rngs)


def l2_normalize(x, axis=-1, eps=1e-12):
  """`torch.nn.functional.normalize(x, p=2)` in float32: x / max(||x||, eps)."""
  x = x.astype(jnp.float32)
  norm = jnp.sqrt(jnp.sum(x * x, axis=axis, keepdims=True))
  return x / jnp.maximum(norm, eps)


class BatchNorm(nnx.Module):
  """BatchNorm with PyTorch's semantics (BatchNorm1d/2d over the last, channel, axis).

  Train mode normalises with the biased statistics of the whole array; under `jax.jit` over a
  mesh that mean is global, i.e. SyncBatchNorm. The running variance is updated with the
  *unbiased* batch variance and momentum 0.1 (new = 0.9 old + 0.1 batch), as torch does;
  flax's nnx.BatchNorm uses the biased one. `num_batches_tracked` is kept so that official
  checkpoints round-trip exactly; it has no effect on the computation (momentum is fixed).
  Statistics and the normalisation are computed in float32; the output is cast to `dtype`.
  """

  def __init__(self, num_features, *, momentum=0.1, eps=1e-5, dtype=jnp.float32, rngs=None):
    del rngs  # deterministic init (weight 1, bias 0); accepted for a uniform constructor
    self.momentum, self.eps, self.dtype = momentum, eps, dtype
    self.scale = nnx.Param(jnp.ones((num_features,), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((num_features,), jnp.float32))
    self.mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32))
    self.var = nnx.BatchStat(jnp.ones((num_features,), jnp.float32))
    self.num_batches_tracked = nnx.BatchStat(jnp.zeros((), jnp.int32))

  def __call__(self, x, *, train):
    x = x.astype(jnp.float32)
    axes = tuple(range(x.ndim - 1))
    if train:
      n = math.prod(x.shape[:-1])
      if n < 2:
        raise ValueError(f"BatchNorm in train mode needs more than 1 value per channel, "
                         f"got input shape {x.shape}")
      mean = jnp.mean(x, axes)
      var = jnp.mean(jnp.square(x - mean), axes)  # two-pass, biased: used to normalise
      m = self.momentum
      self.mean[...] = (1 - m) * self.mean[...] + m * jax.lax.stop_gradient(mean)
      self.var[...] = (1 - m) * self.var[...] + m * jax.lax.stop_gradient(var) * (n / (n - 1))
      self.num_batches_tracked[...] = self.num_batches_tracked[...] + 1
    else:
      mean, var = self.mean[...], self.var[...]
    y = (x - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...] + self.bias[...]
    return y.astype(self.dtype)
