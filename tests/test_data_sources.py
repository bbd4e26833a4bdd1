"""Data sources: the embedded digits, image folders, synthetic images, spec errors."""
from collections import Counter
import io
import os

import numpy as np
from PIL import Image
import pytest
from sklearn.datasets import load_digits

from dino_jax.data import sources
from dino_jax.data.sources import get_source


def test_digits_split_is_fixed_stratified_and_covers_every_image():
  train, test = get_source('digits:train'), get_source('digits:test')
  assert (len(train), len(test)) == (1437, 360)
  assert train.num_classes == test.num_classes == 10
  full = np.bincount(load_digits().target)
  train_counts = np.bincount([train[i]['label'] for i in range(len(train))], minlength=10)
  test_counts = np.bincount([test[i]['label'] for i in range(len(test))], minlength=10)
  np.testing.assert_array_equal(train_counts + test_counts, full)
  # Stratified: each class keeps its share of the 360 test images within one image.
  assert np.all(np.abs(test_counts - full * 360 / full.sum()) <= 1)
  # Disjoint and complete: as multisets, the two splits hold exactly the 1,797 images.
  digits = load_digits()
  grey = np.round(digits.images * 255 / 16).astype(np.uint8)
  everything = Counter(
      np.asarray(Image.fromarray(g).resize((32, 32), Image.BICUBIC)).tobytes() for g in grey)
  both = Counter(src[i]['image'][..., 0].tobytes() for src in (train, test) for i in range(len(src)))
  assert both == everything


def test_digits_images_are_upsampled_real_digits():
  src = get_source('digits:test:48')
  record = src[5]
  assert record['image'].shape == (48, 48, 3) and record['image'].dtype == np.uint8
  assert np.array_equal(record['image'][..., 0], record['image'][..., 2])  # grey in RGB
  # Same image as scikit-learn's, up to bicubic up/down sampling.
  digits = load_digits()
  small = np.asarray(Image.fromarray(record['image'][..., 0]).resize((8, 8), Image.BOX), np.float64)
  matches = [np.abs(small - img * 255 / 16).mean() for img in digits.images[digits.target == record['label']]]
  assert min(matches) < 12
  assert repr(src) == "DigitsSource(split='test', image_size=48)"
  assert repr(get_source('digits:test:48')) == repr(src)  # stable repr for grain checkpoints
  np.testing.assert_array_equal(get_source('digits:test:48')[5]['image'], record['image'])


def _write(path, image, fmt, **kw):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  image.save(path, fmt, **kw)


def _photo(w=40, h=30, seed=0):
  rng = np.random.default_rng(seed)
  return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_imagefolder_labels_follow_sorted_class_folders_like_torchvision(tmp_path):
  root = tmp_path / 'train'
  _write(str(root / 'zebra' / 'b.jpg'), _photo(), 'JPEG')
  _write(str(root / 'zebra' / 'a.png'), _photo(seed=1), 'PNG')
  _write(str(root / 'ant' / 'nested' / 'c.webp'), _photo(seed=2), 'WEBP')
  _write(str(root / 'ant' / 'd.JPEG'), _photo(seed=3), 'JPEG')
  (root / 'ant' / 'notes.txt').write_text('not an image')
  src = get_source(f'imagefolder:{root}')
  assert src.classes == ['ant', 'zebra'] and src.num_classes == 2
  # torchvision walks each class folder with sorted(os.walk(...)) and sorted file names.
  names = [os.path.relpath(src[i]['path'], root) for i in range(len(src))]
  assert names == ['ant/d.JPEG', 'ant/nested/c.webp', 'zebra/a.png', 'zebra/b.jpg']
  assert [src[i]['label'] for i in range(len(src))] == [0, 0, 1, 1]
  decoded = Image.open(io.BytesIO(src[2]['image']))
  np.testing.assert_array_equal(np.asarray(decoded), np.asarray(_photo(seed=1)))
  assert repr(src) == f'ImageFolderSource({str(root)!r})'


def test_flat_folder_is_unlabelled(tmp_path):
  _write(str(tmp_path / 'x.png'), _photo(), 'PNG')
  _write(str(tmp_path / 'y.jpg'), _photo(seed=1), 'JPEG')
  src = get_source(f'imagefolder:{tmp_path}')
  assert len(src) == 2 and src.num_classes is None
  assert {src[i]['label'] for i in range(2)} == {-1}


def test_missing_or_empty_folders_fail_with_the_path(tmp_path):
  with pytest.raises(FileNotFoundError, match='does-not-exist'):
    get_source(f'imagefolder:{tmp_path}/does-not-exist')
  with pytest.raises(FileNotFoundError, match='holds no image'):
    get_source(f'imagefolder:{tmp_path}')
  _write(str(tmp_path / 'cat' / 'a.png'), _photo(), 'PNG')
  (tmp_path / 'dog').mkdir()
  with pytest.raises(FileNotFoundError, match="dog"):
    get_source(f'imagefolder:{tmp_path}')


def test_unknown_or_malformed_specs_name_the_valid_kinds():
  with pytest.raises(ValueError, match='digits, imagefolder, tfds, synthetic'):
    get_source('imagenet:/data')
  with pytest.raises(ValueError, match='digits, imagefolder'):
    get_source('no-colon')
  with pytest.raises(ValueError, match="'train' or 'test'"):
    get_source('digits:val')
  with pytest.raises(ValueError, match='synthetic:<N>'):
    get_source('synthetic:many')
  with pytest.raises(ValueError, match='tfds:<name>'):
    get_source('tfds:imagenette')


def test_synthetic_images_are_deterministic():
  a, b = get_source('synthetic:20x24'), get_source('synthetic:20x24')
  assert len(a) == 20 and repr(a) == repr(b) == sources.SyntheticSource(20, 24).__repr__()
  assert a[3]['image'].shape == (24, 24, 3) and a[3]['label'] == 3
  np.testing.assert_array_equal(a[7]['image'], b[7]['image'])
  assert not np.array_equal(a[7]['image'], a[8]['image'])
  with pytest.raises(IndexError):
    a[20]
