"""Multi-crop geometry: torchvision's RandomResizedCrop boxes and PIL-exact crops, draft decoding."""
import io

import numpy as np
from PIL import Image
import pytest
import torch
from sklearn.datasets import load_sample_image

from dino_jax.data import multicrop
from dino_jax.data.multicrop import CropGroup, MultiCrop, random_resized_crop_box
from tests.torch_ref import augment as ref


def _jpeg(width, height, quality=90):
  photo = Image.fromarray(load_sample_image('china.jpg')).resize((width, height), Image.BICUBIC)
  buf = io.BytesIO()
  photo.save(buf, 'JPEG', quality=quality)
  return buf.getvalue()


def test_fallback_is_torchvisions_central_crop():
  # No box of >= 99% of a 1000x100 image has a ratio <= 4/3: all 10 tries fail (hand-derived).
  rng = np.random.default_rng(0)
  assert random_resized_crop_box(1000, 100, (0.99, 1.0), (3 / 4, 4 / 3), rng) == (0, 433, 100, 133)
  assert random_resized_crop_box(100, 1000, (0.99, 1.0), (3 / 4, 4 / 3), rng) == (433, 0, 133, 100)
  # A 1x1 image: boxes round to zero width, the fallback is the whole pixel.
  assert random_resized_crop_box(1, 1, (0.05, 0.4), (3 / 4, 4 / 3), rng) == (0, 0, 1, 1)


@pytest.mark.parametrize('scale', [(0.05, 0.4), (0.4, 1.0)])
def test_box_distribution_matches_torchvision(scale):
  """Same algorithm, different RNGs: the box statistics agree with the torch-RNG reference."""
  width, height, n = 500, 375, 3000
  rng = np.random.default_rng(1)
  torch.manual_seed(1)
  ours = np.array([random_resized_crop_box(width, height, scale, (3 / 4, 4 / 3), rng) for _ in range(n)])
  theirs = np.array([ref.rrc_params(width, height, scale) for _ in range(n)])
  for boxes in (ours, theirs):
    top, left, h, w = boxes.T
    assert np.all((top >= 0) & (left >= 0) & (top + h <= height) & (left + w <= width))
  def stats(boxes):
    top, left, h, w = boxes.T.astype(np.float64)
    return np.array([(h * w).mean() / (width * height), np.log(w / h).mean(),
                     (left + w / 2).mean() / width, (top + h / 2).mean() / height])
  a, b = stats(ours), stats(theirs)
  # Standard errors of these means are < 0.01 at n=3000; 0.03 is ~4 sigma.
  np.testing.assert_allclose(a, b, atol=0.03)
  area = ours[:, 2] * ours[:, 3] / (width * height)
  assert area.min() >= scale[0] * 0.95 and area.max() <= scale[1] * 1.05


def _replay(groups, width, height, seed, flip=True):
  """The boxes and flips MultiCrop draws from `default_rng(seed)`: boxes, then flips, per group."""
  rng = np.random.default_rng(seed)
  plan = []
  for g in groups:
    boxes = [random_resized_crop_box(width, height, g.scale, g.ratio, rng) for _ in range(g.number)]
    flips = rng.random(g.number) < 0.5 if flip else [False] * g.number
    plan.append((g, boxes, flips))
  return plan


@pytest.mark.parametrize('interpolation,pil_filter', [('bicubic', Image.BICUBIC), ('bilinear', Image.BILINEAR)])
def test_crops_are_pixel_identical_to_the_official_pil_calls(interpolation, pil_filter):
  data = _jpeg(200, 150)
  groups = (CropGroup('global', 64, 2, (0.4, 1.0)), CropGroup('local', 24, 5, (0.05, 0.4)))
  out = MultiCrop(groups, interpolation=interpolation)({'image': data, 'label': 7}, np.random.default_rng(3))
  assert out['global'].shape == (2, 64, 64, 3) and out['local'].shape == (5, 24, 24, 3)
  assert out['global'].dtype == np.uint8 and out['label'] == 7
  image = ref.pil_loader(data)
  for g, boxes, flips in _replay(groups, 200, 150, seed=3):
    for n, (box, flip) in enumerate(zip(boxes, flips)):
      expected = ref.resized_crop(image, *box, g.size, pil_filter)
      expected = ref.hflip(expected) if flip else expected
      np.testing.assert_array_equal(out[g.name][n], np.asarray(expected), err_msg=f'{g.name} {n}')


def test_flip_is_a_fair_coin_and_can_be_disabled():
  data = {'image': np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)}
  groups = (CropGroup('global', 16, 200, (1.0, 1.0), (1.0, 1.0)),)  # whole image: crops differ only by flips
  out = MultiCrop(groups)(data, np.random.default_rng(0))['global']
  flipped = np.array([not np.array_equal(c, out[0]) for c in out])
  assert 0.35 < flipped.mean() < 0.65
  np.testing.assert_array_equal(out[flipped][0], out[0][:, ::-1])
  plain = MultiCrop(groups, flip=False)(data, np.random.default_rng(0))['global']
  assert all(np.array_equal(c, plain[0]) for c in plain)


def test_draft_decodes_large_jpegs_at_reduced_scale_with_close_pixels():
  data = _jpeg(1600, 1200)
  groups = (CropGroup('global', 96, 2, (0.4, 1.0)), CropGroup('local', 32, 4, (0.05, 0.4)))
  record = {'image': data, 'label': 0}
  image = Image.open(io.BytesIO(data))
  plan = _replay(groups, 1600, 1200, seed=5)
  k = min(min(h, w) // g.size for g, boxes, _ in plan for (_, _, h, w) in boxes)
  assert k >= 2
  reduce = MultiCrop(groups)._draft(image, plan)
  assert reduce == min(8, 2 ** int(np.log2(k))) and image.size == (1600 // reduce, 1200 // reduce)
  fast = MultiCrop(groups, draft=True)(record, np.random.default_rng(5))
  exact = MultiCrop(groups, draft=False)(record, np.random.default_rng(5))
  for name in ('global', 'local'):
    diff = np.abs(fast[name].astype(int) - exact[name].astype(int))
    # DCT-domain downscaling vs a full decode + antialiased bicubic: same picture, small noise.
    assert diff.mean() < 2.0, (name, diff.mean())


def test_draft_never_triggers_when_a_crop_is_near_its_output_size():
  data = _jpeg(500, 375)
  groups = (CropGroup('global', 224, 2, (0.4, 1.0)),)
  image = Image.open(io.BytesIO(data))
  assert MultiCrop(groups)._draft(image, _replay(groups, 500, 375, seed=0)) == 1
  assert image.size == (500, 375)


def test_center_crop_matches_the_official_eval_transform():
  for w, h in [(200, 150), (150, 200), (64, 64), (40, 90)]:
    data = _jpeg(w, h)
    ours = multicrop.CenterCrop(56, 64)({'image': data, 'label': 1})
    expected = ref.eval_transform(ref.pil_loader(data), resize_size=64, image_size=56)
    np.testing.assert_array_equal(ours['image'], np.asarray(expected), err_msg=f'{w}x{h}')
  # Crop larger than the resized image: zero padding, like torchvision's center_crop.
  data = _jpeg(90, 40)
  ours = multicrop.CenterCrop(72, 48)({'image': data})
  expected = ref.center_crop(ref.resize_shorter(ref.pil_loader(data), 48), 72)
  np.testing.assert_array_equal(ours['image'], np.asarray(expected))


def test_unknown_interpolation_is_rejected():
  with pytest.raises(ValueError, match='bicubic'):
    MultiCrop((), interpolation='cubic')


class _Scripted:
  """The same stream of uniform numbers for both samplers: `uniform(lo, hi)` (numpy's Generator method, and the
  reference's torch uniform_) and `integers(lo, hi)` (hi excluded, as numpy's and torch.randint)."""

  def __init__(self, seed):
    self._u = np.random.default_rng(seed)

  def uniform(self, lo, hi):
    return lo + (hi - lo) * self._u.random()

  def integers(self, lo, hi):
    return lo + int(self._u.random() * (hi - lo))


def test_boxes_equal_torchvisions_for_the_same_draws():
  """Our RandomResizedCrop box and torchvision's get_params fed the same uniform draws give the same box, for image
  shapes from 1x1 to 1000x100, both crop scales, and boxes that hit torchvision's central fallback."""
  shapes = [(500, 375), (375, 500), (64, 64), (1000, 100), (100, 1000), (7, 3), (1, 1), (33, 97)]
  fallbacks = 0
  for n, (width, height) in enumerate(shapes):
    for scale in [(0.05, 0.4), (0.4, 1.0), (0.14, 1.0), (0.95, 1.0)]:
      for trial in range(60):
        seed = [n, int(scale[0] * 100), trial]
        ours = random_resized_crop_box(width, height, scale, (3 / 4, 4 / 3), _Scripted(seed))
        draws = _Scripted(seed)
        theirs = ref.rrc_params(width, height, scale, uniform=draws.uniform, randint=draws.integers)
        assert ours == theirs, (width, height, scale, trial, ours, theirs)
        top, left, h, w = ours
        fallbacks += (top, left) == ((height - h) // 2, (width - w) // 2) and (h, w) != (height, width)
  assert fallbacks > 0   # the fallback branch was reached and agreed
