"""PyTorch reference heads: DINO's DINOHead (vision_transformer.py) and SwAV's projection + prototypes
(src/resnet50.py), with the official parameter names."""
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from tests.torch_ref.vit import trunc_normal_


class DINOHead(nn.Module):
  def __init__(self, in_dim, out_dim, use_bn=False, norm_last_layer=True, nlayers=3, hidden_dim=2048,
               bottleneck_dim=256):
    super().__init__()
    nlayers = max(nlayers, 1)
    if nlayers == 1:
      self.mlp = nn.Linear(in_dim, bottleneck_dim)
    else:
      dims = [in_dim] + [hidden_dim] * (nlayers - 1)
      seq = []
      for d_in, d_out in zip(dims[:-1], dims[1:]):
        seq.append(nn.Linear(d_in, d_out))
        if use_bn:
          seq.append(nn.BatchNorm1d(d_out))
        seq.append(nn.GELU())
      seq.append(nn.Linear(hidden_dim, bottleneck_dim))
      self.mlp = nn.Sequential(*seq)
    for m in self.modules():
      if isinstance(m, nn.Linear):
        trunc_normal_(m.weight)
        nn.init.zeros_(m.bias)
    # Created after the init above: keeps torch's default Linear init.
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", FutureWarning)  # torch.nn.utils.weight_norm, as the official code
      self.last_layer = nn.utils.weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
    self.last_layer.weight_g.data.fill_(1)
    if norm_last_layer:
      self.last_layer.weight_g.requires_grad = False

  def forward(self, x):
    return self.last_layer(F.normalize(self.mlp(x), dim=-1, p=2))


def swav_projection(in_dim, hidden_mlp, output_dim):
  """SwAV's `projection_head` (None when output_dim == 0)."""
  if output_dim == 0:
    return None
  if hidden_mlp == 0:
    return nn.Linear(in_dim, output_dim)
  return nn.Sequential(nn.Linear(in_dim, hidden_mlp), nn.BatchNorm1d(hidden_mlp), nn.ReLU(inplace=True),
                       nn.Linear(hidden_mlp, output_dim))


class SwAVHead(nn.Module):
  """The head part of SwAV's ResNet: projection, L2-normalisation, prototypes."""

  def __init__(self, in_dim=2048, hidden_mlp=2048, output_dim=128, nmb_prototypes=3000):
    super().__init__()
    self.projection_head = swav_projection(in_dim, hidden_mlp, output_dim)
    self.prototypes = nn.Linear(output_dim or in_dim, nmb_prototypes, bias=False)

  def forward(self, x):
    if self.projection_head is not None:
      x = self.projection_head(x)
    x = F.normalize(x, dim=1, p=2)
    return x, self.prototypes(x)


class MultiCropWrapper(nn.Module):
  """DINO's utils.MultiCropWrapper: backbone per resolution group, head on the concatenation."""

  def __init__(self, backbone, head):
    super().__init__()
    self.backbone, self.head = backbone, head

  def forward(self, crops):
    return self.head(torch.cat([self.backbone(x) for x in crops]))
