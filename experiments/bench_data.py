"""Images per second per CPU core: our DINO multi-crop vs the official DataAugmentationDINO.

    python experiments/bench_data.py                       # ~2 minutes on a 2-core VM
    python experiments/bench_data.py --images 32 --repeats 2

The process pins itself to one CPU core (torch, XLA and PIL all share it), then measures in one
run, interleaved so that machine noise hits every variant alike:
  (a) ours, CPU part: JPEG decode + 2x224 + 8x96 RandomResizedCrop (bicubic) + flip -> uint8;
  (b) (a) plus our photometric ops (jitter, grey, blur, solarise, normalise) run on this CPU core
      with jax, as they would run on the accelerator;
  (c) the official DataAugmentationDINO (torchvision's transforms = Pillow calls, rebuilt in
      tests/torch_ref/augment.py): decode, crops, colour ops, ToTensor, Normalize;
  (d) data.crop_on='device', CPU part: decode + the boxes and flips drawn + the padded image
      (dino_jax/data/decode.py), with the accelerator part (crops cut and resized, resize.py) timed
      beside it on this CPU core, and the host->device bytes per image of both paths.
and, for large photos (2000x1500), (a) with and without JPEG draft decoding vs (c).
The images are ImageNet-sized JPEGs (quality 90) cut from scikit-learn's two sample photos.
Results go to experiments/results/bench_data.{md,json}.

    python experiments/bench_data.py --photometry-only --batch 256   # on a GPU machine

times only the photometric step (DINO shapes, 2x224 + 8x96) on jax's default device and prints
images/s; it writes nothing. `--device-crops-only --batch 256` does the same for the accelerator part
of data.crop_on='device' (the crops cut and resized from padded real images, resize.py).
"""
import argparse
import io
import json
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

from configs import common  # noqa: E402
from PIL import Image  # noqa: E402


def make_jpegs(n, size, seed=0):
  """n JPEGs of about `size` (w, h), random crops of the sample photos, some portrait."""
  from sklearn.datasets import load_sample_image

  photos = [load_sample_image(name) for name in ('china.jpg', 'flower.jpg')]
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    photo = photos[i % 2]
    h, w = photo.shape[:2]
    ch, cw = int(rng.integers(h // 2, h)), int(rng.integers(w // 2, w))
    top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    target = size if i % 4 else size[::-1]  # a quarter portrait, like ImageNet
    jitter = rng.uniform(0.85, 1.0)
    target = (int(target[0] * jitter), int(target[1] * jitter))
    image = Image.fromarray(photo[top:top + ch, left:left + cw]).resize(target, Image.BICUBIC)
    buf = io.BytesIO()
    image.save(buf, 'JPEG', quality=90)
    out.append(buf.getvalue())
  return out


def time_per_image(fn, items):
  start = time.perf_counter()
  for item in items:
    fn(item)
  return (time.perf_counter() - start) / len(items)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--images', type=int, default=48, help='ImageNet-sized JPEGs per timing')
  parser.add_argument('--large', type=int, default=8, help='2000x1500 JPEGs per timing (0: skip)')
  parser.add_argument('--repeats', type=int, default=3, help='interleaved timing rounds (median)')
  parser.add_argument('--batch', type=int, default=8, help='images per photometric batch in (b)')
  parser.add_argument('--device-image-size', type=int, default=common.dino_defaults().data.device_image_size,
                      help="data.device_image_size for (d)")
  parser.add_argument('--out', default=os.path.join(ROOT, 'experiments', 'results', 'bench_data'))
  parser.add_argument('--photometry-only', action='store_true',
                      help="time the photometric step alone on jax's default device")
  parser.add_argument('--device-crops-only', action='store_true',
                      help="time resize.device_crops alone on jax's default device")
  args = parser.parse_args()
  if args.photometry_only:
    return photometry_only(args.batch)
  if args.device_crops_only:
    return device_crops_only(args.batch, args.device_image_size)

  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  core = sorted(os.sched_getaffinity(0))[0]
  os.sched_setaffinity(0, {core})  # every thread of this process on one core
  import jax
  import jax.numpy as jnp
  import torch

  from dino_jax.data import decode, multicrop, photometric, resize
  from tests.torch_ref import augment as ref

  torch.set_num_threads(1)
  groups = (multicrop.CropGroup('global', 224, 2, (0.4, 1.0)),
            multicrop.CropGroup('local', 96, 8, (0.05, 0.4)))
  ours = multicrop.MultiCrop(groups, interpolation='bicubic')
  exact = multicrop.MultiCrop(groups, interpolation='bicubic', draft=False)
  official = ref.DataAugmentationDINO((0.4, 1.0), (0.05, 0.4), 8)
  device = decode.DeviceMultiCrop(groups, image_size=args.device_image_size)
  crops_cfg = common.dino_defaults().crops
  cut = jax.jit(lambda batch: resize.device_crops(batch, crops_cfg))
  aug = common.dino_defaults().aug
  photo = jax.jit(lambda batch, key: photometric.augment(batch, key, aug))

  jpegs = make_jpegs(args.images, (500, 375))
  large = make_jpegs(args.large, (2000, 1500), seed=1) if args.large else []
  rng = np.random.default_rng(0)
  crop = lambda mc: (lambda data: mc({'image': data, 'label': 0}, rng))
  run_official = lambda data: official(ref.pil_loader(data))
  # A photometric batch from real crops; compile once before timing.
  elements = [ours({'image': d, 'label': 0}, rng) for d in jpegs[:args.batch]]
  batch = {k: jnp.asarray(np.stack([e[k] for e in elements])) for k in ('global', 'local')}
  jax.block_until_ready(photo(batch, jax.random.key(0)))
  plans = [device({'image': d, 'label': 0}, rng) for d in jpegs[:args.batch]]
  plan_batch = {k: jnp.asarray(np.stack([e[k] for e in plans])) for k in plans[0]}
  jax.block_until_ready(cut(plan_batch))
  for fn in (crop(ours), run_official, crop(device)):
    time_per_image(fn, jpegs[:4])  # warm-up

  timings = {k: [] for k in ('a', 'photometric', 'c', 'd', 'd_device', 'large_a', 'large_a_exact', 'large_c')}
  for r in range(args.repeats):
    timings['a'].append(time_per_image(crop(ours), jpegs))
    timings['c'].append(time_per_image(run_official, jpegs))
    timings['d'].append(time_per_image(crop(device), jpegs))
    start = time.perf_counter()
    for i in range(3):
      jax.block_until_ready(cut(plan_batch))
    timings['d_device'].append((time.perf_counter() - start) / (3 * args.batch))
    start = time.perf_counter()
    for i in range(3):
      jax.block_until_ready(photo(batch, jax.random.key(r * 3 + i)))
    timings['photometric'].append((time.perf_counter() - start) / (3 * args.batch))
    if large:
      timings['large_a'].append(time_per_image(crop(ours), large))
      timings['large_a_exact'].append(time_per_image(crop(exact), large))
      timings['large_c'].append(time_per_image(run_official, large))
  sec = {k: float(np.median(v)) for k, v in timings.items() if v}
  rate = lambda s: 1.0 / s
  results = {
      'images_per_second_per_core': {
          '(a) ours, CPU part (decode + multi-crop)': rate(sec['a']),
          '(b) ours, CPU part + photometry on CPU (jax)': rate(sec['a'] + sec['photometric']),
          '(c) official DataAugmentationDINO (PIL)': rate(sec['c']),
          "(d) data.crop_on='device', CPU part (decode + boxes + pad)": rate(sec['d']),
      },
      'ratio_d_over_c': sec['c'] / sec['d'],
      'ratio_d_over_a': sec['a'] / sec['d'],
      'device_part_ms_per_image_on_this_cpu_core': 1e3 * sec['d_device'],
      'host_to_device_bytes_per_image': {
          'cpu path (uint8 crops)': 2 * 224 * 224 * 3 + 8 * 96 * 96 * 3 + 8,
          'device path (padded image + boxes)': decode.bytes_per_image(crops_cfg, args.device_image_size),
      },
      'ratio_a_over_c': sec['c'] / sec['a'],
      'ratio_b_over_c': sec['c'] / (sec['a'] + sec['photometric']),
      'milliseconds_per_image': {k: 1e3 * v for k, v in sec.items()},
      'setup': {
          'images': args.images, 'image_size': '~500x375 (a quarter portrait), JPEG q90',
          'crops': '2 x 224 (scale 0.4-1) + 8 x 96 (scale 0.05-0.4), bicubic',
          'repeats': args.repeats, 'photometric_batch': args.batch, 'cpu_core': core,
          'cpu': _cpu_model(), 'load_average_1min': os.getloadavg()[0],
          'python': platform.python_version(),
          'jax': jax.__version__, 'torch': torch.__version__, 'pillow': Image.__version__,
          'command': ' '.join(['python experiments/bench_data.py'] + sys.argv[1:]),
      },
  }
  if large:
    results['large_photos_2000x1500'] = {
        'ours (draft decode)': rate(sec['large_a']),
        'ours (full decode, pixel-exact)': rate(sec['large_a_exact']),
        'official': rate(sec['large_c']),
    }
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out + '.json', 'w') as f:
    json.dump(results, f, indent=2)
  with open(args.out + '.md', 'w') as f:
    f.write(_markdown(results))
  print(_markdown(results))


def photometry_only(batch_size, rounds=20):
  import jax
  import jax.numpy as jnp

  from dino_jax.data import photometric

  aug = common.dino_defaults().aug
  fn = jax.jit(lambda batch, key: photometric.augment(batch, key, aug))
  rng = np.random.default_rng(0)
  batch = {'global': jnp.asarray(rng.integers(0, 256, (batch_size, 2, 224, 224, 3), np.uint8)),
           'local': jnp.asarray(rng.integers(0, 256, (batch_size, 8, 96, 96, 3), np.uint8))}
  start = time.perf_counter()
  jax.block_until_ready(fn(batch, jax.random.key(0)))
  compile_s = time.perf_counter() - start
  start = time.perf_counter()
  for i in range(rounds):
    out = fn(batch, jax.random.key(i + 1))
  jax.block_until_ready(out)
  per_batch = (time.perf_counter() - start) / rounds
  print(f'{jax.devices()[0].device_kind}: photometry for {batch_size} images (2x224 + 8x96): '
        f'{1e3 * per_batch:.2f} ms per batch, {batch_size / per_batch:.0f} images/s '
        f'(first call with compilation {compile_s:.1f} s)')


def device_crops_only(batch_size, image_size, rounds=20):
  import jax
  import jax.numpy as jnp

  from dino_jax.data import decode, multicrop, resize

  crops = common.dino_defaults().crops
  device = decode.DeviceMultiCrop(multicrop.crop_groups(crops), image_size=image_size)
  rng = np.random.default_rng(0)
  elements = [device({'image': d, 'label': 0}, rng) for d in make_jpegs(batch_size, (500, 375))]
  batch = {k: jnp.asarray(np.stack([e[k] for e in elements])) for k in elements[0]}
  fn = jax.jit(lambda b: resize.device_crops(b, crops))
  start = time.perf_counter()
  jax.block_until_ready(fn(batch))
  compile_s = time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(rounds):
    out = fn(batch)
  jax.block_until_ready(out)
  per_batch = (time.perf_counter() - start) / rounds
  print(f'{jax.devices()[0].device_kind}: device crops for {batch_size} images (2x224 + 8x96 from {image_size}^2 '
        f'padded JPEGs): {1e3 * per_batch:.2f} ms per batch, {1e3 * per_batch / batch_size:.4f} ms per image, '
        f'{batch_size / per_batch:.0f} images/s (first call with compilation {compile_s:.1f} s)')


def _cpu_model():
  try:
    with open('/proc/cpuinfo') as f:
      return next(l.split(':', 1)[1].strip() for l in f if l.startswith('model name'))
  except (OSError, StopIteration):
    return platform.machine()


def _markdown(results):
  s = results['setup']
  lines = [
      '# Input pipeline throughput: DINO multi-crop, one CPU core', '',
      f"Command: `{s['command']}` ({s['cpu']}, core {s['cpu_core']}; jax {s['jax']}, "
      f"torch {s['torch']}, Pillow {s['pillow']}; median of {s['repeats']} interleaved rounds; "
      f"machine load average {s['load_average_1min']:.1f} when it finished).", '',
      f"{s['images']} JPEGs {s['image_size']}; {s['crops']}.", '',
      '| variant | images/s per core | ms per image |', '|---|---|---|']
  ms = results['milliseconds_per_image']
  per = {'(a)': ms['a'], '(b)': ms['a'] + ms['photometric'], '(c)': ms['c'], '(d)': ms['d']}
  for name, value in results['images_per_second_per_core'].items():
    lines.append(f'| {name} | {value:.1f} | {per[name[:3]]:.1f} |')
  lines += ['', f"(a) / (c) = **{results['ratio_a_over_c']:.2f}x** (target >= 2x); "
            f"(b) / (c) = {results['ratio_b_over_c']:.2f}x.", '',
            '(b) runs the accelerator part on the CPU only to show its cost there; in training it '
            'runs inside the jitted step on the GPU, and the CPU does (a) alone.', '',
            f"(d) / (c) = **{results['ratio_d_over_c']:.2f}x**, (d) / (a) = {results['ratio_d_over_a']:.2f}x "
            "(target >= 500 images/s per core). The accelerator part of (d), the crops cut and resized "
            f"(resize.py), costs {results['device_part_ms_per_image_on_this_cpu_core']:.1f} ms per image on "
            "this CPU core; on a GPU it runs inside the jitted step.", '',
            'Host -> device bytes per image: ' + ', '.join(
                f'{k} {v:,}' for k, v in results['host_to_device_bytes_per_image'].items()) + '.']
  if 'large_photos_2000x1500' in results:
    lines += ['', '2000x1500 photos (images/s per core):', '', '| variant | images/s |', '|---|---|']
    lines += [f'| {k} | {v:.1f} |' for k, v in results['large_photos_2000x1500'].items()]
  return '\n'.join(lines) + '\n'


if __name__ == '__main__':
  main()
