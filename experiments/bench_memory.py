r"""What the backward keeps: residual bytes of the student's loss for each `model.remat` policy, and the step's FLOPs.

  python experiments/bench_memory.py [--arch=vit_small --patch=16 --batch=64 --dtype=bfloat16 --remat=none,block,dots
      --compile] [--smoke]

No data and no computation: `jax.eval_shape` over the leaves of `jax.vjp(student_loss, params)[1]` (the function
`jax.vjp` returns holds exactly the arrays the backward needs) for the DINO student on 2 x global + N x local crops.
Works on a CPU for the real shapes. FLOPs are analytic (experiments/flops.py). `--compile` also compiles the whole
step and prints `compiled.memory_analysis()`: meaningful on a GPU only (XLA:CPU's scheduler places the recomputation
early, so its temporaries do not shrink with remat). `--plain_loss` measures the loss without its custom VJP
(log_softmax + einsum under autodiff), for comparison.

Writes experiments/results/bench_memory_<backend>.{md,json} (not with --smoke).
"""
from __future__ import annotations

import argparse
import collections
import functools
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "experiments"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import flops as flops_lib  # noqa: E402

GIB = 2 ** 30


def parse(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  flops_lib.add_shape_args(ap)
  ap.add_argument("--remat", default="none,block,dots")
  ap.add_argument("--plain_loss", action="store_true", help="also measure remat=none with the autodiff loss")
  ap.add_argument("--compile", action="store_true", help="also the compiled step's memory_analysis() (GPU)")
  ap.add_argument("--smoke", action="store_true", help="tiny shapes, nothing written (CPU check of the script)")
  ap.add_argument("--out", default=os.path.join(ROOT, "experiments", "results"))
  a = ap.parse_args(argv)
  if a.smoke:
    a.arch, a.patch, a.batch, a.global_size, a.local_size, a.local_number, a.out_dim = (
        "vit_tiny", 8, 2, 32, 16, 2, 256)
  return a


def make_config(a, remat):
  from configs import common  # noqa: PLC0415
  c = common.dino_defaults()
  c.batch_size = a.batch
  c.model.arch, c.model.patch_size, c.model.out_dim, c.model.dtype = a.arch, a.patch, a.out_dim, a.dtype
  c.model.remat = remat
  c.model.overrides = {"img_size": a.global_size, **({"depth": 2} if a.smoke else {})}
  c.crops.global_size, c.crops.local_size, c.crops.local_number = a.global_size, a.local_size, a.local_number
  return c


def _plain_dino_loss(student_logits, teacher_logits, center, *, student_temp=0.1, num_global=2, teacher_probs=None,
                     **_):
  """The loss before its custom VJP: log_softmax and the pair contraction under autodiff."""
  del teacher_logits, center
  b = teacher_probs.shape[0] // num_global
  n = student_logits.shape[0] // b
  logp = jax.nn.log_softmax(student_logits.astype(jnp.float32) / student_temp, axis=-1).reshape(n, b, -1)
  ce = -jnp.einsum("tbk,sbk->ts", teacher_probs.reshape(num_global, b, -1), logp) / b
  same = jnp.arange(num_global)[:, None] == jnp.arange(n)[None, :]
  return jnp.sum(jnp.where(same, 0.0, ce)) / (num_global * n - num_global)


def residuals(config, plain_loss=False):
  """ShapeDtypeStructs of the arrays the student's backward keeps."""
  from dino_jax import losses  # noqa: PLC0415
  from dino_jax import state as state_lib  # noqa: PLC0415
  from dino_jax.methods import dino  # noqa: PLC0415
  run = state_lib.build_run(config, steps_per_epoch=1000)
  c, b = config.crops, config.batch_size
  f32 = jnp.float32
  crops = [jax.ShapeDtypeStruct((c.global_number * b, c.global_size, c.global_size, 3), f32)]
  if c.local_number:
    crops.append(jax.ShapeDtypeStruct((c.local_number * b, c.local_size, c.local_size, 3), f32))
  targets = jax.ShapeDtypeStruct((c.global_number * b, config.model.out_dim), f32)
  strip = lambda t: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), t)  # noqa: E731

  def backward_fn(params, stats, crops, targets):
    loss = functools.partial(dino.student_loss, graphdef=run.graphdef, batch_stats=stats, crops=crops,
                             key=jax.random.key(0), targets=targets, config=config)
    return jax.vjp(lambda p: loss(p)[0], params)[1]

  saved = losses.dino_loss
  if plain_loss:
    losses.dino_loss = _plain_dino_loss
  try:
    return run, jax.eval_shape(backward_fn, strip(run.abstract.params), strip(run.abstract.batch_stats), crops,
                               targets)
  finally:
    losses.dino_loss = saved


def summarize(tree, logits_shape):
  leaves = jax.tree.leaves(tree)
  n_bytes = sum(x.size * x.dtype.itemsize for x in leaves)
  groups = collections.Counter()
  for x in leaves:
    groups[(tuple(x.shape), str(x.dtype), x.dtype.itemsize)] += 1
  top = sorted(groups.items(), key=lambda kv: -kv[1] * kv[0][2] * _size(kv[0][0]))[:8]
  logit_copies = sum(1 for x in leaves if x.dtype == jnp.float32 and _size(x.shape) >= _size(logits_shape))
  return {"bytes": n_bytes, "arrays": len(leaves), "fp32_full_logit_copies": logit_copies,
          "largest": [{"shape": list(s), "dtype": d, "count": n,
                       "bytes": n * i * _size(s)} for (s, d, i), n in top]}


def _size(shape):
  out = 1
  for s in shape:
    out *= s
  return out


def compiled_memory(run):
  """memory_analysis() of the whole compiled train step (a GPU figure; on a CPU it does not reflect remat)."""
  from dino_jax import sharding, steps  # noqa: PLC0415
  c, b = run.config.crops, run.config.batch_size
  u8 = jnp.uint8
  batch = {"global": jax.ShapeDtypeStruct((b, c.global_number, c.global_size, c.global_size, 3), u8,
                                          sharding=sharding.batch_sharding(run.mesh))}
  if c.local_number:
    batch["local"] = jax.ShapeDtypeStruct((b, c.local_number, c.local_size, c.local_size, 3), u8,
                                          sharding=sharding.batch_sharding(run.mesh))
  step = jax.jit(steps.make_train_step(run), donate_argnums=(0,))
  m = step.lower(run.abstract, batch).compile().memory_analysis()
  if m is None:
    return None
  return {k: int(getattr(m, k)) for k in ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes",
                                          "generated_code_size_in_bytes") if hasattr(m, k)}


def main(argv=None):
  a = parse(argv)
  rows = []
  cases = [(r, False) for r in a.remat.split(",")] + ([("none", True)] if a.plain_loss else [])
  base_flops = None
  for remat, plain in cases:
    config = make_config(a, remat)
    run, res = residuals(config, plain_loss=plain)
    logits_shape = ((config.crops.global_number + config.crops.local_number) * a.batch, a.out_dim)
    row = {"remat": remat, "loss": "autodiff" if plain else "custom VJP", **summarize(res, logits_shape)}
    f = flops_lib.step_flops(config)
    base_flops = base_flops or flops_lib.step_flops(config, "none")["total"]
    row.update(flops_per_step=f["total"], flops_ratio=f["total"] / base_flops)
    if a.compile:
      row["memory_analysis"] = compiled_memory(run)
    rows.append(row)
    print(json.dumps({k: v for k, v in row.items() if k != "largest"}), flush=True)

  crops = f"2x{a.global_size}" + (f" + {a.local_number}x{a.local_size}" if a.local_number else "")
  cmd = " ".join(argv if argv is not None else sys.argv[1:])
  lines = [f"# Residuals of the backward: DINO {a.arch}/{a.patch}, {a.dtype}, batch {a.batch}, {crops}, "
           f"out_dim {a.out_dim}", "",
           f"Command: `python experiments/bench_memory.py {cmd}` (jax {jax.__version__}, {jax.default_backend()}).",
           "Residuals: `jax.eval_shape` over the leaves of `jax.vjp(student_loss, params)[1]` (what the backward "
           "keeps; no data, no computation). FLOPs: analytic, experiments/flops.py (x1.00 = no remat).", "",
           "| remat | loss | residuals | arrays | fp32 copies of the [crops*B, out_dim] logits | FLOPs/step | vs none |",
           "|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['remat']} | {r['loss']} | {r['bytes'] / GIB:.2f} GiB | {r['arrays']} | "
                 f"{r['fp32_full_logit_copies']} | {r['flops_per_step'] / 1e12:.2f} T | x{r['flops_ratio']:.2f} |")
  if any("memory_analysis" in r for r in rows):
    lines += ["", "| remat | compiled temp | arguments | outputs |", "|---|---|---|---|"]
    for r in rows:
      m = r.get("memory_analysis") or {}
      lines.append(f"| {r['remat']} | {m.get('temp_size_in_bytes', 0) / GIB:.2f} GiB | "
                   f"{m.get('argument_size_in_bytes', 0) / GIB:.2f} GiB | {m.get('output_size_in_bytes', 0) / GIB:.2f} GiB |")
  lines += ["", "Largest residual groups (shape, dtype, count) per policy:", ""]
  for r in rows:
    top = ", ".join(f"{g['count']}x{tuple(g['shape'])} {g['dtype']} ({g['bytes'] / GIB:.2f} GiB)"
                    for g in r["largest"][:4])
    lines.append(f"- {r['remat']} ({r['loss']}): {top}")
  text = "\n".join(lines) + "\n"
  print(text)
  if not a.smoke:
    os.makedirs(a.out, exist_ok=True)
    name = f"bench_memory_{jax.default_backend()}"
    with open(os.path.join(a.out, name + ".md"), "w") as f:
      f.write(text)
    with open(os.path.join(a.out, name + ".json"), "w") as f:
      json.dump({"args": vars(a), "jax": jax.__version__, "backend": jax.default_backend(), "rows": rows}, f,
                indent=2)
  return rows


if __name__ == "__main__":
  main()
