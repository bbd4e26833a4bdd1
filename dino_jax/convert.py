r"""Official PyTorch checkpoints <-> our runs: export a run's checkpoint to a .pth, import a .pth as a new run.

Export (the official code loads the file):

  python -m dino_jax.convert --workdir=runs/x [--step=N] --out=x.pth --kind=full|backbone|teacher_backbone

  full              DINO: main_dino.py's checkpoint.pth, from which it resumes ('student' with the `module.` prefix,
                    'teacher' with it only when the network has BatchNorms, as DDP wraps it only then; 'epoch', the
                    epochs completed; 'dino_loss' holding the centre [1, out_dim]). Not included: 'optimizer' (optax
                    moments and per-tensor step counts have no faithful torch.optim form, so main_dino.py resumes
                    with fresh AdamW/SGD moments and says "key 'optimizer' not found"), 'fp16_scaler' (starts anew),
                    'args' (an argparse pickle, which torch >= 2.6 refuses to load by default; the official scripts
                    take their arguments from the command line anyway).
                    SwAV: main_swav.py's checkpoint.pth.tar, {'epoch', 'state_dict'} with `module.` keys (backbone,
                    projection head, prototypes). The queue (queue{rank}.pth) is not written: it is refilled within
                    queue_length / batch iterations of resuming.
  backbone          the student's backbone as a bare state dict.
  teacher_backbone  the teacher's backbone as a bare state dict: the dino_vits16_pretrain.pth style that eval_knn.py,
                    eval_linear.py and hubconf load (the usual file to publish). For SwAV, the network itself.

  'epoch' is step // steps_per_epoch with steps_per_epoch counted on the run's config.data.source; pass --epoch when
  that data is not reachable from where you convert.

Import (a new run at step 0 that `python -m dino_jax.train` continues and `python -m dino_jax.evaluate` evaluates):

  python -m dino_jax.convert --pth=dino_vits16_pretrain.pth --config=configs/dino_vit_small16.py --workdir=runs/y \
      [--config.key=value ...] [--checkpoint_key=teacher] [--backbone_only]

  A DINO training checkpoint ('student' and 'teacher') fills the student and the teacher (and the centre, when
  'dino_loss' is there); a SwAV checkpoint or release (with prototypes) fills the network. Anything else is a backbone
  (DINO/timm/torchvision/SwAV releases, or the --checkpoint_key network of a full file with --backbone_only): it goes
  into both the student's and the teacher's backbone and the head keeps its initialisation. The optimiser starts
  fresh and the schedules start at step 0 (fine-tuning). Give the same --config(.x) values to dino_jax.train later;
  the data iterator's position (the start) is saved for config.data.source, so use the same data settings too.

A checkpoint that does not fit the config's architecture is refused with its missing, unexpected and wrongly shaped
keys listed; nothing is dropped or zero-filled silently.
"""
from __future__ import annotations

import logging
import os

import jax
from absl import app, flags
from flax import nnx

from dino_jax import checkpoint as ckpt_lib
from dino_jax import methods
from dino_jax import state as state_lib
from dino_jax.data import pipeline, sources
from dino_jax.interop import torch as interop

KINDS = ("full", "backbone", "teacher_backbone")


# ------------------------------------------------------------------ export

def networks(config, state):
  """(student, teacher) MultiCropWrappers holding a train state's parameters and BatchNorm statistics (host copies;
  an abstract state from jax.eval_shape gives abstract modules). The teacher is the network the method evaluates
  (for SwAV, a second copy of the trained network)."""
  graphdef = state_lib.graphdef_of(config)
  student = nnx.merge(graphdef, *jax.device_get((state.params, state.batch_stats)))
  teacher = nnx.merge(graphdef, *jax.device_get(methods.get(config.method).evaluated(state)))
  return student, teacher


def completed_epochs(config, step):
  """Epochs completed at `step`, counted on config.data.source (the official checkpoint's 'epoch')."""
  try:
    source = sources.get_source(config.data.source, data_dir=config.data.data_dir)
    per_epoch = pipeline.steps_per_epoch(source, config)
  except (ValueError, OSError, TypeError, AttributeError) as e:
    raise ValueError(f"cannot count the epochs of step {step}: config.data.source={config.data.source!r} is not "
                     f"readable here ({e}); pass --epoch=N") from e
  if step % per_epoch:
    logging.warning("step %d is %d steps into epoch %d: main_dino.py/main_swav.py resume at epoch boundaries, so "
                    "they will run that epoch from its start", step, step % per_epoch, step // per_epoch)
  return step // per_epoch


def export_object(config, state, kind, *, epoch=None):
  """The object to torch.save for `kind` (see the module docstring); `epoch` is needed for kind='full'."""
  if kind not in KINDS:
    raise ValueError(f"--kind={kind!r}; expected one of {', '.join(KINDS)}")
  student, teacher = networks(config, state)
  if kind == "backbone":
    return interop.export_checkpoint(student, "backbone")
  if kind == "teacher_backbone":
    return interop.export_checkpoint(teacher, "backbone")
  if epoch is None:
    raise ValueError("kind='full' needs the epoch")
  return methods.get(config.method).export(config, student, teacher, state, epoch)


def export_run(workdir, out, *, kind="full", step=None, epoch=None):
  """Write a run's checkpoint (latest, or `step`) to `out` as an official .pth. Returns the saved object."""
  config, state = ckpt_lib.load_run(workdir, step)
  step = int(jax.device_get(state.step))
  if kind == "full" and epoch is None:
    epoch = completed_epochs(config, step)
  obj = export_object(config, state, kind, epoch=epoch)
  if os.path.dirname(os.path.abspath(out)):
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  interop.save_pth(obj, out)
  logging.info("wrote %s (%s, %s) from %s at step %d%s", out, config.method, kind, workdir, step,
               f", epoch {epoch}" if kind == "full" else "")
  return obj


# ------------------------------------------------------------------ import

def _describe(config):
  m = config.model
  patch = f"/{m.patch_size}" if m.arch.startswith("vit") else ""
  overrides = dict(m.overrides)
  return f"{config.method} {m.arch}{patch}" + (f" {overrides}" if overrides else "")


def load_into(pth, what, config, module, obj, **kwargs):
  """interop.import_checkpoint(module, obj, **kwargs), with a refusal re-raised naming the file, the part and the
  config's model. Returns its notes."""
  try:
    return interop.import_checkpoint(module, obj, **kwargs)
  except interop.StateDictMismatchError as e:
    raise interop.StateDictMismatchError(f"{pth}: {what} does not fit the config's model ({_describe(config)}):\n"
                                         f"{e}") from e
  except (ValueError, TypeError) as e:
    raise type(e)(f"{pth}: {what}: {e}") from e


_NETWORK_PARTS = ("params", "batch_stats", "teacher", "teacher_batch_stats")


def load_networks(pth, obj, config, abstract, *, checkpoint_key="teacher", backbone_only=False):
  """The official checkpoint `obj` (read from `pth`) loaded into the networks of `abstract` (the train state's shapes).

  Returns ({part: pure dict}, method_state entries) for the parts params, batch_stats and, for a method with a
  teacher, teacher and teacher_batch_stats; leaves the file does not provide (a head, for a backbone file) stay
  ShapeDtypeStructs, to be initialised as the config initialises them. The method recognises its own official
  training checkpoints; anything else is a backbone. Nothing is computed here, so a file of the wrong architecture is
  refused before any compilation.
  """
  method = methods.get(config.method)
  student, teacher = networks(config, abstract)
  extra = None if backbone_only else method.load(pth, obj, config, student, teacher)
  if extra is None:
    notes = load_into(pth, "the backbone", config, student.backbone, obj, checkpoint_key=checkpoint_key)
    nnx.update(teacher.backbone, nnx.state(student.backbone))
    extra = {}
    logging.info("%s: backbone only, loaded into the %s backbone; the %s head keeps its initialisation (seed %d)%s",
                 pth, "student's and the teacher's" if method.HAS_TEACHER else "network's", config.method,
                 config.seed, "".join(f"; {n}" for n in notes))
  else:
    logging.info("%s: official %s training checkpoint loaded (networks%s)", pth, config.method,
                 "".join(f", {k}" for k in extra))
  parts = dict(zip(("params", "batch_stats"), (s.to_pure_dict() for s in nnx.state(student, nnx.Param,
                                                                                     nnx.BatchStat))))
  if method.HAS_TEACHER:
    parts.update(zip(("teacher", "teacher_batch_stats"), (s.to_pure_dict() for s in nnx.state(teacher, nnx.Param,
                                                                                             nnx.BatchStat))))
  return parts, extra


def assemble_state(init, tx, networks_, method_state, *, out_shardings=None):
  """`init()` (a run's fresh state) with the loaded leaves of `networks_` (from load_networks) and the
  `method_state` entries put in, and the optimiser state made for the loaded parameters, under one jit.

  The random initialisation of the replaced leaves is dead code that XLA drops, which makes this much faster to
  compile than the full init (tens of seconds for a ResNet-50 on a CPU).
  """
  leaves, treedef = jax.tree.flatten(networks_)
  loaded = [None if isinstance(x, jax.ShapeDtypeStruct) else x for x in leaves]

  def build(loaded, method_state):
    fresh = init()
    fresh_leaves = treedef.flatten_up_to({k: getattr(fresh, k) for k in networks_})
    parts = jax.tree.unflatten(treedef, [f if x is None else x for x, f in zip(loaded, fresh_leaves)])
    state = fresh.replace(**parts, opt_state=tx.init(parts["params"]))
    return state.replace(method_state={**state.method_state, **method_state})

  return jax.jit(build, out_shardings=out_shardings)(loaded, method_state)


def _fresh_data_iterator(config):
  """The training data iterator at its start, as dino_jax.train builds it (None if the source is unreadable)."""
  try:
    source = sources.get_source(config.data.source, data_dir=config.data.data_dir)
  except (ValueError, OSError, TypeError, AttributeError) as e:
    logging.warning("config.data.source=%r is not readable here (%s): the checkpoint is written without the data "
                    "iterator's position, which dino_jax.train needs to resume from it; evaluation works",
                    config.data.source, e)
    return None
  return iter(pipeline.make_train_dataset(source, config, seed=config.seed, process_index=jax.process_index(),
                                          process_count=jax.process_count()))


def import_pth(pth, config, workdir, *, checkpoint_key="teacher", backbone_only=False):
  """Load an official .pth into a fresh train state for `config` and save it as step 0 of `workdir`.

  Returns the saved state. Refuses a workdir that already holds checkpoints.
  """
  ckpt_dir = os.path.join(workdir, "checkpoints")
  if os.path.isdir(ckpt_dir) and any(name.isdigit() for name in os.listdir(ckpt_dir)):
    raise FileExistsError(f"{ckpt_dir} already holds checkpoints; import into a new --workdir")
  obj = interop.load_pth(pth)
  run = state_lib.build_run(config)   # shardings as dino_jax.train lays the state out (the SwAV queue is per device)
  loaded, method_state = load_networks(pth, obj, config, run.abstract, checkpoint_key=checkpoint_key,
                                       backbone_only=backbone_only)
  state = assemble_state(run.init, run.tx, loaded, method_state, out_shardings=run.shardings)
  data_iter = _fresh_data_iterator(config)
  checkpoints = ckpt_lib.Checkpoints(ckpt_dir, async_save=False)
  try:
    checkpoints.save(0, state, data_iterator=data_iter, config=config, force=True)
  finally:
    checkpoints.close()
    if hasattr(data_iter, "close"):
      data_iter.close()
  logging.info("saved %s as step 0 of %s", pth, workdir)
  return state


# ------------------------------------------------------------------ command line

def _define_flags():
  # Defined when run as a program, not on import: tests import this module next to dino_jax.train, which defines
  # --workdir and --config in the same process.
  from ml_collections import config_flags  # noqa: PLC0415
  flags.DEFINE_string("workdir", None, "Export: the run to read. Import: the new run directory to write.")
  flags.DEFINE_integer("step", None, "Export: checkpoint step (default: latest).")
  flags.DEFINE_string("out", None, "Export: the .pth file to write.")
  flags.DEFINE_enum("kind", "full", KINDS, "Export: what to write (see the module docstring).")
  flags.DEFINE_integer("epoch", None, "Export, kind=full: the 'epoch' to record (default: counted on the data).")
  flags.DEFINE_string("pth", None, "Import: the official .pth / .pth.tar file to read.")
  config_flags.DEFINE_config_file("config", None, "Import: the recipe the weights are for (configs/*.py).",
                                  lock_config=True)
  flags.DEFINE_string("checkpoint_key", "teacher", "Import: which network of a full file a backbone comes from.")
  flags.DEFINE_bool("backbone_only", False, "Import: take only the backbone, even from a full checkpoint.")


def main(argv):
  del argv
  from dino_jax import console  # noqa: PLC0415
  console.quiet_logging()  # orbax's per-file messages only with --verbosity=1
  f = flags.FLAGS
  if not f.workdir:
    raise app.UsageError("--workdir is required")
  if bool(f.pth) == bool(f.out):
    raise app.UsageError("give either --pth (import into --workdir) or --out (export from --workdir)")
  if f.pth:
    if f.config is None:
      raise app.UsageError("import needs --config=configs/<recipe>.py (the architecture the weights are for)")
    import_pth(f.pth, f.config, f.workdir, checkpoint_key=f.checkpoint_key, backbone_only=f.backbone_only)
  else:
    export_run(f.workdir, f.out, kind=f.kind, step=f.step, epoch=f.epoch)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
