r"""DINO training-step throughput: our jitted step against the official step in PyTorch, same shapes, same device kind.

  python experiments/bench_train.py [--arch=vit_small --patch=16 --batch=64 --global_size=224 --local_size=96
      --local_number=8 --out_dim=65536 --dtype=bfloat16 --steps=20 --warmup=3 --peak_tflops=989 --torch_autocast]

Ours: `dino_jax.steps.make_train_step` under `jax.jit` (photometric augmentation on the device included, state
donated), on uint8 crops already in device memory, timed over --steps after --warmup (compilation excluded), each
step blocked on. FLOPs per step from XLA's cost analysis of the compiled step; MFU = FLOPs/s / --peak_tflops.
Peak device memory from the device's memory statistics when it reports them (GPUs do, the CPU does not).

Baseline: the official main_dino.py iteration (tests/torch_ref/dino.py: the official ViT, DINO head, loss, AdamW with
per-tensor clipping, last-layer freezing, EMA) on float crops in the device's memory, without its data augmentation
(the official code does that in CPU workers), optionally under torch.autocast (--torch_autocast: float16 on CUDA as
the official `--use_fp16 true`, bfloat16 on CPU). Both run on the same device kind: torch uses CUDA when JAX does.

Writes experiments/results/bench_train_<device>.{md,json}.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import numpy as np  # noqa: E402


def parse(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--arch", default="vit_small")
  ap.add_argument("--patch", type=int, default=16)
  ap.add_argument("--depth", type=int, default=None, help="fewer blocks (CPU smoke runs)")
  ap.add_argument("--batch", type=int, default=64)
  ap.add_argument("--global_size", type=int, default=224)
  ap.add_argument("--local_size", type=int, default=96)
  ap.add_argument("--local_number", type=int, default=8)
  ap.add_argument("--out_dim", type=int, default=65536)
  ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
  ap.add_argument("--steps", type=int, default=20)
  ap.add_argument("--warmup", type=int, default=3)
  ap.add_argument("--peak_tflops", type=float, default=None, help="the device's dense peak for MFU (H200 bf16: 989)")
  ap.add_argument("--torch_autocast", action="store_true")
  ap.add_argument("--skip_torch", action="store_true")
  ap.add_argument("--out", default=os.path.join(ROOT, "experiments", "results"))
  return ap.parse_args(argv)


def make_config(a):
  from configs import common  # noqa: PLC0415
  c = common.dino_defaults()
  c.batch_size = a.batch
  c.model.arch, c.model.patch_size, c.model.out_dim, c.model.dtype = a.arch, a.patch, a.out_dim, a.dtype
  c.model.overrides = {"img_size": a.global_size, **({"depth": a.depth} if a.depth else {})}
  c.crops.global_size, c.crops.local_size, c.crops.local_number = a.global_size, a.local_size, a.local_number
  return c


def time_ours(a, config):
  from dino_jax import sharding, steps  # noqa: PLC0415
  from dino_jax import state as state_lib  # noqa: PLC0415

  run = state_lib.build_run(config, steps_per_epoch=1000)
  mesh, state_sh = run.mesh, run.shardings
  state = jax.jit(run.init, out_shardings=state_sh)()
  rng = np.random.default_rng(0)
  batch = {"global": rng.integers(0, 256, (a.batch, 2, a.global_size, a.global_size, 3), dtype=np.uint8)}
  if a.local_number:
    batch["local"] = rng.integers(0, 256, (a.batch, a.local_number, a.local_size, a.local_size, 3), dtype=np.uint8)
  batch = sharding.global_batch(batch, mesh)
  step = jax.jit(steps.make_train_step(run), in_shardings=(state_sh, sharding.batch_sharding(mesh)), donate_argnums=(0,))
  compiled = step.lower(state, batch).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get("flops", 0.0)) if cost else 0.0
  for _ in range(a.warmup):
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
  times = []
  for _ in range(a.steps):
    t = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t)
  stats = jax.devices()[0].memory_stats() or {}
  return {"step_s": float(np.median(times)), "flops_per_step": flops, "loss": float(metrics["loss"]),
          "peak_bytes": stats.get("peak_bytes_in_use")}


def time_torch(a):
  import torch  # noqa: PLC0415

  from tests.torch_ref import dino as ref  # noqa: PLC0415
  from tests.torch_ref import heads as ref_heads  # noqa: PLC0415
  from tests.torch_ref import vit as ref_vit  # noqa: PLC0415

  device = "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"
  kw = {"img_size": a.global_size, **({"depth": a.depth} if a.depth else {})}

  def net():
    backbone = ref_vit.vit(a.arch, a.patch, drop_path_rate=0.1, **kw)
    return ref_heads.MultiCropWrapper(backbone, ref_heads.DINOHead(backbone.embed_dim, a.out_dim)).to(device)

  trainer = ref.Trainer(net(), net(), out_dim=a.out_dim, ncrops=2 + a.local_number, epochs=100, niter_per_ep=1000,
                        batch_size=a.batch)
  trainer.loss.center = trainer.loss.center.to(device)
  g = torch.randn(a.batch, 3, a.global_size, a.global_size, device=device)
  images = [g, g.clone()] + [torch.randn(a.batch, 3, a.local_size, a.local_size, device=device)
                             for _ in range(a.local_number)]
  amp = (torch.autocast(device, dtype=torch.float16 if device == "cuda" else torch.bfloat16)
         if a.torch_autocast else None)

  def one():
    if amp is None:
      return trainer.step(images)
    with amp:
      return trainer.step(images)

  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  if device == "cuda":
    torch.cuda.reset_peak_memory_stats()
  for _ in range(a.warmup):
    one()
  sync()
  times = []
  for _ in range(a.steps):
    t = time.perf_counter()
    one()
    sync()
    times.append(time.perf_counter() - t)
  return {"step_s": float(np.median(times)), "device": device, "threads": torch.get_num_threads(),
          "peak_bytes": torch.cuda.max_memory_allocated() if device == "cuda" else None}


def main(argv=None):
  a = parse(argv)
  config = make_config(a)
  dev = jax.devices()[0]
  ours = time_ours(a, config)
  theirs = None if a.skip_torch else time_torch(a)
  ours_ips = a.batch / ours["step_s"]
  result = {"args": vars(a), "device": dev.device_kind, "backend": jax.default_backend(), "jax": jax.__version__,
            "ours": {**ours, "img_per_s": ours_ips}, "machine": platform.processor() or platform.machine()}
  if ours["flops_per_step"] and a.peak_tflops:
    result["ours"]["mfu"] = ours["flops_per_step"] / ours["step_s"] / (a.peak_tflops * 1e12)
  if theirs:
    result["official"] = {**theirs, "img_per_s": a.batch / theirs["step_s"]}
    result["ratio"] = ours_ips / result["official"]["img_per_s"]

  gb = lambda b: f"{b / 2**30:.1f} GiB" if b else "n/a"  # noqa: E731
  crops = f"2x{a.global_size}" + (f" + {a.local_number}x{a.local_size}" if a.local_number else "")
  lines = [f"# DINO training step: {a.arch}/{a.patch}{f' depth {a.depth}' if a.depth else ''}, batch {a.batch}, "
           f"{crops}, out_dim {a.out_dim}",
           "", f"Command: `python experiments/bench_train.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
           f"Device: {dev.device_kind} ({jax.default_backend()}), jax {jax.__version__}; median of {a.steps} steps "
           f"after {a.warmup} warm-up steps.", "",
           "| implementation | step (ms) | images/s | peak memory |", "|---|---|---|---|",
           f"| ours ({a.dtype}, jitted, photometry on device) | {1e3 * ours['step_s']:.1f} | {ours_ips:.1f} | "
           f"{gb(ours['peak_bytes'])} |"]
  if theirs:
    lines.append(f"| official step in PyTorch ({'autocast' if a.torch_autocast else 'float32'}, {theirs['device']}, "
                 f"{theirs['threads']} threads) | {1e3 * theirs['step_s']:.1f} | {result['official']['img_per_s']:.1f} "
                 f"| {gb(theirs['peak_bytes'])} |")
    lines += ["", f"Ours / official: **{result['ratio']:.2f}x** images per second."]
  if "mfu" in result["ours"]:
    lines.append(f"MFU: {100 * result['ours']['mfu']:.1f}% of {a.peak_tflops} TFLOP/s "
                 f"({ours['flops_per_step'] / 1e12:.2f} TFLOP per step, XLA's count).")
  text = "\n".join(lines) + "\n"
  print(text)
  os.makedirs(a.out, exist_ok=True)
  name = f"bench_train_{jax.default_backend()}"
  with open(os.path.join(a.out, name + ".md"), "w") as f:
    f.write(text)
  with open(os.path.join(a.out, name + ".json"), "w") as f:
    json.dump(result, f, indent=2)
  return result


if __name__ == "__main__":
  main()
