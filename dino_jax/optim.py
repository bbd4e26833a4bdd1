"""Optimisers and schedules with the semantics of the official PyTorch code.

Three things differ from the stock optax transforms and matter for parity:

* Per-tensor freezing. The official code freezes a tensor (DINO's head `last_layer` for `freeze_last_layer` epochs,
  SwAV's `prototypes` for `freeze_prototypes_niters` iterations) by setting its `.grad` to None. PyTorch optimisers then
  skip that tensor entirely: no update, no weight decay, no moment update and, for Adam, no step count, so its bias
  correction starts when it is unfrozen. `frozen_until(path) -> int` gives, per parameter, the first step at which it
  trains; Adam keeps one step counter per tensor.
* Per-tensor gradient clipping (DINO `clip_gradients`): each tensor is rescaled by clip / (||g|| + 1e-6) when that is
  below 1, instead of one global norm.
* LARS variants: DINO's `utils.LARS` (barlow-twins style, 1-D parameters excluded) and apex `LARC` used by SwAV
  (trust ratio on every tensor, weight decay folded into the gradient). Neither is `optax.lars`.

Learning rate and weight decay are functions of the step (`Schedules`) evaluated inside the transform from its own
step counter, which is the train state's step.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import optax

ScheduleFn = Callable[[jax.Array], jax.Array]
FreezeFn = Callable[[str], int]


# ----------------------------------------------------------------------------------------------------------------------
# Schedules
# ----------------------------------------------------------------------------------------------------------------------
def cosine_schedule(step, *, base, final, total_steps, warmup_steps=0, start_warmup=0.0):
  """`utils.cosine_scheduler` of the official DINO code (and SwAV's lr schedule) evaluated at `step`.

  Linear warm-up `np.linspace(start_warmup, base, warmup_steps)` (both end points included), then
  `final + (base - final) * (1 + cos(pi * i / (total_steps - warmup_steps))) / 2` for i = step - warmup_steps.
  Steps past the end keep the last value (the official array would be indexed out of range).
  """
  step = jnp.minimum(jnp.asarray(step, jnp.float32), total_steps - 1)
  decay_steps = max(total_steps - warmup_steps, 1)
  i = step - warmup_steps
  cosine = final + 0.5 * (base - final) * (1.0 + jnp.cos(jnp.pi * i / decay_steps))
  if warmup_steps <= 0:
    return cosine
  warm = start_warmup + (base - start_warmup) * step / max(warmup_steps - 1, 1)
  return jnp.where(step < warmup_steps, warm, cosine)


@dataclasses.dataclass(frozen=True)
class Schedules:
  """Every progress-dependent value of a run, as functions of the global step: the lr and the weight decay, the
  method's own values (`values`, e.g. DINO's teacher momentum and temperature, SwAV's queue start) and the step at
  which each frozen tensor starts training (`frozen`, {name in a parameter's path: step})."""
  lr: ScheduleFn
  weight_decay: ScheduleFn
  values: Mapping[str, ScheduleFn] = dataclasses.field(default_factory=dict)
  frozen: Mapping[str, int] = dataclasses.field(default_factory=dict)


def make_schedules(config, steps_per_epoch: int, method=None) -> Schedules:
  """Schedules from `config.optim` (lr scaled linearly with the global batch when `optim.lr_scaling` is set) and the
  method's (`method`: a dino_jax.methods.Method; default: the one config.method names)."""
  if method is None:
    from dino_jax import methods  # noqa: PLC0415 (methods import this module)
    method = methods.get(config.method)
  o = config.optim
  total = config.epochs * steps_per_epoch
  base_lr = o.lr * config.batch_size / 256.0 if o.lr_scaling else o.lr
  lr = lambda s: cosine_schedule(s, base=base_lr, final=o.min_lr, total_steps=total,
                                 warmup_steps=int(o.warmup_epochs * steps_per_epoch), start_warmup=o.start_warmup)
  wd = lambda s: cosine_schedule(s, base=o.weight_decay, final=o.weight_decay_end, total_steps=total)
  return Schedules(lr=lr, weight_decay=wd, values=method.schedules(config, steps_per_epoch),
                   frozen=method.frozen(config, steps_per_epoch))


# ----------------------------------------------------------------------------------------------------------------------
# Parameter groups
# ----------------------------------------------------------------------------------------------------------------------
def path_str(path) -> str:
  """'backbone/blocks/0/attn/qkv/kernel' for a jax key path."""
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def decay_mask(params):
  """True where weight decay applies: the official `get_params_groups` skips biases and every 1-D tensor.

  `cls_token` (1, 1, D) and `pos_embed` (1, N + 1, D) are 3-D and therefore decayed, as in the official code.
  """
  return jax.tree_util.tree_map_with_path(
      lambda p, x: x.ndim > 1 and not path_str(p).endswith("bias"), params)


def freeze_by_name(**until: int) -> FreezeFn:
  """frozen_until for `freeze_by_name(last_layer=N)`: parameters whose path contains a key train from step N."""
  return lambda path: max([n for key, n in until.items() if key in path.split("/")] or [0])


def _frozen(frozen_until: FreezeFn | None, params, count):
  """Tree of bool scalars: True where the tensor is frozen at step `count`."""
  if frozen_until is None:
    return jax.tree.map(lambda _: jnp.bool_(False), params)
  return jax.tree_util.tree_map_with_path(lambda p, _: count < frozen_until(path_str(p)), params)


# ----------------------------------------------------------------------------------------------------------------------
# Per-tensor clipping
# ----------------------------------------------------------------------------------------------------------------------
def clip_per_tensor(grads, max_norm):
  """DINO `clip_gradients`: g *= min(1, max_norm / (||g|| + 1e-6)) for each tensor. Returns (grads, norms)."""
  norms = jax.tree.map(lambda g: jnp.sqrt(jnp.sum(jnp.square(g.astype(jnp.float32)))), grads)
  if not max_norm:
    return grads, norms
  clipped = jax.tree.map(lambda g, n: g * jnp.minimum(1.0, max_norm / (n + 1e-6)).astype(g.dtype), grads, norms)
  return clipped, norms


# ----------------------------------------------------------------------------------------------------------------------
# AdamW (PyTorch semantics, per-tensor step counts)
# ----------------------------------------------------------------------------------------------------------------------
class AdamWState(NamedTuple):
  count: jax.Array       # global step
  tensor_count: optax.Params  # per-tensor number of updates taken (PyTorch's state['step'])
  mu: optax.Params
  nu: optax.Params


def adamw(schedules: Schedules, *, b1=0.9, b2=0.999, eps=1e-8, frozen_until: FreezeFn | None = None,
          clip: float = 0.0) -> optax.GradientTransformation:
  """torch.optim.AdamW on two groups (decayed / not decayed), with optional per-tensor clipping and freezing."""

  def init(params):
    zeros = lambda: jax.tree.map(lambda p: jnp.zeros_like(p, jnp.float32), params)
    return AdamWState(jnp.zeros([], jnp.int32), jax.tree.map(lambda _: jnp.zeros([], jnp.int32), params),
                      zeros(), zeros())

  def update(grads, state, params):
    grads, _ = clip_per_tensor(grads, clip)
    lr, wd = schedules.lr(state.count), schedules.weight_decay(state.count)
    frozen, decay = _frozen(frozen_until, params, state.count), decay_mask(params)

    def one(g, p, t, m, v, fz, dec):
      g = g.astype(jnp.float32)
      t_new = t + 1
      m_new = b1 * m + (1 - b1) * g
      v_new = b2 * v + (1 - b2) * g * g
      bc1 = 1 - b1 ** t_new.astype(jnp.float32)
      bc2 = 1 - b2 ** t_new.astype(jnp.float32)
      step = lr / bc1 * m_new / (jnp.sqrt(v_new) / jnp.sqrt(bc2) + eps)
      # PyTorch AdamW: p <- p * (1 - lr * wd) - step, i.e. the update is -(lr * wd * p) - step.
      upd = -step - (lr * wd * p if dec else 0.0)
      keep = lambda new, old: jnp.where(fz, old, new)
      return keep(upd, jnp.zeros_like(upd)).astype(p.dtype), keep(t_new, t), keep(m_new, m), keep(v_new, v)

    out = jax.tree.map(one, grads, params, state.tensor_count, state.mu, state.nu, frozen, decay)
    pick = lambda i: jax.tree.map(lambda _, o: o[i], params, out)
    return pick(0), AdamWState(state.count + 1, pick(1), pick(2), pick(3))

  return optax.GradientTransformation(init, update)


# ----------------------------------------------------------------------------------------------------------------------
# SGD, LARS (DINO) and LARC (apex, SwAV): one momentum machinery, three gradient rules
# ----------------------------------------------------------------------------------------------------------------------
class MomentumState(NamedTuple):
  count: jax.Array
  momentum: optax.Params


def _norm(x):
  return jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32))))


def _sgd_rule(g, p, wd, dec):
  """torch.optim.SGD weight decay: d_p = g + wd * p on the decayed group."""
  return g + wd * p if dec else g


def _lars_rule(g, p, wd, dec, eta=0.001):
  """DINO `utils.LARS`: 1-D tensors get neither decay nor adaptation; others d_p = (g + wd p) * eta ||p|| / ||d_p||."""
  if p.ndim == 1:
    return g
  dp = g + wd * p
  pn, un = _norm(p), _norm(dp)
  q = jnp.where((pn > 0) & (un > 0), eta * pn / jnp.where(un > 0, un, 1.0), 1.0)
  return dp * q


def _larc_rule(g, p, wd, dec, trust=0.001, eps=1e-8):
  """apex LARC (clip=False): when ||p|| and ||g|| are non-zero, d_p = (g + wd p) * trust ||p|| / (||g|| + wd ||p|| + eps);
  otherwise the raw gradient without weight decay (LARC zeroes the group's decay while the inner SGD steps).
  wd is the tensor's group decay: 0 outside the decayed group (LARC reads `weight_decay` per parameter group)."""
  wd = wd if dec else 0.0
  pn, gn = _norm(p), _norm(g)
  ok = (pn != 0) & (gn != 0)
  ratio = trust * pn / (gn + wd * pn + eps)
  return jnp.where(ok, (g + wd * p) * ratio, g)


_RULES = {"sgd": _sgd_rule, "lars": _lars_rule, "larc": _larc_rule}


def momentum_optimizer(kind: str, schedules: Schedules, *, momentum=0.9, frozen_until: FreezeFn | None = None,
                       clip: float = 0.0, decay_all: bool = False) -> optax.GradientTransformation:
  """SGD with heavy-ball momentum (PyTorch: buf = m * buf + d_p; p -= lr * buf) after a per-tensor gradient rule.

  kind: 'sgd' (torch SGD on DINO's two groups), 'lars' (DINO utils.LARS), 'larc' (apex LARC around SGD, SwAV).
  decay_all: decay every tensor (SwAV passes weight_decay to SGD for all parameters); otherwise the DINO groups.
  A frozen tensor's momentum buffer is left untouched, as PyTorch skips tensors whose grad is None.
  """
  if kind not in _RULES:
    raise ValueError(f"unknown optimizer {kind!r}; expected one of {sorted(_RULES)}")
  rule = _RULES[kind]

  def init(params):
    return MomentumState(jnp.zeros([], jnp.int32), jax.tree.map(lambda p: jnp.zeros_like(p, jnp.float32), params))

  def update(grads, state, params):
    grads, _ = clip_per_tensor(grads, clip)
    lr, wd = schedules.lr(state.count), schedules.weight_decay(state.count)
    frozen = _frozen(frozen_until, params, state.count)
    decay = jax.tree.map(lambda p: True, params) if decay_all else decay_mask(params)

    def one(g, p, buf, fz, dec):
      d_p = rule(g.astype(jnp.float32), p.astype(jnp.float32), wd, dec)
      buf_new = momentum * buf + d_p
      upd = -lr * buf_new
      return jnp.where(fz, 0.0, upd).astype(p.dtype), jnp.where(fz, buf, buf_new)

    out = jax.tree.map(one, grads, params, state.momentum, frozen, decay)
    pick = lambda i: jax.tree.map(lambda _, o: o[i], params, out)
    return pick(0), MomentumState(state.count + 1, pick(1))

  return optax.GradientTransformation(init, update)


def make_optimizer(config, schedules: Schedules) -> optax.GradientTransformation:
  """The optimiser named by `config.optim.name` ('adamw', 'sgd', 'lars', 'larc'), skipping `schedules.frozen`."""
  o = config.optim
  frozen_until = freeze_by_name(**schedules.frozen)
  if o.name == "adamw":
    return adamw(schedules, frozen_until=frozen_until, clip=o.clip_grad)
  if o.name not in _RULES:
    raise ValueError(f"config.optim.name={o.name!r}; expected one of {', '.join(['adamw', *sorted(_RULES)])}")
  return momentum_optimizer(o.name, schedules, momentum=o.momentum, frozen_until=frozen_until, clip=o.clip_grad,
                            decay_all=o.decay_all)
