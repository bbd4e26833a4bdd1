r"""Training-step throughput: our jitted step against the official step in PyTorch, same shapes, same device kind.

  python experiments/bench_train.py [--method=dino --arch=vit_small --patch=16 --batch=64 --global_size=224
      --local_size=96 --local_number=8 --out_dim=65536 --dtype=bfloat16 --remat=block --steps=20 --warmup=3
      --peak_tflops=989 --torch_autocast --gpu_flags --name=NAME --smoke]
  python experiments/bench_train.py --method=swav --arch=resnet50 --batch=256 --local_number=6 ...
  python experiments/bench_train.py --collect=DIR      # one table from the DIR/*.json of several runs

Ours: `dino_jax.steps.make_train_step` under `jax.jit` (photometric augmentation on the device included, state
donated), on uint8 crops already in device memory, timed over --steps after --warmup, each step blocked on; the
compile time is the `lower().compile()` wall time. FLOPs per step are analytic (experiments/flops.py: matmuls and
convolutions of every forward, x3 for the student's backward, plus the recomputed forward of --remat), MFU =
FLOPs/s / --peak_tflops; XLA's own count (cost analysis) is recorded beside it. Peak device memory from the device's
memory statistics when it reports them (GPUs do, the CPU does not).

Baseline: the official iteration (tests/torch_ref: DINO's main_dino.py step with its ViT, head, loss, AdamW with
per-tensor clipping and EMA; SwAV's main_swav.py step with its ResNet-50, Sinkhorn and LARC) on float crops in the
device's memory, without its data augmentation (the official code does that in CPU workers), optionally under
torch.autocast (--torch_autocast: float16 on CUDA as the official `--use_fp16 true`, bfloat16 on CPU).

GPU XLA flags: --gpu_flags appends GPU_FLAGS (below) to XLA_FLAGS before jax starts; XLA_FLAGS set in the
environment are kept. None of them is measured yet (no GPU figures in this repository so far).

Writes experiments/results/bench_train_<backend>.{md,json} (--name: <name>.{md,json}; --smoke without --name:
nothing).
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
sys.path.insert(0, os.path.join(ROOT, "experiments"))

# XLA:GPU options that usually help a single-GPU training step: the latency-hiding scheduler overlaps copies and
# collectives with compute. Read before jax starts, hence here.
GPU_FLAGS = "--xla_gpu_enable_latency_hiding_scheduler=true"
if "--gpu_flags" in sys.argv[1:]:
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + GPU_FLAGS).strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402

import flops as flops_lib  # noqa: E402


def parse(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--method", default="dino", choices=["dino", "swav"])
  flops_lib.add_shape_args(ap)
  ap.add_argument("--depth", type=int, default=None, help="fewer blocks (CPU smoke runs)")
  ap.add_argument("--remat", default=None, help="model.remat (default: the recipe's)")
  ap.add_argument("--nmb_prototypes", type=int, default=3000, help="SwAV")
  ap.add_argument("--steps", type=int, default=20)
  ap.add_argument("--warmup", type=int, default=3)
  ap.add_argument("--peak_tflops", type=float, default=None, help="the device's dense peak for MFU (H200 bf16: 989)")
  ap.add_argument("--torch_autocast", action="store_true")
  ap.add_argument("--skip_torch", action="store_true")
  ap.add_argument("--gpu_flags", action="store_true", help="append GPU_FLAGS to XLA_FLAGS (read at import)")
  ap.add_argument("--name", default=None, help="output file stem (default bench_train_<backend>)")
  ap.add_argument("--smoke", action="store_true", help="tiny shapes, 1+1 steps, nothing written (CPU check)")
  ap.add_argument("--collect", default=None, help="a folder of this script's .json outputs: tabulate them")
  ap.add_argument("--out", default=os.path.join(ROOT, "experiments", "results"))
  a = ap.parse_args(argv)
  if a.smoke:
    a.batch, a.global_size, a.local_size, a.steps, a.warmup = 2, 32, 16, 1, 1
    a.depth = 1 if a.arch.startswith("vit") else None
    a.local_number, a.out_dim, a.nmb_prototypes = min(a.local_number, 2), 256, 64
    a.arch = "vit_tiny" if a.arch.startswith("vit") else "resnet"   # a 4-block ResNet of width 8
  return a


def make_config(a):
  from configs import common  # noqa: PLC0415
  c = common.dino_defaults() if a.method == "dino" else common.swav_defaults()
  c.batch_size = a.batch
  c.model.arch, c.model.patch_size, c.model.dtype = a.arch, a.patch, a.dtype
  if a.method == "dino":
    c.model.out_dim = a.out_dim
  else:
    c.model.nmb_prototypes = a.nmb_prototypes
  if a.remat:
    c.model.remat = a.remat
  if a.arch.startswith("vit"):
    c.model.overrides = {"img_size": a.global_size, **({"depth": a.depth} if a.depth else {})}
  elif a.smoke:
    c.model.overrides = {"layers": (1, 1, 1, 1), "width": 8}
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
  t0 = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
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
  return {"step_s": float(np.median(times)), "compile_s": compile_s, "xla_flops_per_step": flops,
          "flops_per_step": float(flops_lib.step_flops(config)["total"]), "loss": float(metrics["loss"]),
          "peak_bytes": stats.get("peak_bytes_in_use")}


def time_torch(a):
  import torch  # noqa: PLC0415

  from tests.torch_ref import dino as ref  # noqa: PLC0415
  from tests.torch_ref import heads as ref_heads  # noqa: PLC0415
  from tests.torch_ref import vit as ref_vit  # noqa: PLC0415

  device = "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"
  kw = {"img_size": a.global_size, **({"depth": a.depth} if a.depth else {})}
  crops = [a.global_size] * 2 + [a.local_size] * a.local_number
  images = [torch.randn(a.batch, 3, s, s, device=device) for s in crops]

  if a.method == "swav":
    from tests.torch_ref import resnet as ref_resnet  # noqa: PLC0415
    from tests.torch_ref import swav as ref_swav  # noqa: PLC0415
    backbone = ref_resnet.ResNet50(swav=True, **({"width": 8} if a.smoke else {}))
    in_dim = 32 * (8 if a.smoke else 64)
    model = ref_heads.MultiCropWrapper(backbone, ref_heads.SwAVHead(in_dim, nmb_prototypes=a.nmb_prototypes))
    trainer = ref_swav.Trainer(model.to(device), nmb_crops=[2, a.local_number], batch_size=a.batch, epochs=100,
                               niter_per_ep=1000)
  else:
    def net():
      backbone = ref_vit.vit(a.arch, a.patch, drop_path_rate=0.1, **kw)
      return ref_heads.MultiCropWrapper(backbone, ref_heads.DINOHead(backbone.embed_dim, a.out_dim)).to(device)

    trainer = ref.Trainer(net(), net(), out_dim=a.out_dim, ncrops=2 + a.local_number, epochs=100,
                          niter_per_ep=1000, batch_size=a.batch)
    trainer.loss.center = trainer.loss.center.to(device)
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


GIB = 2 ** 30


def _gib(b):
  return f"{b / GIB:.1f} GiB" if b else "n/a"


def title(a):
  crops = f"2x{a['global_size']}" + (f" + {a['local_number']}x{a['local_size']}" if a["local_number"] else "")
  arch = a["arch"] + (f"/{a['patch']}" if a["arch"].startswith("vit") else "")
  depth = f" depth {a['depth']}" if a.get("depth") else ""
  return f"{a['method'].upper()} {arch}{depth}, batch {a['batch']}, {crops}"


def table(results):
  """Markdown rows: ours and official side by side for each run."""
  lines = ["| run | implementation | step (ms) | images/s | MFU | peak memory | compile (s) |",
           "|---|---|---|---|---|---|---|"]
  for r in results:
    a, o = r["args"], r["ours"]
    mfu = lambda x: f"{100 * x:.1f}%" if x else "n/a"  # noqa: E731
    lines.append(f"| {title(a)} | ours ({a['dtype']}, remat {r.get('remat', '?')}) | {1e3 * o['step_s']:.1f} | "
                 f"{o['img_per_s']:.1f} | {mfu(o.get('mfu'))} | {_gib(o['peak_bytes'])} | {o['compile_s']:.1f} |")
    if r.get("official"):
      t = r["official"]
      lines.append(f"| | official ({'autocast' if a['torch_autocast'] else 'float32'}, {t['device']}) | "
                   f"{1e3 * t['step_s']:.1f} | {t['img_per_s']:.1f} | {mfu(t.get('mfu'))} | {_gib(t['peak_bytes'])} "
                   f"| - |")
      lines.append(f"| | **ours / official** | | **{r['ratio']:.2f}x** | | | |")
  return lines


def collect(folder, out):
  """One table (and one json list) from the .json files of several runs in `folder`."""
  results = []
  for name in sorted(os.listdir(folder)):
    if name.endswith(".json"):
      with open(os.path.join(folder, name)) as f:
        results.append(json.load(f))
  if not results:
    raise SystemExit(f"no .json results in {folder}")
  r0 = results[0]
  text = "\n".join([f"# Training step on {r0['device']} ({r0['backend']}), jax {r0['jax']}", "",
                    f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Commands: one per run below "
                    "(experiments/device_check.sh runs them all). Synthetic uint8 crops in device memory; FLOPs "
                    "analytic (experiments/flops.py); peak memory from the device's statistics.", "",
                    *table(results), "", "Commands:", "",
                    *[f"- `{r['command']}` (XLA_FLAGS=`{r.get('xla_flags', '')}`)" for r in results]]) + "\n"
  print(text)
  os.makedirs(out, exist_ok=True)
  stem = f"bench_train_{r0['backend']}"
  with open(os.path.join(out, stem + ".md"), "w") as f:
    f.write(text)
  with open(os.path.join(out, stem + ".json"), "w") as f:
    json.dump(results, f, indent=2)
  return results


def main(argv=None):
  a = parse(argv)
  if a.collect:
    return collect(a.collect, a.out)
  config = make_config(a)
  dev = jax.devices()[0]
  ours = time_ours(a, config)
  theirs = None if a.skip_torch else time_torch(a)
  ours_ips = a.batch / ours["step_s"]
  command = "python experiments/bench_train.py " + " ".join(argv if argv is not None else sys.argv[1:])
  result = {"args": vars(a), "command": command, "remat": config.model.remat, "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "device": dev.device_kind, "backend": jax.default_backend(), "jax": jax.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "ours": {**ours, "img_per_s": ours_ips}, "machine": platform.processor() or platform.machine()}
  if a.peak_tflops:
    result["ours"]["mfu"] = ours["flops_per_step"] / ours["step_s"] / (a.peak_tflops * 1e12)
  if theirs:
    result["official"] = {**theirs, "img_per_s": a.batch / theirs["step_s"]}
    if a.peak_tflops:
      result["official"]["mfu"] = ours["flops_per_step"] / theirs["step_s"] / (a.peak_tflops * 1e12)
    result["ratio"] = ours_ips / result["official"]["img_per_s"]

  lines = [f"# Training step: {title(vars(a))}", "", f"Command: `{command}`",
           f"Device: {dev.device_kind} ({jax.default_backend()}), jax {jax.__version__}; median of {a.steps} steps "
           f"after {a.warmup} warm-up steps. FLOPs per step {ours['flops_per_step'] / 1e12:.3f} T (analytic; XLA "
           f"counts {ours['xla_flops_per_step'] / 1e12:.3f} T).", "", *table([result])]
  if theirs:
    lines += ["", f"Ours / official: **{result['ratio']:.2f}x** images per second."]
  text = "\n".join(lines) + "\n"
  print(text)
  if not a.smoke or a.name:
    os.makedirs(a.out, exist_ok=True)
    name = a.name or f"bench_train_{jax.default_backend()}"
    with open(os.path.join(a.out, name + ".md"), "w") as f:
      f.write(text)
    with open(os.path.join(a.out, name + ".json"), "w") as f:
      json.dump(result, f, indent=2)
  return result


if __name__ == "__main__":
  main()
