"""Official PyTorch checkpoints in and out: state dicts (name -> numpy array) <-> our modules.

Two levels:

* `state_dict(module)` / `load_state_dict(module, sd)`: the exact names and layouts that the
  equivalent official PyTorch module's `state_dict()` has (no prefixes). Our attribute names are
  the official module names, so the mapping is mechanical: Linear kernels are transposed, conv
  kernels go HWIO <-> OIHW, `scale` <-> `weight`, BatchNorm `mean`/`var` <-> `running_mean`/
  `running_var`, and the two places where torch's nn.Sequential numbers activations too (the DINO
  head's `mlp`, SwAV's `projection_head`) get their torch indices.
* `import_checkpoint(module, ckpt)` / `export_checkpoint(module, kind)`: whole official files —
  DINO backbone releases (dino_vits16_pretrain.pth), DINO training checkpoints (`student`/
  `teacher`), SwAV releases and training checkpoints (`module.` prefix, `state_dict` key), timm
  ViTs and torchvision ResNet-50s.

Only numpy is needed; torch is imported lazily by `load_pth`/`save_pth` (and to read tensors).
"""
import logging

import jax.numpy as jnp
import numpy as np
from flax import nnx

from dino_jax.models.heads import DINOHead, SwAVHead, WeightNormLinear
from dino_jax.models.layers import BatchNorm
from dino_jax.models.wrapper import MultiCropWrapper

log = logging.getLogger(__name__)

_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
               "var": "running_var", "num_batches_tracked": "num_batches_tracked",
               "cls_token": "cls_token", "pos_embed": "pos_embed", "v": "weight_v", "g": "weight_g"}
# Newer torch (parametrizations.weight_norm) names the same two tensors differently.
_WEIGHT_NORM_ALIASES = {"parametrizations.weight.original0": "weight_g",
                        "parametrizations.weight.original1": "weight_v"}
# Keys an official file may carry beside a backbone: DINO/timm `head.*`, torchvision `fc.*`, SwAV's head.
_NOT_BACKBONE = ("head.", "fc.", "projection_head.", "prototypes.")
_SWAV_HEAD = ("projection_head.", "prototypes.")
_MAX_LISTED = 40


class StateDictMismatchError(ValueError):
  """A state dict that does not fit the module: lists missing, unexpected and wrongly shaped keys."""


# ------------------------------------------------------------------ names and layouts

def _torch_layout(leaf, value):
  """Our array -> the official tensor layout."""
  if leaf == "kernel" and value.ndim == 2 or leaf in ("v", "g"):
    return value.T                              # (in, out) -> [out, in]; g (1, out) -> [out, 1]
  if leaf == "kernel" and value.ndim == 4:
    return value.transpose(3, 2, 0, 1)          # HWIO -> OIHW
  if leaf == "num_batches_tracked":
    return value.astype(np.int64)
  return value


def _torch_shape(leaf, shape):
  if leaf == "kernel" and len(shape) == 2 or leaf in ("v", "g"):
    return tuple(shape[::-1])
  if leaf == "kernel" and len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  return tuple(shape)


def _our_layout(leaf, value, like):
  """Official tensor -> our layout and dtype (`like`: our variable's shape/dtype)."""
  if leaf == "kernel" and value.ndim == 2 or leaf in ("v", "g"):
    value = value.T
  elif leaf == "kernel" and value.ndim == 4:
    value = value.transpose(2, 3, 1, 0)
  return np.array(value, dtype=like.dtype, order="C")  # (np.ascontiguousarray turns 0-d into 1-d)


def _sequential_indices(module):
  """{path of an nnx.List: torch nn.Sequential index of each element (None: the list is one layer)}."""
  out = {}
  for path, m in nnx.iter_modules(module):
    if isinstance(m, DINOHead):
      if len(m.mlp) == 1:
        out[path + ("mlp",)] = [None]
      else:
        # Linear[, BN], GELU, ..., Linear: a GELU follows each layer not followed by a BN.
        idx, i = [], 0
        for j, layer in enumerate(m.mlp):
          idx.append(i)
          last = j == len(m.mlp) - 1
          i += 1 if last or isinstance(m.mlp[j + 1], BatchNorm) else 2
        out[path + ("mlp",)] = idx
    elif isinstance(m, SwAVHead) and isinstance(m.projection_head, nnx.List):
      out[path + ("projection_head",)] = [0, 1, 3]  # Linear, BN, ReLU, Linear
  return out


def _fixed_gains(module):
  """{torch name of weight_g: out_dim} for weight-normalised layers whose gain is the constant 1."""
  return {".".join(map(str, path)) + ".weight_g": m.v.shape[1]
          for path, m in nnx.iter_modules(module) if isinstance(m, WeightNormLinear) and m.g is None}


def _name_map(module):
  """{torch name: (our path, our variable)} for every variable of `module`."""
  seq = _sequential_indices(module)
  names = {}
  for path, var in nnx.to_flat_state(nnx.state(module)):
    parts = list(path)
    for k in range(len(parts) - 1):
      prefix = tuple(path[:k])
      if prefix in seq and isinstance(parts[k], int):
        parts[k] = seq[prefix][parts[k]]
    leaf = path[-1]
    if leaf not in _LEAF_NAMES:
      raise ValueError(f"no PyTorch name for variable {'/'.join(map(str, path))}")
    parts[-1] = _LEAF_NAMES[leaf]
    names[".".join(str(p) for p in parts if p is not None)] = (path, var)
  return names


def _canonical_key(key):
  for alias, name in _WEIGHT_NORM_ALIASES.items():
    if key == alias or key.endswith("." + alias):
      return key[: len(key) - len(alias)] + name
  return key


def _to_numpy(value, key):
  if hasattr(value, "detach"):  # a torch tensor
    import torch
    value = value.detach().cpu()
    if value.dtype in (torch.bfloat16, torch.float16):
      value = value.float()
    return value.numpy()
  if isinstance(value, (np.ndarray, np.generic)) or hasattr(value, "__array__"):
    return np.asarray(value)
  raise TypeError(f"state dict entry {key!r} is a {type(value).__name__}, not an array or tensor")


# ------------------------------------------------------------------ module level

def state_dict(module, state=None):
  """The official PyTorch state dict of `module`, as {name: numpy array}.

  `state` (an nnx.State, e.g. the teacher's params) overrides the module's values; variables it
  does not hold keep the module's. A weight-normalised layer with a fixed gain exports the
  constant `weight_g` = 1 that the official module stores.
  """
  values = {path: var for path, var in nnx.to_flat_state(nnx.state(module))}
  if state is not None:
    for path, var in nnx.to_flat_state(state):
      if path not in values:
        raise KeyError(f"state entry {'/'.join(map(str, path))} is not a variable of {type(module).__name__}")
      values[path] = var
  out = {}
  for name, (path, _) in _name_map(module).items():
    v = values[path]
    v = v.get_value() if isinstance(v, nnx.Variable) else v
    out[name] = np.array(_torch_layout(path[-1], np.asarray(v)))
  for name, out_dim in _fixed_gains(module).items():
    out[name] = np.ones((out_dim, 1), np.float32)
  return out


def load_state_dict(module, sd, *, strict=True):
  """Load an official-named state dict into `module` in place (an abstract module from
  nnx.eval_shape works too). Values may be numpy arrays or torch tensors.

  Wrong shapes always raise. With strict=True, missing or unexpected keys raise too; with
  strict=False they are logged and returned ({'missing': [...], 'unexpected': [...]}), the
  missing variables keeping their current values.
  """
  names = _name_map(module)
  gains = _fixed_gains(module)
  sd = {_canonical_key(k): v for k, v in sd.items()}
  missing = sorted((set(names) | set(gains)) - set(sd))
  unexpected = sorted(set(sd) - set(names) - set(gains))
  wrong, updates = [], []
  for name, value in sd.items():
    if name in gains:
      g = _to_numpy(value, name)
      if g.shape != (gains[name], 1):
        wrong.append(f"{name}: checkpoint {tuple(g.shape)} vs model {(gains[name], 1)}")
      elif not np.all(g == 1):
        raise StateDictMismatchError(
            f"{name} is not all ones: the checkpoint was trained with norm_last_layer=False; "
            f"build the head with norm_last_layer=False to load it")
      continue
    if name not in names:
      continue
    path, var = names[name]
    value, ref = _to_numpy(value, name), var.get_value()
    want = _torch_shape(path[-1], ref.shape)
    if tuple(value.shape) != want:
      wrong.append(f"{name}: checkpoint {tuple(value.shape)} vs model {want}")
      continue
    updates.append((path, _our_layout(path[-1], value, ref)))
  if wrong or (strict and (missing or unexpected)):
    raise StateDictMismatchError(_mismatch_message(type(module).__name__, missing, unexpected, wrong))
  if missing or unexpected:
    log.warning("%s", _mismatch_message(type(module).__name__, missing, unexpected, []))
  nnx.update(module, nnx.from_flat_state([(p, jnp.asarray(v)) for p, v in updates]))
  return {"missing": missing, "unexpected": unexpected}


def _mismatch_message(target, missing, unexpected, wrong):
  lines = [f"state dict does not match {target}:"]
  for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong)):
    if items:
      shown = ", ".join(items[:_MAX_LISTED])
      more = f", ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
      lines.append(f"  {title} ({len(items)}): {shown}{more}")
  return "\n".join(lines)


# ------------------------------------------------------------------ official files

def _is_tensor_dict(obj):
  return isinstance(obj, dict) and obj and all(hasattr(v, "shape") for v in obj.values())


def import_checkpoint(module, checkpoint, *, checkpoint_key="teacher", strict=True):
  """Load an official checkpoint (the object `torch.load` returns, or `load_pth(path)`) into
  `module`, a backbone or a MultiCropWrapper. Returns notes on what was deliberately left out.

  Accepted: a plain state dict (DINO/timm/torchvision/SwAV releases); a DINO training checkpoint
  (`checkpoint_key` picks 'teacher' — the official evaluation default — or 'student'); a SwAV
  training checkpoint (its 'state_dict'). As the official loaders do, `module.` is stripped,
  and for a backbone `backbone.` too. For a backbone, keys of heads the backbone does not have
  (DINO/timm `head.*`, torchvision `fc.*`, SwAV `projection_head.*`/`prototypes.*`) are set
  aside with a note; every other key must match (see load_state_dict).
  """
  sd = checkpoint
  if isinstance(sd, dict) and not _is_tensor_dict(sd):
    for key in (checkpoint_key, "state_dict"):
      if isinstance(sd.get(key), dict):
        sd = sd[key]
        break
    else:
      raise ValueError(f"checkpoint has no state dict under {checkpoint_key!r} or 'state_dict'; "
                       f"top-level keys: {sorted(map(str, sd))}")
  if not _is_tensor_dict(sd):
    raise ValueError("checkpoint is not a state dict of tensors")
  sd = {k.replace("module.", ""): v for k, v in sd.items()}
  notes = []
  if isinstance(module, MultiCropWrapper):
    if not any(k.startswith("backbone.") for k in sd):
      # SwAV keeps backbone and head in one flat module.
      sd = {(("head." if k.startswith(_SWAV_HEAD) else "backbone.") + k): v for k, v in sd.items()}
  else:
    sd = {k.replace("backbone.", ""): v for k, v in sd.items()}
    dropped = sorted(k for k in sd if k.startswith(_NOT_BACKBONE))
    if dropped:
      notes.append(f"ignored {len(dropped)} head/classifier keys not part of the backbone: "
                   f"{', '.join(dropped[:_MAX_LISTED])}{' ...' if len(dropped) > _MAX_LISTED else ''}")
      sd = {k: v for k, v in sd.items() if k not in dropped}
  for note in notes:
    log.info("%s", note)
  load_state_dict(module, sd, strict=strict)
  return notes


def _has_batchnorm(module):
  return any(isinstance(m, BatchNorm) for _, m in nnx.iter_modules(module))


def export_checkpoint(module, kind, *, teacher=None):
  """The object to `torch.save` for the official code to load.

  kind='backbone': the backbone's state dict (dino_vits16_pretrain.pth style; loads with
    strict=True into the official ViT, a timm ViT with num_classes=0, or a torchvision
    ResNet-50 whose fc is nn.Identity, as DINO's evaluation scripts build it).
  kind='dino': {'student', 'teacher'} of a MultiCropWrapper as main_dino.py saves them: the
    student under DistributedDataParallel (`module.` prefix), the teacher with `module.` only
    when it has BatchNorms (main_dino.py wraps it in DDP only then). `teacher` is a module or an
    nnx.State of the same architecture (e.g. the teacher params).
  kind='swav': SwAV's flat state dict with the `module.` prefix, as swav_800ep_pretrain.pth.tar
    and main_swav.py's 'state_dict'.
  """
  if kind == "backbone":
    return state_dict(module.backbone if isinstance(module, MultiCropWrapper) else module)
  if not isinstance(module, MultiCropWrapper):
    raise TypeError(f"kind={kind!r} needs a MultiCropWrapper, got {type(module).__name__}")
  if kind == "dino":
    if teacher is None:
      raise ValueError("kind='dino' needs the teacher (a module or an nnx.State)")
    if isinstance(teacher, nnx.Module):
      teacher_sd = state_dict(teacher)
    else:
      teacher_sd = state_dict(module, teacher)
    t_prefix = "module." if _has_batchnorm(module) else ""
    return {"student": {"module." + k: v for k, v in state_dict(module).items()},
            "teacher": {t_prefix + k: v for k, v in teacher_sd.items()}}
  if kind == "swav":
    sd = state_dict(module)
    return {"module." + k.split(".", 1)[1]: v for k, v in sd.items()}
  raise ValueError(f"unknown export kind {kind!r}; valid: 'backbone', 'dino', 'swav'")


def load_pth(path):
  """torch.load a .pth file on the CPU -> the raw object (tensors stay torch tensors).

  Loads with weights_only=True (no arbitrary pickles); DINO training checkpoints also hold their
  argparse `args`, which is allowed explicitly.
  """
  import argparse
  torch = _import_torch()
  with torch.serialization.safe_globals([argparse.Namespace]):
    return torch.load(path, map_location="cpu", weights_only=True)


def save_pth(obj, path):
  """torch.save an export (numpy arrays, possibly nested in dicts) as torch tensors."""
  torch = _import_torch()

  def convert(o):
    if isinstance(o, dict):
      return {k: convert(v) for k, v in o.items()}
    if isinstance(o, np.ndarray):
      return torch.from_numpy(np.array(o, order="C"))  # keeps 0-d buffers 0-d
    return o
  torch.save(convert(obj), path)


def _import_torch():
  try:
    import torch
  except ImportError as e:
    raise ImportError("reading or writing .pth files needs PyTorch: pip install torch") from e
  return torch
