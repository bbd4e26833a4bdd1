"""The DINO loss with its hand-written backward (losses/dino.py `_pair_cross_entropy`) against plain autodiff of
log_softmax + the pair contraction: loss and gradients equal within 1e-5 relative (float32), and the backward keeps
one float32 copy of the [crops * B, K] logits (the whole step's count is in experiments/bench_memory.py)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dino_jax import losses

TOL = 1e-5
N_CROPS, B, K = 6, 4, 1024


def plain_loss(student_logits, teacher_probs, *, student_temp, num_global):
  """The loss as autodiff sees it without the custom VJP: log_softmax, one einsum, the same-view mask."""
  n_crops = student_logits.shape[0] // B
  logp = jax.nn.log_softmax(student_logits / student_temp, axis=-1).reshape(n_crops, B, -1)
  q = teacher_probs.reshape(num_global, B, -1)
  ce = -jnp.einsum("tbk,sbk->ts", q, logp) / B
  same = np.arange(num_global)[:, None] == np.arange(n_crops)[None, :]
  return jnp.sum(jnp.where(same, 0.0, ce)) / (num_global * n_crops - num_global)


def _inputs(num_global=2, seed=0):
  rng = np.random.default_rng(seed)
  s = jnp.asarray(rng.normal(size=(N_CROPS * B, K)), jnp.float32)
  t = jnp.asarray(rng.normal(size=(num_global * B, K)) * 3, jnp.float32)
  return s, losses.teacher_targets(t, jnp.asarray(rng.normal(size=K), jnp.float32), 0.04)


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.abs(a - b).max() / np.abs(b).max()


@pytest.mark.parametrize("num_global,temp", [(2, 0.1), (3, 0.2)])
def test_fused_loss_and_grads_match_autodiff(num_global, temp):
  s, q = _inputs(num_global)
  fused = lambda x: losses.dino_loss(x, q, None, student_temp=temp, num_global=num_global, teacher_probs=q)  # noqa: E731
  plain = lambda x: plain_loss(x, q, student_temp=temp, num_global=num_global)  # noqa: E731
  (lf, gf), (lp, gp) = jax.value_and_grad(fused)(s), jax.value_and_grad(plain)(s)
  assert _rel(lf, lp) <= TOL
  assert _rel(gf, gp) <= TOL
  # A gradient that is not identically small: the comparison can fail.
  assert np.abs(np.asarray(gp)).max() > 1e-4


def _full_logit_copies(fn, s):
  residuals = jax.eval_shape(lambda x: jax.vjp(fn, x)[1], s)
  return sum(1 for a in jax.tree.leaves(residuals) if a.size >= s.size and a.dtype == jnp.float32)


def test_fused_backward_keeps_one_copy_of_the_logits():
  s, q = _inputs()
  fused = lambda x: losses.dino_loss(x, q, None, student_temp=0.1, teacher_probs=q)  # noqa: E731
  plain = lambda x: plain_loss(x, q, student_temp=0.1, num_global=2)  # noqa: E731
  assert _full_logit_copies(fused, s) == 1
  assert _full_logit_copies(plain, s) >= 1
