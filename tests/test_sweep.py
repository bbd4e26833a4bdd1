"""Sweeps: grid and sweep() expansion, workdir names, the collector's statistics against hand values, and real runs
(dino_jax.train processes) through the local launcher and submitit's local executor: a half-finished sweep resumes,
a finished run is skipped, and the same config and seed give bit-identical metrics from one process to the next."""
import csv
import json
import os
import shutil
import sys
import types

import numpy as np
import pytest

from dino_jax.sweep import collect, grid, launch
from dino_jax.sweep.launch import plan
from tests.helpers import ROOT, recipe

TINY = os.path.join(ROOT, "tests", "configs", "quickstart_test.py")
QUICKSTART = os.path.join(ROOT, "configs", "quickstart.py")


def test_grid_and_sweep_expand_to_named_runs():
  runs = grid.parse_grid(["seed=0,1", "crops.local_scale=(0.2,0.5),(0.1,0.3)", "model.arch=vit_tiny"])
  assert runs == [{"seed": 0, "crops.local_scale": (0.2, 0.5), "model.arch": "vit_tiny"},
                  {"seed": 0, "crops.local_scale": (0.1, 0.3), "model.arch": "vit_tiny"},
                  {"seed": 1, "crops.local_scale": (0.2, 0.5), "model.arch": "vit_tiny"},
                  {"seed": 1, "crops.local_scale": (0.1, 0.3), "model.arch": "vit_tiny"}]
  module = types.SimpleNamespace(sweep=lambda: [{"seed": 0, "optim.lr": 1e-3}, {"seed": 1, "optim.lr": 1e-3}])
  crossed = grid.expand(module, None, ["loss.teacher_temp=0.04,0.07"])
  assert [grid.run_name(r) for r in crossed] == [          # seed last: the setting reads first
      "optim.lr=0.001,loss.teacher_temp=0.04,seed=0", "optim.lr=0.001,loss.teacher_temp=0.07,seed=0",
      "optim.lr=0.001,loss.teacher_temp=0.04,seed=1", "optim.lr=0.001,loss.teacher_temp=0.07,seed=1"]
  assert grid.run_name({"crops.local_scale": (0.2, 0.5), "data.source": "imagefolder:/a b"}) == \
      "crops.local_scale=0.2_0.5,data.source=imagefolder__a_b"
  assert grid.run_name({}) == "default" and grid.expand(types.SimpleNamespace(), None) == [{}]
  assert grid.setting_of({"optim.lr": 1e-3, "seed": 4}) == {"optim.lr": 1e-3}
  with pytest.raises(ValueError, match="same run twice"):
    grid.expand(module, None, ["seed=0"])                  # the grid's seed overrides sweep()'s: two identical runs
  with pytest.raises(ValueError, match="key=v1"):
    grid.parse_grid(["seed"])
  config = grid.resolve(QUICKSTART, {"optim.lr": 1e-3, "crops.local_scale": (0.1, 0.3), "model.arch": "vit_small"})
  assert config.optim.lr == 1e-3 and config.crops.local_scale == (0.1, 0.3) and config.model.arch == "vit_small"
  assert grid.resolve(QUICKSTART, {"model.overrides.depth": 4}).model.overrides.depth == 4
  for bad in ({"optim.lrr": 1.0}, {"optim.lr": "fast"}, {"crops": 3}):   # what train would refuse
    with pytest.raises(KeyError):
      grid.resolve(QUICKSTART, bad)


def test_recipe_sweeps_and_their_saved_configs(tmp_path):
  runs = plan(os.path.join(ROOT, "configs", "quickstart.py"), str(tmp_path), [])
  assert [os.path.basename(r.workdir) for r in runs] == [f"seed={s}" for s in range(5)]
  saved = json.load(open(os.path.join(runs[3].workdir, "config.json")))
  assert saved["seed"] == 3 and saved["method"] == "dino"
  assert runs[3].command[-1] == "--config.seed=3" and grid.status(runs[3].workdir) == "new"
  swav = plan(os.path.join(ROOT, "configs", "swav_quickstart.py"), str(tmp_path / "swav"), ["optim.lr=1e-3"])
  assert [os.path.basename(r.workdir) for r in swav] == [f"optim.lr=0.001,seed={s}" for s in range(3)]
  round2 = plan(os.path.join(ROOT, "configs", "quickstart_search.py") + ":round2", str(tmp_path / "search"), [])
  assert len(round2) == 2 and "epochs=120" in os.path.basename(round2[1].workdir)
  saved = json.load(open(os.path.join(round2[1].workdir, "config.json")))
  assert saved["epochs"] == 120 and saved["model"]["overrides"]["embed_dim"] == 128
  assert saved["crops"]["global_scale"] == [0.8, 1.0]


def _fake_run(sweep_dir, overrides, losses, knn, random_knn, pixels_knn, linear=None, online=None):
  d = os.path.join(sweep_dir, grid.run_name(overrides))
  os.makedirs(d)
  json.dump(overrides, open(os.path.join(d, "overrides.json"), "w"))
  with open(os.path.join(d, "metrics.jsonl"), "w") as f:
    for step, loss in enumerate(losses, 1):
      f.write(json.dumps({"step": step, "loss": loss}) + "\n")
      if online is not None:   # as train.py logs it: the online k-NN's own line after the step's training line
        f.write(json.dumps({"step": step, "epoch": float(step), "knn/k5/top1": online[step - 1]}) + "\n")
  json.dump({"teacher": {"k=10": {"top1": knn, "top5": 99.0}}, "random_init": {"k=10": {"top1": random_knn}},
             "pixels": {"k=10": {"top1": pixels_knn}}}, open(os.path.join(d, "eval.json"), "w"))
  if linear is not None:
    json.dump({"teacher": {"top1": linear}}, open(os.path.join(d, "eval_linear.json"), "w"))
  json.dump({"returncode": 0, "wall_s": 100.0 + len(losses)}, open(os.path.join(d, grid.DONE), "w"))
  return d


def test_collector_mean_std_and_interval_against_hand_values(tmp_path):
  s = str(tmp_path)
  for seed, knn, rnd, loss in ((0, 80.0, 30.0, 2.0), (1, 82.0, 31.0, 3.0), (2, 84.0, 35.0, 4.0)):
    _fake_run(s, {"optim.lr": 1e-3, "seed": seed}, [9.0, loss], knn, rnd, 97.5, linear=knn - 10,
              online=[20.0 + seed, knn - 5])
  _fake_run(s, {"optim.lr": 2e-3, "seed": 0}, [9.0, 1.5], 90.0, 33.0, 97.5)
  unfinished = _fake_run(s, {"optim.lr": 2e-3, "seed": 1}, [9.0], 10.0, 10.0, 97.5)
  os.remove(os.path.join(unfinished, grid.DONE))
  table = collect.collect(s)
  rows = {(r["setting"], r["model"]): r for r in table["rows"]}
  a = rows[("optim.lr=0.001", "teacher")]["metrics"]
  assert a["knn k=10"]["n"] == 3 and a["knn k=10"]["mean"] == pytest.approx(82.0)
  assert a["knn k=10"]["std"] == pytest.approx(2.0)                       # sqrt(((-2)^2 + 0 + 2^2) / (3 - 1))
  assert a["knn k=10"]["ci95"] == pytest.approx((82 - 4.302653 * 2 / 3 ** 0.5, 82 + 4.302653 * 2 / 3 ** 0.5))
  assert a["loss"]["mean"] == pytest.approx(3.0) and a["loss"]["std"] == pytest.approx(1.0)
  assert a["linear"]["mean"] == pytest.approx(72.0)
  r = rows[("optim.lr=0.001", "random_init")]["metrics"]["knn k=10"]
  assert r["mean"] == pytest.approx(32.0) and r["std"] == pytest.approx(np.std([30, 31, 35], ddof=1))
  b = rows[("optim.lr=0.002", "teacher")]["metrics"]["knn k=10"]
  assert b["n"] == 1 and b["mean"] == 90.0 and b["std"] == 0.0           # the unfinished seed is left out
  md = collect.markdown(table)
  assert "82.00 ± 2.00 [77.03, 86.97]" in md and "optim.lr=0.002,seed=1" in md.split("Not finished")[1]
  assert md.count("raw pixels") == 1                                     # the same for every setting: one row
  paths = collect.write(table, str(tmp_path / "out"), "test")
  assert all(os.path.getsize(p) > 0 for p in paths)
  runs = {row["run"]: row for row in csv.DictReader(open(tmp_path / "out" / "runs.csv"))}
  assert runs["optim.lr=0.001,seed=0"]["wall s (last launch)"] == "102"            # from its done.json
  assert runs["optim.lr=0.002,seed=1"]["wall s (last launch)"] == ""               # unfinished: none
  assert {"loss.png", "knn.png", "knn_curve.png"} <= {os.path.basename(p) for p in paths}   # k-NN over training
  merged = collect.read_metrics(os.path.join(s, "optim.lr=0.001,seed=2"))    # a step's two lines are one row
  assert merged == [{"step": 1, "loss": 9.0, "epoch": 1.0, "knn/k5/top1": 22.0},
                    {"step": 2, "loss": 4.0, "epoch": 2.0, "knn/k5/top1": 79.0}]


def _run_metrics(workdir):
  return [{k: v for k, v in m.items() if k != "img_per_sec"} for m in collect.read_metrics(workdir)]


def test_half_finished_sweep_resumes_and_runs_are_bit_identical(tmp_path):
  """A run through the local launcher; a copy of it cut back to its first step (checkpoint, metrics; no done.json) is
  resumed by submitit's local executor in another process, the finished run skipped. Same metrics, bit for bit."""
  base = ["max_steps=3", "eval.test_source=''", "checkpoint_every_steps=1", "keep_checkpoints=3",
          "crops.local_scale=(0.2,0.5)"]
  (a,) = plan(TINY, str(tmp_path / "a"), base + ["seed=0"])
  (b,) = plan(TINY, str(tmp_path / "b"), base + ["seed=0"])
  assert os.path.basename(a.workdir) == ("max_steps=3,eval.test_source=,checkpoint_every_steps=1,keep_checkpoints=3,"
                                         "crops.local_scale=0.2_0.5,seed=0")
  cache = {"JAX_COMPILATION_CACHE_DIR": str(tmp_path / "xla_cache"), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1"}
  a.env = b.env = cache                                                # b reuses a's compiled step: the test's time
  assert launch.local([a], log=lambda *_: None) == {a.workdir: 0} and grid.status(a.workdir) == "done"
  shutil.rmtree(b.workdir)
  shutil.copytree(a.workdir, b.workdir)
  for step in ("2", "3"):
    shutil.rmtree(os.path.join(b.workdir, "checkpoints", step))
  lines = open(os.path.join(b.workdir, "metrics.jsonl")).readlines()
  open(os.path.join(b.workdir, "metrics.jsonl"), "w").write(lines[0])
  os.remove(os.path.join(b.workdir, grid.DONE))
  assert grid.status(b.workdir) == "started"
  import submitit  # noqa: F401,PLC0415 (a dev requirement: missing, the test fails instead of skipping)
  todo = [r for r in (a, b) if grid.status(r.workdir) != "done"]        # what the sweep command launches
  assert todo == [b]
  jobs = launch.slurm(todo, str(tmp_path / "submitit"), cluster="local", wait=True, log=lambda *_: None,
                      timeout_min=5)
  assert jobs[0].result() == 0 and grid.status(b.workdir) == "done"
  assert "resumed at step 1" in open(os.path.join(b.workdir, "log.txt")).read()
  assert [m["step"] for m in _run_metrics(b.workdir)] == [1, 2, 3]
  assert _run_metrics(a.workdir) == _run_metrics(b.workdir)            # every logged value, as float64 JSON


def test_gpu_launcher_gives_each_process_one_device_and_queues_the_rest(tmp_path):
  """Five runs on two 'GPUs': each process sees exactly one device id, never two at once on the same id."""
  script = ("import json, os, sys, time; t = time.time(); time.sleep(0.3); "
            "json.dump({'dev': os.environ['CUDA_VISIBLE_DEVICES'], 't0': t, 't1': time.time()}, "
            "open(sys.argv[1], 'w'))")
  runs = [launch.Run(str(tmp_path / f"r{i}"), [sys.executable, "-c", script, str(tmp_path / f"r{i}.json")],
                     str(tmp_path)) for i in range(5)]
  out = launch.gpus(runs, devices=["3", "5"], log=lambda *_: None, poll_s=0.05)
  assert out == {r.workdir: 0 for r in runs} and all(grid.status(r.workdir) == "done" for r in runs)
  seen = [json.load(open(tmp_path / f"r{i}.json")) for i in range(5)]
  assert {s["dev"] for s in seen} == {"3", "5"}
  for dev in ("3", "5"):
    spans = sorted((s["t0"], s["t1"]) for s in seen if s["dev"] == dev)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), spans      # one process per device at a time
