"""ResNet-50 with torchvision's layout (v1.5: stride on the 3x3 conv), NHWC input.

Module names follow torchvision (`conv1`, `bn1`, `layer1.0.downsample.0`, ...) so torchvision,
DINO and SwAV checkpoints map 1:1. SwAV's src/resnet50.py pads by 1 and convolves with padding 2,
which is the same function as torchvision's padding 3. The classifier `fc` is absent: DINO's
MultiCropWrapper replaces it by the identity and SwAV never has one. Output: [B, 2048]
average-pooled features.
"""
import jax
import jax.numpy as jnp
from flax import nnx

from dino_jax.models.layers import BatchNorm, kaiming_normal_fan_out
from dino_jax.models.vit import remat_call


def _conv(c_in, c_out, kernel, stride, padding, dtype, rngs):
  return nnx.Conv(c_in, c_out, (kernel, kernel), strides=(stride, stride),
                  padding=((padding, padding), (padding, padding)), use_bias=False, dtype=dtype,
                  kernel_init=kaiming_normal_fan_out, rngs=rngs)


class Bottleneck(nnx.Module):
  expansion = 4

  def __init__(self, c_in, planes, stride, dtype, rngs):
    c_out = planes * self.expansion
    self.conv1 = _conv(c_in, planes, 1, 1, 0, dtype, rngs)
    self.bn1 = BatchNorm(planes, dtype=dtype)
    self.conv2 = _conv(planes, planes, 3, stride, 1, dtype, rngs)
    self.bn2 = BatchNorm(planes, dtype=dtype)
    self.conv3 = _conv(planes, c_out, 1, 1, 0, dtype, rngs)
    self.bn3 = BatchNorm(c_out, dtype=dtype)
    if stride != 1 or c_in != c_out:
      self.downsample = nnx.List([_conv(c_in, c_out, 1, stride, 0, dtype, rngs), BatchNorm(c_out, dtype=dtype)])
    else:
      self.downsample = None

  def __call__(self, x, *, train):
    out = jax.nn.relu(self.bn1(self.conv1(x), train=train))
    out = jax.nn.relu(self.bn2(self.conv2(out), train=train))
    out = self.bn3(self.conv3(out), train=train)
    if self.downsample is not None:
      conv, bn = self.downsample
      x = bn(conv(x), train=train)
    return jax.nn.relu(out + x)


class ResNet(nnx.Module):
  """Bottleneck ResNet; `__call__(x, rng=None, train=False)` -> [B, 2048] in float32.

  `train` selects batch statistics (global over the array, i.e. SyncBatchNorm under jit over a
  mesh) and updates the running ones; `rng` is unused (no stochastic depth in torchvision's ResNet).
  """

  def __init__(self, layers=(3, 4, 6, 3), *, width=64, dtype=jnp.float32, remat="none", rngs: nnx.Rngs):
    remat_call(remat)  # refuses an unknown policy now
    self.dtype, self.remat = dtype, remat
    self.num_features = self.embed_dim = width * 8 * Bottleneck.expansion
    self.conv1 = _conv(3, width, 7, 2, 3, dtype, rngs)
    self.bn1 = BatchNorm(width, dtype=dtype)
    c_in = width
    for i, n in enumerate(layers):
      planes = width * 2 ** i
      blocks = []
      for j in range(n):
        blocks.append(Bottleneck(c_in, planes, 2 if (i > 0 and j == 0) else 1, dtype, rngs))
        c_in = planes * Bottleneck.expansion
      setattr(self, f"layer{i + 1}", nnx.List(blocks))
    self.num_stages = len(layers)

  def stem(self, x, *, train):
    x = jax.nn.relu(self.bn1(self.conv1(x), train=train))
    # PyTorch's MaxPool2d pads with -inf, as nnx.max_pool does.
    return nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))

  def __call__(self, x, *, rng=None, train=False):
    del rng
    x = self.stem(x, train=train)
    # Each bottleneck block under the remat policy (`train` is static: it picks the BatchNorm path).
    call = remat_call(self.remat, train=train)
    for i in range(self.num_stages):
      for block in getattr(self, f"layer{i + 1}"):
        x = call(block, x)
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


def resnet50(**kwargs):
  """ResNet-50 (25.6M parameters with torchvision's fc; 23,508,032 without it, as here)."""
  return ResNet((3, 4, 6, 3), **kwargs)
