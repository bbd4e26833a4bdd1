"""Vision Transformer as in DINO's `vision_transformer.py` (ViT-T/S/B, patch 16 or 8), NHWC input.

Same function as the official model: pre-norm blocks, qkv bias, exact GELU, LayerNorm eps 1e-6,
learned positional embedding with bicubic interpolation for other input sizes, per-sample
stochastic depth. Attribute names follow the official module names so that checkpoints map 1:1
(see dino_jax/interop/torch.py).

Precision: parameters are fp32, matmuls run in `dtype`. The residual stream stays fp32 (fp32
cls token and positional embedding promote it, bf16 branch outputs are added to it), which is
what PyTorch autocast does in the official fp16 training; LayerNorm statistics and the attention
softmax are fp32.

Rematerialisation: `remat` ('none', 'block', 'dots'; `REMAT_POLICIES`) puts each block under `jax.checkpoint`, so the backward
recomputes the block's forward instead of keeping its activations; the numbers are the same (tests/test_remat.py).

Attention: `attention_impl=None` (the default) picks cuDNN flash attention at trace time on a GPU
in bf16/fp16 and XLA elsewhere (`resolve_attention_impl`); 'xla' or 'cudnn' force one.
"""
import math
import warnings
from functools import lru_cache

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dino_jax.models.layers import torch_default_bias, torch_default_kernel, trunc_normal

_LN_EPS = 1e-6
_CUBIC_A = -0.75  # PyTorch's bicubic coefficient (jax.image.resize uses Keys a=-0.5 and antialiases)


def _layer_norm(dim, dtype, rngs):
  # Two-pass variance: the one-pass E[x^2]-E[x]^2 loses digits on the residual stream.
  return nnx.LayerNorm(dim, epsilon=_LN_EPS, dtype=dtype, use_fast_variance=False, rngs=rngs)


def _linear(in_features, out_features, dtype, rngs):
  # The official `_init_weights`: trunc-normal(.02) weights, zero bias.
  return nnx.Linear(in_features, out_features, dtype=dtype, kernel_init=trunc_normal(0.02),
                    bias_init=nnx.initializers.zeros_init(), rngs=rngs)


def _rows(layer, x):
  """`layer` applied to [..., D] as one 2-D [rows, D] matmul, then reshaped back. The same numbers; XLA's CPU backend
  computes the weight gradient of a 2-D matmul about twice as fast as that of a 3-D dot (measured on ViT-S/16's MLP:
  0.11 s against 0.23 s for 16 images), and the reshapes are free."""
  return layer(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], -1)


def drop_path(x, rate, key):
  """Stochastic depth per sample, as the official `drop_path`: keep-prob division, mask floor(keep + U)."""
  if key is None or rate == 0.0:
    return x
  keep = 1.0 - rate
  u = jax.random.uniform(key, (x.shape[0],) + (1,) * (x.ndim - 1), jnp.float32)
  mask = jnp.floor(keep + u)
  return (x / keep * mask).astype(x.dtype)


def padded_attention(q, k, v, *, implementation, scale=None, multiple=8):
  """`jax.nn.dot_product_attention` with the sequence zero-padded to a multiple of `multiple`.

  cuDNN flash attention wants token counts that are multiples of 8 (197 and 37 are not); the
  padded keys are masked out through `key_value_seq_lengths` and the padded queries dropped.
  """
  b, t = q.shape[:2]
  pad = -t % multiple
  widths = ((0, 0), (0, pad), (0, 0), (0, 0))
  q, k, v = (jnp.pad(a, widths) for a in (q, k, v))
  lengths = jnp.full((b,), t, jnp.int32)
  out = jax.nn.dot_product_attention(q, k, v, scale=scale, query_seq_lengths=lengths,
                                     key_value_seq_lengths=lengths, implementation=implementation)
  return out[:, :t]


_FLASH_DTYPES = (jnp.bfloat16, jnp.float16)

# What a rematerialised block keeps for its backward: 'none' no remat (everything), 'block' nothing (the whole block is
# recomputed: one more forward of the backbone), 'dots' the outputs of the matmuls without batch dimensions (the
# qkv/proj/fc1/fc2 2-D matmuls; attention scores, softmax, GELU and LayerNorm are recomputed).
REMAT_POLICIES = {"none": None, "block": None, "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


def remat_call(remat, **static):
  """f(module, *args) -> module(*args, **static), its backward recomputing the forward as the policy named by `remat`
  says (REMAT_POLICIES). `static` are Python values closed over (e.g. BatchNorm's `train`), not traced.

  Written over `jax.checkpoint` on the module split into (graph, state): BatchNorm statistics updated inside come out
  as outputs and are written back (an `nnx.remat`-wrapped BatchNorm refuses to mutate its statistics in flax 0.12).
  """
  if remat not in REMAT_POLICIES:
    raise ValueError(f"remat must be one of {sorted(REMAT_POLICIES)}, got {remat!r}")
  if remat == "none":
    return lambda module, *args: module(*args, **static)

  def call(module, *args):
    graphdef, state = nnx.split(module)

    def forward(state, *args):
      inner = nnx.merge(graphdef, state)
      return inner(*args, **static), nnx.state(inner, nnx.BatchStat)

    out, stats = jax.checkpoint(forward, policy=REMAT_POLICIES[remat])(state, *args)
    nnx.update(module, stats)
    return out

  return call


def resolve_attention_impl(impl, dtype, head_dim, backend=None):
  """The `jax.nn.dot_product_attention` implementation to use: 'cudnn' or 'xla'.

  An explicit 'xla' or 'cudnn' is kept. None picks cuDNN flash attention when it applies: on a
  GPU backend (`backend`, default `jax.default_backend()`, read at trace time), for bf16/fp16
  inputs and head dims cuDNN accepts (a multiple of 8, at most 128 on every GPU generation);
  otherwise XLA (fp32, CPU, TPU). jax's own `implementation=None` means XLA (jax 0.10), hence
  the choice made here. Should jax still refuse cuDNN when tracing (an old cuDNN), the automatic
  choice falls back to XLA with a warning. The attention maps (`Attention.weights`) need the
  weights and always use the explicit softmax.
  """
  if impl is not None:
    return impl
  backend = jax.default_backend() if backend is None else backend
  dtype_ok = any(jnp.dtype(dtype) == jnp.dtype(d) for d in _FLASH_DTYPES)
  if backend == "gpu" and dtype_ok and head_dim % 8 == 0 and head_dim <= 128:
    return "cudnn"
  return "xla"


def _warn_cudnn_fallback(error):
  # warnings (not logging): shown once per distinct message, not once per traced block.
  warnings.warn(f"cuDNN flash attention unavailable ({error}); using XLA attention", RuntimeWarning,
                stacklevel=3)


@lru_cache(maxsize=64)
def bicubic_matrix(in_size, out_size, scale_factor):
  """[out_size, in_size] matrix of `F.interpolate(mode='bicubic', align_corners=False, scale_factor=s)`.

  With an explicit scale factor PyTorch maps output pixel i to source (i + .5) / s - .5 (not
  in/out), clamps the 4 taps to the border and uses a = -0.75. Computed in float32 like its CPU
  kernel.
  """
  f32 = np.float32
  scale = f32(1.0 / scale_factor)
  a = f32(_CUBIC_A)

  def near(t):   # |t| <= 1
    return ((a + 2) * t - (a + 3)) * t * t + 1

  def far(t):    # 1 < |t| < 2
    return ((a * t - 5 * a) * t + 8 * a) * t - 4 * a

  m = np.zeros((out_size, in_size), np.float64)
  for i in range(out_size):
    src = scale * (f32(i) + f32(0.5)) - f32(0.5)
    i0 = min(int(np.floor(src)), in_size - 1)
    t = min(max(src - f32(i0), f32(0)), f32(1))
    taps = (far(t + 1), near(t), near(1 - t), far(2 - t))
    for j, w in enumerate(taps):
      m[i, min(max(i0 - 1 + j, 0), in_size - 1)] += w
  return m.astype(np.float32)


class PatchEmbed(nnx.Module):
  def __init__(self, patch_size, embed_dim, dtype, rngs):
    # Left at PyTorch's default Conv2d init: the official `_init_weights` touches only Linear/LayerNorm.
    fan_in = 3 * patch_size * patch_size
    self.proj = nnx.Conv(3, embed_dim, (patch_size, patch_size), strides=(patch_size, patch_size),
                         padding="VALID", dtype=dtype, kernel_init=torch_default_kernel,
                         bias_init=torch_default_bias(fan_in), rngs=rngs)

  def __call__(self, x):
    x = self.proj(x)                                  # [B, H/p, W/p, D]
    return x.reshape(x.shape[0], -1, x.shape[-1])     # row-major patches, as torch's flatten(2)


class Attention(nnx.Module):
  def __init__(self, dim, num_heads, qkv_bias, dtype, attention_impl, rngs):
    self.num_heads = num_heads
    self.scale = (dim // num_heads) ** -0.5
    self.attention_impl = attention_impl
    self.qkv = nnx.Linear(dim, 3 * dim, use_bias=qkv_bias, dtype=dtype, kernel_init=trunc_normal(0.02),
                          bias_init=nnx.initializers.zeros_init(), rngs=rngs)
    self.proj = _linear(dim, dim, dtype, rngs)

  def _qkv(self, x):
    b, n, d = x.shape
    qkv = _rows(self.qkv, x).reshape(b, n, 3, self.num_heads, d // self.num_heads)
    return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # each [B, N, heads, head_dim]

  def weights(self, x):
    """Softmax attention weights [B, heads, N, N] in float32."""
    q, k, _ = self._qkv(x)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    return jax.nn.softmax(logits * self.scale, axis=-1)

  def __call__(self, x):
    q, k, v = self._qkv(x)
    y = None
    if resolve_attention_impl(self.attention_impl, q.dtype, q.shape[-1]) == "cudnn":
      try:
        y = padded_attention(q, k, v, implementation="cudnn", scale=self.scale)
      except (NotImplementedError, RuntimeError) as e:
        # jax refuses cuDNN at trace time on GPUs/cuDNN versions without the kernel. An explicit request
        # fails; the automatic choice falls back to XLA.
        if self.attention_impl == "cudnn":
          raise
        _warn_cudnn_fallback(e)
    if y is None:
      y = jax.nn.dot_product_attention(q, k, v, scale=self.scale, implementation="xla")
    return _rows(self.proj, y.reshape(x.shape))


class Mlp(nnx.Module):
  def __init__(self, dim, hidden, dtype, rngs):
    self.fc1 = _linear(dim, hidden, dtype, rngs)
    self.fc2 = _linear(hidden, dim, dtype, rngs)

  def __call__(self, x):
    return _rows(self.fc2, jax.nn.gelu(_rows(self.fc1, x), approximate=False))


class Block(nnx.Module):
  def __init__(self, dim, num_heads, mlp_ratio, qkv_bias, drop_path_rate, dtype, attention_impl, rngs):
    self.drop_path_rate = drop_path_rate
    self.norm1 = _layer_norm(dim, dtype, rngs)
    self.attn = Attention(dim, num_heads, qkv_bias, dtype, attention_impl, rngs)
    self.norm2 = _layer_norm(dim, dtype, rngs)
    self.mlp = Mlp(dim, int(dim * mlp_ratio), dtype, rngs)

  def __call__(self, x, key=None):
    # Two independent per-sample masks, one per residual branch, as the official Block.
    k_attn, k_mlp = (None, None) if key is None else (jax.random.fold_in(key, 0), jax.random.fold_in(key, 1))
    x = x + drop_path(self.attn(self.norm1(x)), self.drop_path_rate, k_attn)
    return x + drop_path(self.mlp(self.norm2(x)), self.drop_path_rate, k_mlp)


class VisionTransformer(nnx.Module):
  """ViT backbone returning the normalised cls token ([B, embed_dim]) for NHWC images."""

  def __init__(self, *, patch_size=16, embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0, qkv_bias=True,
               drop_path_rate=0.0, img_size=224, dtype=jnp.float32, attention_impl=None, remat="none",
               rngs: nnx.Rngs):
    if embed_dim % num_heads:
      raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
    if attention_impl not in (None, "xla", "cudnn"):
      raise ValueError(f"attention_impl must be None, 'xla' or 'cudnn', got {attention_impl!r}")
    remat_call(remat)  # refuses an unknown policy now rather than at trace time
    self.patch_size, self.dtype, self.remat = patch_size, dtype, remat
    self.embed_dim = self.num_features = embed_dim
    self.grid = img_size // patch_size
    self.patch_embed = PatchEmbed(patch_size, embed_dim, dtype, rngs)
    # 3-D on purpose (as the official nn.Parameter shapes): they are weight-decayed.
    self.cls_token = nnx.Param(trunc_normal(0.02)(rngs.params(), (1, 1, embed_dim)))
    self.pos_embed = nnx.Param(trunc_normal(0.02)(rngs.params(), (1, self.grid ** 2 + 1, embed_dim)))
    # Linear decay rule; float32 values as torch.linspace(0, rate, depth) gives.
    rates = np.linspace(0.0, drop_path_rate, depth, dtype=np.float32)
    self.blocks = nnx.List([
        Block(embed_dim, num_heads, mlp_ratio, qkv_bias, float(r), dtype, attention_impl, rngs)
        for r in rates])
    self.norm = _layer_norm(embed_dim, dtype, rngs)

  def interpolate_pos_encoding(self, h, w):
    """Positional embedding for an h x w patch grid: the official bicubic resize with its +0.1 offset."""
    pos = self.pos_embed[...]
    n = pos.shape[1] - 1
    if h * w == n and h == w:
      return pos
    g = int(math.sqrt(n))
    # The +0.1 (official, see dino issue #8) keeps floor(g * s) == h despite float error; torch
    # then uses 1/s, not g/h, for the source coordinates, so the result depends on it.
    s_h, s_w = (h + 0.1) / g, (w + 0.1) / g
    if int(math.floor(g * s_h)) != h or int(math.floor(g * s_w)) != w:
      raise ValueError(f"cannot interpolate a {g}x{g} positional grid to {h}x{w}")
    m_h = jnp.asarray(bicubic_matrix(g, h, s_h))
    m_w = jnp.asarray(bicubic_matrix(g, w, s_w))
    grid = pos[0, 1:].reshape(g, g, -1)
    patch = jnp.einsum("ih,jw,hwd->ijd", m_h, m_w, grid, precision=jax.lax.Precision.HIGHEST)
    return jnp.concatenate([pos[:, :1], patch.reshape(1, h * w, -1)], axis=1)

  def prepare_tokens(self, x):
    b, h, w, _ = x.shape
    p = self.patch_size
    if h % p or w % p:
      # The official conv silently drops the remainder; a mismatched crop size is almost
      # always a configuration mistake, so we say so.
      raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {p}")
    tokens = self.patch_embed(x)
    cls = jnp.broadcast_to(self.cls_token[...], (b, 1, self.embed_dim))
    tokens = jnp.concatenate([cls, tokens.astype(jnp.float32)], axis=1)
    return tokens + self.interpolate_pos_encoding(h // p, w // p)

  def __call__(self, x, *, rng=None, train=False):
    """x: [B, H, W, 3] normalised images. rng: key for stochastic depth (None: no drop-path)."""
    del train  # no train-mode-only layers in a ViT; accepted so all backbones share a signature
    x = self.prepare_tokens(x)
    call = remat_call(self.remat)
    for i, blk in enumerate(self.blocks):
      x = call(blk, x, None if rng is None else jax.random.fold_in(rng, i))
    return self.norm(x)[:, 0]

  def get_intermediate_layers(self, x, n=1):
    """Tokens [B, 1+N, D] after each of the last `n` blocks, each passed through the final norm."""
    x = self.prepare_tokens(x)
    out = []
    for i, blk in enumerate(self.blocks):
      x = blk(x)
      if len(self.blocks) - i <= n:
        out.append(self.norm(x))
    return out

  def get_last_selfattention(self, x):
    """Softmax attention weights of the last block, [B, heads, 1+N, 1+N], float32."""
    x = self.prepare_tokens(x)
    depth = len(self.blocks)
    for i, blk in enumerate(self.blocks):
      if i == depth - 1:
        return blk.attn.weights(blk.norm1(x))
      x = blk(x)


_VARIANTS = {"vit_tiny": (192, 3), "vit_small": (384, 6), "vit_base": (768, 12)}


def _vit(name, patch_size, kwargs):
  embed_dim, num_heads = _VARIANTS[name]
  args = dict(patch_size=patch_size, embed_dim=embed_dim, depth=12, num_heads=num_heads, mlp_ratio=4.0,
              qkv_bias=True)
  args.update(kwargs)
  if "rngs" not in args:
    raise TypeError(f"{name}() needs rngs=nnx.Rngs(...)")
  return VisionTransformer(**args)


def vit_tiny(patch_size=16, **kwargs):
  return _vit("vit_tiny", patch_size, kwargs)


def vit_small(patch_size=16, **kwargs):
  return _vit("vit_small", patch_size, kwargs)


def vit_base(patch_size=16, **kwargs):
  return _vit("vit_base", patch_size, kwargs)
