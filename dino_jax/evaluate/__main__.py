r"""Evaluate the latest checkpoint of a run: k-NN top-1/top-5 of the teacher and its output entropy; with --linear,
also the official linear probe (dino_jax.evaluate.linear).

  python -m dino_jax.evaluate --workdir=runs/quickstart [--compare_random_init] [--step=N]
  python -m dino_jax.evaluate --workdir=runs/quickstart --linear [--linear_lr=0.3 --linear_epochs=100 ...]
  python -m dino_jax.evaluate --workdir=runs/quickstart --retrieval --query=DIR --gallery=DIR [--multiscale]

The config is read from the checkpoint (k, T, image sizes, config.eval.linear); the sources can be changed with
--train_source / --test_source (e.g. to evaluate on another labelled dataset). Results go to <workdir>/eval.json and,
with --linear, <workdir>/eval_linear.json. --retrieval (instead of the k-NN) ranks the --gallery images for each --query
image (class sub-folders, or any source spec such as digits:test; dino_jax.evaluate.retrieval) and writes
<workdir>/eval_retrieval.json (eval_retrieval_multiscale.json). Only our messages and the progress bars are printed (--verbosity=1: the libraries' too).
"""
from __future__ import annotations

import json
import os

import jax
from absl import app, flags

from dino_jax import console
from dino_jax.data import sources
from dino_jax.evaluate import linear, retrieval
from dino_jax.evaluate import run as eval_run
from dino_jax.checkpoint import load_run

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory written by dino_jax.train.", required=True)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
_RANDOM = flags.DEFINE_bool("compare_random_init", False, "Also evaluate the architecture at random init.")
_TRAIN_SOURCE = flags.DEFINE_string("train_source", None, "Override config.eval.train_source.")
_TEST_SOURCE = flags.DEFINE_string("test_source", None, "Override config.eval.test_source.")
_LINEAR = flags.DEFINE_bool("linear", False, "Also train and validate the official linear probe.")
_LINEAR_EPOCHS = flags.DEFINE_integer("linear_epochs", None, "Override config.eval.linear.epochs.")
_LINEAR_LR = flags.DEFINE_float("linear_lr", None, "Override config.eval.linear.lr (at batch 256).")
_LINEAR_BATCH = flags.DEFINE_integer("linear_batch_size", None, "Override config.eval.linear.batch_size.")
_RETRIEVAL = flags.DEFINE_bool("retrieval", False, "Image retrieval of --query against --gallery instead of the k-NN.")
_QUERY = flags.DEFINE_string("query", None, "Retrieval queries: a folder of class sub-folders or a source spec.")
_GALLERY = flags.DEFINE_string("gallery", None, "Retrieval gallery (the same as --query: each query's own left out).")
_MULTISCALE = flags.DEFINE_bool("multiscale", False, "Retrieval: average the features at scales 1, 1/sqrt(2), 1/2.")
_RETRIEVAL_K = flags.DEFINE_list("retrieval_k", ["1", "5", "10"], "Retrieval: the k of recall@k and precision@k.")


def _source(value, config):
  """A source spec ('digits:test', 'tfds:...') or a plain folder (imagefolder)."""
  kind = value.partition(":")[0]
  return sources.get_source(value if kind in sources.KINDS else f"imagefolder:{value}", data_dir=config.data.data_dir)


def _retrieval(config, state):
  if not (_QUERY.value and _GALLERY.value):
    raise app.UsageError("--retrieval needs --query=DIR and --gallery=DIR")
  query, gallery = _source(_QUERY.value, config), _source(_GALLERY.value, config)
  same = repr(query) == repr(gallery)
  ks = tuple(int(k) for k in _RETRIEVAL_K.value)
  return {name: retrieval.retrieval_eval(config, params, stats, query, gallery, multiscale=_MULTISCALE.value,
                                         same_set=same, ks=ks, progress=eval_run.progress)
          for name, (params, stats) in eval_run.backbones(config, state, _RANDOM.value).items()}


def _report(results, state, filename, table):
  """Adds the checkpoint's step, writes <workdir>/<filename> and prints the table (process 0 only)."""
  results["step"] = int(jax.device_get(state.step))
  if jax.process_index() == 0:
    with open(os.path.join(_WORKDIR.value, filename), "w") as f:
      json.dump(results, f, indent=2)
    print(table(results))


def main(argv):
  del argv
  console.quiet_logging()
  config, state = load_run(_WORKDIR.value, _STEP.value)
  if _RETRIEVAL.value:
    name = "eval_retrieval_multiscale.json" if _MULTISCALE.value else "eval_retrieval.json"
    _report(_retrieval(config, state), state, name, retrieval.format_retrieval)
    return
  if _TRAIN_SOURCE.value:
    config.eval.train_source = _TRAIN_SOURCE.value
  if _TEST_SOURCE.value:
    config.eval.test_source = _TEST_SOURCE.value
  _report(eval_run.evaluate_state(config, state, compare_random_init=_RANDOM.value), state, "eval.json",
          eval_run.format_results)
  if _LINEAR.value:
    with config.unlocked():
      lin = linear.linear_config(config)
      for key, flag in (("epochs", _LINEAR_EPOCHS), ("lr", _LINEAR_LR), ("batch_size", _LINEAR_BATCH)):
        if flag.value is not None:
          lin[key] = flag.value
      config.eval.linear = lin
    _report(eval_run.linear_probe_state(config, state, compare_random_init=_RANDOM.value), state, "eval_linear.json",
            eval_run.format_linear)


if __name__ == "__main__":
  app.run(main)
