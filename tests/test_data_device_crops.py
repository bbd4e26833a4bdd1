"""data.crop_on='device': Pillow's resize in jax (resize.py), the workers' plan (decode.py), the same crops as the cpu
path, and a training run on a folder of real JPEGs."""
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_sample_image

from dino_jax.data import decode, multicrop, resize

FILTERS = {'bicubic': Image.Resampling.BICUBIC, 'bilinear': Image.Resampling.BILINEAR}


def photos():
  return [load_sample_image(name) for name in ('china.jpg', 'flower.jpg')]  # 427 x 640 real photos


def _compare(got, ref):
  d = np.abs(np.asarray(got, np.int32) - np.asarray(ref, np.int32))
  return d.max(), (d == 0).mean()


@pytest.mark.parametrize('kind', ['bicubic', 'bilinear'])
def test_resize_matches_pillow_on_real_photos(kind):
  """img.crop(box).resize(size) (torchvision's crop) and img.resize(size, box=...) (the draft path), down- and
  up-scaling, odd sizes, boxes at the border: within one level, at least 99.9 % of the pixels identical."""
  rng = np.random.default_rng(0)
  worst, exact = 0, []
  for image in photos():
    H, W = image.shape[:2]
    pil = Image.fromarray(image)
    for out in (224, 97, 333):
      taps = (resize.max_taps(kind, H, out), resize.max_taps(kind, W, out))
      fn = jax.jit(lambda im, box, out=out, taps=taps: resize.resize_crop(im, box, out, kind, taps))
      boxes = [(0, 0, H, W), (H - 301, W - 77, 301, 77), (0, W - 250, 150, 250), (5, 3, 31, 45)]
      for top, left, h, w in boxes:
        ref = pil.crop((left, top, left + w, top + h)).resize((out, out), FILTERS[kind])
        box = np.stack([resize.axis_box(top, h, top, top + h), resize.axis_box(left, w, left, left + w)])
        m, e = _compare(fn(image, box), ref)
        worst, exact = max(worst, m), exact + [e]
      x0, y0 = rng.uniform(0, W / 2), rng.uniform(0, H / 2)
      x1, y1 = rng.uniform(x0 + 20, W), rng.uniform(y0 + 20, H)
      box32 = np.float32([x0, y0, x1, y1])  # Pillow keeps the box in C floats too
      ref = pil.resize((out, out), FILTERS[kind], box=tuple(float(v) for v in box32))
      box = np.stack([resize.axis_box(0, H, box32[1], box32[3]), resize.axis_box(0, W, box32[0], box32[2])])
      m, e = _compare(fn(image, box), ref)
      worst, exact = max(worst, m), exact + [e]
  assert worst <= 1
  assert np.mean(exact) >= 0.999 and min(exact) >= 0.99, exact


def _jpegs():
  out = []
  for image, size in zip(photos(), ((500, 375), (1400, 1050))):  # ImageNet-sized; large enough for draft decoding
    buf = io.BytesIO()
    Image.fromarray(image).resize(size, Image.Resampling.BICUBIC).save(buf, 'JPEG', quality=90)
    out.append(buf.getvalue())
  return out


@pytest.mark.parametrize('kind,groups', [
    ('bicubic', (multicrop.CropGroup('global', 224, 2, (0.4, 1.0)), multicrop.CropGroup('local', 96, 4, (0.05, 0.4)))),
    ('bilinear', (multicrop.CropGroup('global', 224, 2, (0.14, 1.0)), multicrop.CropGroup('local', 96, 2, (0.05, 0.14)))),
])
def test_device_crops_equal_the_cpu_path_crops(kind, groups):
  """Same seed, same JPEG: the device path's crops (boxes and flips drawn in the workers, cut and resized in jax)
  are the cpu path's within one uint8 level, with and without draft decoding (DINO bicubic, SwAV bilinear)."""
  config = type('Crops', (), {'global_size': 224, 'local_size': 96, 'interpolation': kind})
  cpu = multicrop.MultiCrop(groups, interpolation=kind, flip=True, draft=True)
  device = decode.DeviceMultiCrop(groups, image_size=768, flip=True, draft=True)
  crops = jax.jit(lambda batch: resize.device_crops(batch, config))
  exact = []
  for i, data in enumerate(_jpegs()):
    for seed in range(2):
      want = cpu({'image': data, 'label': 3}, np.random.default_rng([seed, i]))
      element = device({'image': data, 'label': 3}, np.random.default_rng([seed, i]))
      assert element['image'].shape == (768, 768, 3) and element['label'] == 3
      got = crops({k: v[None] for k, v in element.items()})
      for name in ('global', 'local'):
        m, e = _compare(got[name][0], want[name])
        assert m <= 1, (i, seed, name)
        exact.append(e)
  assert np.mean(exact) >= 0.999, exact


def test_images_larger_than_the_pad_are_downscaled_to_fit():
  groups = (multicrop.CropGroup('global', 32, 2, (0.4, 1.0)),)
  element = decode.DeviceMultiCrop(groups, image_size=128, draft=False)(
      {'image': _jpegs()[1], 'label': 0}, np.random.default_rng(0))  # 1400 x 1050 -> 1/16 needed: 1/8 + reduce 2
  assert element['image'].shape == (128, 128, 3)
  rows = element['global_box']
  assert rows.shape == (2, 2, 4) and (rows[:, :, 0] == 0).all()  # box resize on the whole reduced image
  assert rows[0, 1, 1] == 88 and rows[0, 0, 1] == 66 and (rows[:, :, 3] <= rows[:, :, 1]).all()
  assert element['image'][66:].max() == 0 and element['image'][:, 88:].max() == 0 and element['image'].max() > 0


def test_training_on_a_jpeg_folder_through_the_device_path(tmp_path):
  """End to end on CPU: an ImageFolder of real JPEGs, crops cut inside the jitted step; the loss is finite and the
  batches the step received were the device path's."""
  from dino_jax import train
  from tests import helpers

  rng = np.random.default_rng(0)
  for c, image in enumerate(photos()):
    (tmp_path / 'data' / f'class{c}').mkdir(parents=True)
    for j in range(8):
      top, left = int(rng.integers(0, 300)), int(rng.integers(0, 500))
      Image.fromarray(image[top:top + 120:3, left:left + 140:3]).save(tmp_path / 'data' / f'class{c}' / f'{j}.jpg',
                                                                 quality=90)
  config = helpers.recipe('quickstart', **{'data.source': f'imagefolder:{tmp_path / "data"}', 'data.crop_on': 'device',
                                           'data.device_image_size': 48, 'crops.local_number': 0, 'max_steps': 2, 'eval.test_source': None,
                                           'eval.test_source': None})
  train.train_and_evaluate(config, str(tmp_path / 'run'))
  metrics = helpers.run_metrics(str(tmp_path / 'run'))
  losses = [m['loss'] for m in metrics if 'loss' in m]
  assert losses and np.isfinite(losses).all()


def test_simplejpeg_and_pil_decodes_give_the_same_element():
  """The libjpeg-turbo decoder (with DCT scaling) and PIL's (with draft) ship the same pixels and boxes, colour and grey."""
  groups = (multicrop.CropGroup('global', 64, 2, (0.4, 1.0)), multicrop.CropGroup('local', 32, 2, (0.05, 0.4)))
  device = decode.DeviceMultiCrop(groups, image_size=768)
  buf = io.BytesIO()
  Image.fromarray(photos()[0]).convert('L').save(buf, 'JPEG', quality=85)
  for data in _jpegs() + [buf.getvalue()]:
    turbo = device._turbo(data, {'image': data, 'label': 1}, np.random.default_rng(5))
    pil = device._pil({'image': data, 'label': 1}, np.random.default_rng(5))
    assert turbo is not None and turbo.keys() == pil.keys()
    for k in pil:
      np.testing.assert_array_equal(turbo[k], pil[k], err_msg=k)
  assert device._turbo(b'not a jpeg', {}, np.random.default_rng(0)) is None
