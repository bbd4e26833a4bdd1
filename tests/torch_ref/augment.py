"""The official DINO and SwAV augmentations, rebuilt from the PIL calls torchvision makes.

torchvision does not import in our environment, but on PIL images its transforms are thin
wrappers over Pillow, so each piece here calls the same Pillow function with the same arguments
and draws its randomness the way the official code does (torch RNG for torchvision transforms,
Python `random` for DINO's blur and solarisation, numpy for SwAV's blur probability).
Sources: facebookresearch/dino main_dino.py `DataAugmentationDINO`, utils.py `GaussianBlur`,
`Solarization`; facebookresearch/swav src/multicropdataset.py; torchvision transforms and
functional_pil. Used by the parity tests and by experiments/bench_data.py.
"""
import io
import math
import random

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SWAV_STD = (0.228, 0.224, 0.225)


def pil_loader(data):
  """torchvision's default ImageFolder loader: open and convert to RGB (no EXIF handling)."""
  return Image.open(io.BytesIO(data) if isinstance(data, bytes) else data).convert('RGB')


# ---- geometry -------------------------------------------------------------------------------

def _torch_uniform(lo, hi):
  return torch.empty(1).uniform_(float(lo), float(hi)).item()


def _torch_randint(lo, hi):
  return torch.randint(lo, hi, size=(1,)).item()


def rrc_params(width, height, scale, ratio=(3 / 4, 4 / 3), uniform=_torch_uniform, randint=_torch_randint):
  """torchvision RandomResizedCrop.get_params: (top, left, h, w). Draws from the torch RNG, or from the given
  `uniform(lo, hi)` and `randint(lo, hi)` (hi excluded), in torchvision's order."""
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = area * uniform(scale[0], scale[1])
    aspect = math.exp(uniform(log_ratio[0], log_ratio[1]))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = randint(0, height - h + 1)
      left = randint(0, width - w + 1)
      return top, left, h, w
  in_ratio = float(width) / float(height)
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    h, w = height, int(round(height * max(ratio)))
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def resized_crop(img, top, left, h, w, size, interpolation=Image.BICUBIC):
  """F.resized_crop on PIL: crop then resize to (size, size)."""
  return img.crop((left, top, left + w, top + h)).resize((size, size), interpolation)


def hflip(img):
  return img.transpose(Image.FLIP_LEFT_RIGHT)


def resize_shorter(img, size, interpolation=Image.BICUBIC):
  """F.resize(img, int) on PIL: shorter side to `size`, longer side truncated (int())."""
  w, h = img.size
  if (w <= h and w == size) or (h <= w and h == size):
    return img
  if w < h:
    return img.resize((size, int(size * h / w)), interpolation)
  return img.resize((int(size * w / h), size), interpolation)


def center_crop(img, size):
  """F.center_crop on PIL, zero padding when the crop is larger than the image."""
  w, h = img.size
  if size > w or size > h:
    pad_l, pad_t = (size - w) // 2 if size > w else 0, (size - h) // 2 if size > h else 0
    pad_r, pad_b = (size - w + 1) // 2 if size > w else 0, (size - h + 1) // 2 if size > h else 0
    padded = Image.new(img.mode, (w + pad_l + pad_r, h + pad_t + pad_b), 0)
    padded.paste(img, (pad_l, pad_t))
    img, (w, h) = padded, padded.size
  top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
  return img.crop((left, top, left + size, top + size))


# ---- colour (torchvision functional_pil) ----------------------------------------------------

def adjust_brightness(img, factor):
  return ImageEnhance.Brightness(img).enhance(factor)


def adjust_contrast(img, factor):
  return ImageEnhance.Contrast(img).enhance(factor)


def adjust_saturation(img, factor):
  return ImageEnhance.Color(img).enhance(factor)


def adjust_hue(img, factor):
  """torchvision adjust_hue: H channel of PIL's HSV shifted by uint8(factor * 255), wrapping.

  torchvision writes `np_h += np.uint8(hue_factor * 255)`; with numpy 1.x a negative product
  became int(product) mod 256 (truncation toward zero, then wrap-around). numpy 2 refuses the
  cast, so we spell out the numpy 1.x result.
  """
  h, s, v = img.convert('HSV').split()
  shift = int(factor * 255) % 256
  np_h = ((np.asarray(h, np.int64) + shift) % 256).astype(np.uint8)
  return Image.merge('HSV', (Image.fromarray(np_h, 'L'), s, v)).convert('RGB')


def grayscale3(img):
  """F.to_grayscale(img, 3): PIL's 'L' conversion replicated to three channels."""
  g = np.asarray(img.convert('L'))
  return Image.fromarray(np.dstack([g, g, g]), 'RGB')


def gaussian_blur(img, radius):
  return img.filter(ImageFilter.GaussianBlur(radius=radius))


def solarize(img):
  return ImageOps.solarize(img, threshold=128)


def to_tensor_normalize(img, mean=IMAGENET_MEAN, std=IMAGENET_STD):
  """ToTensor (uint8 / 255, CHW) then Normalize ((x - mean) / std)."""
  t = torch.from_numpy(np.array(img, np.uint8)).permute(2, 0, 1).float().div(255)
  return (t - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


def color_jitter_params(brightness, contrast, saturation, hue):
  """ColorJitter.get_params: a random op order and one factor per op (torch RNG)."""
  order = torch.randperm(4).tolist()
  b = torch.empty(1).uniform_(max(0.0, 1 - brightness), 1 + brightness).item()
  c = torch.empty(1).uniform_(max(0.0, 1 - contrast), 1 + contrast).item()
  s = torch.empty(1).uniform_(max(0.0, 1 - saturation), 1 + saturation).item()
  h = torch.empty(1).uniform_(-hue, hue).item()
  return order, (b, c, s, h)


def color_jitter(img, order, factors):
  ops = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)
  for i in order:
    img = ops[i](img, factors[i])
  return img


# ---- the official pipelines -------------------------------------------------------------------

class _Crop:
  """RandomResizedCrop -> flip -> jitter (p) -> grayscale (p) -> blur (p) -> solarise (p) -> tensor."""

  def __init__(self, size, scale, *, interpolation, jitter, jitter_p, gray_p, blur_p, solarize_p,
               mean, std, blur_rng):
    self.size, self.scale, self.interpolation = size, scale, interpolation
    self.jitter, self.jitter_p, self.gray_p = jitter, jitter_p, gray_p
    self.blur_p, self.solarize_p, self.mean, self.std = blur_p, solarize_p, mean, std
    self.blur_rng = blur_rng

  def __call__(self, img):
    top, left, h, w = rrc_params(img.width, img.height, self.scale)
    img = resized_crop(img, top, left, h, w, self.size, self.interpolation)
    if torch.rand(1) < 0.5:
      img = hflip(img)
    if not self.jitter_p < torch.rand(1):  # RandomApply
      img = color_jitter(img, *color_jitter_params(*self.jitter))
    if torch.rand(1) < self.gray_p:  # RandomGrayscale (torch RNG in current torchvision)
      img = grayscale3(img)
    if self.blur_rng() <= self.blur_p:
      img = gaussian_blur(img, random.uniform(0.1, 2.0))
    if self.solarize_p and random.random() < self.solarize_p:
      img = solarize(img)
    return to_tensor_normalize(img, self.mean, self.std)


class DataAugmentationDINO:
  """main_dino.py: 2 global crops (blur 1.0 / 0.1, solarise 0 / 0.2) + n local crops (blur 0.5)."""

  def __init__(self, global_crops_scale=(0.4, 1.0), local_crops_scale=(0.05, 0.4),
               local_crops_number=8, global_size=224, local_size=96):
    common = dict(interpolation=Image.BICUBIC, jitter=(0.4, 0.4, 0.2, 0.1), jitter_p=0.8,
                  gray_p=0.2, mean=IMAGENET_MEAN, std=IMAGENET_STD, blur_rng=random.random)
    self.global1 = _Crop(global_size, global_crops_scale, blur_p=1.0, solarize_p=0.0, **common)
    self.global2 = _Crop(global_size, global_crops_scale, blur_p=0.1, solarize_p=0.2, **common)
    self.local = _Crop(local_size, local_crops_scale, blur_p=0.5, solarize_p=0.0, **common)
    self.local_crops_number = local_crops_number

  def __call__(self, img):
    return [self.global1(img), self.global2(img)] + [
        self.local(img) for _ in range(self.local_crops_number)]


class SwAVMultiCrop:
  """src/multicropdataset.py: bilinear crops, strength-1 colour distortion, blur p 0.5."""

  def __init__(self, size_crops=(224, 96), nmb_crops=(2, 6), min_scale_crops=(0.14, 0.05),
               max_scale_crops=(1.0, 0.14)):
    self.trans = []
    for size, n, lo, hi in zip(size_crops, nmb_crops, min_scale_crops, max_scale_crops):
      crop = _Crop(size, (lo, hi), interpolation=Image.BILINEAR, jitter=(0.8, 0.8, 0.8, 0.2),
                   jitter_p=0.8, gray_p=0.2, blur_p=0.5, solarize_p=0.0, mean=IMAGENET_MEAN,
                   std=SWAV_STD, blur_rng=np.random.rand)
      self.trans.extend([crop] * n)

  def __call__(self, img):
    return [t(img) for t in self.trans]


def eval_transform(img, resize_size=256, image_size=224):
  """eval_knn.py: Resize(256, bicubic) + CenterCrop(224) (before ToTensor/Normalize)."""
  return center_crop(resize_shorter(img, resize_size, Image.BICUBIC), image_size)
