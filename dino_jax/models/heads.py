"""Projection heads: DINO's (vision_transformer.py `DINOHead`) and SwAV's (src/resnet50.py)."""
import jax
import jax.numpy as jnp
from flax import nnx

from dino_jax.models.layers import BatchNorm, l2_normalize, torch_default_kernel, torch_linear, trunc_normal


class WeightNormLinear(nnx.Module):
  """Bias-free linear layer w = g * v / ||v||, PyTorch `weight_norm(dim=0)` (Salimans & Kingma 2016).

  `v` has the Flax layout (in, out), so each output unit is normalised over axis 0 (its inputs).
  With `fixed_gain` g is the constant 1 and not a parameter (DINO's `norm_last_layer`); otherwise
  `g` is a Param of shape (1, out), 2-D like the official [out, 1] `weight_g` (so it is
  weight-decayed, as the official parameter groups do). The normalisation is float32; the matmul runs in `dtype`
  with float32 accumulation and a float32 result (the [crops * B, 65536] logits feed the float32 loss).
  """

  def __init__(self, in_features, out_features, *, fixed_gain, dtype=jnp.float32, rngs):
    self.dtype = dtype
    # Created after the official `_init_weights` ran: PyTorch's default Linear init.
    self.v = nnx.Param(torch_default_kernel(rngs.params(), (in_features, out_features), jnp.float32))
    self.g = None if fixed_gain else nnx.Param(jnp.ones((1, out_features), jnp.float32))

  def __call__(self, x):
    v = self.v[...]
    w = v / jnp.sqrt(jnp.sum(v * v, axis=0, keepdims=True))
    if self.g is not None:
      w = w * self.g[...]
    return jnp.dot(x.astype(self.dtype), w.astype(self.dtype), preferred_element_type=jnp.float32)


class DINOHead(nnx.Module):
  """MLP (nlayers Linear, GELU between, optional BN) -> L2-normalise -> weight-normalised Linear.

  `mlp` holds the Linear (and BatchNorm) layers in order; the activations are applied in between.
  """

  def __init__(self, in_dim, out_dim, *, use_bn=False, norm_last_layer=True, nlayers=3, hidden_dim=2048,
               bottleneck_dim=256, dtype=jnp.float32, rngs: nnx.Rngs):
    nlayers = max(nlayers, 1)
    self.use_bn, self.nlayers = use_bn, nlayers
    dims = [in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim]
    layers = []
    for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
      layers.append(nnx.Linear(d_in, d_out, dtype=dtype, kernel_init=trunc_normal(0.02),
                               bias_init=nnx.initializers.zeros_init(), rngs=rngs))
      if use_bn and i < nlayers - 1:
        layers.append(BatchNorm(d_out, dtype=dtype))
    self.mlp = nnx.List(layers)
    self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, fixed_gain=norm_last_layer, dtype=dtype, rngs=rngs)

  def __call__(self, x, *, train=False):
    """x: [B, in_dim] -> logits [B, out_dim] in float32. `train` drives the BatchNorms."""
    last = len(self.mlp) - 1
    for i, layer in enumerate(self.mlp):
      x = layer(x, train=train) if isinstance(layer, BatchNorm) else layer(x)
      # GELU after each hidden Linear (after its BN when there is one), none after the bottleneck.
      if i < last and not isinstance(self.mlp[i + 1], BatchNorm):
        x = jax.nn.gelu(x, approximate=False)
    return self.last_layer(l2_normalize(x))


class SwAVHead(nnx.Module):
  """SwAV projection (Linear-BN-ReLU-Linear), L2-normalised embedding, bias-free prototypes.

  hidden_mlp=0: the projection is a single Linear; output_dim=0: no projection at all (the
  prototypes then act on the L2-normalised backbone features). Layers keep PyTorch's default
  Linear init, as src/resnet50.py initialises only convs and BatchNorm2d.
  """

  def __init__(self, in_dim=2048, *, hidden_mlp=2048, output_dim=128, nmb_prototypes=3000,
               dtype=jnp.float32, rngs: nnx.Rngs):
    if nmb_prototypes <= 0:
      raise ValueError(f"SwAVHead needs nmb_prototypes > 0, got {nmb_prototypes}")
    if output_dim == 0:
      self.projection_head = None
      feat_dim = in_dim
    elif hidden_mlp == 0:
      self.projection_head = torch_linear(in_dim, output_dim, dtype=dtype, rngs=rngs)
      feat_dim = output_dim
    else:
      self.projection_head = nnx.List([
          torch_linear(in_dim, hidden_mlp, dtype=dtype, rngs=rngs),
          BatchNorm(hidden_mlp, dtype=dtype),
          torch_linear(hidden_mlp, output_dim, dtype=dtype, rngs=rngs),
      ])
      feat_dim = output_dim
    # Scores feed Sinkhorn-Knopp (exp(score / 0.05)): float32.
    self.prototypes = torch_linear(feat_dim, nmb_prototypes, use_bias=False, dtype=jnp.float32, rngs=rngs)

  def __call__(self, x, *, train=False):
    """x: [B, in_dim] -> (embedding [B, output_dim] L2-normalised, scores [B, nmb_prototypes]), float32."""
    proj = self.projection_head
    if isinstance(proj, nnx.List):
      lin1, bn, lin2 = proj
      x = lin2(jax.nn.relu(bn(lin1(x), train=train)))
    elif proj is not None:
      x = proj(x)
    z = l2_normalize(x)
    return z, self.prototypes(z)
