"""SwAV's optimiser: apex LARC (trust 0.001, clip=False) around SGD momentum 0.9, with the prototypes frozen for the
first iterations, and main_swav.py's lr schedule; against tests/torch_ref/swav.py (`LARC` + torch.optim.SGD in
float64, `lr_schedule`), built from the recipe config exactly as the trainer builds it."""
import jax
import jax.numpy as jnp
import numpy as np
import torch

from configs import common
from dino_jax import optim
from tests.torch_ref import swav as ref

NITER, EPOCHS, FREEZE = 3, 3, 4


def _config():
  c = common.swav_defaults()
  c.epochs = EPOCHS
  c.optim.lr, c.optim.min_lr, c.optim.start_warmup, c.optim.warmup_epochs = 4.8, 0.0048, 0.3, 1
  c.optim.weight_decay = c.optim.weight_decay_end = 1e-2   # large, so the folded decay changes every update
  c.optim.freeze_prototypes_niters = FREEZE
  return c


def _params(rng):
  return {
      "backbone": {"conv": {"kernel": rng.standard_normal((3, 3, 4, 5))},
                   "bn": {"scale": 1.0 + 0.1 * rng.standard_normal(5), "bias": np.zeros(5)}},  # bias: ||p|| = 0
      "head": {"prototypes": {"kernel": rng.standard_normal((6, 7))},
               "dead": {"kernel": rng.standard_normal((2, 3))}},        # gets a zero gradient: ||g|| = 0
  }


def test_larc_sgd_matches_apex_larc_around_torch_sgd():
  """Every branch of LARC over 9 iterations: trust ratio with the decay folded in, the plain gradient (no decay) for a
  tensor of norm 0 and for a zero gradient, prototypes skipped entirely (no update, momentum untouched) for
  `freeze_prototypes_niters` iterations, then trained; lr warm-up from `start_warmup` and cosine to `final_lr`."""
  config = _config()
  schedules = optim.make_schedules(config, NITER)
  tx = optim.make_optimizer(config, schedules)
  rng = np.random.default_rng(0)
  start = _params(rng)
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), start)
  state = tx.init(params)
  names, leaves = zip(*[(optim.path_str(p), x) for p, x in jax.tree_util.tree_flatten_with_path(start)[0]])
  tensors = [torch.tensor(x, requires_grad=True) for x in leaves]      # float64
  opt = ref.LARC(torch.optim.SGD(tensors, lr=config.optim.lr, momentum=0.9, weight_decay=config.optim.weight_decay),
                 trust_coefficient=0.001, clip=False)
  lrs = ref.lr_schedule(config.optim.lr, config.optim.min_lr, EPOCHS, NITER, warmup_epochs=1,
                        start_warmup=config.optim.start_warmup)
  update = jax.jit(tx.update)
  for it in range(EPOCHS * NITER):
    grads = [rng.standard_normal(x.shape) for x in leaves]
    grads[names.index("head/dead/kernel")] *= 0.0
    for group in opt.param_groups:
      group["lr"] = lrs[it]
    opt.zero_grad()
    for name, t, g in zip(names, tensors, grads):
      t.grad = None if ("prototypes" in name and it < FREEZE) else torch.tensor(g)   # main_swav.py's cancellation
    opt.step()
    tree = jax.tree_util.tree_unflatten(jax.tree.structure(params), [jnp.asarray(g, jnp.float32) for g in grads])
    updates, state = update(tree, state, params)
    params = jax.tree.map(lambda p, u: p + u, params, updates)
    assert abs(float(schedules.lr(it)) - lrs[it]) <= 1e-6 * lrs[it], it
    for name, t, mine in zip(names, tensors, jax.tree.leaves(params)):
      expected = t.detach().numpy()
      err = np.max(np.abs(np.asarray(mine, np.float64) - expected)) / np.max(np.abs(expected))
      assert err <= 1e-5, (it, name, err)
    prototypes = np.asarray(params["head"]["prototypes"]["kernel"])
    assert np.array_equal(prototypes, start["head"]["prototypes"]["kernel"].astype(np.float32)) == (it < FREEZE), it
  # The zero-norm bias took plain SGD steps (no decay, no trust ratio): its distance from 0 is lr-sized, not 1e-3 x.
  assert np.max(np.abs(np.asarray(params["backbone"]["bn"]["bias"]))) > 0.1


def test_larc_respects_the_decay_groups_when_asked():
  """With decay_all=False (DINO's two groups), apex LARC reads each group's weight_decay: biases and 1-D tensors are
  then neither decayed nor is the decay in their trust ratio."""
  sched = optim.Schedules(lr=lambda s: jnp.float32(1.0), weight_decay=lambda s: jnp.float32(0.5))
  p = {"w": jnp.full((2, 2), 2.0), "bias": jnp.array([1.0, -1.0])}
  g = {"w": jnp.full((2, 2), 0.1), "bias": jnp.array([0.1, 0.2])}
  for decay_all in (False, True):
    upd, _ = optim.momentum_optimizer("larc", sched, decay_all=decay_all).update(g, optim.momentum_optimizer(
        "larc", sched, decay_all=decay_all).init(p), p)
    for name in ("w", "bias"):
      wd = 0.5 if (decay_all or name == "w") else 0.0
      pn, gn = np.linalg.norm(p[name]), np.linalg.norm(g[name])
      expected = -(np.asarray(g[name]) + wd * np.asarray(p[name])) * 0.001 * pn / (gn + wd * pn + 1e-8)
      np.testing.assert_allclose(upd[name], expected, rtol=1e-6)
