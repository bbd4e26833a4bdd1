r"""What faults cost: the step time around an asynchronous checkpoint save, and how fast a survivor exits when its
peer is killed.

  python experiments/bench_faults.py [--config=configs/quickstart.py --steps=60 --save_every=5 --batch=N] [--peer]

Save stall: the recipe's jitted train step on a fixed uint8 batch already on the device, each step blocked on, with
`dino_jax.checkpoint.Checkpoints.save` (asynchronous, as training saves) every --save_every steps. Reported: the
median step without a save, the step that starts a save (its host time includes `save()`: the device-to-host copy of
the state and orbax's bookkeeping; the files are written by a background thread) and the step after it.

Peer death (--peer): two jax.distributed processes on localhost train tests/configs/quickstart_test.py; once both are
past the checkpoint of step 4, process 1 is killed with SIGKILL and the time until process 0 exits (with its
one-paragraph message and exit code 1) is measured, with multihost.heartbeat_timeout_s=6.

Writes experiments/results/bench_faults_<device>.{json,md}, with the load average beside the figures.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import numpy as np  # noqa: E402


def parse(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--config", default=os.path.join(ROOT, "configs", "quickstart.py"))
  ap.add_argument("--steps", type=int, default=60)
  ap.add_argument("--save_every", type=int, default=5)
  ap.add_argument("--batch", type=int, default=None, help="override the recipe's batch_size (e.g. 64 on one GPU)")
  ap.add_argument("--peer", action="store_true", help="also measure the exit time after a killed peer")
  ap.add_argument("--out", default=os.path.join(ROOT, "experiments", "results"))
  return ap.parse_args(argv)


def save_stall(a):
  import importlib.util  # noqa: PLC0415
  from dino_jax import checkpoint as ckpt_lib, sharding, state as state_lib, steps  # noqa: PLC0415
  spec = importlib.util.spec_from_file_location("recipe", a.config)
  recipe = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(recipe)
  config = recipe.get_config()
  if a.batch:
    config.batch_size = a.batch
  mesh = sharding.make_mesh()
  run = state_lib.build_run(config, steps_per_epoch=100, mesh=mesh)
  state = jax.jit(run.init, out_shardings=run.shardings)()
  c, b = config.crops, config.batch_size
  rng = np.random.default_rng(0)
  batch = {"global": rng.integers(0, 255, (b, c.global_number, c.global_size, c.global_size, 3), np.uint8)}
  if c.local_number:
    batch["local"] = rng.integers(0, 255, (b, c.local_number, c.local_size, c.local_size, 3), np.uint8)
  batch = sharding.global_batch(batch, mesh)
  step = jax.jit(steps.make_train_step(run), in_shardings=(run.shardings, sharding.batch_sharding(mesh)),
                 out_shardings=(run.shardings, sharding.replicated(mesh)), donate_argnums=(0,))
  state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
  copies = []   # the bar the stall is held to: the state's device-to-host copy, timed alone
  for _ in range(7):
    t0 = time.perf_counter()
    jax.device_get(state)
    copies.append(time.perf_counter() - t0)
  times, kinds, calls = [], [], []
  with tempfile.TemporaryDirectory() as tmp:
    checkpoints = ckpt_lib.Checkpoints(tmp, every_steps=a.save_every, keep=2)
    for i in range(1, a.steps + 1):
      t0 = time.perf_counter()
      state, _ = step(state, batch)
      t1 = time.perf_counter()
      saving = checkpoints.save(i, state, config=config)
      if saving:
        calls.append(time.perf_counter() - t1)
      jax.block_until_ready(state)
      times.append(time.perf_counter() - t0)
      kinds.append("save" if saving else ("after" if kinds and kinds[-1] == "save" else "plain"))
    checkpoints.close()
  warm = 3  # compilation and the first saves' set-up excluded
  pick = lambda k: [t * 1e3 for t, kk in list(zip(times, kinds))[warm:] if kk == k]
  plain, save, after = pick("plain"), pick("save"), pick("after")
  return {"config": os.path.relpath(a.config, ROOT), "state_mb": state_bytes / 2**20, "steps": a.steps,
          "save_every": a.save_every, "step_ms_median": float(np.median(plain)),
          "save_step_ms_median": float(np.median(save)), "after_save_step_ms_median": float(np.median(after)),
          "stall_ms_median": float(np.median(save) - np.median(plain)), "saves_timed": len(save),
          "device_to_host_ms_median": float(np.median(copies[1:]) * 1e3),
          "save_call_ms_median": float(np.median(calls[1:]) * 1e3),
          "background": checkpoints.background}


def peer_exit_time():
  workdir = tempfile.mkdtemp()
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2")
  args = [sys.executable, "-m", "dino_jax.train", "--config=tests/configs/quickstart_test.py", f"--workdir={workdir}",
          "--config.max_steps=200", "--config.eval.test_source=", "--config.multihost.heartbeat_timeout_s=6",
          "--config.block_each_step=True"]
  logs = [open(os.path.join(workdir, f"p{i}.log"), "w") for i in range(2)]
  procs = [subprocess.Popen(args, cwd=ROOT, env=dict(env, JAX_PROCESS_ID=str(i)), stdout=logs[i],
                            stderr=subprocess.STDOUT) for i in range(2)]
  metrics = os.path.join(workdir, "metrics.jsonl")
  while not (os.path.exists(metrics) and len(open(metrics).readlines()) >= 5 and
             os.path.isdir(os.path.join(workdir, "checkpoints", "4"))):
    if procs[0].poll() is not None:
      raise RuntimeError(open(logs[0].name).read()[-3000:])
    time.sleep(0.05)
  procs[1].send_signal(signal.SIGKILL)
  killed = time.monotonic()
  rc = procs[0].wait(timeout=120)
  took = time.monotonic() - killed
  procs[1].wait()
  for log in logs:
    log.close()
  message = [l for l in open(logs[0].name).read().splitlines() if l.startswith("ERROR: process 0")]
  return {"exit_s": took, "exit_code": rc, "heartbeat_timeout_s": 6, "message": message[0] if message else None}


def main():
  a = parse()
  out = {"device": jax.devices()[0].device_kind, "platform": jax.devices()[0].platform,
         "load_average": os.getloadavg(), "save_stall": save_stall(a)}
  if a.peer:
    out["peer_death"] = peer_exit_time()
  os.makedirs(a.out, exist_ok=True)
  name = f"bench_faults_{out['platform']}"
  with open(os.path.join(a.out, name + ".json"), "w") as f:
    json.dump(out, f, indent=2)
  s = out["save_stall"]
  lines = [f"# What faults cost ({out['device']}, load average {out['load_average'][0]:.1f})", "",
           f"`python experiments/bench_faults.py{' --peer' if a.peer else ''}` — {s['config']}, state "
           f"{s['state_mb']:.1f} MiB, a save every {s['save_every']} of {s['steps']} steps", "",
           "| | ms (median) |", "|---|---|",
           f"| step without a save | {s['step_ms_median']:.1f} |",
           f"| step that starts an asynchronous save | {s['save_step_ms_median']:.1f} |",
           f"| step after it (files written in the background) | {s['after_save_step_ms_median']:.1f} |",
           f"| stall (save step - plain step) | {s['stall_ms_median']:.1f} |",
           f"| the training loop blocked in `Checkpoints.save()` | {s['save_call_ms_median']:.1f} |",
           f"| the state's device-to-host copy alone (`jax.device_get`) | {s['device_to_host_ms_median']:.1f} |",
           "", "Orbax's save runs on a background thread" if s["background"] else
           "Orbax's save runs on the main thread (multi-process)",
           ]
  if a.peer:
    p = out["peer_death"]
    lines += ["", f"Peer killed (SIGKILL) in a 2-process run: the survivor exited with code {p['exit_code']} after "
              f"{p['exit_s']:.1f} s (multihost.heartbeat_timeout_s={p['heartbeat_timeout_s']}).", "",
              f"> {p['message']}"]
  with open(os.path.join(a.out, name + ".md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
