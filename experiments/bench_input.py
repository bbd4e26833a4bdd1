r"""Training throughput fed from a folder of real JPEGs against the same step on synthetic input already on the device.

  python experiments/bench_input.py --config=configs/dino_vit_small16.py --batch=256 --images=2048 --steps=40 \
      --out=/tmp/bench_input                                            # on a GPU machine (device_check.sh)
  python experiments/bench_input.py --config=configs/quickstart.py --batch=16 --images=64 --steps=2 \
      --workers=2 --crop_on=device --device_image_size=64 --out=/tmp/bench_smoke   # a CPU smoke run

Writes --images ImageNet-sized JPEGs (~500x375, q90, cut from scikit-learn's two sample photos, as bench_data.py)
as an ImageFolder under --out, then runs `dino_jax.steps.make_train_step` (jitted, state donated) twice for --steps
after --warmup steps: (1) fed by `pipeline.make_train_dataset` on that folder (grain workers: decode + boxes on the
CPU, `data.crop_on` as given; the host->device put included), (2) on one synthetic uint8 crop batch already in
device memory (what bench_train.py times). Prints and writes --out/bench_input.json: images/s of both, their ratio,
the CPU cores, the worker count, the host->device bytes per image and the load average.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "experiments"))

import numpy as np  # noqa: E402


def parse(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--config", default=os.path.join(ROOT, "configs", "dino_vit_small16.py"))
  ap.add_argument("--batch", type=int, default=256)
  ap.add_argument("--images", type=int, default=2048, help="JPEGs in the folder (>= one batch)")
  ap.add_argument("--steps", type=int, default=40)
  ap.add_argument("--warmup", type=int, default=3)
  ap.add_argument("--workers", type=int, default=None, help="data.num_workers (default: the config's)")
  ap.add_argument("--crop_on", default=None, help="data.crop_on (default: the config's)")
  ap.add_argument("--device_image_size", type=int, default=None, help="data.device_image_size (default: the config's)")
  ap.add_argument("--out", default="/tmp/bench_input")
  return ap.parse_args(argv)


def load_config(path, a):
  spec = importlib.util.spec_from_file_location("bench_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.batch_size = a.batch
  if a.workers is not None:
    c.data.num_workers = a.workers
  if a.crop_on is not None:
    c.data.crop_on = a.crop_on
  if a.device_image_size is not None:
    c.data.device_image_size = a.device_image_size
  return c


def write_folder(root, n):
  import bench_data  # noqa: PLC0415
  for i, data in enumerate(bench_data.make_jpegs(n, (500, 375))):
    d = os.path.join(root, f"class{i % 10}")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, f"{i}.jpg"), "wb") as f:
      f.write(data)


def timed(step, state, batches, warmup, steps):
  import jax  # noqa: PLC0415
  for _ in range(warmup):
    state, metrics = step(state, next(batches))
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = step(state, next(batches))
  jax.block_until_ready(metrics)
  return state, (time.perf_counter() - start) / steps


def main(argv=None):
  a = parse(argv)
  from absl import flags  # noqa: PLC0415
  flags.FLAGS.mark_as_parsed()  # grain workers read absl flags
  import jax  # noqa: PLC0415

  from dino_jax import sharding, state as state_lib, steps as steps_lib  # noqa: PLC0415
  from dino_jax.data import decode, pipeline, sources  # noqa: PLC0415

  config = load_config(a.config, a)
  folder = os.path.join(a.out, "jpegs")
  if not os.path.isdir(folder):
    write_folder(folder, a.images)
  config.data.source = f"imagefolder:{folder}"
  source = sources.get_source(config.data.source)
  mesh = sharding.make_mesh()
  run = state_lib.build_run(config, steps_per_epoch=pipeline.steps_per_epoch(source, config), mesh=mesh)
  state = jax.jit(run.init, out_shardings=run.shardings)()
  step = jax.jit(steps_lib.make_train_step(run), in_shardings=(run.shardings, sharding.batch_sharding(mesh)),
                 out_shardings=(run.shardings, sharding.replicated(mesh)), donate_argnums=(0,))

  it = iter(pipeline.make_train_dataset(source, config, seed=0))
  feed = (sharding.global_batch(next(it), mesh) for _ in iter(int, 1))
  state, jpeg_s = timed(step, state, feed, a.warmup, a.steps)
  if hasattr(it, "close"):
    it.close()

  crops, rng = config.crops, np.random.default_rng(0)
  synthetic = {"global": rng.integers(0, 256, (a.batch, crops.global_number, crops.global_size, crops.global_size, 3),
                                      dtype=np.uint8)}
  if crops.local_number:
    synthetic["local"] = rng.integers(0, 256, (a.batch, crops.local_number, crops.local_size, crops.local_size, 3),
                                      dtype=np.uint8)
  synthetic = sharding.global_batch(synthetic, mesh)
  step = jax.jit(steps_lib.make_train_step(run), in_shardings=(run.shardings, sharding.batch_sharding(mesh)),
                 out_shardings=(run.shardings, sharding.replicated(mesh)), donate_argnums=(0,))
  state, synthetic_s = timed(step, state, (synthetic for _ in iter(int, 1)), a.warmup, a.steps)

  crop_bytes = crops.global_number * crops.global_size ** 2 * 3 + crops.local_number * crops.local_size ** 2 * 3 + 8
  result = {
      "device": jax.devices()[0].device_kind, "devices": jax.device_count(), "cpu_cores": len(os.sched_getaffinity(0)),
      "crop_on": config.data.crop_on, "num_workers": int(config.data.num_workers), "batch": a.batch,
      "jpeg_folder_images_per_s": a.batch / jpeg_s, "synthetic_images_per_s": a.batch / synthetic_s,
      "ratio": synthetic_s / jpeg_s,
      "host_to_device_bytes_per_image": (decode.bytes_per_image(crops, config.data.device_image_size)
                                         if config.data.crop_on == "device" else crop_bytes),
      "load_average_1min": os.getloadavg()[0],
      "command": " ".join(["python experiments/bench_input.py"] + (sys.argv[1:] if argv is None else argv)),
  }
  with open(os.path.join(a.out, "bench_input.json"), "w") as f:
    json.dump(result, f, indent=2)
  print(f"{result['device']} x{result['devices']}, {result['cpu_cores']} CPU cores, {result['num_workers']} workers, "
        f"crop_on={result['crop_on']}, batch {a.batch}: JPEG folder {result['jpeg_folder_images_per_s']:.0f} img/s, "
        f"synthetic {result['synthetic_images_per_s']:.0f} img/s (ratio {result['ratio']:.2f}); "
        f"{result['host_to_device_bytes_per_image']:,} bytes/image host->device; load {result['load_average_1min']:.1f}")


if __name__ == "__main__":
  main()
