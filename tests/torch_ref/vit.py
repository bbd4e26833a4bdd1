"""PyTorch reference ViT with the semantics and parameter names of DINO's vision_transformer.py.

Written for our parity tests (NCHW, as the official code). Deterministic parts only matter here;
stochastic depth takes an explicit uniform draw so tests can feed the same numbers to both sides.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn


def trunc_normal_(t, std=0.02, lo=-2.0, hi=2.0):
  """Normal(0, std) restricted to [lo, hi] (absolute bounds, like timm's helper)."""
  with torch.no_grad():
    return nn.init.trunc_normal_(t, mean=0.0, std=std, a=lo, b=hi)


def drop_path(x, rate, u):
  """Per-sample stochastic depth given uniform draws u of shape [B]."""
  if rate == 0.0 or u is None:
    return x
  keep = 1.0 - rate
  mask = torch.floor(keep + u).view(-1, *([1] * (x.dim() - 1)))
  return x / keep * mask


class Attention(nn.Module):
  def __init__(self, dim, heads):
    super().__init__()
    self.heads = heads
    self.qkv = nn.Linear(dim, 3 * dim, bias=True)
    self.proj = nn.Linear(dim, dim)

  def forward(self, x):
    b, n, d = x.shape
    q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).unbind(2)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))              # [B, heads, N, hd]
    attn = torch.softmax(q @ k.transpose(-1, -2) * (d // self.heads) ** -0.5, dim=-1)
    y = (attn @ v).transpose(1, 2).reshape(b, n, d)
    return self.proj(y), attn


class Mlp(nn.Module):
  def __init__(self, dim, hidden):
    super().__init__()
    self.fc1 = nn.Linear(dim, hidden)
    self.fc2 = nn.Linear(hidden, dim)

  def forward(self, x):
    return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
  def __init__(self, dim, heads, mlp_ratio, drop_path_rate):
    super().__init__()
    self.rate = drop_path_rate
    self.norm1 = nn.LayerNorm(dim, eps=1e-6)
    self.attn = Attention(dim, heads)
    self.norm2 = nn.LayerNorm(dim, eps=1e-6)
    self.mlp = Mlp(dim, int(dim * mlp_ratio))

  def forward(self, x, u=(None, None)):
    y, _ = self.attn(self.norm1(x))
    x = x + drop_path(y, self.rate, u[0])
    return x + drop_path(self.mlp(self.norm2(x)), self.rate, u[1])


class PatchEmbed(nn.Module):
  def __init__(self, patch, dim):
    super().__init__()
    self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)

  def forward(self, x):
    return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
  def __init__(self, patch_size=16, embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0, img_size=224,
               drop_path_rate=0.0):
    super().__init__()
    self.patch_size, self.embed_dim = patch_size, embed_dim
    self.patch_embed = PatchEmbed(patch_size, embed_dim)
    n = (img_size // patch_size) ** 2
    self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
    self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, embed_dim))
    rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
    self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, r) for r in rates)
    self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
    trunc_normal_(self.pos_embed)
    trunc_normal_(self.cls_token)
    for m in self.modules():
      if isinstance(m, nn.Linear):
        trunc_normal_(m.weight)
        nn.init.zeros_(m.bias)
      elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)

  def pos_encoding(self, h, w):
    """Positional embedding for an h x w patch grid (official bicubic resize, +0.1 offset)."""
    n = self.pos_embed.shape[1] - 1
    if h * w == n and h == w:
      return self.pos_embed
    g = int(math.sqrt(n))
    grid = self.pos_embed[:, 1:].reshape(1, g, g, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=((h + 0.1) / g, (w + 0.1) / g), mode="bicubic")
    assert grid.shape[-2:] == (h, w)
    return torch.cat([self.pos_embed[:, :1], grid.permute(0, 2, 3, 1).reshape(1, h * w, -1)], dim=1)

  def tokens(self, x):
    b, _, hh, ww = x.shape
    t = torch.cat([self.cls_token.expand(b, -1, -1), self.patch_embed(x)], dim=1)
    return t + self.pos_encoding(hh // self.patch_size, ww // self.patch_size)

  def forward(self, x, u=None):
    """u: optional [depth, 2, B] uniform draws for stochastic depth."""
    x = self.tokens(x)
    for i, blk in enumerate(self.blocks):
      x = blk(x) if u is None else blk(x, (u[i, 0], u[i, 1]))
    return self.norm(x)[:, 0]

  def get_intermediate_layers(self, x, n=1):
    x = self.tokens(x)
    out = []
    for i, blk in enumerate(self.blocks):
      x = blk(x)
      if i >= len(self.blocks) - n:
        out.append(self.norm(x))
    return out

  def get_last_selfattention(self, x):
    x = self.tokens(x)
    for blk in self.blocks[:-1]:
      x = blk(x)
    return self.blocks[-1].attn(self.blocks[-1].norm1(x))[1]


def vit(name, patch_size=16, **kw):
  dims = {"vit_tiny": (192, 3), "vit_small": (384, 6), "vit_base": (768, 12)}[name]
  return VisionTransformer(patch_size=patch_size, embed_dim=dims[0], num_heads=dims[1], **kw)
