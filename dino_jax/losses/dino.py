"""DINO self-distillation loss, centring and the teacher-temperature schedule (Caron et al. 2021, Sec. 3.1).

All inputs are global-view arrays: under `jax.jit` over a mesh the batch axis may be sharded across devices and
hosts, and every mean below is then taken over the global batch (XLA inserts the all-reduce), which is what the
official code does with `dist.all_reduce` in `update_center`.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def dino_loss(student_logits, teacher_logits, center, *, student_temp=0.1, teacher_temp=0.04,
              num_global=2, teacher_probs=None):
  """Cross-entropy between sharpened, centred teacher outputs and student outputs over crop pairs.

  Args:
    student_logits: [n_crops * B, K], crop-major (all of crop 0, then all of crop 1, ...) like the official
      `MultiCropWrapper`; the first `num_global` crops are the global views.
    teacher_logits: [num_global * B, K] raw teacher logits of the global views, crop-major.
    center: [K] running centre (the value *before* this step's update: the official loss uses the old centre).
    student_temp: student temperature (0.1).
    teacher_temp: teacher temperature for this step (scalar, may be traced: it follows an epoch schedule).
    num_global: number of global crops the teacher saw.
    teacher_probs: optional precomputed teacher targets [num_global * B, K] (e.g. from Sinkhorn-Knopp, DINOv2's
      alternative to centring); when given, `center` and `teacher_temp` are not used for the targets.

  Returns:
    Scalar loss: the mean over the 2 * (n_crops - 1) (teacher view, student view) pairs with different views of the
    batch-mean cross-entropy. Computed in float32 whatever the input dtype.
  """
  n_total = student_logits.shape[0]
  batch = teacher_logits.shape[0] // num_global
  if n_total % batch or teacher_logits.shape[0] % num_global:
    raise ValueError(f"student rows {n_total} and teacher rows {teacher_logits.shape[0]} are not multiples of "
                     f"the batch {batch} (num_global={num_global})")
  n_crops = n_total // batch
  if teacher_probs is None:
    teacher_probs = teacher_targets(teacher_logits, center, teacher_temp)
  teacher = jax.lax.stop_gradient(teacher_probs.astype(jnp.float32)).reshape(num_global, batch, -1)
  return _pair_cross_entropy(student_logits.reshape(n_crops, batch, -1), teacher, float(student_temp))


def _pair_weights(num_global, n_crops):
  """[num_global, n_crops] 1/n_terms for pairs of different views, 0 where student and teacher see the same view
  (the official `if v == iq: continue`)."""
  same_view = np.arange(num_global)[:, None] == np.arange(n_crops)[None, :]
  return np.where(same_view, 0.0, 1.0 / (num_global * n_crops - num_global)).astype(np.float32)


# The cross-entropy over crop pairs with a hand-written backward. With log p_s = z_s - lse(z_s), z = logits / temp:
#   loss = sum_ts w_ts (-1/B) sum_b [<q_tb, z_sb> - lse(z_sb) Q_tb],  Q_tb = sum_k q_tbk,
#   dloss/dz_sb = -(1/B) (W_sb - (sum_k W_sbk) softmax(z_sb)),  W_s = sum_t w_ts q_t.
# The forward never forms log_softmax (one fused pass for lse, one contraction), and the backward keeps only the
# logits it was given and lse [n_crops, B]: autodiff of log_softmax + einsum kept three float32 [n_crops*B, K] arrays
# (z, exp(z - max) and log p).
@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _pair_cross_entropy(student, teacher, temp):
  return _pair_ce_fwd(student, teacher, temp)[0]


def _pair_ce_fwd(student, teacher, temp):
  n_crops, batch = student.shape[:2]
  w = _pair_weights(teacher.shape[0], n_crops)
  z = student.astype(jnp.float32) / temp
  lse = jax.nn.logsumexp(z, axis=-1)                                       # [S, B]
  dots = jnp.einsum("tbk,sbk->ts", teacher, z)
  mass = jnp.sum(teacher, axis=-1)                                          # [T, B]
  ce = -(dots - jnp.einsum("tb,sb->ts", mass, lse)) / batch
  return jnp.sum(w * ce), (student, teacher, lse)


def _pair_ce_bwd(temp, res, g):
  student, teacher, lse = res
  n_crops, batch = student.shape[:2]
  w = jnp.asarray(_pair_weights(teacher.shape[0], n_crops))
  wq = jnp.einsum("ts,tbk->sbk", w, teacher)                                # W_s
  p = jnp.exp(student.astype(jnp.float32) / temp - lse[..., None])
  dz = -(wq - jnp.sum(wq, axis=-1, keepdims=True) * p) * (g / batch)
  return (dz / temp).astype(student.dtype), jnp.zeros_like(teacher)


_pair_cross_entropy.defvjp(_pair_ce_fwd, _pair_ce_bwd)


def teacher_targets(teacher_logits, center, teacher_temp):
  """Centred and sharpened teacher distribution softmax((t - c) / tau), in float32, without gradient."""
  logits = (teacher_logits.astype(jnp.float32) - center.astype(jnp.float32)) / teacher_temp
  return jax.lax.stop_gradient(jax.nn.softmax(logits, axis=-1))


def update_center(center, teacher_logits, momentum=0.9):
  """EMA of the global-batch mean of the raw teacher logits (before temperature), as the official `update_center`."""
  batch_center = jnp.mean(jax.lax.stop_gradient(teacher_logits).astype(jnp.float32), axis=0)
  return center * momentum + batch_center * (1.0 - momentum)


def teacher_temperature(epoch, *, warmup_temp, temp, warmup_epochs):
  """Teacher temperature for a (possibly traced) integer epoch.

  The official schedule is `np.linspace(warmup_temp, temp, warmup_epochs)` followed by `temp`: the warm-up is indexed
  by epoch (not iteration), reaches `temp` on its last warm-up epoch and includes both end points.
  """
  if warmup_epochs <= 0:
    return jnp.asarray(temp, jnp.float32)
  epoch = jnp.asarray(epoch, jnp.float32)
  frac = epoch / max(warmup_epochs - 1, 1) if warmup_epochs > 1 else jnp.zeros_like(epoch)
  warm = warmup_temp + (temp - warmup_temp) * frac
  return jnp.where(epoch < warmup_epochs, warm, temp).astype(jnp.float32)


def entropy(probs, axis=-1):
  """Shannon entropy (nats) of distributions along `axis`, float32."""
  probs = probs.astype(jnp.float32)
  return -jnp.sum(probs * jnp.log(jnp.clip(probs, 1e-30)), axis=axis)
