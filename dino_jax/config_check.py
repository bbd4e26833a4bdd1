"""The config checked before anything runs: every out-of-range or unknown value refused, naming the key.

`validate(config, device_count=...)` runs in `dino_jax.train` before any data is read or anything is compiled. It
collects every problem (the run-level keys here, the method's own keys through its `validate`) and raises one
`ConfigError` listing them, each with the key, the value, the valid range or names, and a value that works.
"""
from __future__ import annotations

import numbers

OPTIMIZERS = ("adamw", "sgd", "lars", "larc")


class ConfigError(ValueError):
  """A config that cannot run; its message lists every problem found."""


def _number(value):
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _fmt(key, value):
  return f"config.{key}={value!r}"


def positive(key, value, example):
  if _number(value) and value > 0:
    return None
  return f"{_fmt(key, value)}: must be > 0 (e.g. --config.{key}={example.split()[0]}; official: {example})"


def at_least(key, value, low, example, *, integer=False):
  if _number(value) and value >= low and (not integer or float(value).is_integer()):
    return None
  kind = "an integer" if integer else "a number"
  return f"{_fmt(key, value)}: must be {kind} >= {low} (e.g. {example})"


def in_range(key, value, low, high, example, *, integer=False):
  if _number(value) and low <= value <= high and (not integer or float(value).is_integer()):
    return None
  kind = "an integer" if integer else "a number"
  return f"{_fmt(key, value)}: must be {kind} in [{low}, {high}] (e.g. {example})"


def one_of(key, value, names):
  if value in names:
    return None
  return f"{_fmt(key, value)}: must be one of {', '.join(map(repr, names))}"


def problems(*items):
  return [p for p in items if p]


def _scale(key, value):
  try:
    lo, hi = (float(v) for v in value)
  except (TypeError, ValueError):
    return f"{_fmt(key, value)}: must be a pair (min, max) of area fractions, e.g. (0.4, 1.0)"
  if not 0 < lo <= hi <= 1:
    return f"{_fmt(key, tuple(value))}: must satisfy 0 < min <= max <= 1 (fractions of the image area), e.g. (0.4, 1.0)"
  return None


def _source(key, spec, required):
  from dino_jax.data import sources  # noqa: PLC0415
  if spec in (None, ""):
    return f"{_fmt(key, spec)}: no data source; set e.g. --config.{key}=imagefolder:/data/imagenet/train" \
        if required else None
  try:
    sources.parse_spec(spec)
  except ValueError as e:
    return f"config.{key}: {e}"
  return None


def _fault_keys(c):
  """The keys of dino_jax.faults: the non-finite policy and the multi-process timeouts."""
  found = []
  if "on_nonfinite" in c.loss:
    found += problems(one_of("loss.on_nonfinite", c.loss.on_nonfinite, ("stop", "skip")),
                      at_least("loss.max_consecutive_nonfinite", c.loss.max_consecutive_nonfinite, 1, "10",
                               integer=True))
  if "multihost" in c:
    m = c.multihost
    found += problems(at_least("multihost.heartbeat_timeout_s", m.heartbeat_timeout_s, 2, "60", integer=True),
                      at_least("multihost.init_timeout_s", m.init_timeout_s, 1, "300", integer=True),
                      positive("multihost.step_timeout_s", m.step_timeout_s, "600"))
  return found


def validate(config, *, device_count=None):
  """Raise ConfigError listing every problem of `config` (before any data is read or anything is compiled)."""
  from dino_jax import methods, models, profiling  # noqa: PLC0415
  c, o, cr = config, config.optim, config.crops
  found = problems(
      at_least("batch_size", c.batch_size, 1, "512 (global: 64 per GPU x 8 GPUs)", integer=True),
      at_least("epochs", c.epochs, 1, "100", integer=True),
      at_least("log_every_steps", c.log_every_steps, 1, "10", integer=True),
      at_least("checkpoint_every_steps", c.checkpoint_every_steps, 1, "1000", integer=True),
      at_least("keep_checkpoints", c.keep_checkpoints, 1, "2", integer=True),
      one_of("optim.name", o.name, OPTIMIZERS),
      positive("optim.lr", o.lr, "5e-4 (DINO ViT at batch 256), 4.8 (SwAV)"),
      at_least("optim.min_lr", o.min_lr, 0, "1e-6"),
      in_range("optim.warmup_epochs", o.warmup_epochs, 0, c.epochs, "10"),
      at_least("optim.start_warmup", o.start_warmup, 0, "0"),
      in_range("optim.weight_decay", o.weight_decay, 0, 1, "0.04 (AdamW), 1e-6 (SwAV LARC)"),
      in_range("optim.weight_decay_end", o.weight_decay_end, 0, 1, "0.4"),
      in_range("optim.momentum", o.momentum, 0, 1, "0.9"),
      at_least("optim.clip_grad", o.clip_grad, 0, "3.0 (0 disables)"),
      one_of("model.arch", c.model.arch, models.BACKBONES),
      one_of("model.dtype", c.model.dtype, tuple(models.DTYPES)),
      one_of("model.remat", c.model.get("remat", "none"), tuple(models.REMAT_POLICIES)),
      in_range("model.drop_path_rate", c.model.get("drop_path_rate", 0.0), 0, 1, "0.1"),
      at_least("crops.global_size", cr.global_size, 1, "224", integer=True),
      at_least("crops.global_number", cr.global_number, 1, "2", integer=True),
      at_least("crops.local_number", cr.local_number, 0, "8", integer=True),
      _scale("crops.global_scale", cr.global_scale),
      _scale("crops.local_scale", cr.local_scale) if cr.local_number else None,
      at_least("crops.local_size", cr.local_size, 1, "96", integer=True) if cr.local_number else None,
      one_of("crops.interpolation", cr.interpolation, ("bicubic", "bilinear", "nearest", "lanczos")),
      at_least("data.num_workers", c.data.num_workers, 0, "10 (0: in-process)", integer=True),
      one_of("data.on_bad_image", c.data.on_bad_image, ("skip", "fail")),
      at_least("data.device_prefetch", c.data.device_prefetch, 1, "2", integer=True),
      one_of("data.crop_on", c.data.get("crop_on", "cpu"), ("cpu", "device")),
      one_of("crops.interpolation (data.crop_on='device')", cr.interpolation, ("bicubic", "bilinear"))
      if c.data.get("crop_on", "cpu") == "device" else None,
      at_least("data.device_image_size", c.data.get("device_image_size", 512), cr.global_size if
               _number(cr.global_size) else 1, "512; with data.crop_on='device', at least crops.global_size",
               integer=True)
      if c.data.get("crop_on", "cpu") == "device" else None,
      _source("data.source", c.data.source, required=True),
      _source("eval.train_source", c.eval.train_source, required=bool(c.eval.test_source)),
      _source("eval.test_source", c.eval.test_source, required=False),
      at_least("eval.every_epochs", c.eval.get("every_epochs", 0), 0, "5 (0: k-NN at the end only)", integer=True),
      at_least("eval.online_train_samples", c.eval.get("online_train_samples", 0), 0, "10000 (0: all)", integer=True),
      at_least("eval.online_test_samples", c.eval.get("online_test_samples", 0), 0, "2000 (0: all)", integer=True),
      profiling.check(c.get("profile_steps", ())),
  )
  found.extend(_fault_keys(c))
  if c.model.arch.startswith("vit") and _number(c.model.patch_size):
    p = c.model.patch_size
    for key in ("global_size",) + (("local_size",) if cr.local_number else ()):
      size = cr[key]
      if _number(size) and size % p:
        found.append(f"config.crops.{key}={size!r}: must be a multiple of the patch size model.patch_size={p} "
                     f"(e.g. {max(p, size - size % p)})")
  if any(not (isinstance(k, int) and k >= 1) for k in c.eval.knn_k):
    found.append(f"config.eval.knn_k={tuple(c.eval.knn_k)!r}: must be positive integers, e.g. (10, 20, 100, 200)")
  if device_count and _number(c.batch_size) and c.batch_size >= 1 and c.batch_size % device_count:
    found.append(f"config.batch_size={c.batch_size}: must be divisible by the {device_count} devices (e.g. "
                 f"{max(device_count, c.batch_size - c.batch_size % device_count)})")
  try:
    method = methods.get(c.method)
  except ValueError as e:
    found.append(str(e))
  else:
    found.extend(method.validate(config))
  if found:
    raise ConfigError("the config cannot run:\n  " + "\n  ".join(found))
