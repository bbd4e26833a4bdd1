"""DINO head, SwAV head and MultiCropWrapper parity with our PyTorch references (fp32, CPU).

Relative error: max|ours - ref| / max|ref| (must be <= 1e-5). BatchNorm is checked in train mode
(batch statistics, and the running statistics it leaves behind) and in eval mode.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from dino_jax.interop.torch import load_state_dict, state_dict
from dino_jax.models import DINOHead, MultiCropWrapper, SwAVHead, build_backbone
from tests.torch_ref import heads as ref_heads
from tests.torch_ref.vit import vit as torch_vit

TOL = 1e-5


def rel_err(ours, ref):
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  return np.abs(ours - ref).max() / np.abs(ref).max()


def load_from(ref, ours):
  load_state_dict(ours, {k: v.numpy() for k, v in ref.state_dict().items()})
  return ours


def assert_same_state(ours, ref):
  """Every parameter and buffer (running stats, num_batches_tracked) equal to the reference's."""
  mine, theirs = state_dict(ours), ref.state_dict()
  assert set(mine) == set(theirs)
  for k, v in theirs.items():
    v = v.numpy()
    assert mine[k].dtype == v.dtype and mine[k].shape == v.shape, k
    assert np.abs(mine[k] - v).max() <= TOL * np.abs(v).max(), k  # exact where the reference is 0


def run_both(ref, ours, x, train):
  """Forward both in train or eval mode; our module's BatchStat updates are kept."""
  ref.train(train)
  with torch.no_grad():
    want = ref(x)
  got = nnx.jit(lambda m, x: m(x, train=train))(ours, jnp.asarray(x.numpy()))
  return got, want


@pytest.mark.parametrize("use_bn,norm_last_layer,nlayers", [
    (False, True, 3), (True, False, 3), (False, False, 1), (True, True, 2)])
def test_dino_head_parity(use_bn, norm_last_layer, nlayers):
  torch.manual_seed(0)
  ref = ref_heads.DINOHead(384, 4096, use_bn=use_bn, norm_last_layer=norm_last_layer, nlayers=nlayers)
  if not norm_last_layer:
    ref.last_layer.weight_g.data.uniform_(0.5, 2.0)  # a trained gain must be applied per output unit
  ours = load_from(ref, nnx.eval_shape(lambda: DINOHead(384, 4096, use_bn=use_bn, norm_last_layer=norm_last_layer,
                                                        nlayers=nlayers, rngs=nnx.Rngs(0))))
  x = torch.randn(16, 384) * 3
  for train in (True, False):
    got, want = run_both(ref, ours, x, train)
    assert got.dtype == jnp.float32 and got.shape == (16, 4096)
    assert rel_err(got, want) <= TOL
  assert_same_state(ours, ref)  # includes the running stats updated by the train-mode pass


def test_dino_head_last_layer_layout_and_init():
  def init(**kw):  # one compiled init returning only what is checked (XLA drops the rest: faster to compile)
    head = DINOHead(384, 1000, rngs=nnx.Rngs(0), **kw)
    return head.last_layer.v[...], head.mlp[0].kernel[...], head.mlp[0].bias[...]
  v, w, b = map(np.asarray, jax.jit(init)())
  assert v.shape == (256, 1000) and nnx.eval_shape(lambda: DINOHead(384, 1000, rngs=nnx.Rngs(0))).last_layer.g is None
  bound = 1 / np.sqrt(256)  # PyTorch's default Linear init (created after _init_weights)
  assert np.abs(v).max() <= bound and abs(v.std() - bound / np.sqrt(3)) < 0.02 * bound
  assert abs(w.std() - 0.02) < 1e-3 and not b.any()
  # norm_last_layer=False: g is a parameter, initialised to 1, with the same v.
  free = nnx.eval_shape(lambda: DINOHead(384, 1000, norm_last_layer=False, rngs=nnx.Rngs(0)))
  assert free.last_layer.g.shape == (1, 1000)
  g = jax.jit(lambda: DINOHead(384, 1000, norm_last_layer=False, rngs=nnx.Rngs(0)).last_layer.g[...])()
  assert (np.asarray(g) == 1).all()
  paths = ["/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(free, nnx.Param))]
  assert "last_layer/g" in paths and "last_layer/v" in paths


def count(module):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


def test_dino_head_parameter_count():
  """ViT-S DINO head, out_dim 65,536: 22,352,128 parameters in PyTorch, which counts the frozen
  weight_g (65,536); with norm_last_layer our g is a constant, not a parameter."""
  official = sum(p.numel() for p in ref_heads.DINOHead(384, 65536).parameters())  # CPU: faster than a first meta
  assert official == 22_352_128
  assert count(nnx.eval_shape(lambda: DINOHead(384, 65536, rngs=nnx.Rngs(0)))) == 22_352_128 - 65_536
  assert count(nnx.eval_shape(lambda: DINOHead(384, 65536, norm_last_layer=False, rngs=nnx.Rngs(0)))) == official


@pytest.mark.parametrize("hidden_mlp,output_dim", [(2048, 128), (0, 128), (0, 0)])
def test_swav_head_parity(hidden_mlp, output_dim):
  torch.manual_seed(1)
  ref = ref_heads.SwAVHead(2048, hidden_mlp=hidden_mlp, output_dim=output_dim, nmb_prototypes=3000)
  ours = load_from(ref, nnx.eval_shape(lambda: SwAVHead(2048, hidden_mlp=hidden_mlp, output_dim=output_dim,
                                                        nmb_prototypes=3000, rngs=nnx.Rngs(0))))
  x = torch.relu(torch.randn(8, 2048))
  for train in (True, False):
    (z, s), (z_ref, s_ref) = run_both(ref, ours, x, train)
    assert z.shape == (8, output_dim or 2048) and s.shape == (8, 3000)
    assert rel_err(z, z_ref) <= TOL and rel_err(s, s_ref) <= TOL
    assert np.allclose(np.linalg.norm(np.asarray(z), axis=1), 1.0, atol=1e-6)
  assert_same_state(ours, ref)


def test_swav_head_init_and_count():
  head = nnx.jit(lambda: SwAVHead(rngs=nnx.Rngs(0)))()
  official = sum(p.numel() for p in ref_heads.SwAVHead().parameters())
  assert count(head) == official == 4_846_720
  # PyTorch's default Linear init for every layer (SwAV initialises only convs and BatchNorm2d).
  for layer, fan_in in ((head.projection_head[0], 2048), (head.projection_head[2], 2048), (head.prototypes, 128)):
    w, bound = np.asarray(layer.kernel[...]), 1 / np.sqrt(fan_in)
    assert np.abs(w).max() <= bound and abs(w.std() - bound / np.sqrt(3)) < 0.02 * bound
  assert head.prototypes.kernel.shape == (128, 3000) and head.prototypes.bias is None


@torch.no_grad()
def test_multicrop_wrapper_parity():
  """Two resolution groups, crop-major, head run once on the concatenated features."""
  torch.manual_seed(2)
  ref = ref_heads.MultiCropWrapper(torch_vit("vit_tiny", 16, depth=2, img_size=32),
                                   ref_heads.DINOHead(192, 512, use_bn=True)).train()
  ours = nnx.eval_shape(lambda: MultiCropWrapper(
      build_backbone("vit_tiny", depth=2, img_size=32, drop_path_rate=0.1, rngs=nnx.Rngs(0)),
      DINOHead(192, 512, use_bn=True, rngs=nnx.Rngs(0))))
  load_from(ref, ours)
  crops = [torch.randn(4, 3, 32, 32), torch.randn(6, 3, 16, 16)]
  crops_j = [jnp.asarray(c.permute(0, 2, 3, 1).numpy()) for c in crops]
  rng = jax.random.key(3)

  def outputs(m, c, r):
    train_out = m(c, train=True)  # BatchNorm on batch statistics, running stats updated
    # With an rng, group i's backbone gets fold_in(rng, i); the head sees the concatenation.
    feats = [m.backbone(x, rng=jax.random.fold_in(r, i)) for i, x in enumerate(c)]
    return (train_out, m(c, rng=r, train=False), m.head(jnp.concatenate(feats), train=False),
            m(c, train=False))

  got, dropped, by_hand, no_drop = nnx.jit(outputs)(ours, crops_j, rng)
  assert got.shape == (10, 512) and rel_err(got, ref(crops)) <= TOL
  assert_same_state(ours, ref)
  assert rel_err(dropped, by_hand) <= TOL and rel_err(dropped, no_drop) > 1e-3
