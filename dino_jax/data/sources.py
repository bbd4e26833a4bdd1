"""Image sources: random-access record lists that grain reads by index.

A source is chosen by a spec string (`config.data.source`):

  digits:train | digits:test [:<size>]   scikit-learn's 1,797 handwritten digits, shipped inside the
                                         package (no download); the embedded default dataset.
  imagefolder:/path                      class sub-folders like torchvision's ImageFolder, or a flat
                                         folder of unlabelled images (label -1).
  tfds:<name>[:<config>]/<split>         a prepared TFDS dataset read through `tfds.data_source`.
  synthetic:<N>[x<size>]                 deterministic random images, for benchmarks.

Every source has `__len__`, `__getitem__(i) -> {'image', 'label', 'path'}`, `num_classes` (None when
unlabelled) and a `__repr__` that depends only on its arguments (grain checkpoints compare it).
`image` is either the encoded file (bytes) or a uint8 HWC array; `path` names the record in logs.
"""
import functools
import os

import numpy as np
from PIL import Image

# torchvision's `IMG_EXTENSIONS`, so an ImageFolder lists the same files as the official loader.
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff', '.webp')

KINDS = ('digits', 'imagefolder', 'tfds', 'synthetic')


class DigitsSource:
  """scikit-learn's handwritten digits (UCI optdigits test set): 8x8 images, 17 grey levels, 10 classes.

  The split is fixed and stratified: 1,437 train / 360 test images (`train_test_split`,
  random_state=0). Each image is scaled from 0..16 to 0..255, upsampled once to `image_size`
  (PIL bicubic, so random crops have pixels to work with) and replicated to RGB: white digits on
  black.
  """
  num_classes = 10
  test_size = 360
  split_seed = 0

  def __init__(self, split: str = 'train', image_size: int = 32):
    if split not in ('train', 'test'):
      raise ValueError(f"digits split must be 'train' or 'test', got {split!r}")
    self.split, self.image_size = split, int(image_size)
    self._images, self._labels = _digits_split(split, self.image_size)

  def __len__(self):
    return len(self._labels)

  def __getitem__(self, i):
    return {'image': self._images[i], 'label': int(self._labels[i]),
            'path': f'digits:{self.split}[{i}]'}

  def __repr__(self):
    return f'DigitsSource(split={self.split!r}, image_size={self.image_size})'


@functools.lru_cache(maxsize=4)
def _digits_split(split, image_size):
  """(images uint8 [n, S, S, 3], labels int32 [n]) of one split, built once per process."""
  from sklearn.datasets import load_digits
  from sklearn.model_selection import train_test_split

  digits = load_digits()
  index = np.arange(len(digits.target))
  train, test = train_test_split(index, test_size=DigitsSource.test_size,
                                 stratify=digits.target, random_state=DigitsSource.split_seed)
  chosen = np.sort(train if split == 'train' else test)
  grey = np.round(digits.images[chosen] * (255.0 / 16.0)).astype(np.uint8)
  size = (image_size, image_size)
  images = np.stack([
      np.asarray(Image.fromarray(g, 'L').resize(size, Image.Resampling.BICUBIC).convert('RGB'))
      for g in grey])
  images.setflags(write=False)
  return images, digits.target[chosen].astype(np.int32)


class ImageFolderSource:
  """A folder of images read as encoded bytes; decoding happens in the multi-crop workers.

  With class sub-folders the classes are the sorted folder names and each class folder is walked
  recursively, files sorted, as torchvision's `ImageFolder` does, so label indices and file order
  match the official loader. Without sub-folders the folder's images are one unlabelled set
  (label -1, `num_classes` None).
  """

  def __init__(self, root: str):
    self.root = os.path.abspath(os.path.expanduser(root))
    if not os.path.isdir(self.root):
      raise FileNotFoundError(f"imagefolder: '{self.root}' is not a directory")
    class_dirs = sorted(e.name for e in os.scandir(self.root) if e.is_dir(follow_symlinks=True))
    samples = []
    if class_dirs:
      empty = []
      for label, name in enumerate(class_dirs):
        files = _walk_images(os.path.join(self.root, name))
        if not files:
          empty.append(name)
        samples.extend((f, label) for f in files)
      if empty:
        raise FileNotFoundError(
            f"imagefolder '{self.root}': no image files ({', '.join(IMAGE_EXTENSIONS)}) in class "
            f"folder(s) {empty}")
      self.classes = class_dirs
      self.num_classes = len(class_dirs)
    else:
      samples = [(f, -1) for f in _list_images(self.root)]
      self.classes = []
      self.num_classes = None
    if not samples:
      raise FileNotFoundError(
          f"imagefolder '{self.root}' holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
    self._paths = [p for p, _ in samples]
    self._labels = np.array([l for _, l in samples], np.int32)

  def __len__(self):
    return len(self._paths)

  def __getitem__(self, i):
    path = self._paths[i]
    with open(path, 'rb') as f:
      data = f.read()
    return {'image': data, 'label': int(self._labels[i]), 'path': path}

  def __repr__(self):
    return f'ImageFolderSource({self.root!r})'


def _is_image(name):
  return name.lower().endswith(IMAGE_EXTENSIONS)


def _list_images(folder):
  return sorted(e.path for e in os.scandir(folder) if e.is_file() and _is_image(e.name))


def _walk_images(folder):
  files = []
  for root, _, names in sorted(os.walk(folder, followlinks=True)):
    files.extend(os.path.join(root, n) for n in sorted(names) if _is_image(n))
  return files


class TfdsSource:
  """A prepared TFDS dataset with random access (`tfds.data_source`, array_record files).

  Images stay encoded (`SkipDecoding`) so the multi-crop workers decode only what they crop.
  `name` is TFDS's own form, `dataset[/config][:version]`. Nothing is downloaded.
  """

  def __init__(self, name: str, split: str, data_dir: str | None = None,
               image_key: str = 'image', label_key: str = 'label'):
    import tensorflow_datasets as tfds

    self.name, self.split, self.data_dir = name, split, data_dir
    self.image_key, self.label_key = image_key, label_key
    try:
      builder = tfds.builder(name, data_dir=data_dir)
      self._source = builder.as_data_source(
          split=split, decoders={image_key: tfds.decode.SkipDecoding()})
    except Exception as e:  # tfds raises several types for a missing or unprepared dataset
      raise FileNotFoundError(
          f"tfds source '{name}' split '{split}' (data_dir={data_dir!r}) could not be opened: "
          f"{e}. Prepare it first, e.g. `tfds build {name.split(':')[0]} --data_dir=...` "
          f"with file_format=array_record.") from e
    features = builder.info.features
    if image_key not in features:
      raise KeyError(f"tfds '{name}' has no feature {image_key!r} (features: {list(features)})")
    label = features[label_key] if label_key in features else None
    self.num_classes = getattr(label, 'num_classes', None)
    if len(self._source) == 0:
      raise FileNotFoundError(f"tfds source '{name}' split '{split}' is empty")

  def __len__(self):
    return len(self._source)

  def __getitem__(self, i):
    record = self._source[i]
    label = record.get(self.label_key, -1)
    return {'image': record[self.image_key], 'label': int(label),
            'path': f'tfds:{self.name}/{self.split}[{i}]'}

  def __repr__(self):
    return f'TfdsSource(name={self.name!r}, split={self.split!r}, data_dir={self.data_dir!r})'


class SyntheticSource:
  """Deterministic random images for benchmarks: smooth colour gradients plus noise, labels i % 10."""
  num_classes = 10

  def __init__(self, num_images: int, image_size: int = 64, seed: int = 0):
    if num_images <= 0 or image_size <= 0:
      raise ValueError(f'synthetic source needs positive sizes, got {num_images}x{image_size}')
    self.num_images, self.image_size, self.seed = int(num_images), int(image_size), int(seed)

  def __len__(self):
    return self.num_images

  def __getitem__(self, i):
    if not 0 <= i < self.num_images:
      raise IndexError(f'synthetic index {i} out of range [0, {self.num_images})')
    rng = np.random.default_rng([self.seed, i])
    s = self.image_size
    ramp = np.linspace(0.0, 1.0, s, dtype=np.float32)
    corners = rng.uniform(0, 255, size=(2, 2, 3)).astype(np.float32)
    top = corners[0, 0] + ramp[:, None] * (corners[0, 1] - corners[0, 0])
    bottom = corners[1, 0] + ramp[:, None] * (corners[1, 1] - corners[1, 0])
    image = top[None] + ramp[:, None, None] * (bottom - top)[None]
    image += rng.normal(0, 20, size=image.shape).astype(np.float32)
    return {'image': np.clip(image, 0, 255).astype(np.uint8), 'label': i % 10,
            'path': f'synthetic[{i}]'}

  def __repr__(self):
    return f'SyntheticSource(num_images={self.num_images}, image_size={self.image_size}, seed={self.seed})'


def parse_spec(spec: str):
  """(kind, argument) of a source spec, checked without reading any data (see the module docstring)."""
  kind, sep, rest = str(spec).partition(':')
  if not sep or kind not in KINDS:
    raise ValueError(f'unknown data source {spec!r}: the kinds are {", ".join(KINDS)} '
                     "(e.g. 'digits:train', 'imagefolder:/data/imagenet/train', "
                     "'tfds:imagenette/train', 'synthetic:1000x64')")
  if kind == 'digits':
    split, _, size = rest.partition(':')
    if split not in ('train', 'test') or (size and not size.isdigit()):
      raise ValueError(f"data source {spec!r}: the digits split must be 'train' or 'test' (e.g. 'digits:train', "
                       "'digits:test:32')")
  elif kind == 'imagefolder' and not rest:
    raise ValueError(f"data source {spec!r}: give a folder, e.g. 'imagefolder:/data/train'")
  elif kind == 'tfds':
    name, slash, split = rest.rpartition('/')
    if not slash or not name or not split:
      raise ValueError(f"data source {spec!r}: expected 'tfds:<name>[:<config>]/<split>'")
  elif kind == 'synthetic':
    count, _, size = rest.partition('x')
    if not count.isdigit() or (size and not size.isdigit()):
      raise ValueError(f"data source {spec!r}: expected 'synthetic:<N>[x<size>]'")
  return kind, rest


def get_source(spec: str, *, data_dir: str | None = None):
  """Returns the source named by `spec` (see the module docstring for the forms)."""
  kind, rest = parse_spec(spec)
  if kind == 'digits':
    split, _, size = rest.partition(':')
    return DigitsSource(split, int(size) if size else 32)
  if kind == 'imagefolder':
    return ImageFolderSource(rest)
  if kind == 'tfds':
    name, _, split = rest.rpartition('/')
    if '/' not in name:  # our '<name>:<config>' is TFDS's '<name>/<config>'
      name = name.replace(':', '/', 1)
    return TfdsSource(name, split, data_dir=data_dir)
  count, _, size = rest.partition('x')
  return SyntheticSource(int(count), int(size) if size else 64)
