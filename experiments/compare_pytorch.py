r"""Our training step beside the official PyTorch one: same initial weights, same augmented batches, N steps.

  python experiments/compare_pytorch.py --method=dino --official=/path/to/your/clone/of/facebookresearch/dino
  python experiments/compare_pytorch.py --method=swav --official=/path/to/your/clone/of/facebookresearch/swav \
      --fp64_twin                                           # SwAV's ResNet-50 recipe on the digits, see below
  python experiments/compare_pytorch.py --method=dino       # against tests/torch_ref (the in-repo reference)
  python experiments/compare_pytorch.py --method=swav       # against tests/torch_ref, the quickstart's ViT
  python experiments/compare_pytorch.py --method=swav --backbone=resnet50   # tests/torch_ref, the --official recipe

The recipe is the digits quickstart (configs/quickstart.py, configs/swav_quickstart.py) with a few overrides so that
a short run crosses the schedules' switches (COMPARE below: 4 epochs of 44 steps at batch 32, so the lr warm-up ends
and the last layer / prototypes unfreeze within 60 steps; no stochastic depth, which the two frameworks cannot
draw alike). SwAV runs with its official optimiser (LARC around SGD, decay on every tensor, no clipping) and a queue
that starts in epoch 1 (full, hence used, from step 47), because the reference implements that loop; the quickstart's
AdamW is DINO's. The official SwAV code has ResNets only, so `--method=swav --official` runs configs/swav_resnet50.py
(ResNet-50, projection 2048-2048-128, 3000 prototypes, epsilon 0.05, start_warmup 0.3, SwAV's photometry) on the
same digits pipeline with SWAV_RESNET below: 2 global 32-px and 2 local 16-px crops, float32, the same COMPARE and
optimiser overrides.

Batches: our input pipeline's crops, augmented by our photometric chain on the device with the train step's keys,
then handed to our method's update and, as NCHW tensors of the same values, to the PyTorch loop. Our initial weights
go to PyTorch through dino_jax.interop.torch (SwAV: export_checkpoint(kind='swav'), loaded strictly), and both sides
are checked to hold the same weights before the first step. With --official the PyTorch modules are imported from
the clone at that path, never copied: DINO's student/teacher (vision_transformer.py, utils.py) and main_dino.py's
DINOLoss; SwAV's network (src/resnet50.py's resnet50(normalize=True, ...), its forward without the `.cuda()` a
CPU-only torch lacks) and main_swav.py's distributed_sinkhorn (its module-global `args` set, a one-process gloo
group for its all_reduce). Top-level imports of code the comparison never runs (apex, torchvision, pandas) are
stubbed during the import when they are not installed. The iteration around them is the official one: DINO's
schedules, loss, clipping, last-layer freezing and EMA from the clone; SwAV's, which main_swav.py writes inline in
train(), is tests/torch_ref/swav.py's Trainer (prototype normalisation, multi-resolution forward, queue, swapped
prediction, prototype freezing, lr schedule, and apex's LARC, which needs a CUDA build of apex to import).

Written to --out: compare.md (the headline figures; per step: both losses, their relative difference, the relative
distance between the two networks' weights, that distance against the reference's own drift from the start, and the
centre's distance (DINO) or both code entropies (SwAV); with --fp64_twin the same PyTorch iteration in float64 too,
the distance of PyTorch's own float32 from exact arithmetic), compare.json, compare.png.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import importlib.util
import json
import os
import socket
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from dino_jax import sharding, steps  # noqa: E402
from dino_jax import state as state_lib  # noqa: E402
from dino_jax.data import photometric, pipeline, sources  # noqa: E402
from dino_jax.interop import torch as interop  # noqa: E402

COMPARE = {"batch_size": 32, "epochs": 4, "optim.warmup_epochs": 1, "model.drop_path_rate": 0.0,
           "log_every_steps": 1}
SWAV_OFFICIAL_OPTIM = {"optim.name": "larc", "optim.lr": 0.6, "optim.lr_scaling": False, "optim.min_lr": 0.0,
                       "optim.weight_decay": 1e-6, "optim.weight_decay_end": 1e-6, "optim.decay_all": True,
                       "optim.clip_grad": 0.0, "optim.freeze_prototypes_niters": 44, "loss.queue_length": 64,
                       "loss.epoch_queue_starts": 1}
# The official SwAV network is a ResNet-50 (src/resnet50.py): with --official, configs/swav_resnet50.py (its network,
# 2048 -> 2048 -> 128 projection, 3000 prototypes, epsilon 0.05, SwAV's photometry) on the digits pipeline of the
# quickstarts (configs/common.py digits_quickstart), at crop sizes where ResNet-50's five stride-2 stages still leave
# a 1x1 map, in float32.
SWAV_RESNET = {"model.arch": "resnet50", "model.overrides": {}, "crops.global_size": 32, "crops.local_size": 16,
               "crops.local_number": 2}


def recipe(method, backbone="vit"):
  """(config, its description): the quickstart of `method` (backbone 'vit'), or for SwAV with backbone 'resnet50'
  configs/swav_resnet50.py on the digits, with the comparison's overrides."""
  from ml_collections import config_dict  # noqa: PLC0415
  from configs import common  # noqa: PLC0415
  if method == "dino" and backbone != "vit":
    raise SystemExit("DINO compares on the quickstart's ViT only (--backbone=vit)")
  if backbone == "resnet50":
    c = common.digits_quickstart(importlib.import_module("configs.swav_resnet50").get_config(), photometry=True)
    name = "configs/swav_resnet50.py on the digits (configs/common.py digits_quickstart)"
  else:
    name = "configs/quickstart.py" if method == "dino" else "configs/swav_quickstart.py"
    c = importlib.import_module(name[:-3].replace("/", ".")).get_config()
  overrides = overrides_for(method, backbone)
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  assert isinstance(c, config_dict.ConfigDict)
  return c, name


def overrides_for(method, backbone="vit"):
  return {**COMPARE, **(SWAV_OFFICIAL_OPTIM if method == "swav" else {}),
          **(SWAV_RESNET if backbone == "resnet50" else {})}


# ============ the PyTorch side: official modules from a clone, or the in-repo reference ============

class _Stub(types.ModuleType):
  """Stand-in for a module that an official script imports at top level only for code the comparison never runs
  (apex's LARC and amp, torchvision's datasets, pandas' log tables): each attribute is an empty class (so that e.g.
  `class MultiCropDataset(datasets.ImageFolder)` still defines)."""
  __path__ = []   # a package: its submodules can be stubbed too

  def __getattr__(self, name):
    if name.startswith("__"):
      raise AttributeError(name)
    value = type(name, (), {})
    setattr(self, name, value)
    return value


@contextlib.contextmanager
def _stubbed_if_absent(names):
  """`names` (dotted, parents first) whose top-level package is not installed are _Stub modules in sys.modules for
  the duration of the block only."""
  absent = {n.split(".")[0] for n in names if importlib.util.find_spec(n.split(".")[0]) is None}
  added = []
  for name in names:
    if name.split(".")[0] in absent and name not in sys.modules:
      sys.modules[name] = _Stub(name)
      added.append(name)
      parent, _, leaf = name.rpartition(".")
      if parent:
        setattr(sys.modules[parent], leaf, sys.modules[name])
  try:
    yield
  finally:
    for name in added:
      del sys.modules[name]


def _import_official(official, names, stubs=()):
  """The modules `names` imported from the clone at `official` (first on sys.path), `stubs` stubbed if absent."""
  path = os.path.abspath(official)
  if path not in sys.path:
    sys.path.insert(0, path)
  with _stubbed_if_absent(stubs):
    return [importlib.import_module(n) for n in names]


def _checkout(official):
  """'official checkout PATH at COMMIT' (the commit when PATH is a git work tree)."""
  path = os.path.abspath(official)
  try:
    commit = subprocess.run(["git", "-C", path, "rev-parse", "HEAD"], capture_output=True, text=True,
                            check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return f"official checkout {path}"
  return f"official checkout {path} at {commit}"


def _one_process_group():
  """A gloo group of this one process for the official all_reduce calls (DINOLoss.update_center,
  distributed_sinkhorn): a sum over one rank is the identity. On a free port."""
  import torch.distributed as dist  # noqa: PLC0415
  if not dist.is_initialized():
    with socket.socket() as s:
      s.bind(("127.0.0.1", 0))
      port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


def dino_modules(official: str | None):
  """The pieces of the official DINO iteration, by role: vit(**shape), head(in, out, **kw), wrapper, DINOLoss,
  cosine_scheduler, clip_gradients, cancel_gradients_last_layer, params_groups."""
  import torch  # noqa: PLC0415
  if official is None:
    from tests.torch_ref import dino, heads, vit  # noqa: PLC0415
    return types.SimpleNamespace(
        vit=lambda **kw: vit.VisionTransformer(**kw), head=heads.DINOHead, wrapper=heads.MultiCropWrapper,
        DINOLoss=dino.DINOLoss, cosine_scheduler=dino.cosine_scheduler, clip_gradients=dino.clip_gradients,
        cancel_gradients_last_layer=dino.cancel_gradients_last_layer, params_groups=dino.params_groups,
        source="tests/torch_ref (in-repo reference)")
  # main_dino.py imports torchvision for its data loading only, which the comparison does not use
  vits, utils, main_dino = _import_official(official, ["vision_transformer", "utils", "main_dino"],
                                            stubs=["torchvision", "torchvision.datasets", "torchvision.transforms",
                                                   "torchvision.models"])
  _one_process_group()     # DINOLoss.update_center all-reduces the batch centre

  def vit(patch_size, embed_dim, depth, num_heads, img_size, mlp_ratio=4.0, drop_path_rate=0.0):
    return vits.VisionTransformer(img_size=[img_size], patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                                  num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=True,
                                  drop_path_rate=drop_path_rate,
                                  norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6))
  return types.SimpleNamespace(
      vit=vit, head=vits.DINOHead, wrapper=utils.MultiCropWrapper, DINOLoss=main_dino.DINOLoss,
      cosine_scheduler=utils.cosine_scheduler, clip_gradients=utils.clip_gradients,
      cancel_gradients_last_layer=utils.cancel_gradients_last_layer, params_groups=utils.get_params_groups,
      source=_checkout(official))


class TorchDINO:
  """The official DINO iteration (main_dino.py train_one_epoch, fp32, one process) on given augmented crops:
  tests/torch_ref/dino.py's Trainer driving the networks, loss and utilities of `mods`."""

  def __init__(self, mods, config, state_dict, steps_per_epoch):
    import torch  # noqa: PLC0415
    from tests.torch_ref import dino  # noqa: PLC0415
    m, o, lo = config.model, config.optim, config.loss
    shape = dict(patch_size=m.patch_size, embed_dim=m.overrides["embed_dim"], depth=m.overrides["depth"],
                 num_heads=m.overrides["num_heads"], img_size=m.overrides["img_size"])
    head_kw = dict(use_bn=m.use_bn_in_head, nlayers=m.head_nlayers, hidden_dim=m.head_hidden_dim,
                   bottleneck_dim=m.head_bottleneck_dim)
    self.student = mods.wrapper(mods.vit(**shape), mods.head(shape["embed_dim"], m.out_dim,
                                                             norm_last_layer=m.norm_last_layer, **head_kw))
    teacher = mods.wrapper(mods.vit(**shape), mods.head(shape["embed_dim"], m.out_dim, **head_kw))
    self.student.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()}, strict=True)
    assert o.name == "adamw", "the comparison drives AdamW (the quickstart's and DINO's default)"
    self.trainer = dino.Trainer(
        self.student, teacher, out_dim=m.out_dim, ncrops=config.crops.global_number + config.crops.local_number,
        epochs=config.epochs, niter_per_ep=steps_per_epoch, batch_size=config.batch_size, lr=o.lr, min_lr=o.min_lr,
        warmup_epochs=o.warmup_epochs, weight_decay=o.weight_decay, weight_decay_end=o.weight_decay_end,
        clip_grad=o.clip_grad, freeze_last_layer=o.freeze_last_layer, momentum_teacher=config.teacher_momentum,
        warmup_teacher_temp=lo.warmup_teacher_temp, teacher_temp=lo.teacher_temp,
        warmup_teacher_temp_epochs=lo.warmup_teacher_temp_epochs, student_temp=lo.student_temp,
        center_momentum=lo.center_momentum, lr_scaling=o.lr_scaling, pieces=mods)

  def step(self, crops):
    loss = self.trainer.step(crops)
    return {"loss": loss, "center": self.trainer.loss.center.numpy()[0].copy()}

  def weights(self):
    return {k: v.numpy() for k, v in self.student.state_dict().items()}


def swav_modules(official: str | None, config):
  """The pieces of the official SwAV iteration that differ by source, by role: network() -> (torch module taking the
  list of resolution groups and returning (embedding, scores), its prototypes Linear), state_dict(our module) -> the
  torch module's state dict, name(our name) -> its torch name, sinkhorn(outs, epsilon, iterations) on the list of
  per-rank scores. The iteration around them is tests/torch_ref/swav.py's Trainer (main_swav.py's train())."""
  from tests.torch_ref import heads, resnet, swav, vit  # noqa: PLC0415
  m, lo = config.model, config.loss
  ov = dict(m.overrides)
  if official is None:
    def network():
      if m.arch == "resnet50":
        width = ov.get("width", 64)
        backbone, dim = resnet.ResNet50(swav=True, width=width), 32 * width
      else:
        backbone = vit.VisionTransformer(patch_size=m.patch_size, embed_dim=ov["embed_dim"], depth=ov["depth"],
                                         num_heads=ov["num_heads"], img_size=ov["img_size"])
        dim = ov["embed_dim"]
      net = heads.MultiCropWrapper(backbone, heads.SwAVHead(dim, m.hidden_mlp, m.feat_dim, m.nmb_prototypes))
      return net, net.head.prototypes
    return types.SimpleNamespace(network=network, state_dict=interop.state_dict, name=lambda k: k,
                                 sinkhorn=swav.distributed_sinkhorn, source="tests/torch_ref (in-repo reference)")

  if m.arch != "resnet50" or ov:
    raise SystemExit(f"--official with SwAV: the official network is src/resnet50.py's ResNet-50; the config has "
                     f"model.arch={m.arch!r}, model.overrides={ov} (the recipe is --backbone=resnet50)")
  # main_swav.py imports apex (LARC, amp, SyncBN), torchvision (its dataset) and, through src/logger.py, pandas at
  # top level; none of them is on the path the comparison runs
  main_swav, resnet50 = _import_official(
      official, ["main_swav", "src.resnet50"],
      stubs=["apex", "apex.parallel", "apex.parallel.LARC", "torchvision", "torchvision.datasets",
             "torchvision.transforms", "pandas"])
  _one_process_group()     # distributed_sinkhorn all-reduces its sums
  # distributed_sinkhorn reads these three of the module-global `args` that main() parses
  main_swav.args = argparse.Namespace(epsilon=lo.epsilon, sinkhorn_iterations=lo.sinkhorn_iters, world_size=1)

  def network():
    net = resnet50.resnet50(normalize=True, hidden_mlp=m.hidden_mlp, output_dim=m.feat_dim,
                            nmb_prototypes=m.nmb_prototypes)
    import torch  # noqa: PLC0415
    # ResNet.forward without its `.cuda(non_blocking=True)` (a CPU-only torch has no CUDA): the backbone once per
    # resolution group (the Trainer groups the crops as its unique_consecutive does), the head on the concatenation
    net.forward = lambda groups: net.forward_head(torch.cat([net.forward_backbone(g) for g in groups]))
    return net, net.prototypes

  def sinkhorn(outs, epsilon, iterations):
    assert len(outs) == 1 and (epsilon, iterations) == (main_swav.args.epsilon, main_swav.args.sinkhorn_iterations)
    return [main_swav.distributed_sinkhorn(outs[0])]

  def state_dict(module):  # what main_swav.py saves, `module.` (its DistributedDataParallel) left out
    return {k.removeprefix("module."): v for k, v in interop.export_checkpoint(module, "swav").items()}
  # SwAV's flat names: ours without the MultiCropWrapper's `backbone.` / `head.` (export_checkpoint's mapping)
  return types.SimpleNamespace(network=network, state_dict=state_dict, name=lambda k: k.split(".", 1)[1],
                               sinkhorn=sinkhorn, source=_checkout(official))


class TorchSwAV:
  """main_swav.py's iteration (tests/torch_ref/swav.py Trainer: LARC, queue, prototype freezing, lr schedule) on the
  network and Sinkhorn-Knopp of `mods` (swav_modules: the official ones from a clone, or the in-repo reference),
  with the codes of each step recorded for their entropy. weights() uses our names. `dtype` torch.float64: a
  float64 twin, which measures how far PyTorch's own float32 iteration is from exact arithmetic."""

  def __init__(self, mods, config, model, steps_per_epoch, dtype=None):
    import torch  # noqa: PLC0415
    from tests.torch_ref import swav  # noqa: PLC0415
    m, o, lo = config.model, config.optim, config.loss
    net, prototypes = mods.network()
    sd = mods.state_dict(model)
    net.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, strict=True)
    self.dtype = dtype or torch.float32
    net.to(self.dtype)
    self.ours = {mods.name(k): k for k in interop.state_dict(model)}      # torch name -> ours
    assert set(self.ours) == set(net.state_dict()) == set(sd), "every tensor mapped, one to one"
    self.codes = []

    def recording(*args, **kw):
      q = mods.sinkhorn(*args, **kw)
      self.codes.append([x.detach().numpy().copy() for x in q])
      return q
    self.trainer = swav.Trainer(
        net, nmb_crops=(config.crops.global_number, config.crops.local_number), batch_size=config.batch_size,
        epochs=config.epochs, niter_per_ep=steps_per_epoch, crops_for_assign=tuple(lo.crops_for_assign),
        feat_dim=m.feat_dim, base_lr=o.lr, final_lr=o.min_lr, warmup_epochs=o.warmup_epochs,
        start_warmup=o.start_warmup, wd=o.weight_decay, freeze_prototypes_niters=o.freeze_prototypes_niters,
        queue_length=lo.queue_length, epoch_queue_starts=lo.epoch_queue_starts, temperature=lo.temperature,
        epsilon=lo.epsilon, sinkhorn_iterations=lo.sinkhorn_iters, momentum=o.momentum, prototypes=prototypes,
        sinkhorn=recording)
    self.bs = config.batch_size

  def step(self, crops):
    self.codes = []
    loss = self.trainer.step([c.to(self.dtype) for c in crops])
    # mean per-sample entropy of the codes of the current batch (the rows after the queue), over the assigned crops
    ent = [float(np.mean(-np.sum(q[0][-self.bs:] * np.log(np.maximum(q[0][-self.bs:], 1e-30)), axis=1)))
           for q in self.codes]
    return {"loss": loss, "assign_entropy": float(np.mean(ent))}

  def weights(self):
    return {self.ours[k]: v.numpy() for k, v in self.trainer.model.state_dict().items()}


# ============ the comparison ============

def _to_torch(x, n):
  import torch  # noqa: PLC0415
  x = np.asarray(x)
  b = x.shape[0] // n
  return [torch.from_numpy(np.ascontiguousarray(x[i * b:(i + 1) * b].transpose(0, 3, 1, 2))) for i in range(n)]


def _rel(a, b):
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _flat(sd, keys):
  return np.concatenate([np.asarray(sd[k], np.float64).ravel() for k in keys])


def zero_gradient_mask(sd, keys, config):
  """True for the entries whose exact gradient is 0 (both frameworks give them float32 rounding noise, which AdamW's
  normalisation turns into lr-sized steps of arbitrary sign, and LARC's trust ratio amplifies): the key third of
  every qkv bias (q.b_k shifts a whole softmax row), and with BatchNorm after the first head layer its Linear bias,
  the bias of the next Linear before a BatchNorm and the backbone's final LayerNorm bias (constant shifts that the
  BatchNorm removes)."""
  bn_after = {"dino": ["head.mlp.0.bias", "head.mlp.3.bias"] if config.model.get("use_bn_in_head") else [],
              "swav": ["head.projection_head.0.bias"]}[config.method]
  masks = []
  for k in keys:
    m = np.zeros(np.asarray(sd[k]).size, bool)
    if k.endswith("attn.qkv.bias"):
      d = m.size // 3
      m[d:2 * d] = True
    if k in bn_after or (bn_after and k == "backbone.norm.bias"):
      m[:] = True
    masks.append(m)
  return np.concatenate(masks)


def compare(method: str, steps_n: int, official: str | None = None, config=None, backbone: str | None = None,
            fp64_twin: bool = False) -> dict:
  """`steps_n` steps of ours and of the PyTorch iteration (official from the clone at `official`, or the in-repo
  reference) on the same batches. `config` replaces the recipe (tests); `backbone` picks it ('vit': the quickstart's,
  'resnet50': SwAV's ResNet-50 on the digits; default resnet50 for SwAV with `official`, else vit). `fp64_twin`
  (SwAV): the same PyTorch iteration in float64 beside it, for the distance of PyTorch's float32 from exact
  arithmetic, the floor that ours can be held to."""
  backbone = backbone or ("resnet50" if method == "swav" and official else "vit")
  if config is None:
    config, config_name = recipe(method, backbone)
    overrides = overrides_for(method, backbone)
  else:
    config_name, overrides = "the config given to compare()", {}
  source = sources.get_source(config.data.source, data_dir=config.data.data_dir)
  spe = pipeline.steps_per_epoch(source, config, 1)
  mesh = sharding.make_mesh(jax.devices()[:1])
  run = state_lib.build_run(config, steps_per_epoch=spe, mesh=mesh)
  state = jax.jit(run.init)()
  model0 = state_lib.merge_model(run.graphdef, state.params, state.batch_stats)
  sd0 = interop.state_dict(model0)
  if method == "dino":
    mods = dino_modules(official)
    theirs = TorchDINO(mods, config, sd0, spe)
  else:
    mods = swav_modules(official, config)
    theirs = TorchSwAV(mods, config, model0, spe)
  twin = None
  if fp64_twin:
    if method != "swav":
      raise SystemExit("--fp64_twin is implemented for SwAV only")
    import torch  # noqa: PLC0415
    twin = TorchSwAV(mods, config, model0, spe, dtype=torch.float64)
  keys = [k for k in theirs.weights() if not k.endswith("num_batches_tracked")]
  start = _flat(sd0, keys)
  for side in (theirs, twin) if twin else (theirs,):
    assert np.array_equal(_flat(side.weights(), keys), start), "both sides start from the same weights"
  keep = ~zero_gradient_mask(sd0, keys, config)

  @jax.jit
  def augment(batch, step):
    key = jax.random.fold_in(jax.random.key(config.seed), step)     # the train step's keys
    aug_key, drop_key = jax.random.split(key)
    views = photometric.augment(batch, aug_key, config.aug)
    return [steps.crop_major(views["global"]), steps.crop_major(views["local"])], drop_key

  update = jax.jit(functools.partial(run.method.update, graphdef=run.graphdef, tx=run.tx, schedules=run.schedules,
                                     config=config))
  data = iter(pipeline.make_train_dataset(source, config, seed=config.seed, process_index=0, process_count=1))
  rows = []
  for it in range(steps_n):
    batch = jax.device_put(next(data))
    crops, key = augment(batch, jnp.int32(it))
    torch_crops = (_to_torch(crops[0], config.crops.global_number) + _to_torch(crops[1], config.crops.local_number))
    t = theirs.step(torch_crops)
    state, metrics = update(state, crops, key)
    metrics = jax.device_get(metrics)
    mine = _flat(interop.state_dict(state_lib.merge_model(run.graphdef, state.params, state.batch_stats)), keys)
    ref = _flat(theirs.weights(), keys)
    row = {"step": it + 1, "loss_ours": float(metrics["loss"]), "loss_torch": t["loss"],
           "loss_rel_diff": abs(float(metrics["loss"]) - t["loss"]) / abs(t["loss"]),
           "weights_rel_dist": _rel(mine, ref), "drift_rel_dist": _rel(mine - start, ref - start),
           "drift_rel_dist_nonzero_grad": _rel((mine - start)[keep], (ref - start)[keep]),
           "lr": float(metrics["lr"])}
    if method == "dino":
      c = np.asarray(state.method_state["center"], np.float64)
      row.update(center_rel_dist=_rel(c, t["center"]), center_norm_ours=float(np.linalg.norm(c)),
                 center_norm_torch=float(np.linalg.norm(t["center"])))
    else:
      row.update(code_entropy_ours=float(metrics["assign_entropy"]), code_entropy_torch=t["assign_entropy"])
    if twin:
      t64, ref64 = twin.step(torch_crops), _flat(twin.weights(), keys)
      row.update(loss_torch64=t64["loss"], loss_rel_diff_torch64=abs(t["loss"] - t64["loss"]) / abs(t64["loss"]),
                 drift_rel_dist_torch64=_rel(ref - start, ref64 - start),
                 drift_rel_dist_nonzero_grad_torch64=_rel((ref - start)[keep], (ref64 - start)[keep]),
                 drift_rel_dist_nonzero_grad_ours64=_rel((mine - start)[keep], (ref64 - start)[keep]),
                 code_entropy_torch64=t64["assign_entropy"])
    rows.append(row)
  return {"method": method, "reference": mods.source, "config": config_name, "steps": steps_n,
          "steps_per_epoch": spe, "overrides": overrides, "rows": rows}


def markdown(result: dict) -> str:
  r = result["rows"]
  extra = (["centre rel. dist", "‖c‖ ours", "‖c‖ torch"] if result["method"] == "dino"
           else ["code entropy ours", "code entropy torch"])
  twin = "loss_torch64" in r[0]
  if twin:
    extra += ["torch fp32 vs fp64: loss rel. diff", "vs drift*", "ours vs fp64: vs drift*"]
  head = ["step", "lr", "loss ours", "loss torch", "loss rel. diff", "weights rel. dist", "vs drift",
          "vs drift*"] + extra
  lines = [f"### {result['method'].upper()}: ours against {result['reference']}, {result['steps']} steps", "",
           f"{result['config']} with "
           + ", ".join(f"`{k}={v}`" for k, v in result["overrides"].items())
           + f" ({result['steps_per_epoch']} steps per epoch); same initial weights, same augmented batches.", "",
           *summary(result), "",
           "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for x in r:
    cells = [str(x["step"]), f"{x['lr']:.2e}", f"{x['loss_ours']:.6f}", f"{x['loss_torch']:.6f}",
             f"{x['loss_rel_diff']:.1e}", f"{x['weights_rel_dist']:.1e}", f"{x['drift_rel_dist']:.1e}",
             f"{x['drift_rel_dist_nonzero_grad']:.1e}"]
    if result["method"] == "dino":
      cells += [f"{x['center_rel_dist']:.1e}", f"{x['center_norm_ours']:.4f}", f"{x['center_norm_torch']:.4f}"]
    else:
      cells += [f"{x['code_entropy_ours']:.5f}", f"{x['code_entropy_torch']:.5f}"]
    if twin:
      cells += [f"{x['loss_rel_diff_torch64']:.1e}", f"{x['drift_rel_dist_nonzero_grad_torch64']:.1e}",
                f"{x['drift_rel_dist_nonzero_grad_ours64']:.1e}"]
    lines.append("| " + " | ".join(cells) + " |")
  lines += ["", "weights rel. dist = ‖θ_ours − θ_torch‖ / ‖θ_torch‖ over every tensor of the trained network; vs drift "
            "= ‖(θ_ours − θ_0) − (θ_torch − θ_0)‖ / ‖θ_torch − θ_0‖, the same difference against how far training "
            "moved the weights; vs drift* = the same without the entries whose exact gradient is 0 "
            "(compare_pytorch.zero_gradient_mask)."]
  if twin:
    lines += ["", "torch fp32 vs fp64: the same PyTorch iteration run in float64 beside it (--fp64_twin), against "
              "which PyTorch's float32 and ours are measured alike: ‖(θ_torch − θ_0) − (θ_fp64 − θ_0)‖ / "
              "‖θ_fp64 − θ_0‖ and ‖(θ_ours − θ_0) − (θ_fp64 − θ_0)‖ / ‖θ_fp64 − θ_0‖, without the zero-gradient "
              "entries."]
  return "\n".join(lines) + "\n"


def summary(result: dict) -> list[str]:
  """The headline figures: the largest loss difference over the first 20 steps and over all, the largest code
  entropy difference (SwAV) or centre distance (DINO), the distances at the last step."""
  r = result["rows"]
  first = r[:20]
  out = [f"- loss rel. diff, max: {max(x['loss_rel_diff'] for x in first):.1e} (steps 1-{len(first)}), "
         f"{max(x['loss_rel_diff'] for x in r):.1e} (all {len(r)} steps)"]
  if "code_entropy_ours" in r[0]:
    d = [abs(x["code_entropy_ours"] - x["code_entropy_torch"]) for x in r]
    out.append(f"- |code entropy ours − torch|, max: {max(d[:20]):.1e} (steps 1-{len(first)}), {max(d):.1e} (all)")
  else:
    out.append(f"- centre rel. dist, max: {max(x['center_rel_dist'] for x in r):.1e}")
  last = r[-1]
  line = (f"- step {last['step']}: weights rel. dist {last['weights_rel_dist']:.1e}, vs drift "
          f"{last['drift_rel_dist']:.1e}, vs drift* {last['drift_rel_dist_nonzero_grad']:.1e}")
  if "loss_torch64" in last:
    line += (f"; PyTorch fp32 vs fp64 at the same step: vs drift* {last['drift_rel_dist_nonzero_grad_torch64']:.1e}"
             f" (ours vs fp64 {last['drift_rel_dist_nonzero_grad_ours64']:.1e}); loss rel. diff fp32 vs fp64, max: "
             f"{max(x['loss_rel_diff_torch64'] for x in first):.1e} (steps 1-{len(first)}), "
             f"{max(x['loss_rel_diff_torch64'] for x in r):.1e} (all)")
  return out + [line]


def plot(result: dict, path: str):
  import matplotlib  # noqa: PLC0415
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415
  r = result["rows"]
  s = [x["step"] for x in r]
  fig, ax = plt.subplots(1, 3, figsize=(13, 3.6))
  ax[0].plot(s, [x["loss_torch"] for x in r], "o-", ms=3, label="PyTorch")
  ax[0].plot(s, [x["loss_ours"] for x in r], "x--", ms=4, label="ours (JAX)")
  ax[0].set_title("loss")
  ax[0].legend()
  for key, label in (("loss_rel_diff", "loss rel. diff"), ("weights_rel_dist", "weights rel. dist"),
                     ("drift_rel_dist", "vs drift"), ("drift_rel_dist_nonzero_grad", "vs drift*"),
                     ("center_rel_dist", "centre rel. dist"),
                     ("loss_rel_diff_torch64", "loss rel. diff torch fp32 vs fp64"),
                     ("drift_rel_dist_nonzero_grad_torch64", "vs drift* torch fp32 vs fp64")):
    if key in r[0]:
      ax[1].semilogy(s, [max(x[key], 1e-17) for x in r], label=label)
  ax[1].set_title("ours vs PyTorch")
  ax[1].legend(fontsize=7)
  if result["method"] == "dino":
    ax[2].plot(s, [x["center_norm_torch"] for x in r], "o-", ms=3, label="PyTorch")
    ax[2].plot(s, [x["center_norm_ours"] for x in r], "x--", ms=4, label="ours")
    ax[2].set_title("‖centre‖")
  else:
    ax[2].plot(s, [x["code_entropy_torch"] for x in r], "o-", ms=3, label="PyTorch")
    ax[2].plot(s, [x["code_entropy_ours"] for x in r], "x--", ms=4, label="ours")
    if "code_entropy_torch64" in r[0]:
      ax[2].plot(s, [x["code_entropy_torch64"] for x in r], ":", label="PyTorch fp64")
    ax[2].set_title("code entropy (per sample)")
  ax[2].legend()
  for a in ax:
    a.set_xlabel("step")
  fig.suptitle(f"{result['method'].upper()}: ours vs {result['reference']}", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--method", choices=["dino", "swav"], default="dino")
  p.add_argument("--official", default=None, help="path of your clone of facebookresearch/dino (--method=dino) or "
                 "facebookresearch/swav (--method=swav); default: the in-repo reference, tests/torch_ref")
  p.add_argument("--backbone", choices=["vit", "resnet50"], default=None, help="SwAV: the quickstart's ViT or "
                 "ResNet-50 on the digits (SWAV_RESNET); default resnet50 with --official (the official network), "
                 "else vit")
  p.add_argument("--fp64_twin", action="store_true", help="SwAV: also run the PyTorch iteration in float64, to "
                 "measure how far PyTorch's own float32 is from exact arithmetic (a random ResNet-50 in train mode "
                 "amplifies rounding)")
  p.add_argument("--steps", type=int, default=60)
  p.add_argument("--out", default=None, help="default experiments/results/compare_<method>")
  a = p.parse_args()
  out = a.out or os.path.join(ROOT, "experiments", "results", f"compare_{a.method}")
  os.makedirs(out, exist_ok=True)
  result = compare(a.method, a.steps, a.official, backbone=a.backbone, fp64_twin=a.fp64_twin)
  with open(os.path.join(out, "compare.json"), "w") as f:
    json.dump(result, f, indent=1)
  with open(os.path.join(out, "compare.md"), "w") as f:
    f.write(markdown(result))
  plot(result, os.path.join(out, "compare.png"))
  print(markdown(result))


if __name__ == "__main__":
  main()
