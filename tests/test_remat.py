"""Rematerialisation (`model.remat`) changes no number: gradients of a tiny ViT and a tiny ResNet with and without it
agree in float32 (relative 1e-6), and the backward keeps fewer residuals."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dino_jax import models
from dino_jax.models import build_backbone

TOL = 1e-6


def _grads(name, remat, x, **kw):
  model = build_backbone(name, rngs=nnx.Rngs(0), remat=remat, **kw)
  graphdef, params, stats = models.split(model)

  def loss(p):
    m = models.merge(graphdef, p, stats)
    out = m(x, rng=jax.random.key(3), train=True)
    return jnp.sum(jnp.sin(out))

  value, grads = jax.jit(jax.value_and_grad(loss))(params)
  residuals = jax.eval_shape(lambda p: jax.vjp(loss, p)[1], params)
  n_bytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(residuals))
  return value, jax.tree.leaves(grads), n_bytes


VIT = dict(patch_size=4, depth=2, embed_dim=32, num_heads=2, img_size=16, drop_path_rate=0.2)
RESNET = dict(layers=(1, 1), width=4)


CASES = {"vit_tiny": (VIT, 16), "resnet": (RESNET, 16)}


@functools.cache
def _case(name, remat):
  kw, size = CASES[name]
  x = jax.random.normal(jax.random.key(1), (2, size, size, 3), jnp.float32)
  return _grads(name, remat, x, **kw)


@pytest.mark.parametrize("name,remat", [("vit_tiny", "block"), ("vit_tiny", "dots"), ("resnet", "block")])
def test_remat_same_gradients(name, remat):
  v0, g0, b0 = _case(name, "none")
  v1, g1, b1 = _case(name, remat)
  np.testing.assert_allclose(v1, v0, rtol=TOL)
  for a, b in zip(g1, g0):
    scale = np.abs(np.asarray(b)).max()
    assert np.abs(np.asarray(a) - np.asarray(b)).max() <= TOL * scale
  assert b1 < b0, (b1, b0)


def test_remat_unknown_policy():
  with pytest.raises(ValueError, match="remat"):
    build_backbone("vit_tiny", rngs=nnx.Rngs(0), remat="everything", **VIT)
