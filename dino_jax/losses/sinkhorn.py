"""Sinkhorn-Knopp equipartition (SwAV, Caron et al. 2020, Sec. 3.1 and Alg. in App. A).

One kernel serves SwAV's online clustering and DINO's `centering='sinkhorn'` (DINOv2's
`sinkhorn_knopp_teacher`). The two official versions are the same computation:

- SwAV `distributed_sinkhorn`: `epsilon` = 0.05, scores = embedding @ prototypes (cosines), the
  samples are one crop of the batch, optionally preceded by the queue.
- DINOv2 `sinkhorn_knopp_teacher`: `epsilon` = the (scheduled) teacher temperature applied to the raw
  teacher logits, and the samples are BOTH global crops stacked ([2*B, K], B in the kernel = 2 x the
  global batch). The caller stacks them; the kernel is unchanged.

Sums are written on the global-view array: under `jax.jit` over a Mesh with the batch sharded, XLA
turns the total and the per-prototype sums into all-reduces, exactly like the official
`dist.all_reduce` calls, while the per-sample sums stay local.
"""
import functools

import jax
import jax.numpy as jnp


@functools.partial(jax.jit, static_argnames=("num_iters",))
def sinkhorn_knopp(scores, *, epsilon=0.05, num_iters=3):
  """Soft assignments with equal mass per prototype, as `distributed_sinkhorn` of main_swav.py.

  Args:
    scores: [..., K] scores of any float dtype; every leading axis is a sample axis (B = their
      product), so a per-shard layout [n_shards, N, K] is handled as N*n_shards samples.
    epsilon: entropic regularisation (may be a traced scalar, e.g. a scheduled temperature).
    num_iters: number of (prototype, sample) normalisation rounds.

  Returns:
    float32 [..., K] assignments: each sample's row sums to 1 (the result is the transport plan
    times B), each prototype receives about B/K. No gradient flows through it.
  """
  shape = scores.shape
  num_prototypes = shape[-1]
  # Always fp32: the exponent below spans ~40 (cosines / 0.05) and bf16 keeps 8 bits of mantissa.
  x = jax.lax.stop_gradient(scores).astype(jnp.float32).reshape(-1, num_prototypes)
  num_samples = x.shape[0]
  x = x / epsilon
  # The official exponentiates directly: exp(1 / 0.05) ~ 4.9e8 already overflows fp16 (max 65504),
  # and any score above 88 * epsilon (4.4 at 0.05; raw DINO logits at 0.04) overflows fp32 and bf16.
  # A global constant factor cancels in the first normalisation (Q / sum Q), so subtracting the
  # global max changes nothing but the rounding; a per-sample shift would alter the 3-round result.
  # Underflow would need a sample whose every score sits ~87 * epsilon below the global max: not
  # for cosines (span 2) nor for DINO's head with a weight-normalised last layer (|logit| <= 1).
  x = x - jnp.max(x)
  q = jnp.exp(x)
  q = q / jnp.sum(q)

  def normalise(_, q):
    # Each prototype (a column here, a row of the official K x B matrix) gets total mass 1/K;
    # this sum runs over the global batch.
    q = q / jnp.sum(q, axis=0, keepdims=True)
    q = q / num_prototypes
    # Each sample gets mass 1/B; a per-sample sum, local to its shard.
    q = q / jnp.sum(q, axis=1, keepdims=True)
    return q / num_samples

  # A loop rather than Python unrolling keeps compile time flat in `num_iters` (300 unrolled rounds took
  # minutes to compile on CPU); its trip count is static, so XLA:GPU runs it without a host sync.
  q = jax.lax.fori_loop(0, num_iters, normalise, q)
  return (q * num_samples).reshape(shape)
