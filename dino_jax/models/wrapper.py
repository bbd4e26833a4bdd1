"""Multi-crop wrapper: one backbone pass per resolution group, one head pass on the concatenation."""
import jax
import jax.numpy as jnp
from flax import nnx


class MultiCropWrapper(nnx.Module):
  """`backbone` + `head`, as the official `utils.MultiCropWrapper` (the attribute names give the
  official `backbone.*` / `head.*` checkpoint keys).

  Running the backbone once per resolution keeps shapes fixed per call; BatchNorm backbones
  therefore see one batch per group, as in the official code.
  """

  def __init__(self, backbone, head):
    self.backbone = backbone
    self.head = head

  def __call__(self, crops, *, rng=None, train=True):
    """crops: list of [n_i * B, H_i, W_i, 3] arrays, crop-major, one per resolution group.

    rng: key for stochastic depth (folded with the group index); None disables drop-path
    (teacher). Returns the head output on the features concatenated in group order.
    """
    if not isinstance(crops, (list, tuple)):
      crops = [crops]
    feats = [self.backbone(x, rng=None if rng is None else jax.random.fold_in(rng, i), train=train)
             for i, x in enumerate(crops)]
    return self.head(jnp.concatenate(feats, axis=0), train=train)
