"""TFDS source: a tiny dataset prepared here as array_record (no TensorFlow), read by spec."""
import io

import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from dino_jax.data import make_train_dataset
from dino_jax.data.sources import get_source
from tests.helpers import pipeline_config


class DinoTinyImages(tfds.core.GeneratorBasedBuilder):
  """Image i: (20 + i) x 30 pixels all equal to 8 * i, label i % 3; configs of 12 and 30 images."""
  VERSION = tfds.core.Version('1.0.0')
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name='small'), tfds.core.BuilderConfig(name='large')]

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        'image': tfds.features.Image(shape=(None, None, 3)),
        'label': tfds.features.ClassLabel(num_classes=3)}))

  def _split_generators(self, dl_manager):
    n = 12 if self.builder_config.name == 'small' else 30
    return {'train': self._generate_examples(n), 'test': self._generate_examples(5)}

  def _generate_examples(self, n):
    for i in range(n):
      buf = io.BytesIO()  # encoded here: TFDS would need TensorFlow to encode arrays
      Image.new('RGB', (30, 20 + i), (8 * i,) * 3).save(buf, 'PNG')
      yield i, {'image': buf.getvalue(), 'label': i % 3}


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp('tfds')
  for config in ('small', 'large'):
    DinoTinyImages(config=config, data_dir=str(root), file_format='array_record').download_and_prepare()
  return str(root)


def test_tfds_records_come_back_encoded_with_labels(data_dir):
  src = get_source('tfds:dino_tiny_images:small/train', data_dir=data_dir)
  assert len(src) == 12 and src.num_classes == 3
  seen = set()
  for i in range(len(src)):
    record = src[i]
    assert isinstance(record['image'], bytes)  # decoded later, by the multi-crop workers
    pixels = np.asarray(Image.open(io.BytesIO(record['image'])))
    original = pixels.shape[0] - 20
    assert np.all(pixels == 8 * original) and record['label'] == original % 3
    seen.add(original)
  assert seen == set(range(12))
  assert repr(src) == repr(get_source('tfds:dino_tiny_images:small/train', data_dir=data_dir))
  # TFDS's own spelling and split slicing work too.
  assert len(get_source('tfds:dino_tiny_images/large/train[:10]', data_dir=data_dir)) == 10
  assert len(get_source('tfds:dino_tiny_images:large/test', data_dir=data_dir)) == 5


def test_missing_tfds_dataset_names_the_dataset_and_directory(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"dino_tiny_images.*" + str(tmp_path)):
    get_source('tfds:dino_tiny_images:small/train', data_dir=str(tmp_path))


def test_train_pipeline_reads_a_tfds_source(data_dir):
  src = get_source('tfds:dino_tiny_images:large/train', data_dir=data_dir)
  config = pipeline_config(10, data={'source': 'tfds', 'on_bad_image': 'fail'},
                           crops={'global_size': 16, 'global_scale': (0.4, 1.0), 'local_size': 8, 'local_number': 3,
                                  'local_scale': (0.05, 0.4), 'interpolation': 'bicubic', 'flip': True})
  it = iter(make_train_dataset(src, config, seed=0))
  labels = []
  for _ in range(3):  # one epoch: 30 images in 3 batches
    batch = next(it)
    assert batch['global'].shape == (10, 2, 16, 16, 3) and batch['local'].shape == (10, 3, 8, 8, 3)
    # Flat grey images stay flat grey through crops: the value identifies the image.
    value = batch['global'][:, 0, 0, 0, 0].astype(int)
    np.testing.assert_array_equal(batch['global'], value[:, None, None, None, None] * np.ones_like(batch['global']))
    np.testing.assert_array_equal(batch['label'], (value // 8) % 3)
    labels.extend(value // 8)
  assert sorted(labels) == list(range(30))
