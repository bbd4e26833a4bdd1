"""Optimisers and schedules against PyTorch (torch.optim.AdamW/SGD and DINO's LARS as the official code drives them)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from dino_jax import optim
from tests.torch_ref import dino as ref

SHAPES = {"w": (4, 3), "bias": (3,), "cls_token": (1, 1, 3), "norm": {"scale": (3,)}, "last_layer": {"kernel": (3, 5)}}
EPOCHS, NITER = 3, 3   # 9 steps: warm-up over epoch 0, last layer frozen during epoch 0


def _init(seed=0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: rng.normal(size=s).astype(np.float32), SHAPES, is_leaf=lambda x: isinstance(x, tuple))


def _flat(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
  return out


class _TorchParams(torch.nn.Module):
  def __init__(self, tree):
    super().__init__()
    self.names = list(_flat(tree))
    for name, value in _flat(tree).items():
      mod = self
      *parents, leaf = name.split(".")
      for p in parents:
        if not hasattr(mod, p):
          mod.add_module(p, torch.nn.Module())
        mod = getattr(mod, p)
      mod.register_parameter(leaf, torch.nn.Parameter(torch.tensor(value)))


def _grads(step):
  rng = np.random.default_rng(100 + step)
  # large gradients on some steps so that per-tensor clipping (3.0) is active
  scale = 10.0 if step % 2 else 0.5
  return jax.tree.map(lambda s: (rng.normal(size=s) * scale).astype(np.float32), SHAPES,
                      is_leaf=lambda x: isinstance(x, tuple))


def _schedules(lr, wd0, wd1, warm):
  return optim.Schedules(
      lr=lambda s: optim.cosine_schedule(s, base=lr, final=1e-6, total_steps=EPOCHS * NITER, warmup_steps=warm * NITER),
      weight_decay=lambda s: optim.cosine_schedule(s, base=wd0, final=wd1, total_steps=EPOCHS * NITER))


def _run_both(kind, clip):
  params = _init()
  tmodel = _TorchParams(params)
  groups = ref.params_groups(tmodel)
  topt = {"adamw": lambda: torch.optim.AdamW(groups), "sgd": lambda: torch.optim.SGD(groups, lr=0, momentum=0.9),
          "lars": lambda: ref.LARS(groups)}[kind]()
  lr_tab = ref.cosine_scheduler(0.1, 1e-6, EPOCHS, NITER, warmup_epochs=1)
  wd_tab = ref.cosine_scheduler(0.04, 0.4, EPOCHS, NITER)
  sched = _schedules(0.1, 0.04, 0.4, 1)
  freeze = optim.freeze_by_name(last_layer=NITER)
  tx = (optim.adamw(sched, frozen_until=freeze, clip=clip) if kind == "adamw"
        else optim.momentum_optimizer(kind, sched, frozen_until=freeze, clip=clip))
  jparams = jax.tree.map(jnp.asarray, params)
  state = tx.init(jparams)
  update = jax.jit(tx.update)
  for it in range(EPOCHS * NITER):
    g = _grads(it)
    # --- torch, as train_one_epoch does it
    for i, group in enumerate(topt.param_groups):
      group["lr"] = lr_tab[it]
      if i == 0:
        group["weight_decay"] = wd_tab[it]
    topt.zero_grad()
    for name, p in tmodel.named_parameters():
      p.grad = torch.tensor(_flat(g)[name])
    if clip:
      ref.clip_gradients(tmodel, clip)
    ref.cancel_gradients_last_layer(it // NITER, tmodel, 1)
    topt.step()
    # --- ours
    upd, state = update(jax.tree.map(jnp.asarray, g), state, jparams)
    jparams = jax.tree.map(lambda p, u: p + u, jparams, upd)
    ours = _flat(jax.tree.map(np.asarray, jparams))
    for name, p in tmodel.named_parameters():
      np.testing.assert_allclose(ours[name], p.detach().numpy(), rtol=2e-5, atol=1e-6, err_msg=f"{kind} {name} it {it}")
  return ours, params


@pytest.mark.parametrize("kind", ["adamw", "sgd", "lars"])
def test_optimizer_matches_pytorch_with_groups_clipping_and_freezing(kind):
  final, initial = _run_both(kind, clip=3.0)
  # the last layer did train once unfrozen
  assert not np.allclose(final["last_layer.kernel"], initial["last_layer"]["kernel"])


def test_adamw_frozen_tensor_step_count_starts_late():
  sched = _schedules(0.1, 0.0, 0.0, 0)
  tx = optim.adamw(sched, frozen_until=optim.freeze_by_name(last_layer=4))
  params = jax.tree.map(jnp.asarray, _init())
  state = tx.init(params)
  for it in range(6):
    _, state = tx.update(jax.tree.map(jnp.asarray, _grads(it)), state, params)
  assert int(state.tensor_count["last_layer"]["kernel"]) == 2
  assert int(state.tensor_count["w"]) == 6
  assert int(state.count) == 6


def test_decay_mask_official_groups():
  mask = optim.decay_mask(jax.tree.map(jnp.asarray, _init()))
  assert mask == {"w": True, "bias": False, "cls_token": True, "norm": {"scale": False}, "last_layer": {"kernel": True}}


@pytest.mark.parametrize("warmup,start", [(0, 0.0), (2, 0.0), (3, 0.3)])
def test_cosine_schedule_matches_official_table(warmup, start):
  epochs, niter = 7, 5
  table = ref.cosine_scheduler(4.8, 0.0048, epochs, niter, warmup_epochs=warmup, start_warmup_value=start)
  ours = [float(optim.cosine_schedule(s, base=4.8, final=0.0048, total_steps=epochs * niter,
                                      warmup_steps=warmup * niter, start_warmup=start)) for s in range(epochs * niter)]
  np.testing.assert_allclose(ours, table, rtol=1e-5)
  # past the end the last value is kept
  past = optim.cosine_schedule(10_000, base=4.8, final=0.0048, total_steps=epochs * niter,
                               warmup_steps=warmup * niter, start_warmup=start)
  assert float(past) == pytest.approx(table[-1], rel=1e-5)


def test_per_tensor_clipping_hand_values():
  g = {"a": jnp.asarray([3.0, 4.0]), "b": jnp.asarray([0.3, 0.4])}
  clipped, norms = optim.clip_per_tensor(g, 1.0)
  np.testing.assert_allclose(np.asarray(norms["a"]), 5.0)
  np.testing.assert_allclose(np.asarray(clipped["a"]), np.array([3.0, 4.0]) / (5.0 + 1e-6), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(clipped["b"]), [0.3, 0.4])   # norm 0.5 < 1: untouched (not a global norm)


def test_unknown_optimizer_is_named():
  with pytest.raises(ValueError, match="'adam'"):
    optim.momentum_optimizer("adam", _schedules(0.1, 0, 0, 0))


def test_ema_and_recipe_schedules_hand_values():
  """EMA t <- m t + (1 - m) s on every leaf; a recipe's teacher momentum runs 0.996 -> 1 and its weight decay
  0.04 -> 0.4 on cosines over all iterations, and its lr warms up linearly from 0 to 5e-4 x batch / 256."""
  from configs import common  # noqa: PLC0415
  from dino_jax import steps  # noqa: PLC0415
  out = steps.ema({"a": jnp.array([1.0, 2.0]), "b": {"c": jnp.array(4.0)}},
                  {"a": jnp.array([3.0, 6.0]), "b": {"c": jnp.array(0.0)}}, 0.75)
  np.testing.assert_allclose(out["a"], [1.5, 3.0])
  np.testing.assert_allclose(out["b"]["c"], 3.0)

  c = common.dino_defaults()
  c.epochs, c.batch_size, c.optim.warmup_epochs = 4, 1024, 1
  niter = 10
  s = optim.make_schedules(c, niter)
  total = 4 * niter
  for step in (0, 7, 20, total - 1):
    cos = 0.5 * (1 + np.cos(np.pi * step / total))
    assert float(s.values["teacher_momentum"](step)) == pytest.approx(1.0 - 0.004 * cos, rel=1e-6)
    assert float(s.weight_decay(step)) == pytest.approx(0.4 + (0.04 - 0.4) * cos, rel=1e-6)
  peak = 5e-4 * 1024 / 256
  assert [float(s.lr(k)) for k in (0, 9)] == [0.0, pytest.approx(peak, rel=1e-6)]   # warm-up over 10 iterations
  assert float(s.lr(25)) == pytest.approx(1e-6 + (peak - 1e-6) * 0.5 * (1 + np.cos(np.pi * 15 / 30)), rel=1e-5)
