"""Crops cut and resized on the accelerator (`data.crop_on = 'device'`): Pillow's resampling in jax.

The CPU workers (`decode.py`) ship one decoded image padded to [D, D, 3] and, per crop, its box and
flip drawn exactly as the cpu path draws them; `device_crops` turns that into the cpu path's
{'global': [B, n, G, G, 3], 'local': [B, m, L, L, 3]} uint8 crops inside the jitted step.

Pillow's `Image.resize` (what torchvision's RandomResizedCrop calls: `img.crop(box).resize(size)`)
is two separable passes, each rounded to uint8 (`ImagingResample`; horizontal first, except in
Pillow >= 13 when the height shrinks more than twice as much as the width):
- per output pixel o of an axis, centre c = in0 + (o + 0.5) * scale with scale = (in1 - in0) / out;
  when downscaling the filter is stretched by scale (antialiasing): support = s * max(scale, 1);
  taps are the input pixels [trunc(c - support + 0.5), trunc(c + support + 0.5)) clamped to the
  image, weight filter((x - c + 0.5) / max(scale, 1)), normalised to sum 1 per output pixel;
- weights become 22-bit fixed point (rounded half away from zero), the pixel sum starts at 2^21
  and the result is `>> 22` clipped to [0, 255].
Bicubic is Keys' cubic with a = -0.5 (support 2), bilinear the triangle (support 1).

We compute the same integer weights in float32 (Pillow uses double): a weight can land one
fixed-point unit (2^-22) away, which moves an output pixel by one level only when its sum falls
within a few hundred units of a rounding boundary (measured: tests/test_data_resize.py). The pixel
sums themselves are int32, as in Pillow, so everything else is exact.

`torchvision`'s `img.crop(box).resize(...)` clamps the taps to the box; `img.resize(size, box=...)`
(the draft path, on a DCT-downscaled image) clamps them to the image. Each axis of a crop is
therefore given as (lo, size, in0, in1): taps clamped to [lo, lo + size), box edges in0, in1
relative to lo.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np

PRECISION_BITS = 22  # Pillow's 8-bit resampling: 32 - 8 - 2

SUPPORT = {'bicubic': 2.0, 'bilinear': 1.0}


def _filter(kind, x):
  x = jnp.abs(x)
  if kind == 'bilinear':
    return jnp.where(x < 1.0, 1.0 - x, 0.0)
  if kind == 'bicubic':
    a = -0.5
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return jnp.where(x < 1.0, near, jnp.where(x < 2.0, far, 0.0))
  raise ValueError(f"device crops support {sorted(SUPPORT)}, not {kind!r}")


def _exact_div(x, constant):
  """x / constant, IEEE-rounded: XLA would turn a division by a constant into a product by its rounded
  reciprocal, and an exact integer quotient could then truncate one below."""
  return x / jnp.where(jnp.isnan(x), jnp.float32(1), jnp.float32(constant))


def max_taps(kind, in_size, out_size):
  """Taps per output pixel Pillow allocates for the widest box of an axis of `in_size` pixels."""
  return int(math.ceil(SUPPORT[kind] * max(in_size / out_size, 1.0))) * 2 + 1


def axis_weights(axis, out_size, taps, kind):
  """Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` for one axis.

  axis: float32 [4] = (lo, size, in0, in1). Returns (first [out] int32, absolute index of tap 0,
  weights [out, taps] int32 in 2^-22 units; taps past the clamped range weigh 0).
  """
  lo, size, in0, in1 = axis[0], axis[1], axis[2], axis[3]
  # Everything times `out`: for an integer box the numerators below are exact float32 integers (or
  # halves), so the tap range is exact and each filter argument is rounded once. Computing the
  # centre first (as Pillow does in double) would cost float32 ~1e-4 of a weight on a 500-px axis.
  span = in1 - in0
  stretched = jnp.maximum(span, float(out_size))  # out * max(scale, 1)
  center = in0 * out_size + (jnp.arange(out_size, dtype=jnp.float32) + 0.5) * span  # times out
  reach = SUPPORT[kind] * stretched
  xmin = jnp.maximum(jnp.trunc(_exact_div(center - reach + 0.5 * out_size, out_size)), 0.0)
  xmax = jnp.minimum(jnp.trunc(_exact_div(center + reach + 0.5 * out_size, out_size)), size) - xmin
  x = jnp.arange(taps, dtype=jnp.float32)
  w = _filter(kind, ((x[None, :] + xmin[:, None] + 0.5) * out_size - center[:, None]) / stretched)
  w = jnp.where(x[None, :] < xmax[:, None], w, 0.0)
  total = jnp.sum(w, axis=1, keepdims=True)
  w = jnp.where(total != 0.0, w / jnp.where(total != 0.0, total, 1.0), w)
  fixed = jnp.trunc(w * (1 << PRECISION_BITS) + jnp.where(w < 0, -0.5, 0.5)).astype(jnp.int32)
  return (lo + xmin).astype(jnp.int32), fixed


def _round(acc):
  return jnp.clip((acc + (1 << (PRECISION_BITS - 1))) >> PRECISION_BITS, 0, 255).astype(jnp.uint8)


def _horizontal(pixels, first, weights):
  acc = 0
  for t in range(weights.shape[1]):
    acc = acc + pixels[:, jnp.minimum(first + t, pixels.shape[1] - 1), :] * weights[None, :, t, None]
  return _round(acc).astype(jnp.int32)


def _vertical(pixels, first, weights):
  acc = 0
  for t in range(weights.shape[1]):
    acc = acc + pixels[jnp.minimum(first + t, pixels.shape[0] - 1)] * weights[:, t, None, None]
  return _round(acc).astype(jnp.int32)


def vertical_first_rule():
  """Pillow >= 13 runs the vertical pass first when the height shrinks by more than twice what the width
  shrinks (`ImagingResampleInner`); older Pillow always starts horizontally. Both paths follow the Pillow
  installed, so the cpu and the device crops agree on any machine."""
  import PIL
  return int(PIL.__version__.split('.')[0]) >= 13


def resize_crop(image, box, out_size, kind, taps, vertical_first=None):
  """One crop of `image` [H, W, C] uint8 resized to [out, out, C] as Pillow does.

  box: float32 [2, 4], the (lo, size, in0, in1) of the y and the x axis; taps: (y, x) static widths.
  vertical_first: None follows the installed Pillow (`vertical_first_rule`).
  """
  y_first, y_w = axis_weights(box[0], out_size, taps[0], kind)
  x_first, x_w = axis_weights(box[1], out_size, taps[1], kind)
  pixels = image.astype(jnp.int32)
  # Each pass over the whole padded image (Pillow skips rows the second pass never reads): same values.
  crop = _vertical(_horizontal(pixels, x_first, x_w), y_first, y_w)
  if vertical_first is None:
    vertical_first = vertical_first_rule()
  if vertical_first:
    # The image Pillow resizes is the crop (crop, then resize) or the whole image (resize with a box).
    shrink_y, shrink_x = box[0, 1] - out_size, box[1, 1] - out_size
    other = _horizontal(_vertical(pixels, y_first, y_w), x_first, x_w)
    crop = jnp.where((shrink_y > 0) & (shrink_y > 2 * shrink_x), other, crop)
  return crop.astype(jnp.uint8)


def crop_group(images, boxes, flips, out_size, kind):
  """images uint8 [B, D, D, C], boxes float32 [B, n, 2, 4], flips bool [B, n] -> uint8 [B, n, S, S, C]."""
  taps = (max_taps(kind, images.shape[1], out_size), max_taps(kind, images.shape[2], out_size))

  def one(image, box, flip):
    crop = resize_crop(image, box, out_size, kind, taps)
    return jnp.where(flip, crop[:, ::-1], crop)

  per_image = jax.vmap(one, in_axes=(None, 0, 0))
  return jax.vmap(per_image)(images, boxes, flips)


def device_crops(batch, crops):
  """The device path's batch {'image', '<group>_box', '<group>_flip', ...} -> the cpu path's batch.

  `crops` is `config.crops`; groups with no '<group>_box' in the batch (number 0) are absent.
  Other keys ('label', 'skipped') pass through.
  """
  sizes = {'global': int(crops.global_size), 'local': int(crops.local_size)}
  out = {k: v for k, v in batch.items() if k != 'image' and not k.endswith(('_box', '_flip'))}
  for name, size in sizes.items():
    if f'{name}_box' in batch:
      out[name] = crop_group(batch['image'], batch[f'{name}_box'], batch[f'{name}_flip'], size,
                             crops.interpolation)
  return out


def axis_box(lo, size, in0, in1):
  """numpy helper for tests and workers: one axis as shipped, (lo, size, in0 - lo, in1 - lo)."""
  return np.asarray([lo, size, in0 - lo, in1 - lo], np.float32)
