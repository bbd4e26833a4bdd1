r"""Run a recipe over seeds and settings, then tabulate mean ± std over seeds.

  python -m dino_jax.sweep --config=configs/quickstart.py                       # the recipe's sweep() (5 seeds)
  python -m dino_jax.sweep --config=configs/quickstart.py --grid=seed=0,1,2 --grid=optim.lr=5e-4,1e-3
  python -m dino_jax.sweep --config=... --launcher=gpus                         # one run per GPU, the rest queued
  python -m dino_jax.sweep --config=... --launcher=slurm --slurm_partition=p --slurm_gpus_per_node=8 --slurm_nodes=2
  python -m dino_jax.sweep --config=... --launcher=none                         # only collect what is there

The runs are the recipe's `sweep()` (a list of override dicts) crossed with the --grid axes. Each run trains with
`python -m dino_jax.train` in <workdir>/<its overrides> (e.g. runs/sweeps/quickstart/seed=3), with its overrides,
full config and command saved there. Running the same command again skips finished runs and resumes unfinished
ones. Afterwards the collector writes results.md / .csv / .json, runs.csv and loss.png / knn.png to --results (the
sweep's workdir by default).
"""
from __future__ import annotations

import os
import sys

from absl import app, flags

from dino_jax.sweep import collect, grid, launch
from dino_jax.sweep.launch import plan

_CONFIG = flags.DEFINE_string("config", None, "Recipe file (configs/x.py, or configs/x.py:arg).", required=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "The sweep's directory (default runs/sweeps/<recipe>).")
_GRID = flags.DEFINE_multi_string("grid", [], "key=v1,v2,...: a grid axis (repeat for a product).")
_LAUNCHER = flags.DEFINE_enum("launcher", "local", ["local", "gpus", "slurm", "none"],
                              "local: one run after another; gpus: one run per GPU; slurm: submitit jobs; none: "
                              "collect only.")
_GPUS = flags.DEFINE_list("gpus", None, "GPU ids for --launcher=gpus (default: CUDA_VISIBLE_DEVICES or all).")
_RESULTS = flags.DEFINE_string("results", None, "Where the tables and plots go (default: the sweep's workdir).")
_TITLE = flags.DEFINE_string("title", None, "Title of the table and plots (default: the recipe's name).")
_COLLECT = flags.DEFINE_bool("collect", True, "Tabulate the finished runs after launching.")
_DRY = flags.DEFINE_bool("dry_run", False, "List the runs and their status, launch nothing.")
_SLURM_CLUSTER = flags.DEFINE_string("slurm_cluster", None, "submitit cluster: None (Slurm), 'local' or 'debug'.")
_SLURM_PARTITION = flags.DEFINE_string("slurm_partition", None, "Slurm partition.")
_SLURM_NODES = flags.DEFINE_integer("slurm_nodes", 1, "Nodes per run (one JAX process per task).")
_SLURM_GPUS = flags.DEFINE_integer("slurm_gpus_per_node", 0, "GPUs per node.")
_SLURM_TASKS = flags.DEFINE_integer("slurm_tasks_per_node", 1, "Processes per node (1: one process drives the "
                                    "node's GPUs).")
_SLURM_CPUS = flags.DEFINE_integer("slurm_cpus_per_task", 10, "CPUs per task (data loading workers).")
_SLURM_TIMEOUT = flags.DEFINE_integer("slurm_timeout_min", 60 * 24, "Job time limit; a timed-out job is requeued "
                                      "and resumes.")
_SLURM_PARALLEL = flags.DEFINE_integer("slurm_array_parallelism", 64, "Jobs of the array running at once.")
_SLURM_WAIT = flags.DEFINE_bool("slurm_wait", False, "Wait for the jobs (then collect).")


def main(argv):
  del argv
  recipe = os.path.splitext(os.path.basename(_CONFIG.value.partition(":")[0]))[0]
  sweep_dir = _WORKDIR.value or os.path.join("runs", "sweeps", recipe)
  runs = plan(_CONFIG.value, sweep_dir, _GRID.value)
  todo = [r for r in runs if grid.status(r.workdir) != "done"]
  for r in runs:
    print(f"{grid.status(r.workdir):8s} {r.workdir}")
  print(f"{len(runs)} runs, {len(runs) - len(todo)} done, {len(todo)} to run ({_LAUNCHER.value})")
  if _DRY.value:
    return
  if todo and _LAUNCHER.value == "local":
    launch.local(todo)
  elif todo and _LAUNCHER.value == "gpus":
    launch.gpus(todo, _GPUS.value)
  elif todo and _LAUNCHER.value == "slurm":
    params = dict(timeout_min=_SLURM_TIMEOUT.value, nodes=_SLURM_NODES.value, tasks_per_node=_SLURM_TASKS.value,
                  cpus_per_task=_SLURM_CPUS.value, slurm_array_parallelism=_SLURM_PARALLEL.value, name=recipe)
    if _SLURM_GPUS.value:
      params["gpus_per_node"] = _SLURM_GPUS.value
    if _SLURM_PARTITION.value:
      params["slurm_partition"] = _SLURM_PARTITION.value
    launch.slurm(todo, os.path.join(sweep_dir, "submitit"), cluster=_SLURM_CLUSTER.value, wait=_SLURM_WAIT.value,
                 **params)
    if not _SLURM_WAIT.value:
      print("submitted; rerun with --launcher=none to collect once the jobs are done")
      return
  if _COLLECT.value:
    table = collect.collect(sweep_dir, [os.path.basename(r.workdir) for r in runs])
    out = _RESULTS.value or sweep_dir
    for path in collect.write(table, out, _TITLE.value or recipe):
      print("wrote", path)
    print(collect.markdown(table, _TITLE.value or recipe))
  failed = [r.workdir for r in runs if grid.status(r.workdir) != "done"]
  if failed and _LAUNCHER.value != "none":
    print("not finished:", " ".join(failed), file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
