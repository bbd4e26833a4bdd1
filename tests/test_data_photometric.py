"""Photometric ops on the accelerator vs the Pillow calls torchvision makes, pixel for pixel.

Every op is compared with the PIL operation on the same uint8 crop. The tolerance is zero: our
ops emulate Pillow's integer and float32 arithmetic (see photometric.py), and these tests hold
them to identical pixels on CPU.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest
import torch
from sklearn.datasets import load_sample_image

from configs import common
from dino_jax.data import photometric as P
from tests.torch_ref import augment as ref


@pytest.fixture(scope='module')
def crops():
  """12 natural 48x40 crops (two sample photos) and one of uniform noise, uint8 [13, 40, 48, 3]."""
  rng = np.random.default_rng(0)
  out = []
  for name in ('china.jpg', 'flower.jpg'):
    photo = load_sample_image(name)
    for _ in range(6):
      top, left = rng.integers(0, 280), rng.integers(0, 480)
      crop = Image.fromarray(photo[top:top + 140, left:left + 150])
      out.append(np.asarray(crop.resize((48, 40), Image.BICUBIC)))
  out.append(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8))
  return np.stack(out)


def pil_each(fn, images, *args):
  return np.stack([np.asarray(fn(Image.fromarray(img), *(float(a[i]) for a in args)))
                   for i, img in enumerate(images)])


def assert_pixels_equal(ours, theirs):
  ours = np.asarray(ours)
  assert ours.shape == theirs.shape
  if np.array_equal(ours, theirs):
    return
  diff = np.abs(ours.astype(int) - theirs.astype(int))
  assert diff.max() == 0, f'{np.count_nonzero(diff)} of {diff.size} values differ, max {diff.max()}'


def test_rgb_hsv_conversions_match_pillow_for_every_colour():
  levels = np.arange(256, dtype=np.uint8)
  image = np.empty((256, 256, 256, 3), np.uint8)  # image[r, g, b] = (r, g, b)
  image[..., 0], image[..., 1], image[..., 2] = (levels[:, None, None], levels[None, :, None],
                                                 levels[None, None, :])
  image = image.reshape(4096, 4096, 3)
  hsv = np.asarray(Image.fromarray(image, 'RGB').convert('HSV'))
  # uint8 in, int32 inside the jit: a quarter of the transfer.
  ours = jax.jit(lambda x: jnp.stack(P.rgb_to_hsv(x.astype(jnp.int32)), -1))(image)
  assert_pixels_equal(ours, hsv)
  back = np.asarray(Image.fromarray(image, 'HSV').convert('RGB'))  # every (h, s, v) triple
  ours = jax.jit(lambda x: P.hsv_to_rgb(*(x[..., i].astype(jnp.int32) for i in range(3))))(image)
  assert_pixels_equal(ours, back)


FACTORS = [0.0, 0.6, 1.0, 1.2, 1.4, 2.0]


@pytest.mark.parametrize('name', ['brightness', 'contrast', 'saturation'])
def test_enhance_ops_match_pillow_with_fixed_and_random_factors(crops, name):
  ours_fn = {'brightness': P.adjust_brightness, 'contrast': P.adjust_contrast,
             'saturation': P.adjust_saturation}[name]
  ref_fn = {'brightness': ref.adjust_brightness, 'contrast': ref.adjust_contrast,
            'saturation': ref.adjust_saturation}[name]
  rng = np.random.default_rng(1)
  for factors in ([FACTORS[i % len(FACTORS)] for i in range(len(crops))],
                  rng.uniform(0.0, 1.8, len(crops))):
    factors = np.asarray(factors, np.float32)  # torchvision's factors are float32 draws
    ours = jax.jit(ours_fn)(jnp.asarray(crops, jnp.int32), jnp.asarray(factors))
    assert_pixels_equal(ours, pil_each(ref_fn, crops, factors))


def test_hue_matches_torchvision_adjust_hue(crops):
  # Includes |factor| < 1/255 (shift 0: PIL's lossy HSV round trip still changes pixels),
  # negative factors (wrap-around), and the extremes +-0.5.
  factors = np.array([0.0, 0.001, -0.003, 0.1, -0.1, 0.5, -0.5, 0.25, -0.37, 0.05, -0.05, 0.3,
                      -0.2], np.float32)
  ours = jax.jit(P.adjust_hue)(jnp.asarray(crops, jnp.int32), jnp.asarray(factors))
  theirs = pil_each(ref.adjust_hue, crops, factors)
  assert not np.array_equal(theirs[0], crops[0])  # the round trip is not the identity
  assert_pixels_equal(ours, theirs)


def test_grayscale_and_solarize_match_pillow(crops):
  x = jnp.asarray(crops, jnp.int32)
  grey = jax.jit(P.grayscale)(x)
  assert_pixels_equal(jnp.repeat(grey[..., None], 3, -1), pil_each(ref.grayscale3, crops))
  assert_pixels_equal(jax.jit(P.solarize)(x), pil_each(ref.solarize, crops))


def test_gaussian_blur_matches_pillow_box_blur_exactly(crops):
  # sigma spans DINO's U(0.1, 2), including both sides of sqrt(2), where Pillow's box radius
  # moves from l = 0 to l = 1.
  sigmas = np.array([0.1, 0.3, 0.5, 0.77, 1.0, 1.3, 1.4142, 1.4143, 1.6, 1.9, 2.0, 0.1234, 1.05],
                    np.float32)
  ours = jax.jit(P.gaussian_blur)(jnp.asarray(crops, jnp.int32), jnp.asarray(sigmas))
  assert_pixels_equal(ours, pil_each(ref.gaussian_blur, crops, sigmas))
  rng = np.random.default_rng(2)
  for shape in [(1, 1), (1, 6), (3, 2), (5, 7)]:  # images smaller than the box
    tiny = rng.integers(0, 256, (len(sigmas),) + shape + (3,), dtype=np.uint8)
    ours = jax.jit(P.gaussian_blur)(jnp.asarray(tiny, jnp.int32), jnp.asarray(sigmas))
    assert_pixels_equal(ours, pil_each(ref.gaussian_blur, tiny, sigmas))


def test_normalize_matches_to_tensor_and_normalize(crops):
  ours = np.asarray(P.normalize(jnp.asarray(crops), ref.IMAGENET_MEAN, ref.IMAGENET_STD))
  theirs = np.stack([ref.to_tensor_normalize(Image.fromarray(c)).permute(1, 2, 0).numpy()
                     for c in crops])
  np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-6)
  bf16 = P.normalize(jnp.asarray(crops), ref.IMAGENET_MEAN, ref.IMAGENET_STD, jnp.bfloat16)
  assert bf16.dtype == jnp.bfloat16


def test_random_pipeline_matches_the_official_chain_given_the_same_draws(crops):
  """Jitter in random order (p) -> grayscale (p) -> blur (p) -> solarise (p), as torchvision
  composes them, with our sampled parameters replayed through the PIL calls."""
  aug = common.dino_defaults().aug
  params = P.sample_params(jax.random.key(3), (len(crops),), jitter=aug.jitter, jitter_p=0.7,
                           gray_p=0.3, blur_p=0.6, blur_sigma=aug.blur_sigma, solarize_p=0.4)
  ours = np.asarray(jax.jit(P.apply)(jnp.asarray(crops), params))
  p = jax.tree.map(np.asarray, params)
  expected = []
  for i, crop in enumerate(crops):
    img = Image.fromarray(crop)
    if p['jitter'][i]:
      img = ref.color_jitter(img, [int(k) for k in p['order'][i]],
                             [float(f) for f in p['factors'][i]])
    if p['gray'][i]:
      img = ref.grayscale3(img)
    if p['blur'][i]:
      img = ref.gaussian_blur(img, float(p['sigma'][i]))
    if p['solarize'][i]:
      img = ref.solarize(img)
    expected.append(np.asarray(img))
  # Every branch is exercised at least once in these 13 crops.
  for k in ('jitter', 'gray', 'blur', 'solarize'):
    assert 0 < p[k].sum() < len(crops), k
  assert_pixels_equal(ours, np.stack(expected))


def test_sampled_parameters_follow_the_official_distributions():
  aug = common.dino_defaults().aug
  n = 20000
  p = jax.tree.map(np.asarray, P.sample_params(
      jax.random.key(0), (n, 2), jitter=aug.jitter, jitter_p=aug.jitter_p, gray_p=aug.gray_p,
      blur_p=aug.blur_p_global, blur_sigma=aug.blur_sigma, solarize_p=aug.solarize_p_global))
  tol = 0.02  # > 4 standard errors at n = 20000
  assert abs(p['jitter'].mean() - 0.8) < tol and abs(p['gray'].mean() - 0.2) < tol
  np.testing.assert_allclose(p['blur'].mean(0), [1.0, 0.1], atol=tol)
  np.testing.assert_allclose(p['solarize'].mean(0), [0.0, 0.2], atol=tol)
  assert np.all(np.sort(p['order'], -1) == np.arange(4))  # a permutation per crop
  assert abs((p['order'][..., 0] == 3).mean() - 0.25) < tol  # each op first 1/4 of the time
  lo, hi = p['factors'].min((0, 1)), p['factors'].max((0, 1))
  np.testing.assert_allclose(lo, [0.6, 0.6, 0.8, -0.1], atol=1e-3)
  np.testing.assert_allclose(hi, [1.4, 1.4, 1.2, 0.1], atol=1e-3)
  assert 0.1 <= p['sigma'].min() and p['sigma'].max() <= 2.0
  assert abs(p['sigma'].mean() - 1.05) < tol
  # SwAV: one probability for every crop of a group, stronger jitter.
  swav = common.swav_defaults().aug
  p = jax.tree.map(np.asarray, P.sample_params(
      jax.random.key(1), (n, 2), jitter=swav.jitter, jitter_p=swav.jitter_p, gray_p=swav.gray_p,
      blur_p=swav.blur_p_global, blur_sigma=swav.blur_sigma, solarize_p=swav.solarize_p_global))
  np.testing.assert_allclose(p['blur'].mean(0), [0.5, 0.5], atol=tol)
  assert not p['solarize'].any()
  np.testing.assert_allclose(p['factors'].min((0, 1)), [0.2, 0.2, 0.2, -0.2], atol=1e-3)
  np.testing.assert_allclose(p['factors'].max((0, 1)), [1.8, 1.8, 1.8, 0.2], atol=1e-3)


# The statistics test's batch: DINO's augmentation is compiled once for the two tests that use it.
N_DRAWS, GLOBAL_SIZE, LOCAL_SIZE = 400, 32, 16


@functools.cache
def dino_augment():
  aug = common.dino_defaults().aug
  return jax.jit(lambda batch, key: P.augment(batch, key, aug))


def test_augment_batch_shapes_dtypes_and_determinism():
  rng = np.random.default_rng(0)
  batch = {'global': rng.integers(0, 256, (N_DRAWS, 2, GLOBAL_SIZE, GLOBAL_SIZE, 3), dtype=np.uint8),
           'local': rng.integers(0, 256, (N_DRAWS, 2, LOCAL_SIZE, LOCAL_SIZE, 3), dtype=np.uint8)}
  fn = dino_augment()
  a = fn(batch, jax.random.key(1))
  assert a['global'].shape == batch['global'].shape and a['local'].shape == batch['local'].shape
  assert a['global'].dtype == a['local'].dtype == jnp.float32
  np.testing.assert_array_equal(a['global'], fn(batch, jax.random.key(1))['global'])
  assert not np.array_equal(a['global'], fn(batch, jax.random.key(2))['global'])
  # Per-crop randomness: identical input crops come out differently. A local crop is left alone
  # with probability 0.2 (no jitter) * 0.8 (no grey) * 0.5 (no blur) = 8%; global crop 2 likewise
  # (blur 0.1, solarise 0.2): 11.5%; global crop 1 is always blurred, sigma differing per crop.
  same = {k: np.broadcast_to(v[:1, :1], v.shape) for k, v in batch.items()}
  out = fn(same, jax.random.key(5))
  for name in ('global', 'local'):
    crops = np.asarray(out[name]).reshape((-1,) + out[name].shape[2:])
    assert len({c.tobytes() for c in crops}) >= 0.75 * len(crops), name


def test_zero_probabilities_reduce_to_normalisation_and_gray_p_one_to_grey(crops):
  # The crops' shape (and P.apply's defaults) of the random-chain test: one compilation for both.
  sample = lambda key, gray_p: P.sample_params(
      key, (len(crops),), jitter=(0.4, 0.4, 0.2, 0.1), jitter_p=0.0, gray_p=gray_p, blur_p=0.0,
      blur_sigma=(0.1, 2.0), solarize_p=0.0)
  apply = jax.jit(P.apply)
  np.testing.assert_array_equal(apply(jnp.asarray(crops), sample(jax.random.key(0), 0.0)), crops)
  grey = np.asarray(apply(jnp.asarray(crops), sample(jax.random.key(0), 1.0)))
  assert_pixels_equal(grey, pil_each(ref.grayscale3, crops))


def test_whole_augmentation_statistics_match_data_augmentation_dino():
  """Our CPU crops + accelerator photometry vs the rebuilt official DataAugmentationDINO on one
  photo, 400 draws each (small crop sizes to stay fast): the distributions agree."""
  from dino_jax.data.multicrop import CropGroup, MultiCrop

  photo = Image.fromarray(load_sample_image('china.jpg')).resize((80, 60), Image.BICUBIC)
  data = np.asarray(photo)
  n, torch_rng = N_DRAWS, torch.manual_seed(0)
  official = ref.DataAugmentationDINO((0.4, 1.0), (0.05, 0.4), 2, global_size=GLOBAL_SIZE,
                                      local_size=LOCAL_SIZE)
  theirs = [official(photo) for _ in range(n)]
  theirs = {'global': np.stack([[t.permute(1, 2, 0).numpy() for t in crops[:2]] for crops in theirs]),
            'local': np.stack([[t.permute(1, 2, 0).numpy() for t in crops[2:]] for crops in theirs])}
  multi = MultiCrop((CropGroup('global', GLOBAL_SIZE, 2, (0.4, 1.0)),
                     CropGroup('local', LOCAL_SIZE, 2, (0.05, 0.4))))
  rng = np.random.default_rng(0)
  crops = [multi({'image': data}, rng) for _ in range(n)]
  batch = {k: np.stack([c[k] for c in crops]) for k in ('global', 'local')}
  ours = dino_augment()(batch, jax.random.key(0))
  assert ours['global'].dtype == ours['local'].dtype == jnp.float32
  ours = jax.tree.map(np.asarray, ours)
  del torch_rng
  for group in ('global', 'local'):
    for crop in range(2):
      a, b = ours[group][:, crop], theirs[group][:, crop]
      # Per-crop summaries: mean level, contrast, sharpness (neighbour differences: blur),
      # greyness (R == G == B before normalising).
      def summary(x):
        raw = x * np.float32(ref.IMAGENET_STD) + np.float32(ref.IMAGENET_MEAN)
        grey = np.all(np.abs(raw[..., 0] - raw[..., 1]) < 1e-4, axis=(1, 2))
        sharp = np.abs(np.diff(x, axis=2)).mean((1, 2, 3))
        return x.mean((1, 2, 3)), x.std((1, 2, 3)), sharp, grey
      *stats_a, ga = summary(a)
      *stats_b, gb = summary(b)
      where = f'{group} crop {crop}'
      # Tolerances ~4 standard errors of the difference at n = 400.
      for name, u, v in zip(('mean', 'std', 'sharpness'), stats_a, stats_b):
        assert abs(u.mean() - v.mean()) < 4 * np.sqrt((u.var() + v.var()) / n), (where, name)
      assert abs(ga.mean() - gb.mean()) < 0.09, where


def _knob_aug():
  """Photometric settings with every knob away from the DINO and SwAV defaults; the global crops' blur and
  solarisation probabilities are 0 or 1 so that which crop gets which is checked exactly."""
  aug = common.dino_defaults().aug
  aug.jitter, aug.jitter_p, aug.gray_p = (0.3, 0.5, 0.7, 0.15), 0.6, 0.35
  aug.blur_p_global, aug.blur_p_local, aug.blur_sigma = (1.0, 0.0), 0.5, (0.2, 1.5)
  aug.solarize_p_global, aug.solarize_p_local = (0.0, 1.0), 0.3
  aug.mean, aug.std = (0.3, 0.5, 0.45), (0.2, 0.25, 0.3)
  return aug


def test_augment_replays_through_the_official_pil_chain_group_by_group(crops):
  """`augment`, the path the train step uses, crop by crop against the PIL chain torchvision runs (jitter in the
  drawn order -> grayscale -> blur -> solarise -> ToTensor + Normalize with the config's mean and std), with the
  parameters `augment` drew for each crop of each group (`augment_params`, same key); and those parameters follow
  the config: per-crop probabilities of the global group exactly, the others in distribution."""
  aug = _knob_aug()
  batch = {'global': np.stack([crops[:6], crops[6:12]], axis=1),            # [6, 2, 40, 48, 3]
           'local': np.stack([crops[1:7, :24, :24], crops[7:13, 8:32, 12:36]], axis=1)}
  key = jax.random.key(7)
  out = jax.tree.map(np.asarray, jax.jit(lambda b, k: P.augment(b, k, aug))(batch, key))
  params = jax.tree.map(np.asarray, P.augment_params(batch, key, aug))
  for group in ('global', 'local'):
    p = params[group]
    expected = np.empty(out[group].shape, np.float32)
    for i, j in np.ndindex(*batch[group].shape[:2]):
      img = Image.fromarray(batch[group][i, j])
      if p['jitter'][i, j]:
        img = ref.color_jitter(img, [int(k) for k in p['order'][i, j]], [float(f) for f in p['factors'][i, j]])
      if p['gray'][i, j]:
        img = ref.grayscale3(img)
      if p['blur'][i, j]:
        img = ref.gaussian_blur(img, float(p['sigma'][i, j]))
      if p['solarize'][i, j]:
        img = ref.solarize(img)
      expected[i, j] = ref.to_tensor_normalize(img, aug.mean, aug.std).permute(1, 2, 0).numpy()
    np.testing.assert_allclose(out[group], expected, rtol=1e-6, atol=1e-6, err_msg=group)
  g = params['global']
  assert g['blur'][:, 0].all() and not g['blur'][:, 1].any()
  assert not g['solarize'][:, 0].any() and g['solarize'][:, 1].all()
  assert (params['local']['jitter'] & (np.abs(params['local']['factors'][..., 3]) > 1 / 255)).any()   # hue moves

  # The distributions, on many draws (cheap: no pixels): 4 standard errors.
  many = {'global': np.zeros((4000, 2, 1, 1, 3), np.uint8), 'local': np.zeros((4000, 2, 1, 1, 3), np.uint8)}
  params = jax.tree.map(np.asarray, P.augment_params(many, jax.random.key(8), aug))
  for group, blur_p, solarize_p in (('global', (1.0, 0.0), (0.0, 1.0)), ('local', 0.5, 0.3)):
    p = params[group]
    for name, prob in (('jitter', aug.jitter_p), ('gray', aug.gray_p), ('blur', blur_p), ('solarize', solarize_p)):
      np.testing.assert_allclose(p[name].mean(0), np.broadcast_to(prob, (2,)), atol=4 * np.sqrt(0.25 / 8000),
                                 err_msg=f'{group} {name}')
    b, c, s, h = aug.jitter
    np.testing.assert_allclose(p['factors'].min((0, 1)), [1 - b, 1 - c, 1 - s, -h], atol=2e-3)
    np.testing.assert_allclose(p['factors'].max((0, 1)), [1 + b, 1 + c, 1 + s, h], atol=2e-3)
    np.testing.assert_allclose([p['sigma'].min(), p['sigma'].max()], aug.blur_sigma, atol=2e-3)
