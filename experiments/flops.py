"""Analytic FLOPs of one training step (matmuls and convolutions, 2 FLOPs per multiply-add), for MFU and remat cost.

XLA's cost analysis counts a loop body once and includes elementwise work; these counts are the model's own: the
forward of each network on each crop, x3 for forward + backward (input and weight gradients) of the student, plus
the forward the backward recomputes under `model.remat`.
"""
from __future__ import annotations

VIT_WIDTH = {"vit_tiny": (192, 3), "vit_small": (384, 6), "vit_base": (768, 12)}


def vit_forward(size, *, embed_dim, depth=12, patch=16, mlp_ratio=4.0):
  """(total, in blocks, in batched attention dots) forward FLOPs of a ViT on one size x size image."""
  n = (size // patch) ** 2
  t, d, h = n + 1, embed_dim, int(embed_dim * mlp_ratio)
  linear = 2 * t * (d * 3 * d + d * d + 2 * d * h)
  attention = 2 * 2 * t * t * d                   # q k^T and softmax(.) v, all heads
  blocks = depth * (linear + attention)
  return 2 * n * 3 * patch * patch * d + blocks, blocks, depth * attention


def resnet_forward(size, *, layers=(3, 4, 6, 3), width=64):
  """(total, in blocks) forward FLOPs of torchvision's bottleneck ResNet on one size x size image."""
  conv = lambda hw, k, cin, cout: 2 * hw * hw * k * k * cin * cout  # noqa: E731
  hw = (size + 1) // 2
  stem = conv(hw, 7, 3, width)
  hw = (hw + 1) // 2
  blocks, c_in = 0, width
  for i, n in enumerate(layers):
    planes = width * 2 ** i
    for j in range(n):
      stride = 2 if (i > 0 and j == 0) else 1
      out_hw = (hw + stride - 1) // stride
      blocks += conv(hw, 1, c_in, planes) + conv(out_hw, 3, planes, planes) + conv(out_hw, 1, planes, planes * 4)
      if stride != 1 or c_in != planes * 4:
        blocks += conv(out_hw, 1, c_in, planes * 4)
      hw, c_in = out_hw, planes * 4
  return stem + blocks, blocks


def head_forward(config, in_dim):
  m = config.model
  if config.method == "dino":
    dims = [in_dim] + [m.head_hidden_dim] * (m.head_nlayers - 1) + [m.head_bottleneck_dim, m.out_dim]
  else:
    dims = [in_dim] + ([m.hidden_mlp] if m.hidden_mlp else []) + ([m.feat_dim] if m.feat_dim else []) + \
        [m.nmb_prototypes]
  return sum(2 * a * b for a, b in zip(dims[:-1], dims[1:]))


def backbone_forward(config, size):
  """(total, in blocks, in batched attention dots, feature dim) for one image of the configured backbone."""
  m = config.model
  ov = dict(m.overrides)
  if m.arch.startswith("vit"):
    d = ov.get("embed_dim", VIT_WIDTH[m.arch][0])
    total, blocks, attn = vit_forward(size, embed_dim=d, depth=ov.get("depth", 12), patch=m.patch_size)
    return total, blocks, attn, d
  layers, width = ov.get("layers", (3, 4, 6, 3)), ov.get("width", 64)
  total, blocks = resnet_forward(size, layers=layers, width=width)
  return total, blocks, 0, width * 8 * 4


def step_flops(config, remat=None):
  """FLOPs of one training step at config.batch_size: {'total', 'forward_student', 'forward_teacher', 'recompute'}."""
  c, b = config, config.batch_size
  remat = c.model.get("remat", "none") if remat is None else remat
  g = backbone_forward(c, c.crops.global_size)
  loc = backbone_forward(c, c.crops.local_size)
  n_g, n_l = c.crops.global_number, c.crops.local_number
  head = head_forward(c, g[3])
  student = b * (n_g * g[0] + n_l * loc[0] + (n_g + n_l) * head)
  teacher = b * n_g * (g[0] + head) if c.method == "dino" else 0
  which = {"none": None, "block": 1, "dots": 2}[remat]
  recompute = 0 if which is None else b * (n_g * g[which] + n_l * loc[which])
  return {"total": teacher + 3 * student + recompute, "forward_student": student, "forward_teacher": teacher,
          "recompute": recompute}


def add_shape_args(ap):
  """The shapes of the step a benchmark measures (bench_train.py, bench_memory.py): ViT-S/16 DINO at batch 64,
  2 x 224 + 8 x 96 crops, 65,536 outputs, bf16 by default."""
  ap.add_argument("--arch", default="vit_small")
  ap.add_argument("--patch", type=int, default=16)
  ap.add_argument("--batch", type=int, default=64)
  ap.add_argument("--global_size", type=int, default=224)
  ap.add_argument("--local_size", type=int, default=96)
  ap.add_argument("--local_number", type=int, default=8)
  ap.add_argument("--out_dim", type=int, default=65536)
  ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
