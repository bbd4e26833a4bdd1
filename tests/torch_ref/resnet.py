"""PyTorch reference ResNet-50: torchvision's layout and names (v1.5, stride on the 3x3 conv), and the
SwAV variant of src/resnet50.py (explicit pad 1 + conv padding 2, projection head and prototypes
inside the model, flat state-dict keys)."""
import torch.nn.functional as F
from torch import nn

from tests.torch_ref.heads import swav_projection


class Bottleneck(nn.Module):
  def __init__(self, c_in, planes, stride):
    super().__init__()
    c_out = 4 * planes
    self.conv1 = nn.Conv2d(c_in, planes, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = nn.Conv2d(planes, c_out, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(c_out)
    self.downsample = None
    if stride != 1 or c_in != c_out:
      self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False),
                                      nn.BatchNorm2d(c_out))

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)))
    y = F.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class ResNet50(nn.Module):
  """torchvision.models.resnet50 layout; `fc` only when num_classes > 0. swav=True reproduces the
  SwAV stem (ConstantPad2d(1) then a 7x7 conv with padding 2). `width` (64 in ResNet-50) narrows
  it for fast tests; the output has 32 * width features."""

  def __init__(self, num_classes=0, swav=False, width=64):
    super().__init__()
    self.swav = swav
    self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=2 if swav else 3, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    c_in = width
    for i, n in enumerate((3, 4, 6, 3)):
      planes = width * 2 ** i
      blocks = []
      for j in range(n):
        blocks.append(Bottleneck(c_in, planes, 2 if i > 0 and j == 0 else 1))
        c_in = 4 * planes
      setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
    if num_classes:
      self.fc = nn.Linear(c_in, num_classes)
    for m in self.modules():
      if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
      elif isinstance(m, nn.BatchNorm2d):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)

  def stem(self, x):
    if self.swav:
      x = F.pad(x, (1, 1, 1, 1))
    return F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, stride=2, padding=1)

  def features(self, x):
    x = self.stem(x)
    for i in range(4):
      x = getattr(self, f"layer{i + 1}")(x)
    return x.mean(dim=(2, 3))

  def forward(self, x):
    x = self.features(x)
    return self.fc(x) if hasattr(self, "fc") else x


class SwAVResNet50(ResNet50):
  """SwAV's model: backbone, projection head, L2-normalisation, prototypes in one module."""

  def __init__(self, hidden_mlp=2048, output_dim=128, nmb_prototypes=3000, width=64):
    super().__init__(swav=True, width=width)
    self.projection_head = swav_projection(32 * width, hidden_mlp, output_dim)
    self.prototypes = nn.Linear(output_dim or 32 * width, nmb_prototypes, bias=False)

  def forward(self, x):
    x = self.features(x)
    if self.projection_head is not None:
      x = self.projection_head(x)
    x = F.normalize(x, dim=1, p=2)
    return x, self.prototypes(x)
