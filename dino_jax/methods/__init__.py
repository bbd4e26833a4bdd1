"""The self-supervised methods, one module each, chosen by `config.method` through a name -> module table.

Nothing outside `dino_jax/methods/` tests a method's name: the trainer, the evaluations, the converter, the optimiser
and the benchmarks ask the method module for what is specific to it. A method is a plain module (the way big_vision
picks a model module by name), not a class; `get` returns it wrapped in a `Method` whose optional functions have
defaults. A module defines:

  build_model(config, rngs) -> nnx.Module
      the trained network (a MultiCropWrapper of `state.build_backbone(config, rngs, student=True)` and a head);
      a teacher, if any, has the same graph.
  init_state(config, params, *, n_shards) -> dict
      its own part of the train state (`TrainState.method_state`): DINO's centre, SwAV's queue, {} for none.
  schedules(config, steps_per_epoch) -> {name: step -> value}
      its progress-dependent values (teacher momentum and temperature, queue start), evaluated inside the step.
  frozen(config, steps_per_epoch) -> {parameter name: first step it trains}
      tensors the optimiser skips at first (DINO's last layer, SwAV's prototypes).
  update(state, crops, key, *, graphdef, tx, schedules, config) -> (state, metrics)
      one iteration on the augmented crop-major groups, ending with `steps.commit`.
Optional (defaults in `_DEFAULTS`):
  HAS_TEACHER = True                     whether `TrainState.teacher` holds a second network (else it is None)
  state_shardings(mesh, method_state)    shardings of its state (default: replicated)
  evaluated(state) -> (params, stats)    the network the k-NN, probes and exports read (default: the teacher if any)
  eval_metrics(config, state, mesh)      extra end-of-training checks for eval.json (default: none)
  num_outputs(config) -> int             K of the output distribution, for ln K in plots (default: unknown)
  export(config, student, teacher, state, epoch) -> obj    the official training checkpoint (convert --kind=full)
  load(pth, obj, config, student, teacher) -> dict | None  an official training checkpoint into the networks, in
                                         place; returns method_state entries to set, None if `obj` is not one
  validate(config) -> [str]              problems with its config keys, each naming key, value, range and fix
  defaults() -> ConfigDict               its recipe defaults (completes configs saved before a key existed)

Register a method defined outside the package with `register('name', module)`; or set `config.method` to an
importable module path ('my_project.byol'), which is imported on first use.
"""
from __future__ import annotations

import dataclasses
import importlib
import types
from typing import Any, Callable

import jax

from dino_jax.methods import dino, swav

_REGISTRY: dict[str, types.ModuleType] = {"dino": dino, "swav": swav}
_REQUIRED = ("build_model", "init_state", "schedules", "frozen", "update")


def _replicated(mesh, method_state):
  from dino_jax import sharding  # noqa: PLC0415
  return jax.tree.map(lambda _: sharding.replicated(mesh), method_state)


def _evaluated(state):
  if state.teacher is not None:
    return state.teacher, state.teacher_batch_stats
  return state.params, state.batch_stats


def _no_metrics(config, state, mesh):
  return {}


def _no_export(config, student, teacher, state, epoch):
  raise ValueError(f"config.method={config.method!r} has no official training-checkpoint format: export "
                   "--kind=backbone or --kind=teacher_backbone instead")


_DEFAULTS = dict(HAS_TEACHER=True, state_shardings=_replicated, evaluated=_evaluated, eval_metrics=_no_metrics,
                 num_outputs=lambda config: None, export=_no_export, load=lambda *args: None,
                 validate=lambda config: [], defaults=None)


@dataclasses.dataclass(frozen=True)
class Method:
  """A method module's functions, the optional ones filled with their defaults."""
  name: str
  module: types.ModuleType
  build_model: Callable
  init_state: Callable
  schedules: Callable
  frozen: Callable
  update: Callable
  HAS_TEACHER: bool
  state_shardings: Callable
  evaluated: Callable
  eval_metrics: Callable
  num_outputs: Callable
  export: Callable
  load: Callable
  validate: Callable
  defaults: Any


def register(name: str, module) -> None:
  """Make `config.method = name` use `module` (a module or any object with the functions above)."""
  missing = [f for f in _REQUIRED if not hasattr(module, f)]
  if missing:
    raise TypeError(f"method {name!r}: {module!r} lacks {', '.join(missing)} (see dino_jax/methods/__init__.py)")
  _REGISTRY[name] = module


def names() -> list[str]:
  return sorted(_REGISTRY)


def get(name: str) -> Method:
  """The method `config.method` names: a registered name, or an importable module path."""
  module = _REGISTRY.get(name)
  if module is None and "." in str(name):
    try:
      register(name, importlib.import_module(name))
    except ImportError as e:
      raise ValueError(f"config.method={name!r}: cannot import it as a module ({e})") from e
    module = _REGISTRY[name]
  if module is None:
    raise ValueError(f"config.method={name!r}: unknown method; registered: {', '.join(names())} (or give an "
                     f"importable module path, e.g. 'my_project.byol', or call dino_jax.methods.register)")
  fields = {f.name: getattr(module, f.name, _DEFAULTS.get(f.name)) for f in dataclasses.fields(Method)
            if f.name not in ("name", "module")}
  return Method(name=name, module=module, **fields)
