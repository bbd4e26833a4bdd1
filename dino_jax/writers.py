"""Where a run's metrics go: <workdir>/metrics.jsonl always, TensorBoard event files in the workdir (on by default),
Weights & Biases when `config.log.wandb_project` is set.

  tensorboard --logdir runs/quickstart            # the scalars, the hyperparameters and the images of a run

TensorBoard files are written with tensorboardX (no TensorFlow needed); W&B is the optional extra
`pip install -e .[wandb]`. Every writer gets the same calls: scalars at a step, the hyperparameters once, and images
(uint8 [H, W, 3]) where the backend takes them. Only process 0 writes.
"""
from __future__ import annotations

import json
import logging
import os
import secrets

import numpy as np


def flat_config(config) -> dict:
  """{'optim.lr': 0.002, 'crops.global_scale': '(0.5, 1.0)', ...}: the config as one flat dict of scalars."""
  out = {}

  def walk(node, prefix):
    for key, value in node.items():
      name = f"{prefix}{key}"
      if hasattr(value, "items"):
        walk(value, name + ".")
      elif isinstance(value, (bool, int, float, str)):
        out[name] = value
      else:
        out[name] = str(value)

  walk(config, "")
  return out


def eval_scalars(results) -> dict:
  """{'eval/teacher/k20/top1': .., ...}: the numbers of an evaluation's results (eval.json), flattened ('k=20'
  becomes 'k20': TensorBoard tags cannot hold '=')."""
  out = {}

  def walk(node, prefix):
    for key, value in node.items():
      if isinstance(value, dict):
        walk(value, f"{prefix}{key.replace('=', '')}/")
      elif isinstance(value, (int, float)) and not isinstance(value, bool):
        out[f"{prefix}{key}"] = float(value)

  walk(results, "eval/")
  return out


class JsonlWriter:
  """One JSON line per write_scalars call: {'step': s, **scalars} (what experiments/plot_run.py reads)."""

  def __init__(self, workdir):
    self.path = os.path.join(workdir, "metrics.jsonl")

  def write_scalars(self, step, scalars):
    with open(self.path, "a") as f:
      f.write(json.dumps({"step": int(step), **scalars}) + "\n")

  def write_hparams(self, hparams):
    pass   # the config is saved with every checkpoint

  def write_images(self, step, images):
    pass

  def close(self):
    pass


class TensorBoardWriter:
  """Event files in the workdir (tensorboardX): scalars, the config as hparams and as text, images."""

  def __init__(self, workdir):
    from tensorboardX import SummaryWriter  # noqa: PLC0415
    self.writer = SummaryWriter(logdir=workdir, flush_secs=30)

  def write_scalars(self, step, scalars):
    for key, value in scalars.items():
      self.writer.add_scalar(key, float(value), int(step))

  def write_hparams(self, hparams):
    # add_hparams would open a second run directory; the hparams plugin's summaries go into this one instead.
    from tensorboardX.summary import hparams as hparams_summary  # noqa: PLC0415
    for summary in hparams_summary(hparams, {}):
      self.writer.file_writer.add_summary(summary)
    self.writer.add_text("config", "\n".join(f"    {k} = {v}" for k, v in sorted(hparams.items())), 0)

  def write_images(self, step, images):
    for key, image in images.items():
      self.writer.add_image(key, np.asarray(image), int(step), dataformats="HWC")

  def close(self):
    writers = dict(self.writer.all_writers or {})
    try:
      self.writer.close()
    except OSError as e:
      # A full or read-only disk: the event file is lost, metrics.jsonl says why the run stopped. Mark tensorboardX's
      # event writers closed so that its exit hook does not retry and print a traceback per writer.
      logging.info("TensorBoard event file not written: %s", e)
      for fw in writers.values():
        ev = fw.event_writer
        worker, ev._worker, ev._closed = getattr(ev, "_worker", None), None, True
        if worker is not None:
          worker._queue.put(worker._shutdown_signal)


class WandbWriter:
  """A W&B run named after the workdir; its id is kept in <workdir>/wandb_id so that a resumed run continues it."""

  def __init__(self, workdir, project, entity=None):
    try:
      import wandb  # noqa: PLC0415
    except ImportError as e:
      raise ImportError(f"config.log.wandb_project={project!r} needs the wandb package: pip install wandb "
                        "(or pip install -e .[wandb])") from e
    self.wandb = wandb
    id_path = os.path.join(workdir, "wandb_id")
    if os.path.exists(id_path):
      run_id = open(id_path).read().strip()
    else:
      run_id = secrets.token_hex(8)
      with open(id_path, "w") as f:
        f.write(run_id)
    self.run = wandb.init(project=project, entity=entity, id=run_id, resume="allow", dir=workdir,
                          name=os.path.basename(os.path.normpath(workdir)))

  def write_scalars(self, step, scalars):
    self.run.log(dict(scalars), step=int(step))

  def write_hparams(self, hparams):
    self.run.config.update(hparams, allow_val_change=True)

  def write_images(self, step, images):
    self.run.log({k: self.wandb.Image(np.asarray(v)) for k, v in images.items()}, step=int(step))

  def close(self):
    self.run.finish()


class MultiWriter:
  """The same calls to every writer; nothing at all on processes other than 0."""

  def __init__(self, writers):
    self.writers = list(writers)

  def write_scalars(self, step, scalars, *, jsonl=True):
    """jsonl=False: to the dashboards only (the final evaluation, whose file is eval.json)."""
    for w in self.writers:
      if jsonl or not isinstance(w, JsonlWriter):
        w.write_scalars(step, scalars)

  def write_hparams(self, hparams):
    for w in self.writers:
      w.write_hparams(hparams)

  def write_images(self, step, images):
    for w in self.writers:
      w.write_images(step, images)

  def close(self):
    """Closes every writer, once (later calls do nothing)."""
    writers, self.writers = self.writers, []
    for w in writers:
      w.close()


def create(config, workdir, *, is_main=True) -> MultiWriter:
  """The writers `config.log` asks for (metrics.jsonl always)."""
  if not is_main:
    return MultiWriter([])
  writers = [JsonlWriter(workdir)]
  log = config.get("log", {})
  if log.get("tensorboard", True):
    writers.append(TensorBoardWriter(workdir))
  if log.get("wandb_project"):
    writers.append(WandbWriter(workdir, log.wandb_project, log.get("wandb_entity")))
  return MultiWriter(writers)
