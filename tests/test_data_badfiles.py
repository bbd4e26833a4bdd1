"""Awkward and broken image files: decoded like torchvision's loader, or skipped and counted."""
import io
import logging

import numpy as np
from PIL import Image, ImageOps
import pytest
from sklearn.datasets import load_sample_image

from dino_jax.data import make_eval_dataset, make_train_dataset
from dino_jax.data.multicrop import BadImageError, CropGroup, MultiCrop, random_resized_crop_box
from dino_jax.data.sources import get_source
from tests.helpers import pipeline_config
from tests.torch_ref import augment as ref

GROUPS = (CropGroup('global', 24, 2, (0.4, 1.0)), CropGroup('local', 12, 2, (0.05, 0.4)))


def _photo(w=64, h=48):
  return Image.fromarray(load_sample_image('flower.jpg')).resize((w, h), Image.BICUBIC)


def _encode(image, fmt, **kw):
  buf = io.BytesIO()
  image.save(buf, fmt, **kw)
  return buf.getvalue()


def awkward_files():
  """Readable files in unusual modes: name -> encoded bytes."""
  photo = _photo()
  palette = photo.convert('P', palette=Image.Palette.ADAPTIVE, colors=16)
  wide = (np.asarray(photo.convert('L'), np.uint16) * 257 + np.arange(48)[:, None]).astype(np.uint16)
  exif = Image.Exif()
  exif[0x0112] = 6  # stored sideways: viewers rotate it 90 degrees clockwise
  return {
      'cmyk.jpg': _encode(photo.convert('CMYK'), 'JPEG', quality=95),
      'grey.jpg': _encode(photo.convert('L'), 'JPEG', quality=95),
      'palette_alpha.png': _encode(palette, 'PNG', transparency=3),
      'rgba.png': _encode(photo.convert('RGBA'), 'PNG'),
      'sixteen_bit.png': _encode(Image.fromarray(wide), 'PNG'),
      'one_pixel.png': _encode(Image.new('RGB', (1, 1), (200, 30, 90)), 'PNG'),
      'exif_rotated.jpg': _encode(photo, 'JPEG', quality=95, exif=exif),
  }


def broken_files():
  jpeg = _encode(_photo(), 'JPEG', quality=95)
  return {
      'truncated.jpg': jpeg[:len(jpeg) // 2],
      'empty.jpg': b'',
      'not_an_image.jpg': b'name,label\ncat,1\n',
      'garbage.png': b'\x89PNG\r\n\x1a\n' + bytes(range(256)),
  }


def _replay(width, height, seed):
  rng = np.random.default_rng(seed)
  plan = []
  for g in GROUPS:
    boxes = [random_resized_crop_box(width, height, g.scale, g.ratio, rng) for _ in range(g.number)]
    plan.append((g, boxes, rng.random(g.number) < 0.5))
  return plan


def _expected_crops(image, seed):
  out = {}
  for g, boxes, flips in _replay(*image.size, seed):
    crops = [ref.resized_crop(image, *box, g.size, Image.BICUBIC) for box in boxes]
    out[g.name] = np.stack([np.asarray(ref.hflip(c) if f else c) for c, f in zip(crops, flips)])
  return out


@pytest.mark.parametrize('name', sorted(set(awkward_files()) - {'sixteen_bit.png'}))
def test_awkward_files_decode_like_torchvisions_loader(name):
  data = awkward_files()[name]
  out = MultiCrop(GROUPS)({'image': data, 'label': 1, 'path': name}, np.random.default_rng(0))
  expected = _expected_crops(ref.pil_loader(data), seed=0)
  for group in ('global', 'local'):
    np.testing.assert_array_equal(out[group], expected[group], err_msg=f'{name} {group}')
  if name == 'one_pixel.png':
    assert np.all(out['global'] == [200, 30, 90]) and np.all(out['local'] == [200, 30, 90])
  if name == 'grey.jpg':
    assert np.all(out['global'][..., 0] == out['global'][..., 2])


def test_sixteen_bit_png_is_scaled_not_clipped():
  data = awkward_files()['sixteen_bit.png']
  wide = np.asarray(Image.open(io.BytesIO(data)), np.float64)
  assert wide.max() > 255  # really 16-bit
  # torchvision's loader clips to 255: a nearly white image. We scale by 1/257 instead.
  assert np.asarray(ref.pil_loader(data)).mean() > 250
  out = MultiCrop(GROUPS)({'image': data}, np.random.default_rng(0))
  scaled = Image.fromarray(np.round(wide / 257).astype(np.uint8)).convert('RGB')
  expected = _expected_crops(scaled, seed=0)
  np.testing.assert_array_equal(out['global'], expected['global'])


def test_exif_orientation_ignored_by_default_applied_on_request():
  data = awkward_files()['exif_rotated.jpg']
  stored = ref.pil_loader(data)
  assert stored.size == (64, 48)
  default = MultiCrop(GROUPS)({'image': data}, np.random.default_rng(0))
  np.testing.assert_array_equal(default['global'], _expected_crops(stored, 0)['global'])
  upright = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert('RGB')
  assert upright.size == (48, 64)
  rotated = MultiCrop(GROUPS, exif_transpose=True)({'image': data}, np.random.default_rng(0))
  np.testing.assert_array_equal(rotated['global'], _expected_crops(upright, 0)['global'])


@pytest.mark.parametrize('name', sorted(broken_files()))
def test_broken_files_raise_an_error_naming_the_file(name):
  with pytest.raises(BadImageError, match=name):
    MultiCrop(GROUPS)({'image': broken_files()[name], 'path': name}, np.random.default_rng(0))


def _folder(tmp_path, with_broken=True):
  root = tmp_path / 'data'
  for i in range(8):
    (root / 'good').mkdir(parents=True, exist_ok=True)
    (root / 'good' / f'{i}.jpg').write_bytes(_encode(_photo(40 + i, 30 + i), 'JPEG'))
  files = awkward_files() | (broken_files() if with_broken else {})
  (root / 'odd').mkdir()
  for name, data in files.items():
    (root / 'odd' / name).write_bytes(data)
  return root


def _config(batch_size, on_bad_image, num_workers=0):
  return pipeline_config(batch_size, data={'num_workers': num_workers, 'on_bad_image': on_bad_image},
                         crops={'global_size': 16, 'global_scale': (0.4, 1.0), 'local_size': 8, 'local_number': 2,
                                'local_scale': (0.05, 0.4), 'interpolation': 'bicubic', 'flip': True})


def test_skip_substitutes_logs_and_counts_bad_files(tmp_path, caplog):
  src = get_source(f'imagefolder:{_folder(tmp_path)}')
  assert len(src) == 19  # 8 good + 7 awkward + 4 broken
  broken = {p for p in (str(tmp_path / 'data' / 'odd' / n) for n in broken_files())}
  config = _config(batch_size=19, on_bad_image='skip')
  with caplog.at_level(logging.WARNING):
    it = iter(make_train_dataset(src, config, seed=0))
    first, second = next(it), next(it)
  for batch in (first, second):
    assert batch['global'].shape == (19, 2, 16, 16, 3)
    assert batch['skipped'].sum() >= 4  # each broken file replaced at least once per epoch
    assert set(batch['label']) <= {0, 1}
  logged = ' '.join(r.getMessage() for r in caplog.records)
  assert all(path in logged for path in broken)
  # Deterministic: a second run substitutes the same images.
  again = next(iter(make_train_dataset(src, config, seed=0)))
  for k in first:
    np.testing.assert_array_equal(first[k], again[k])


def test_fail_raises_with_the_path(tmp_path):
  src = get_source(f'imagefolder:{_folder(tmp_path)}')
  with pytest.raises(BadImageError, match='odd/'):
    next(iter(make_train_dataset(src, _config(batch_size=19, on_bad_image='fail'), seed=0)))


def test_an_unreadable_dataset_stops_with_an_error_not_a_hang(tmp_path):
  root = tmp_path / 'junk'
  root.mkdir()
  for i in range(40):
    (root / f'{i:02d}.jpg').write_bytes(b'not a jpeg')
  src = get_source(f'imagefolder:{root}')
  with pytest.raises(RuntimeError, match='consecutive unreadable images'):
    next(iter(make_train_dataset(src, _config(batch_size=4, on_bad_image='skip'), seed=0)))


def test_eval_masks_out_unreadable_images(tmp_path):
  src = get_source(f'imagefolder:{_folder(tmp_path)}')
  batches = list(make_eval_dataset(src, image_size=16, resize_size=20, batch_size=8,
                                   on_bad_image='skip'))
  mask = np.concatenate([b['mask'] for b in batches])
  index = np.concatenate([b['index'] for b in batches])
  assert len(mask) == 24 and mask.sum() == 15  # 19 files - 4 broken; 5 slots of padding
  readable = {i for i in range(len(src)) if not src[i]['path'].endswith(tuple(broken_files()))}
  assert set(index[mask]) == readable
  with pytest.raises(BadImageError):
    list(make_eval_dataset(src, image_size=16, resize_size=20, batch_size=8))


def test_a_failure_in_a_worker_process_reaches_the_caller(tmp_path):
  from absl import flags

  flags.FLAGS.mark_as_parsed()  # grain's worker processes read absl flags
  src = get_source(f'imagefolder:{_folder(tmp_path)}')
  it = iter(make_train_dataset(src, _config(19, on_bad_image='fail', num_workers=1), seed=0))
  try:
    with pytest.raises(BadImageError, match='odd/'):
      next(it)
  finally:
    it.close()
