"""experiments/bench_train.py runs end to end on a tiny model: our step and the official PyTorch step are timed on the
same shapes and the figures are written (the benchmark itself is for a GPU; see the script's docstring)."""
import importlib.util
import json
import math
import os

from tests.helpers import ROOT


def test_bench_train_smoke(tmp_path):
  spec = importlib.util.spec_from_file_location("bench_train", os.path.join(ROOT, "experiments", "bench_train.py"))
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  out = bench.main(["--arch=vit_tiny", "--depth=1", "--batch=4", "--global_size=32", "--local_size=16",
                    "--local_number=2", "--out_dim=256", "--dtype=float32", "--steps=2", "--warmup=1",
                    f"--out={tmp_path}"])
  saved = json.load(open(tmp_path / "bench_train_cpu.json"))
  assert saved["ratio"] == out["ratio"] > 0
  assert math.isfinite(saved["ours"]["loss"]) and saved["ours"]["flops_per_step"] > 0
  assert saved["official"]["img_per_s"] > 0 and saved["ours"]["img_per_s"] > 0
  assert "Ours / official" in (tmp_path / "bench_train_cpu.md").read_text()
