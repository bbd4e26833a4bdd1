"""Multi-crop geometry on the CPU (grain workers): decode, RandomResizedCrop, flip -> uint8 arrays.

numpy + PIL only: this runs in worker processes that never import jax. Colour operations happen
later on the accelerator (`photometric.py`); here we do what needs the full-resolution image.

Fidelity with the official loaders (torchvision `ImageFolder` + `RandomResizedCrop` on PIL images):
- decoding is `Image.open(f).convert('RGB')`: CMYK, grey, palette (transparency dropped, the
  palette colour kept) and RGBA (alpha dropped) images come out as torchvision's loader gives them.
  EXIF orientation is ignored, as torchvision does; `exif_transpose=True` applies it instead.
  One deliberate difference: 16-bit grey PNGs are scaled to 8 bits (v / 257), where PIL's
  `convert('RGB')` clips them to 255 and returns an almost white image.
- crop boxes follow torchvision's `RandomResizedCrop.get_params` exactly (10 tries of scale
  uniform, log-uniform ratio, Python rounding, then the centre-crop fallback), and each crop is
  `img.crop(box).resize((S, S), filter)`, which is what torchvision calls: without `draft` the
  pixels are identical to the official crop for the same box.
- `draft`: when every crop of a JPEG is at least twice its output size, the JPEG is decoded at
  1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling) and the crops resized from there. This changes
  pixels slightly (not bit-exact with the official crop) and saves most of the decode time on
  large photos; on ImageNet-sized images with DINO's crops it rarely triggers.
"""
import dataclasses
import io
import math
import warnings

import numpy as np
from PIL import Image, ImageOps

FILTERS = {
    'bicubic': Image.Resampling.BICUBIC,  # DINO: RandomResizedCrop(..., interpolation=BICUBIC)
    'bilinear': Image.Resampling.BILINEAR,  # SwAV: torchvision's default
    'nearest': Image.Resampling.NEAREST,
    'lanczos': Image.Resampling.LANCZOS,
}


class BadImageError(Exception):
  """A record whose image cannot be decoded; carries its path for the log."""

  def __init__(self, path, reason):
    super().__init__(f'cannot decode image {path}: {reason}')
    self.path, self.reason = path, reason

  def __reduce__(self):  # picklable, so grain can re-raise it from a worker process
    return type(self), (self.path, self.reason)


def _bad(path, error):
  return BadImageError(path, f'{type(error).__name__}: {error}')


@dataclasses.dataclass(frozen=True)
class CropGroup:
  """`number` crops of `size` x `size` pixels covering `scale` of the image area."""
  name: str
  size: int
  number: int
  scale: tuple[float, float]
  ratio: tuple[float, float] = (3 / 4, 4 / 3)


def crop_groups(crops) -> tuple[CropGroup, ...]:
  """The 'global' and 'local' groups from `config.crops` (a group with number 0 is dropped)."""
  groups = [
      CropGroup('global', int(crops.global_size), int(crops.global_number),
                tuple(crops.global_scale)),
      CropGroup('local', int(crops.local_size), int(crops.local_number), tuple(crops.local_scale)),
  ]
  return tuple(g for g in groups if g.number > 0)


def open_image(record, path='<record>'):
  """Returns a lazily decoded PIL image for an encoded (bytes) or decoded (uint8 array) image."""
  try:
    if isinstance(record, np.ndarray) and record.dtype != object:
      array = record[..., 0] if record.ndim == 3 and record.shape[-1] == 1 else record
      return Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8))
    return Image.open(io.BytesIO(bytes(record)))
  except Exception as e:  # PIL raises UnidentifiedImageError, OSError, ValueError, ...
    raise _bad(path, e) from e


def to_rgb(image, path='<record>', exif_transpose=False):
  """Decodes `image` fully and converts it to RGB like torchvision's `pil_loader`."""
  try:
    with warnings.catch_warnings():
      # Palette images with transparency warn on conversion; the official loader drops it too.
      warnings.simplefilter('ignore', UserWarning)
      image.load()
      if exif_transpose:
        image = ImageOps.exif_transpose(image)
      if image.mode in ('I', 'I;16', 'I;16B', 'I;16L', 'I;16N'):
        wide = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(np.round(wide / 257.0), 0, 255).astype(np.uint8), 'L')
      if image.width < 1 or image.height < 1:
        raise ValueError(f'empty image {image.size}')
      return image if image.mode == 'RGB' else image.convert('RGB')
  except Exception as e:
    raise _bad(path, e) from e


def _orientation(image, path):
  """The EXIF orientation tag (1 = upright)."""
  try:
    return image.getexif().get(0x0112, 1)
  except Exception as e:  # a corrupt EXIF block
    raise _bad(path, e) from e


def random_resized_crop_box(width, height, scale, ratio, rng):
  """(top, left, h, w) with the distribution of torchvision's `RandomResizedCrop.get_params`."""
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  # No valid box in 10 tries: torchvision's fallback, a central crop clamped to the ratio range.
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    w, h = int(round(height * max(ratio))), height
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


class MultiCrop:
  """`(record, rng) -> {'global': [n, G, G, 3] uint8, 'local': [m, L, L, 3] uint8, 'label': int32}`.

  Usable as a grain `random_map` callable. All randomness comes from `rng` (boxes first, then
  flips, group by group), so an element is a pure function of (record, rng state).
  """

  def __init__(self, groups, *, interpolation='bicubic', flip=True, draft=True,
               exif_transpose=False):
    if interpolation not in FILTERS:
      raise ValueError(f'interpolation {interpolation!r} is not one of {sorted(FILTERS)}')
    self.groups = tuple(groups)
    self.filter = FILTERS[interpolation]
    self.flip, self.draft, self.exif_transpose = flip, draft, exif_transpose

  def __call__(self, record, rng):
    path = record.get('path', '<record>')
    image = open_image(record['image'], path)
    if self.exif_transpose and _orientation(image, path) != 1:
      image = to_rgb(image, path, exif_transpose=True)  # boxes must be drawn on the rotated image
    plan = self.plan(*image.size, rng)
    reduce = self._draft(image, plan) if self.draft else 1
    image = to_rgb(image, path)
    out = {}
    for g, boxes, flips in plan:
      crops = np.empty((g.number, g.size, g.size, 3), np.uint8)
      for n, ((top, left, h, w), flip) in enumerate(zip(boxes, flips)):
        if reduce == 1:  # torchvision's F.resized_crop: crop, then resize
          crop = image.crop((left, top, left + w, top + h)).resize((g.size, g.size), self.filter)
        else:
          box = (left / reduce, top / reduce, (left + w) / reduce, (top + h) / reduce)
          crop = image.resize((g.size, g.size), self.filter, box=box)
        array = np.asarray(crop)
        crops[n] = array[:, ::-1] if flip else array
      out[g.name] = crops
    out['label'] = np.int32(record.get('label', -1))
    return out

  def plan(self, width, height, rng):
    """[(group, boxes (top, left, h, w), flips)]: every random draw of one image, in the order the cpu path makes
    them (the device path, `decode.DeviceMultiCrop`, draws the same)."""
    plan = []
    for g in self.groups:
      boxes = [random_resized_crop_box(width, height, g.scale, g.ratio, rng) for _ in range(g.number)]
      flips = rng.random(g.number) < 0.5 if self.flip else np.zeros(g.number, bool)
      plan.append((g, boxes, flips))
    return plan

  def _draft(self, image, plan):
    """Asks libjpeg for a 1/2..1/8 scale decode that keeps every crop >= its output size."""
    if image.format != 'JPEG':
      return 1
    k = min(min(h, w) // g.size for g, boxes, _ in plan for (_, _, h, w) in boxes)
    if k < 2:
      return 1
    s = 1 << min(int(math.log2(k)), 3)
    width, height = image.size
    result = image.draft(None, (width // s, height // s))
    return 1 if result is None else width / result[1][2]


def center_crop_box(width, height, resize_size, image_size):
  """Output size after torchvision's Resize(resize_size) and the CenterCrop(image_size) box in it."""
  if width <= height:
    new_w, new_h = resize_size, int(resize_size * height / width)
  else:
    new_w, new_h = int(resize_size * width / height), resize_size
  if (width <= height and width == resize_size) or (height <= width and height == resize_size):
    new_w, new_h = width, height  # torchvision returns the image untouched
  # torchvision pads with zeros when the crop is larger; PIL's crop outside the image does the same.
  top = int(round((new_h - image_size) / 2.0)) if new_h >= image_size else -((image_size - new_h) // 2)
  left = int(round((new_w - image_size) / 2.0)) if new_w >= image_size else -((image_size - new_w) // 2)
  return (new_w, new_h), (left, top, left + image_size, top + image_size)


class CenterCrop:
  """The official evaluation geometry: Resize(resize_size, bicubic, shorter side) + CenterCrop."""

  def __init__(self, image_size, resize_size, *, interpolation='bicubic', exif_transpose=False):
    self.image_size, self.resize_size = int(image_size), int(resize_size)
    self.filter = FILTERS[interpolation]
    self.exif_transpose = exif_transpose

  def __call__(self, record):
    path = record.get('path', '<record>')
    image = to_rgb(open_image(record['image'], path), path, self.exif_transpose)
    new_size, box = center_crop_box(*image.size, self.resize_size, self.image_size)
    if new_size != image.size:
      image = image.resize(new_size, self.filter)
    return {'image': np.asarray(image.crop(box)), 'label': np.int32(record.get('label', -1))}
