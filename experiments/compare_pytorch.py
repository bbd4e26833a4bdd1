r"""Our training step beside the official PyTorch one: same initial weights, same augmented batches, N steps.

  python experiments/compare_pytorch.py --method=dino --official=/path/to/your/clone/of/facebookresearch/dino
  python experiments/compare_pytorch.py --method=dino       # against tests/torch_ref (the in-repo reference)
  python experiments/compare_pytorch.py --method=swav       # against tests/torch_ref (SwAV: in-repo reference only)

The recipe is the digits quickstart (configs/quickstart.py, configs/swav_quickstart.py) with a few overrides so that
a short run crosses the schedules' switches (COMPARE below: 4 epochs of 44 steps at batch 32, so the lr warm-up ends
and the last layer / prototypes unfreeze within 60 steps; no stochastic depth, which the two frameworks cannot
draw alike). SwAV runs with its official optimiser (LARC around SGD, decay on every tensor, no clipping) and a queue
that starts in epoch 1, because the reference implements that loop; the quickstart's AdamW is DINO's.

Batches: our input pipeline's crops, augmented by our photometric chain on the device with the train step's keys,
then handed to our method's update and, as NCHW tensors of the same values, to the PyTorch loop. Our initial weights
go to PyTorch through dino_jax.interop.torch. The PyTorch side is the official DINO student/teacher (loaded from the
clone given with --official: vision_transformer.py, utils.py and main_dino.py's DINOLoss, imported from that path,
never copied) or the in-repo reference, driven by the official iteration (schedules, loss, clipping, last-layer
freezing, EMA).

Written to --out: compare.md (per step: both losses, their relative difference, the relative distance between the
two students' weights, that distance against the reference's own drift from the start, and the centre's distance
(DINO) or both code entropies (SwAV)), compare.json, compare.png.
"""
from __future__ import annotations

import argparse
import functools
import importlib
import json
import os
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


def recipe(method):
  from ml_collections import config_dict  # noqa: PLC0415
  module = importlib.import_module("configs.quickstart" if method == "dino" else "configs.swav_quickstart")
  c = module.get_config()
  for key, value in {**COMPARE, **(SWAV_OFFICIAL_OPTIM if method == "swav" else {})}.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  assert isinstance(c, config_dict.ConfigDict)
  return c


# ============ the PyTorch side: official modules from a clone, or the in-repo reference ============

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
  sys.path.insert(0, os.path.abspath(official))
  try:
    import torchvision  # noqa: F401, PLC0415
  except ImportError:   # main_dino.py imports it for its data loading only, which the comparison does not use
    stub = types.ModuleType("torchvision")
    stub.datasets = stub.transforms = stub.models = types.ModuleType("torchvision.stub")
    sys.modules["torchvision"] = stub
  vits, utils = importlib.import_module("vision_transformer"), importlib.import_module("utils")
  main_dino = importlib.import_module("main_dino")
  import torch.distributed as dist  # noqa: PLC0415
  if not dist.is_initialized():     # DINOLoss.update_center all-reduces the batch centre: a one-process group
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:29517", rank=0, world_size=1)

  def vit(patch_size, embed_dim, depth, num_heads, img_size, mlp_ratio=4.0, drop_path_rate=0.0):
    return vits.VisionTransformer(img_size=[img_size], patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                                  num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=True,
                                  drop_path_rate=drop_path_rate,
                                  norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6))
  return types.SimpleNamespace(
      vit=vit, head=vits.DINOHead, wrapper=utils.MultiCropWrapper, DINOLoss=main_dino.DINOLoss,
      cosine_scheduler=utils.cosine_scheduler, clip_gradients=utils.clip_gradients,
      cancel_gradients_last_layer=utils.cancel_gradients_last_layer, params_groups=utils.get_params_groups,
      source=f"official checkout {os.path.abspath(official)}")


class TorchDINO:
  """The official DINO iteration (main_dino.py train_one_epoch, fp32, one process) on given augmented crops."""

  def __init__(self, mods, config, state_dict, steps_per_epoch):
    import torch  # noqa: PLC0415
    m, o = config.model, config.optim
    shape = dict(patch_size=m.patch_size, embed_dim=m.overrides["embed_dim"], depth=m.overrides["depth"],
                 num_heads=m.overrides["num_heads"], img_size=m.overrides["img_size"])
    head_kw = dict(use_bn=m.use_bn_in_head, nlayers=m.head_nlayers, hidden_dim=m.head_hidden_dim,
                   bottleneck_dim=m.head_bottleneck_dim)
    self.student = mods.wrapper(mods.vit(**shape), mods.head(shape["embed_dim"], m.out_dim,
                                                             norm_last_layer=m.norm_last_layer, **head_kw))
    self.teacher = mods.wrapper(mods.vit(**shape), mods.head(shape["embed_dim"], m.out_dim, **head_kw))
    self.student.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()}, strict=True)
    self.teacher.load_state_dict(self.student.state_dict())
    for p in self.teacher.parameters():
      p.requires_grad = False
    ncrops = config.crops.global_number + config.crops.local_number
    self.loss = mods.DINOLoss(m.out_dim, ncrops, config.loss.warmup_teacher_temp, config.loss.teacher_temp,
                              config.loss.warmup_teacher_temp_epochs, config.epochs,
                              student_temp=config.loss.student_temp, center_momentum=config.loss.center_momentum)
    assert o.name == "adamw", "the comparison drives AdamW (the quickstart's and DINO's default)"
    self.opt = torch.optim.AdamW(mods.params_groups(self.student))
    base = o.lr * config.batch_size / 256.0 if o.lr_scaling else o.lr
    self.lr = mods.cosine_scheduler(base, o.min_lr, config.epochs, steps_per_epoch, warmup_epochs=o.warmup_epochs)
    self.wd = mods.cosine_scheduler(o.weight_decay, o.weight_decay_end, config.epochs, steps_per_epoch)
    self.mom = mods.cosine_scheduler(config.teacher_momentum, 1, config.epochs, steps_per_epoch)
    self.mods, self.config, self.spe, self.it = mods, config, steps_per_epoch, 0

  def step(self, crops):
    import torch  # noqa: PLC0415
    it, epoch = self.it, self.it // self.spe
    for i, group in enumerate(self.opt.param_groups):
      group["lr"] = self.lr[it]
      if i == 0:
        group["weight_decay"] = self.wd[it]
    teacher_out = self.teacher(crops[:2])
    student_out = self.student(crops)
    loss = self.loss(student_out, teacher_out, epoch)
    self.opt.zero_grad()
    loss.backward()
    if self.config.optim.clip_grad:
      self.mods.clip_gradients(self.student, self.config.optim.clip_grad)
    self.mods.cancel_gradients_last_layer(epoch, self.student, self.config.optim.freeze_last_layer)
    self.opt.step()
    with torch.no_grad():
      m = self.mom[it]
      for ps, pt in zip(self.student.parameters(), self.teacher.parameters()):
        pt.data.mul_(m).add_((1 - m) * ps.detach().data)
    self.it += 1
    return {"loss": float(loss.detach()), "center": self.loss.center.numpy()[0].copy()}

  def weights(self):
    return {k: v.numpy() for k, v in self.student.state_dict().items()}


class TorchSwAV:
  """The in-repo reference of main_swav.py's iteration (tests/torch_ref/swav.py Trainer: LARC, queue, freezing),
  with the Sinkhorn codes of each step recorded for their entropy."""

  def __init__(self, config, state_dict, steps_per_epoch):
    import torch  # noqa: PLC0415
    from tests.torch_ref import heads, swav, vit  # noqa: PLC0415
    m, o, lo = config.model, config.optim, config.loss
    ov = m.overrides
    net = heads.MultiCropWrapper(
        vit.VisionTransformer(patch_size=m.patch_size, embed_dim=ov["embed_dim"], depth=ov["depth"],
                              num_heads=ov["num_heads"], img_size=ov["img_size"]),
        heads.SwAVHead(ov["embed_dim"], m.hidden_mlp, m.feat_dim, m.nmb_prototypes))
    net.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()}, strict=True)
    self.trainer = swav.Trainer(
        net, nmb_crops=(config.crops.global_number, config.crops.local_number), batch_size=config.batch_size,
        epochs=config.epochs, niter_per_ep=steps_per_epoch, crops_for_assign=tuple(lo.crops_for_assign),
        feat_dim=m.feat_dim, base_lr=o.lr, final_lr=o.min_lr, warmup_epochs=o.warmup_epochs,
        start_warmup=o.start_warmup, wd=o.weight_decay, freeze_prototypes_niters=o.freeze_prototypes_niters,
        queue_length=lo.queue_length, epoch_queue_starts=lo.epoch_queue_starts, temperature=lo.temperature,
        epsilon=lo.epsilon, sinkhorn_iterations=lo.sinkhorn_iters, momentum=o.momentum)
    self.codes = []
    original = swav.distributed_sinkhorn

    def recording(*args, **kw):
      q = original(*args, **kw)
      self.codes.append([x.detach().numpy().copy() for x in q])
      return q
    swav.distributed_sinkhorn = recording   # the loss looks it up at call time
    self.bs = config.batch_size

  def step(self, crops):
    self.codes = []
    loss = self.trainer.step(crops)
    # mean per-sample entropy of the codes of the current batch (the rows after the queue), over the assigned crops
    ent = [float(np.mean(-np.sum(q[0][-self.bs:] * np.log(np.maximum(q[0][-self.bs:], 1e-30)), axis=1)))
           for q in self.codes]
    return {"loss": loss, "assign_entropy": float(np.mean(ent))}

  def weights(self):
    return {k: v.numpy() for k, v in self.trainer.model.state_dict().items()}


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


def compare(method: str, steps_n: int, official: str | None = None, config=None) -> dict:
  config = config or recipe(method)
  source = sources.get_source(config.data.source, data_dir=config.data.data_dir)
  spe = pipeline.steps_per_epoch(source, config, 1)
  mesh = sharding.make_mesh(jax.devices()[:1])
  run = state_lib.build_run(config, steps_per_epoch=spe, mesh=mesh)
  state = jax.jit(run.init)()
  sd0 = interop.state_dict(state_lib.merge_model(run.graphdef, state.params, state.batch_stats))
  if method == "dino":
    theirs = TorchDINO(dino_modules(official), config, sd0, spe)
    reference = theirs.mods.source
  else:
    if official:
      raise SystemExit("--official is implemented for DINO only (SwAV: the in-repo reference, tests/torch_ref)")
    theirs, reference = TorchSwAV(config, sd0, spe), "tests/torch_ref (in-repo reference)"
  keys = [k for k in theirs.weights() if not k.endswith("num_batches_tracked")]
  start = _flat(sd0, keys)
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
    rows.append(row)
  return {"method": method, "reference": reference, "steps": steps_n, "steps_per_epoch": spe,
          "overrides": {**COMPARE, **(SWAV_OFFICIAL_OPTIM if method == "swav" else {})}, "rows": rows}


def markdown(result: dict) -> str:
  r = result["rows"]
  extra = (["centre rel. dist", "‖c‖ ours", "‖c‖ torch"] if result["method"] == "dino"
           else ["code entropy ours", "code entropy torch"])
  head = ["step", "lr", "loss ours", "loss torch", "loss rel. diff", "weights rel. dist", "vs drift",
          "vs drift*"] + extra
  lines = [f"### {result['method'].upper()}: ours against {result['reference']}, {result['steps']} steps", "",
           f"configs/{'quickstart' if result['method'] == 'dino' else 'swav_quickstart'}.py with "
           + ", ".join(f"`{k}={v}`" for k, v in result["overrides"].items())
           + f" ({result['steps_per_epoch']} steps per epoch); same initial weights, same augmented batches.", "",
           "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for x in r:
    cells = [str(x["step"]), f"{x['lr']:.2e}", f"{x['loss_ours']:.6f}", f"{x['loss_torch']:.6f}",
             f"{x['loss_rel_diff']:.1e}", f"{x['weights_rel_dist']:.1e}", f"{x['drift_rel_dist']:.1e}",
             f"{x['drift_rel_dist_nonzero_grad']:.1e}"]
    if result["method"] == "dino":
      cells += [f"{x['center_rel_dist']:.1e}", f"{x['center_norm_ours']:.4f}", f"{x['center_norm_torch']:.4f}"]
    else:
      cells += [f"{x['code_entropy_ours']:.5f}", f"{x['code_entropy_torch']:.5f}"]
    lines.append("| " + " | ".join(cells) + " |")
  lines += ["", "weights rel. dist = ‖θ_ours − θ_torch‖ / ‖θ_torch‖ over every tensor of the trained network; vs drift "
            "= ‖(θ_ours − θ_0) − (θ_torch − θ_0)‖ / ‖θ_torch − θ_0‖, the same difference against how far training "
            "moved the weights; vs drift* = the same without the entries whose exact gradient is 0 "
            "(compare_pytorch.zero_gradient_mask)."]
  return "\n".join(lines) + "\n"


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
                     ("center_rel_dist", "centre rel. dist")):
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
  p.add_argument("--official", default=None, help="path of your clone of facebookresearch/dino (default: the "
                 "in-repo reference, tests/torch_ref)")
  p.add_argument("--steps", type=int, default=60)
  p.add_argument("--out", default=None, help="default experiments/results/compare_<method>")
  a = p.parse_args()
  out = a.out or os.path.join(ROOT, "experiments", "results", f"compare_{a.method}")
  os.makedirs(out, exist_ok=True)
  result = compare(a.method, a.steps, a.official)
  with open(os.path.join(out, "compare.json"), "w") as f:
    json.dump(result, f, indent=1)
  with open(os.path.join(out, "compare.md"), "w") as f:
    f.write(markdown(result))
  plot(result, os.path.join(out, "compare.png"))
  print(markdown(result))


if __name__ == "__main__":
  main()
