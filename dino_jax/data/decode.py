"""The CPU half of `data.crop_on = 'device'`: decode, draw the crops, ship one padded image (grain workers).

numpy + PIL only (worker processes never import jax). The crops themselves are cut, resized and flipped
inside the jitted step (`resize.device_crops`), which turns this element into the cpu path's.

Per image the worker
- decodes it as the cpu path does (`multicrop.open_image` / `to_rgb`: same modes, same EXIF rule);
- draws every crop box and flip with `MultiCrop.plan`, the cpu path's draws in the cpu path's order, so
  both paths crop the same boxes for the same seed (tests/test_data_device_crops.py);
- pads the decoded image with zeros to [D, D, 3] uint8, D = `data.device_image_size`.

Decoder: JPEGs go through `simplejpeg` (libjpeg-turbo) when it is installed, everything else (and
CMYK JPEGs, broken files, `exif_transpose`) through PIL; both give the same pixels (tested).

Decode scale (JPEG DCT scaling, libjpeg's 1/2, 1/4, 1/8, through PIL's `draft`), the rule:
- with `data.jpeg_draft`, the largest power of two s <= 8 with s <= min over crops of (box side // crop
  size): every box keeps at least its output size in pixels, so every crop is still a downscale (or the
  same upscale) from the decoded image: this is the cpu path's `MultiCrop._draft` rule, and the crops
  then equal the cpu path's draft crops (box resize on the reduced image, per-axis factors);
- and, whatever `jpeg_draft` says, at least the s that makes the image fit D x D. Only this second reason
  makes crops from fewer pixels than their box needs; an image still larger than D at 1/8 (or a
  non-JPEG larger than D) is shrunk with Pillow's `reduce` (box filter) to fit. Such images are rare
  on ImageNet with D = 512 (its photos are mostly 500 px on the long side) and are counted nowhere:
  raise D if your images are larger.
At scale 1 the device crops are torchvision's `img.crop(box).resize(size)`, as on the cpu path.

Per crop the element carries the box as two (lo, size, in0, in1) rows, y then x (see resize.py): taps
clamped to [lo, lo + size) and the box edges in0, in1 relative to lo.
"""
import math

import numpy as np

from dino_jax.data import multicrop

try:
  import simplejpeg
except ImportError:  # optional: PIL decodes the same pixels, a little slower
  simplejpeg = None


class DeviceMultiCrop:
  """`(record, rng) -> {'image': uint8 [D, D, 3], '<group>_box': float32 [n, 2, 4], '<group>_flip': bool [n],
  'label': int32}`, a grain `random_map` callable drawing exactly what `MultiCrop` draws."""

  def __init__(self, groups, *, image_size, flip=True, draft=True, exif_transpose=False):
    self.geometry = multicrop.MultiCrop(groups, flip=flip, draft=draft, exif_transpose=exif_transpose)
    self.image_size = int(image_size)

  def __call__(self, record, rng):
    data = record['image']
    if simplejpeg is not None and not self.geometry.exif_transpose and isinstance(data, bytes):
      element = self._turbo(data, record, rng)
      if element is not None:
        return element
    return self._pil(record, rng)

  def _turbo(self, data, record, rng):
    """JPEG through simplejpeg (libjpeg-turbo, the library Pillow's wheels decode with: the same pixels, measured
    ~20 % faster by experiments/bench_data.py); None for what it does not cover (CMYK, not a JPEG, broken)."""
    try:
      if not simplejpeg.is_jpeg(data):
        return None
      height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except (ValueError, RuntimeError):
      return None
    if colorspace not in ('RGB', 'YCbCr', 'Gray') or min(width, height) < 1:
      return None
    plan = self.geometry.plan(width, height, rng)
    scale = max(self._crop_scale(plan) if self.geometry.draft else 1, self._fit_scale(width, height))
    try:
      pixels = simplejpeg.decode_jpeg(data, colorspace='RGB', min_width=width // scale, min_height=height // scale)
    except (ValueError, RuntimeError):
      return None  # PIL decodes what it can of a truncated file, and names the file if it cannot
    if max(pixels.shape[:2]) > self.image_size:
      return None
    return self.element(pixels, (width, height), plan, record.get('label', -1))

  def _pil(self, record, rng):
    path = record.get('path', '<record>')
    image = multicrop.open_image(record['image'], path)
    if self.geometry.exif_transpose and multicrop._orientation(image, path) != 1:
      image = multicrop.to_rgb(image, path, exif_transpose=True)
    width, height = image.size
    plan = self.geometry.plan(width, height, rng)
    if image.format == 'JPEG':
      scale = max(self._crop_scale(plan) if self.geometry.draft else 1, self._fit_scale(width, height))
      if scale > 1:
        image.draft(None, (width // scale, height // scale))
    image = multicrop.to_rgb(image, path)
    if max(image.size) > self.image_size:
      image = image.reduce(math.ceil(max(image.size) / self.image_size))
    return self.element(np.asarray(image), (width, height), plan, record.get('label', -1))

  def element(self, pixels, original_size, plan, label):
    """The shipped element for decoded `pixels` [h, w, 3] of an image whose boxes were drawn at `original_size`."""
    size = self.image_size
    h, w = pixels.shape[:2]
    out = {'image': np.zeros((size, size, 3), np.uint8)}
    out['image'][:h, :w] = pixels
    exact = (w, h) == tuple(original_size)
    fy, fx = original_size[1] / h, original_size[0] / w
    for g, boxes, flips in plan:
      rows = np.empty((g.number, 2, 4), np.float32)
      for n, (top, left, bh, bw) in enumerate(boxes):
        if exact:  # torchvision's crop, then resize: taps clamped to the box
          rows[n] = ((top, bh, 0, bh), (left, bw, 0, bw))
        else:  # resize with a box on the reduced image: taps clamped to the image
          rows[n] = ((0, h, top / fy, min((top + bh) / fy, h)), (0, w, left / fx, min((left + bw) / fx, w)))
      out[f'{g.name}_box'] = rows
      out[f'{g.name}_flip'] = np.asarray(flips, bool)
    out['label'] = np.int32(label)
    return out

  def _crop_scale(self, plan):
    k = min(min(h, w) // g.size for g, boxes, _ in plan for (_, _, h, w) in boxes)
    return 1 << min(int(math.log2(k)), 3) if k >= 2 else 1

  def _fit_scale(self, width, height):
    scale = 1
    while scale < 8 and math.ceil(max(width, height) / scale) > self.image_size:
      scale *= 2
    return scale


def bytes_per_image(crops, image_size):
  """Host -> device bytes of one image on the device path (image, boxes, flips, label, skipped)."""
  n = int(crops.global_number) + int(crops.local_number)
  return 3 * int(image_size) ** 2 + n * (2 * 4 * 4 + 1) + 4 + 4
