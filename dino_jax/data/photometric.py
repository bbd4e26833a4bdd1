"""Photometric augmentation on the accelerator, inside the jitted train step.

The official pipelines (DINO `DataAugmentationDINO`, SwAV `get_color_distortion` + blur) run
torchvision's transforms on PIL images, so every operation there is a Pillow C routine on uint8
pixels. We emulate those routines on uint8-valued int32 arrays rather than approximating them in
float: the same crop, factors and radius give the official pixels.

Measured on CPU against Pillow 13 (tests/test_data_photometric.py): grayscale, solarise,
RGB<->HSV (all 2^24 colours, both ways), brightness, contrast, saturation and hue with fixed or
random factors, and the Gaussian blur (Pillow's three extended-box passes per axis in its 8.24
fixed point) give identical uint8 pixels; so does the whole random chain given the same draws.

How: integer ops stay integer (grey levels, contrast mean, HSV->RGB as exact rationals, blur);
float steps follow C's float32 operation order. Two compiler rewrites would break that and are
blocked: XLA replaces x / constant with x * (1 / constant) (`_exact_div` keeps a true division),
and a*b + c may become a fused multiply-add (`_mul` makes such products exact first). Not
verified here: a GPU backend whose float division is not IEEE-rounded could move a value across
a uint8 boundary (one level, on rare pixels).

Layout: crops [..., H, W, 3]; per-crop parameters have the leading shape `[...]`.
"""
import math

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

# ---- Pillow's uint8 operations -------------------------------------------------------------------


def _exact_div(x, constant):
  """x / constant with IEEE rounding.

  XLA rewrites a division by a constant or a broadcast scalar into a multiplication by the
  rounded reciprocal; a divisor that depends on the data (the select never picks 1 for a
  number) keeps the true division.
  """
  return x / jnp.where(jnp.isnan(x), jnp.asarray(1, x.dtype), jnp.asarray(constant, x.dtype))


def _split(x):
  """x = hi + lo exactly, each with at most 12 significant bits (the low mantissa bits masked)."""
  hi = lax.bitcast_convert_type(
      lax.bitcast_convert_type(x, jnp.uint32) & jnp.uint32(0xFFFFF000), jnp.float32)
  return hi, x - hi


def _mul(x, small):
  """float32 x * small, rounded once, for |small| an integer < 2^12, however the backend fuses.

  Both partial products are exact, so a fused multiply-add (which XLA may form from a*b + c)
  cannot change the rounding of the product: we get C's separately rounded `x * small`.
  """
  hi, lo = _split(x)
  return hi * small + lo * small


def _per_crop(value, x):
  """Broadcasts a per-crop parameter of shape x.shape[:-3] against pixels [..., H, W, 3]."""
  return jnp.asarray(value)[..., None, None, None]


def grayscale(x):
  """Pillow's RGB -> L: (19595 R + 38470 G + 7471 B + 2^15) >> 16, i.e. ITU-R 601-2 luma, rounded."""
  return (x[..., 0] * 19595 + x[..., 1] * 38470 + x[..., 2] * 7471 + 0x8000) >> 16


def blend(degenerate, x, factor):
  """Pillow's `Image.blend(degenerate, x, factor)` in its float32 arithmetic.

  out = trunc(d + factor * (x - d)), clipped to [0, 255] (the C cast truncates toward zero).
  `ImageEnhance.Brightness/Contrast/Color` are blends against black, the mean grey level and the
  grey image.
  """
  d = degenerate.astype(jnp.float32)
  v = d + _mul(factor.astype(jnp.float32), (x - degenerate).astype(jnp.float32))
  return jnp.clip(jnp.trunc(v), 0, 255).astype(jnp.int32)


def adjust_brightness(x, factor):
  return blend(jnp.zeros_like(x), x, _per_crop(factor, x))


def _mean_grey(grey):
  """int(mean + 0.5) of a grey crop [..., H, W], as `ImageEnhance.Contrast` rounds ImageStat's mean."""
  n = grey.shape[-1] * grey.shape[-2]
  return (2 * grey.sum(axis=(-1, -2)) + n) // (2 * n)  # exact in integers


def adjust_contrast(x, factor):
  """Blend with the crop's mean grey level, int(mean + 0.5) as `ImageEnhance.Contrast` rounds it."""
  mean = _mean_grey(grayscale(x))
  return blend(mean[..., None, None, None], x, _per_crop(factor, x))


def adjust_saturation(x, factor):
  return blend(grayscale(x)[..., None], x, _per_crop(factor, x))


def _two_sum(a, b):
  """a + b = s + e exactly (Knuth's TwoSum, no fused multiply-add needed)."""
  s = a + b
  bb = s - a
  return s, (a - (s - bb)) + (b - bb)


def _floor255(x):
  """floor(255 * x) exactly for float32 x in [0, 1): 255x = 256x - x with the rounding error kept."""
  s, e = _two_sum(x * 256, -x)
  k = jnp.floor(s)
  return (k - jnp.where((s == k) & (e < 0), 1, 0)).astype(jnp.int32)


def rgb_to_hsv(x):
  """Pillow's `convert('HSV')` (Convert.c rgb2hsv): uint8 H, S, V with its float/double rounding."""
  r, g, b = x[..., 0], x[..., 1], x[..., 2]
  maxc = jnp.maximum(r, jnp.maximum(g, b))
  minc = jnp.minimum(r, jnp.minimum(g, b))
  grey = maxc == minc
  f32 = jnp.float32
  cr = jnp.where(grey, 1, maxc - minc).astype(f32)
  s = cr / jnp.maximum(maxc, 1).astype(f32)
  rc, gc, bc = ((maxc - c).astype(f32) / cr for c in (r, g, b))
  # C evaluates 2.0 + rc - bc (and 4.0 + gc - rc) in double and rounds once to float.
  g_max = g == maxc
  s1, e1 = _two_sum(jnp.where(g_max, f32(2), f32(4)), jnp.where(g_max, rc, gc))
  s2, e2 = _two_sum(s1, -jnp.where(g_max, bc, rc))
  h = jnp.where(r == maxc, bc - gc, s2 + (e1 + e2))
  h = _exact_div(h, 6.0)
  h = jnp.where(h < 0, h + 1, h)  # fmod(h / 6 + 1, 1)
  hue = jnp.where(grey, 0, jnp.clip(_floor255(h), 0, 255))
  sat = jnp.where(grey, 0, jnp.clip(_floor255(s), 0, 255))
  return hue, sat, maxc


def hsv_to_rgb(h, s, v):
  """Pillow's `convert('RGB')` from HSV (Convert.c hsv2rgb), in exact integer arithmetic.

  C computes p = round(v (1 - s/255)), q = round(v (1 - s/255 f)), t = round(v (1 - s/255 (1 - f)))
  with f = (6h mod 255) / 255, in double on float-rounded s/255 and f. The exact rationals
  give the same rounding for all 2^24 inputs (none lies close to a half-integer), and int32 holds
  them (< 2^25).
  """
  # Operands are non-negative: lax.div/rem (truncating) equal floor division and modulo, and
  # skip jnp's sign handling.
  sector = lax.div(6 * h, 255)
  n = 6 * h - 255 * sector
  sector = lax.rem(sector, 6)
  rnd = lambda num, den: lax.div(2 * num + den, 2 * den)  # round half up; no exact ties occur
  p = rnd(v * (255 - s), 255)
  q = rnd(v * (65025 - s * n), 65025)
  t = rnd(v * (65025 - s * (255 - n)), 65025)
  cases = [sector == k for k in range(5)]  # sector 5 is the default
  r = jnp.select(cases, [v, q, p, p, t], v)
  g = jnp.select(cases, [t, v, v, q, p], p)
  b = jnp.select(cases, [p, p, t, v, v], q)
  return jnp.stack([r, g, b], -1)


def hue_shift(hue_factor):
  """torchvision's uint8(hue_factor * 255): truncation toward zero, then wrap-around mod 256."""
  return jnp.trunc(hue_factor * 255).astype(jnp.int32) % 256


def adjust_hue(x, hue_factor):
  """torchvision's adjust_hue on PIL: shift Pillow's uint8 hue, convert back (lossy even for 0)."""
  h, s, v = rgb_to_hsv(x)
  h = lax.rem(h + hue_shift(hue_factor)[..., None, None], 256)
  return hsv_to_rgb(h, s, v)


def solarize(x):
  """`ImageOps.solarize(img, 128)`: pixels >= 128 are inverted."""
  return jnp.where(x >= 128, 255 - x, x)


def box_blur_radius(sigma):
  """Pillow's `_gaussian_blur_radius(sigma, 3)`: the extended-box radius whose three passes
  approximate a Gaussian of standard deviation `sigma` (Gwosdek et al. 2011), in float32."""
  sigma = jnp.asarray(sigma, jnp.float32)
  sigma2 = _exact_div(sigma * sigma, 3.0)
  length = jnp.sqrt(_mul(sigma2, 12.0) + 1)  # C: sqrt in double, stored as float
  l = jnp.floor((length - 1) / 2)
  a = (2 * l + 1) * (l * (l + 1) - _mul(sigma2, 3.0))
  a = a / (6 * (sigma2 - (l + 1) * (l + 1)))
  return l + a


def _box_weights(radius):
  """Pillow's 8.24 fixed-point weights: `ww` for the 2r+1 inner taps, `fw` for the two outer ones."""
  r = radius.astype(jnp.int32)  # C: (int)floatRadius
  ww = ((2.0 ** 24) / (radius * 2 + 1)).astype(jnp.uint32)  # float division, then truncation
  fw = (jnp.uint32(1 << 24) - (2 * r + 1).astype(jnp.uint32) * ww) >> 1
  return r, ww, fw


def _max_taps(max_sigma):
  """Outermost tap with a non-zero weight for sigma <= max_sigma: int(radius) + 1 (radius grows
  with sigma); computed in float64 on the host, with a margin for float32 rounding."""
  sigma2 = max_sigma ** 2 / 3
  l = math.floor((math.sqrt(12 * sigma2 + 1) - 1) / 2)
  radius = l + (2 * l + 1) * (l * (l + 1) - 3 * sigma2) / (6 * (sigma2 - (l + 1) ** 2))
  return int(math.floor(radius + 1e-4)) + 1


def gaussian_blur(x, sigma, max_sigma=2.0):
  """`img.filter(ImageFilter.GaussianBlur(sigma))`: 3 box passes along W, then 3 along H.

  Each pass is out[i] = (ww * sum_{|k|<=r} in[i+k] + fw * (in[i-r-1] + in[i+r+1]) + 2^23) >> 24
  with edge pixels repeated, in uint32 as Pillow's BoxBlur.c. `max_sigma` bounds the per-crop
  sigmas (static: it sets the filter length).
  """
  taps = _max_taps(max_sigma)
  r, ww, fw = _box_weights(box_blur_radius(sigma))
  r = r[..., None, None, None]
  zero = jnp.uint32(0)
  weights = [jnp.where(abs(k) <= r, ww[..., None, None, None],
                       jnp.where(abs(k) == r + 1, fw[..., None, None, None], zero))
             for k in range(-taps, taps + 1)]

  def one_pass(y, axis):
    size = y.shape[axis]
    widths = [(0, 0)] * y.ndim
    widths[axis] = (taps, taps)
    padded = jnp.pad(y, widths, mode='edge').astype(jnp.uint32)
    acc = jnp.uint32(1 << 23)
    for i, w in enumerate(weights):
      acc = acc + lax.slice_in_dim(padded, i, i + size, axis=axis) * w
    return (acc >> 24).astype(jnp.int32)

  y = lax.fori_loop(0, 3, lambda _, y: one_pass(y, x.ndim - 2), x)  # along W
  return lax.fori_loop(0, 3, lambda _, y: one_pass(y, x.ndim - 3), y)  # then along H


def normalize(x, mean, std, dtype=jnp.float32):
  """ToTensor + Normalize: (x / 255 - mean) / std, in float32, then cast."""
  y = _exact_div(x.astype(jnp.float32), 255.0)
  y = y - jnp.asarray(mean, jnp.float32)
  return (y / jnp.where(jnp.isnan(y), 1.0, jnp.asarray(std, jnp.float32))).astype(dtype)


# ---- random application --------------------------------------------------------------------------


def sample_params(key, shape, *, jitter, jitter_p, gray_p, blur_p, blur_sigma, solarize_p):
  """Independent per-crop draws, the distributions of the official transforms.

  jitter (b, c, s, h): factors uniform in [max(0, 1 - x), 1 + x] (hue in [-h, h]), applied in a
  random order with probability `jitter_p`; `blur_p` and `solarize_p` broadcast against `shape`.
  """
  # One draw of 13 uniforms per crop: a single random-bits computation compiles much faster
  # than one per parameter.
  u = jax.random.uniform(key, shape + (13,))
  b, c, s, h = (float(v) for v in jitter)
  lows = jnp.array([max(0.0, 1 - b), max(0.0, 1 - c), max(0.0, 1 - s), -h], jnp.float32)
  highs = jnp.array([1 + b, 1 + c, 1 + s, h], jnp.float32)
  per_crop = lambda p: jnp.broadcast_to(jnp.asarray(p, jnp.float32), shape)
  return {
      'jitter': u[..., 0] < jitter_p,
      'order': jnp.argsort(u[..., 1:5], axis=-1),  # a uniformly random permutation
      'factors': lows + (highs - lows) * u[..., 5:9],
      'gray': u[..., 9] < gray_p,
      'blur': u[..., 10] < per_crop(blur_p),
      'sigma': blur_sigma[0] + (blur_sigma[1] - blur_sigma[0]) * u[..., 11],
      'solarize': u[..., 12] < per_crop(solarize_p),
  }


def apply(x, params, *, hue=True, max_sigma=2.0):
  """Colour jitter (random order) -> grayscale -> blur -> solarise on uint8 crops [..., H, W, 3].

  `hue=False` leaves out the hue step (torchvision skips it when its strength is 0; it is not
  the identity, PIL's HSV round trip is lossy).
  """
  y = x.astype(jnp.int32)
  order = params['order']
  # Each crop meets the hue op exactly once: run the blend ops before it, hue once, then the
  # blend ops after it (hue is the costly op; this avoids computing it at all four steps).
  hue_step = jnp.argmax(order == 3, axis=-1)

  def blend_step(step, image, after):
    op = lax.dynamic_index_in_dim(order, step, -1, keepdims=False)
    factor = jnp.take_along_axis(params['factors'], op[..., None], -1)[..., 0]
    grey = grayscale(image)
    degenerate = jnp.where(_per_crop(op == 0, image), 0, jnp.where(
        _per_crop(op == 1, image), _mean_grey(grey)[..., None, None, None], grey[..., None]))
    blended = blend(degenerate, image, _per_crop(factor, image))
    active = (step > hue_step) if after else (step < hue_step)
    return jnp.where(_per_crop(active, image), blended, image)

  jittered = lax.fori_loop(0, 4, lambda i, im: blend_step(i, im, after=False), y)
  if hue:
    jittered = adjust_hue(jittered, params['factors'][..., 3])
  jittered = lax.fori_loop(0, 4, lambda i, im: blend_step(i, im, after=True), jittered)
  y = jnp.where(_per_crop(params['jitter'], y), jittered, y)
  y = jnp.where(_per_crop(params['gray'], y), grayscale(y)[..., None], y)
  y = jnp.where(_per_crop(params['blur'], y), gaussian_blur(y, params['sigma'], max_sigma), y)
  return jnp.where(_per_crop(params['solarize'], y), solarize(y), y)


def augment_params(batch, key, aug):
  """{'global': params, 'local': params}: the per-crop draws `augment` makes for `batch` with `key` (see
  `sample_params`). `aug.blur_p_global` and `aug.solarize_p_global` give one probability per global crop (DINO:
  blur 1.0 / 0.1, solarise 0 / 0.2) or one for all; local crops use `aug.blur_p_local` and `aug.solarize_p_local`."""
  keys = dict(zip(('global', 'local'), jax.random.split(key)))
  probabilities = {'global': (aug.blur_p_global, aug.solarize_p_global),
                   'local': (aug.blur_p_local, aug.solarize_p_local)}
  return {name: sample_params(
      keys[name], batch[name].shape[:-3], jitter=tuple(aug.jitter), jitter_p=aug.jitter_p, gray_p=aug.gray_p,
      blur_p=_probability(probabilities[name][0]), blur_sigma=tuple(aug.blur_sigma),
      solarize_p=_probability(probabilities[name][1]))
      for name in ('global', 'local') if name in batch}


def augment(batch, key, aug):
  """{'global': uint8 [B, n, G, G, 3], 'local': uint8 [B, m, L, L, 3]} -> normalised floats.

  Per-crop randomness from `key` (fold the step in before calling), drawn by `augment_params`.
  """
  dtype = jnp.dtype(aug.dtype)
  return {name: normalize(apply(batch[name], params, hue=float(aug.jitter[3]) > 0,
                                max_sigma=float(aug.blur_sigma[1])), aug.mean, aug.std, dtype)
          for name, params in augment_params(batch, key, aug).items()}


def _probability(p):
  """One probability, or one per crop of the group (a tuple from the config)."""
  return float(p) if np.isscalar(p) else tuple(float(v) for v in p)
