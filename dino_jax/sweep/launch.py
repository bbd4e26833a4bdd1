"""Three ways to run a sweep's runs, each run one `python -m dino_jax.train` process in its own workdir:

- local: one after another on this machine;
- gpus:  one run per GPU in parallel (CUDA_VISIBLE_DEVICES set per process), the rest queued for the next free GPU;
- slurm: one submitit job per run (a job array), multi-node jobs with JAX's distributed set-up from SLURM's
         environment; a preempted or timed-out job is requeued and resumes from its checkpoint.

A run marked done is skipped; a started one resumes (dino_jax.train resumes from the workdir's latest checkpoint).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shlex
import subprocess
import sys
import time

from dino_jax.sweep import grid


@dataclasses.dataclass
class Run:
  """One run of a sweep: its workdir, the train command that makes it, and the directory that command runs in."""
  workdir: str
  command: list[str]
  cwd: str
  env: dict = dataclasses.field(default_factory=dict)

  def execute(self, extra_env: dict | None = None, task: int = 0) -> int:
    """Runs the command to its end, its output appended to <workdir>/log.txt (log.<task>.txt for the other processes
    of a multi-process run); task 0 writes done.json on success. The exit status."""
    os.makedirs(self.workdir, exist_ok=True)
    env = {**os.environ, **self.env, **(extra_env or {})}
    t0 = time.time()
    with open(os.path.join(self.workdir, f"log.{task}.txt" if task else "log.txt"), "a") as log:
      rc = subprocess.call(self.command, cwd=self.cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
    if rc == 0 and task == 0:
      with open(os.path.join(self.workdir, grid.DONE), "w") as f:
        json.dump({"returncode": rc, "wall_s": time.time() - t0, "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}, f)
    return rc


def train_command(config_path: str, workdir: str, overrides: dict, python: str = sys.executable) -> list[str]:
  return [python, "-m", "dino_jax.train", f"--config={config_path}", f"--workdir={workdir}",
          *grid.cli_overrides(overrides)]


def local(runs: list[Run], log=print) -> dict:
  """One after another; a failed run is reported and the next one starts. {workdir: exit status}."""
  out = {}
  for i, r in enumerate(runs):
    log(f"[{i + 1}/{len(runs)}] {r.workdir}")
    out[r.workdir] = r.execute()
    if out[r.workdir]:
      log(f"  failed (exit {out[r.workdir]}), see {r.workdir}/log.txt")
  return out


def visible_gpus() -> list[str]:
  """CUDA_VISIBLE_DEVICES if set, else the GPUs nvidia-smi lists."""
  if os.environ.get("CUDA_VISIBLE_DEVICES"):
    return [g for g in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if g.strip()]
  try:
    listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=True).stdout
  except (OSError, subprocess.CalledProcessError):
    return []
  return [str(i) for i, line in enumerate(listing.splitlines()) if line.startswith("GPU ")]


def gpus(runs: list[Run], devices: list[str] | None = None, log=print, poll_s: float = 1.0) -> dict:
  """One process per device id in `devices` (default: visible_gpus()), each seeing only its GPU; a run waits for
  a free one. {workdir: exit status}."""
  devices = list(devices or visible_gpus())
  if not devices:
    raise RuntimeError("--launcher=gpus: no GPU found (set CUDA_VISIBLE_DEVICES or --gpus)")
  queue, busy, out = list(runs), {}, {}
  env_of = lambda dev: {"CUDA_VISIBLE_DEVICES": dev, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
  import threading  # noqa: PLC0415
  lock = threading.Lock()

  def work(dev, r):
    rc = r.execute(env_of(dev))
    with lock:
      out[r.workdir] = rc
      busy.pop(dev)
    log(f"  {'done' if rc == 0 else f'FAILED (exit {rc})'} on GPU {dev}: {r.workdir}")

  threads = []
  while queue or busy:
    with lock:
      free = [d for d in devices if d not in busy]
      while free and queue:
        dev, r = free.pop(0), queue.pop(0)
        busy[dev] = r
        log(f"GPU {dev}: {r.workdir} ({len(queue)} queued)")
        threads.append(threading.Thread(target=work, args=(dev, r)))
        threads[-1].start()
    time.sleep(poll_s)
  for t in threads:
    t.join()
  return out


class SlurmJob:
  """What a submitit job runs: the train command, with JAX's multi-process set-up when the job spans several tasks.
  `checkpoint()` is submitit's hook on preemption or timeout: the job is requeued as is, and train resumes."""

  def __init__(self, run: Run):
    self.run = run

  def __call__(self) -> int:
    import submitit  # noqa: PLC0415
    env = {}
    job = submitit.JobEnvironment()
    if job.num_tasks > 1:                  # one process per task; jax.distributed.initialize() reads SLURM's variables
      env["DINO_JAX_DISTRIBUTED"] = "1"
    rc = self.run.execute(env, task=job.global_rank)
    if rc:
      raise RuntimeError(f"{self.run.workdir}: exit status {rc}, see its log.txt")
    return rc

  def checkpoint(self):
    import submitit  # noqa: PLC0415
    return submitit.helpers.DelayedSubmission(SlurmJob(self.run))


def slurm(runs: list[Run], folder: str, *, cluster: str | None = None, wait: bool = False, log=print,
          **params) -> list:
  """One job per run, submitted together as an array. `params` are submitit's (timeout_min, slurm_partition, nodes,
  gpus_per_node, tasks_per_node, cpus_per_task, slurm_array_parallelism, ...); cluster='local' runs the jobs on this
  machine through submitit's local executor, 'debug' in this process. Returns the jobs (waited for with wait=True)."""
  import submitit  # noqa: PLC0415
  executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
  executor.update_parameters(**params)
  with executor.batch():
    jobs = [executor.submit(SlurmJob(r)) for r in runs]
  for r, j in zip(runs, jobs):
    log(f"job {j.job_id}: {r.workdir}")
  if wait:
    for j in jobs:
      j.result()
  return jobs


def plan(config_arg: str, sweep_dir: str, grid_specs: list[str], python: str = sys.executable) -> list[Run]:
  """The sweep's runs, each workdir prepared with overrides.json, config.json (the full config it trains with) and
  command.sh."""
  from dino_jax.checkpoint import config_to_dict  # noqa: PLC0415
  module, arg = grid.load_config_module(config_arg)
  runs = []
  for overrides in grid.expand(module, arg, grid_specs):
    workdir = os.path.join(sweep_dir, grid.run_name(overrides))
    config = grid.resolve(config_arg, overrides)     # fails here on an unknown key or a bad type
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "overrides.json"), "w") as f:
      json.dump(overrides, f, indent=1)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      json.dump(config_to_dict(config), f, indent=1)
    command = train_command(config_arg, workdir, overrides, python)
    with open(os.path.join(workdir, "command.sh"), "w") as f:
      f.write(" ".join(shlex.quote(c) for c in command) + "\n")
    runs.append(Run(workdir=workdir, command=command, cwd=os.getcwd()))
  return runs
