"""Tabulate a sweep: every run's final loss, k-NN top-1 per k and linear top-1 (from its metrics.jsonl, eval.json and
eval_linear.json), grouped by setting (the runs' overrides without the seed): seeds, mean ± std and the 95 %
interval of the mean (Student t), beside the baselines the evaluation wrote (the architecture at random
initialisation, the raw pixels). Writes results.md, results.csv (per setting), runs.csv (per run), results.json,
and loss.png / knn.png.
"""
from __future__ import annotations

import csv
import json
import math
import os
import re

import numpy as np

from dino_jax.sweep import grid

TRAINED, RANDOM, PIXELS = "teacher", "random_init", "pixels"
MODEL_LABELS = {TRAINED: "trained", RANDOM: "random init", PIXELS: "raw pixels"}


def _read_json(path):
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def read_metrics(workdir: str) -> list[dict]:
  """metrics.jsonl, one row per step: the training line and the online k-NN line of a step merged, the later value
  of a key winning (a resumed run may log a step twice)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  by_step = {}
  with open(path) as f:
    for line in f:
      if line.strip():
        m = json.loads(line)
        by_step.setdefault(m["step"], {}).update(m)
  return [by_step[s] for s in sorted(by_step)]


def read_run(workdir: str) -> dict:
  """One run's overrides, status and final figures: {'values': {(model, metric): value}} with metric 'loss',
  'knn k=K' or 'linear'."""
  overrides = grid.read_overrides(workdir)
  metrics = read_metrics(workdir)
  values = {}
  if metrics:
    losses = [m["loss"] for m in metrics if "loss" in m]
    if losses:
      values[(TRAINED, "loss")] = losses[-1]
  ev = _read_json(os.path.join(workdir, "eval.json")) or {}
  for model in (TRAINED, RANDOM, PIXELS):
    for k, r in (ev.get(model) or {}).items():
      values[(model, f"knn {k}")] = r["top1"]
  lin = _read_json(os.path.join(workdir, "eval_linear.json")) or {}
  for model in (TRAINED, RANDOM, PIXELS):
    if model in lin:
      values[(model, "linear")] = lin[model]["top1"]
  return {"workdir": workdir, "name": os.path.basename(workdir), "overrides": overrides,
          "setting": grid.run_name(grid.setting_of(overrides)), "seed": overrides.get(grid.SEED),
          "status": grid.status(workdir), "values": values, "metrics": metrics,
          "wall_s": (_read_json(os.path.join(workdir, "done.json")) or {}).get("wall_s")}


def summarize(xs) -> dict:
  """n, mean, sample std (ddof 1; 0 for one value) and the 95 % interval of the mean (t distribution)."""
  xs = np.asarray(xs, np.float64)
  n = len(xs)
  mean = float(xs.mean())
  std = float(xs.std(ddof=1)) if n > 1 else 0.0
  if n > 1:
    from scipy import stats  # noqa: PLC0415 (scikit-learn's dependency)
    half = float(stats.t.ppf(0.975, n - 1)) * std / math.sqrt(n)
  else:
    half = float("nan")
  return {"n": n, "mean": mean, "std": std, "ci95": (mean - half, mean + half)}


def _metric_order(metric):
  kind, _, k = metric.partition(" ")
  return ({"loss": 0, "knn": 1, "linear": 2}[kind], int(k[2:]) if k.startswith("k=") else 0)


def collect(sweep_dir: str, names: list[str] | None = None) -> dict:
  """Every run of `sweep_dir` (or those named) read and grouped: {'runs': [...], 'rows': [{'setting', 'model',
  'n', 'metrics': {metric: summary}}], 'metrics': [...]}. Only finished runs count; the others are listed."""
  if names is None:
    names = sorted(n for n in os.listdir(sweep_dir) if os.path.exists(os.path.join(sweep_dir, n, "overrides.json")))
  runs = [read_run(os.path.join(sweep_dir, n)) for n in names]
  done = [r for r in runs if r["status"] == "done"]
  settings = list(dict.fromkeys(r["setting"] for r in done))
  metrics = sorted({m for r in done for (_, m) in r["values"]}, key=_metric_order)
  rows = []
  for model in (TRAINED, RANDOM, PIXELS):
    for s in settings:
      group = [r for r in done if r["setting"] == s]
      row = {"setting": s, "model": model, "seeds": [r["seed"] for r in group], "metrics": {}}
      for m in metrics:
        xs = [r["values"][(model, m)] for r in group if (model, m) in r["values"]]
        if xs:
          row["metrics"][m] = summarize(xs)
      if row["metrics"]:
        row["n"] = max(v["n"] for v in row["metrics"].values())
        rows.append(row)
  return {"runs": runs, "rows": rows, "metrics": metrics, "settings": settings}


def _cell(s, digits):
  if s["n"] == 1 or s["std"] == 0:   # one seed, or a baseline that does not depend on it
    return f"{s['mean']:.{digits}f}"
  lo, hi = s["ci95"]
  return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def _pixels_once(rows):
  """The raw-pixel k-NN does not depend on the setting's network: one row, unless the settings change it."""
  px = [r for r in rows if r["model"] == PIXELS]
  same = len({json.dumps({m: v["mean"] for m, v in r["metrics"].items()}, sort_keys=True) for r in px}) <= 1
  return [r for r in rows if r["model"] != PIXELS] + (px[:1] if same else px), same


def markdown(table: dict, title: str = "") -> str:
  rows, pixels_shared = _pixels_once(table["rows"])
  metrics = table["metrics"]
  head = ["setting", "model", "seeds"] + [m.replace("knn", "k-NN top-1").replace("linear", "linear top-1")
                                           .replace("loss", "final loss") for m in metrics]
  lines = ([f"### {title}", ""] if title else []) + ["| " + " | ".join(head) + " |",
                                                      "|" + "|".join("---" for _ in head) + "|"]
  for r in rows:
    setting = "(any)" if r["model"] == PIXELS and pixels_shared else r["setting"]
    cells = [_cell(r["metrics"][m], 4 if m == "loss" else 2) if m in r["metrics"] else "" for m in metrics]
    lines.append("| " + " | ".join([f"`{setting}`", MODEL_LABELS[r["model"]], str(r["n"])] + cells) + " |")
  pending = [r["name"] for r in table["runs"] if r["status"] != "done"]
  lines += ["", "mean ± sample std over seeds [95 % interval of the mean, Student t]; k-NN and linear top-1 in %."]
  if pending:
    lines.append(f"Not finished, left out: {', '.join(pending)}.")
  return "\n".join(lines) + "\n"


def write_csv(table: dict, path: str):
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["setting", "model", "metric", "n", "mean", "std", "ci95_low", "ci95_high"])
    for r in table["rows"]:
      for m, s in r["metrics"].items():
        w.writerow([r["setting"], r["model"], m, s["n"], s["mean"], s["std"], *s["ci95"]])


def write_runs_csv(table: dict, path: str):
  cols = sorted({key for r in table["runs"] for key in r["values"]}, key=lambda k: (k[0] != TRAINED, _metric_order(k[1])))
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["run", "setting", "seed", "status", "wall s (last launch)"] + [f"{m} {metric}" for m, metric in cols])
    for r in table["runs"]:
      wall = "" if r.get("wall_s") is None else f"{r['wall_s']:.0f}"
      w.writerow([r["name"], r["setting"], r["seed"], r["status"], wall] + [r["values"].get(c, "") for c in cols])


def plot(table: dict, out_dir: str, title: str = "") -> list[str]:
  """loss.png: the loss per step, one colour per setting (mean over seeds, the seeds' range shaded); knn_curve.png:
  the online k-NN over training, the same way, when the runs logged one; knn.png: each
  run's final k-NN top-1 per setting (dots), their mean, and the baselines as lines. The files written."""
  import matplotlib  # noqa: PLC0415
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415
  done = [r for r in table["runs"] if r["status"] == "done" and r["metrics"]]
  written = []
  colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  def curves(key, ylabel, name, what):
    """One line per setting: the mean over seeds of `key` per step, the seeds' range shaded; None if no run has it."""
    fig, ax = plt.subplots(figsize=(7, 4))
    drawn = False
    for i, s in enumerate(table["settings"]):
      group = [r for r in done if r["setting"] == s and any(key in m for m in r["metrics"])]
      if not group:
        continue
      steps = sorted(set.intersection(*[{m["step"] for m in r["metrics"] if key in m} for r in group]))
      ys = np.array([[{m["step"]: m[key] for m in r["metrics"] if key in m}[st] for st in steps] for r in group])
      c = colours[i % len(colours)]
      ax.plot(steps, ys.mean(0), color=c, lw=1.2, label=f"{s} ({len(group)} seeds)")
      if len(group) > 1:
        ax.fill_between(steps, ys.min(0), ys.max(0), color=c, alpha=0.25, lw=0)
      drawn = True
    if drawn:
      ax.set_xlabel("step")
      ax.set_ylabel(ylabel)
      ax.set_title(title or f"{what}: mean over seeds, range shaded")
      ax.legend(fontsize=7)
      fig.tight_layout()
      written.append(os.path.join(out_dir, name))
      fig.savefig(written[-1], dpi=120)
    plt.close(fig)

  curves("loss", "training loss", "loss.png", "loss")
  online = sorted({k for r in done for m in r["metrics"] for k in m if re.fullmatch(r"knn/k\d+/top1", k)},
                  key=lambda k: int(k.split("/")[1][1:]))
  if online:   # the online k-NN (eval.every_epochs), the largest k
    curves(online[-1], f"k-NN top-1 (%), k = {online[-1].split('/')[1][1:]}", "knn_curve.png", "k-NN over training")

  knn = [m for m in table["metrics"] if m.startswith("knn")]
  if knn:
    fig, axes = plt.subplots(1, len(knn), figsize=(3.5 * len(knn) + 1, 3.6), squeeze=False)
    for ax, m in zip(axes[0], knn):
      for i, s in enumerate(table["settings"]):
        xs = [r["values"][(TRAINED, m)] for r in done if r["setting"] == s and (TRAINED, m) in r["values"]]
        ax.scatter([i] * len(xs), xs, color=colours[i % len(colours)], s=14, zorder=3)
        if xs:
          ax.hlines(np.mean(xs), i - 0.3, i + 0.3, color="k", lw=1.2, zorder=4)
      for model, style in ((RANDOM, ":"), (PIXELS, "--")):
        xs = [r["values"][(model, m)] for r in done if (model, m) in r["values"]]
        if xs:
          ax.axhline(np.mean(xs), color="grey", ls=style, lw=1, label=f"{MODEL_LABELS[model]} {np.mean(xs):.1f}")
      ax.set_xlim(-0.6, len(table["settings"]) - 0.4)
      ax.set_xticks(range(len(table["settings"])), table["settings"], rotation=30, ha="right", fontsize=7)
      ax.set_title(f"{m.replace('knn', 'k-NN top-1 (%),')}", fontsize=9)
      ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    written.append(os.path.join(out_dir, "knn.png"))
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)
  return written


def write(table: dict, out_dir: str, title: str = "", plots: bool = True) -> list[str]:
  os.makedirs(out_dir, exist_ok=True)
  paths = [os.path.join(out_dir, n) for n in ("results.md", "results.csv", "runs.csv", "results.json")]
  with open(paths[0], "w") as f:
    f.write(markdown(table, title))
  write_csv(table, paths[1])
  write_runs_csv(table, paths[2])
  with open(paths[3], "w") as f:
    json.dump({"rows": table["rows"], "runs": [{k: v for k, v in r.items() if k not in ("values", "metrics")}
                                               | {"values": {f"{a} {b}": x for (a, b), x in r["values"].items()}}
                                               for r in table["runs"]]}, f, indent=1)
  return paths + (plot(table, out_dir, title) if plots else [])
