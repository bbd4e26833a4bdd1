r"""Pictures of a run: training curves from metrics.jsonl and the teacher's last-block attention maps.

  python experiments/plot_run.py --workdir=runs/quickstart [--out=experiments/results/quickstart] [--images=6]

Writes <out>_curves.png (loss, learning rate, teacher entropy against ln K, KL(teacher || student), centre norm, the
online k-NN top-1 of each k as "k-NN over training" when config.eval.every_epochs logged it; with the k-NN results of
eval.json in the title) and, for ViT runs, <out>_attention.png: for a few test images, the
[CLS] token's attention over the patches in each head of the teacher's last block (what the DINO paper shows).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script from anywhere

CURVES = (("loss", "loss"), ("lr", "learning rate"), ("teacher_entropy", "teacher entropy (nats)"),
          ("kl_teacher_student", "KL(teacher || student)"), ("center_norm", "centre norm"),
          ("assign_entropy", "code entropy per image (nats)"), ("cluster_entropy", "cluster entropy (nats)"),
          ("knn", "k-NN over training"))
KNN_CURVES = "knn"   # one line per 'knn/k<k>/top1' key (dino_jax/evaluate/online_knn.py), in one panel


def _knn_keys(rows):
  return sorted({k for r in rows for k in r if k.startswith("knn/") and k.endswith("/top1")},
                key=lambda k: int(k.split("/")[1][1:]))


def read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


def _pyplot():
  import matplotlib  # noqa: PLC0415
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415
  return plt


def _save(fig, path):
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  _pyplot().close(fig)
  return path


def plot_curves(workdir, path, num_classes_out=None, title=None):
  return _save(curves_figure(workdir, num_classes_out, title), path)


def curves_figure(workdir, num_classes_out=None, title=None):
  """One panel per metric of CURVES that the run logged, against the step; k-NN results in the title."""
  plt = _pyplot()
  rows = read_metrics(workdir)
  knn_keys = _knn_keys(rows)
  keys = [(k, label) for k, label in CURVES if any(k in r for r in rows) or (k == KNN_CURVES and knn_keys)]
  fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3.0), squeeze=False)
  for ax, (key, label) in zip(axes[0], keys):
    if key == KNN_CURVES:
      for k in knn_keys:
        pts = [(r["step"], r[k]) for r in rows if k in r]
        ax.plot(*zip(*pts), lw=1.2, marker="o", ms=2.5, label=k.split("/")[1].replace("k", "k = "))
      ax.set_ylabel("top-1 (%)", fontsize=8)
      ax.legend(fontsize=7)
    else:
      pts = [(r["step"], r[key]) for r in rows if key in r]
      ax.plot(*zip(*pts), lw=1.2)
    if key in ("teacher_entropy", "cluster_entropy") and num_classes_out:
      ax.axhline(math.log(num_classes_out), color="grey", ls="--", lw=0.8, label=f"ln K = {math.log(num_classes_out):.2f}")
      ax.legend(fontsize=7)
    ax.set_title(label, fontsize=9)
    ax.set_xlabel("step", fontsize=8)
    ax.tick_params(labelsize=7)
  title = title or os.path.basename(os.path.normpath(workdir))
  eval_path = os.path.join(workdir, "eval.json")
  if os.path.exists(eval_path):
    with open(eval_path) as f:
      ev = json.load(f)
    parts = [f"{who} {k}: {v['top1']:.1f}%" for who in ("teacher", "random_init") for k, v in ev.get(who, {}).items()
             if isinstance(v, dict) and "top1" in v]
    title += "   k-NN top-1 — " + ", ".join(parts)
  fig.suptitle(title, fontsize=9)
  return fig


def plot_attention(config, state, path, n_images=6):
  return _save(attention_figure(config, state, n_images)[0], path)


def attention_figure(config, state, n_images=6):
  """(figure, images [n, H, W, 3], maps [n, heads, h, w]): each row an evaluation image and its heads' maps."""
  plt = _pyplot()

  from dino_jax.evaluate.attention import evaluation_maps  # noqa: PLC0415

  images, maps = evaluation_maps(config, state, n_images)
  heads = maps.shape[1]
  fig, axes = plt.subplots(n_images, heads + 1, figsize=(1.4 * (heads + 1), 1.4 * n_images), squeeze=False)
  for r in range(n_images):
    axes[r, 0].imshow(images[r])
    for hd in range(heads):
      axes[r, hd + 1].imshow(maps[r, hd], cmap="inferno")
      if r == 0:
        axes[r, hd + 1].set_title(f"head {hd}", fontsize=7)
  for ax in axes.ravel():
    ax.axis("off")
  fig.suptitle("[CLS] attention, teacher's last block", fontsize=8)
  return fig, images, maps


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--out", default=None, help="path prefix of the PNGs (default: <workdir>/plot)")
  ap.add_argument("--images", type=int, default=6)
  ap.add_argument("--step", type=int, default=None)
  ap.add_argument("--title", default=None, help="figure title (default: the workdir's name)")
  args = ap.parse_args(argv)
  from dino_jax import methods  # noqa: PLC0415
  from dino_jax.checkpoint import load_run  # noqa: PLC0415

  out = args.out or os.path.join(args.workdir, "plot")
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  config, state = load_run(args.workdir, args.step)
  k = methods.get(config.method).num_outputs(config)
  written = [plot_curves(args.workdir, out + "_curves.png", k, args.title)]
  if config.model.arch.startswith("vit"):
    written.append(plot_attention(config, state, out + "_attention.png", args.images))
  for p in written:
    print(p)
  return written


if __name__ == "__main__":
  main()
