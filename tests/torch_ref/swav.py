"""PyTorch reference for SwAV, written by us following the official semantics (facebookresearch/swav
main_swav.py: `distributed_sinkhorn` and the loss loop of `train`; apex `parallel/LARC.py` around
`torch.optim.SGD`).

Multi-GPU runs are simulated in one process: a "world" of `world_size` ranks is a list with one
tensor per rank, and `dist.all_reduce(x)` becomes a sum over that list. Everything is eager fp32
PyTorch, independent of the JAX code under test.
"""
import numpy as np
import torch
import torch.nn.functional as F


@torch.no_grad()
def distributed_sinkhorn(outs, epsilon=0.05, iterations=3):
  """Official Sinkhorn-Knopp on a simulated world: `outs` is a list of per-rank [B_r, K] scores.

  Returns the list of per-rank assignments [B_r, K]. No max subtraction, exactly as the official.
  """
  world_size = len(outs)
  qs = [torch.exp(o / epsilon).t() for o in outs]  # K x B_r per rank
  big_b = qs[0].shape[1] * world_size
  k = qs[0].shape[0]
  total = sum(torch.sum(q) for q in qs)  # all_reduce
  qs = [q / total for q in qs]
  for _ in range(iterations):
    rows = sum(torch.sum(q, dim=1, keepdim=True) for q in qs)  # all_reduce
    qs = [q / rows for q in qs]
    qs = [q / k for q in qs]
    qs = [q / torch.sum(q, dim=0, keepdim=True) for q in qs]  # per rank, per sample
    qs = [q / big_b for q in qs]
  return [(q * big_b).t() for q in qs]


def split_ranks(x, n_crops, world_size):
  """Global crop-major [n_crops * B, ...] -> per-rank crop-major [n_crops * B / world, ...] list.

  Rank r holds samples [r*b, (r+1)*b) of every crop, as a DistributedSampler shard would.
  """
  per_crop = x.reshape(n_crops, world_size, -1, *x.shape[1:])
  return [per_crop[:, r].reshape(-1, *x.shape[1:]) for r in range(world_size)]


class SwAVLossReference:
  """The official loss loop of `train` with its queue, on a simulated world.

  The per-rank loss is the official local loss; DDP averages gradients over ranks, so the global
  objective is the mean of the per-rank losses, which `__call__` returns.
  """

  def __init__(self, nmb_crops, crops_for_assign=(0, 1), world_size=1, temperature=0.1, epsilon=0.05,
               sinkhorn_iterations=3, sinkhorn=None):
    self.sinkhorn = sinkhorn  # None: distributed_sinkhorn above; else the same signature (e.g. the official one)
    self.n_crops = int(np.sum(nmb_crops))
    self.crops_for_assign = list(crops_for_assign)
    self.world_size = world_size
    self.temperature = temperature
    self.epsilon = epsilon
    self.iterations = sinkhorn_iterations
    self.queue = None  # list of per-rank [n_assign, queue_length // world, D] once started
    self.use_the_queue = [False] * world_size

  def start_queue(self, queue_length, batch_size_per_gpu, feat_dim, dtype=torch.float32):
    """What `main` does when `epoch >= epoch_queue_starts` and there is no queue yet (`dtype`: the network's)."""
    queue_length -= queue_length % (batch_size_per_gpu * self.world_size)
    self.queue = [torch.zeros(len(self.crops_for_assign), queue_length // self.world_size, feat_dim, dtype=dtype)
                  for _ in range(self.world_size)]

  def new_epoch(self):
    """`train` starts every epoch with `use_the_queue = False`."""
    self.use_the_queue = [False] * self.world_size

  def __call__(self, embeddings, outputs, prototypes_weight):
    """embeddings / outputs: per-rank lists of [n_crops * bs, D] / [n_crops * bs, K]; prototypes_weight
    [K, D] (torch Linear layout). Returns the mean over ranks of the official per-rank loss."""
    embeddings = [e.detach() for e in embeddings]
    bs = outputs[0].shape[0] // self.n_crops
    losses = [0.0] * self.world_size
    for i, crop_id in enumerate(self.crops_for_assign):
      outs = []
      with torch.no_grad():
        for r in range(self.world_size):
          out = outputs[r][bs * crop_id: bs * (crop_id + 1)].detach()
          if self.queue is not None:
            queue = self.queue[r]
            if self.use_the_queue[r] or not torch.all(queue[i, -1, :] == 0):
              self.use_the_queue[r] = True
              out = torch.cat((torch.mm(queue[i], prototypes_weight.t()), out))
            queue[i, bs:] = queue[i, :-bs].clone()
            queue[i, :bs] = embeddings[r][crop_id * bs: (crop_id + 1) * bs]
          outs.append(out)
        sinkhorn = self.sinkhorn or distributed_sinkhorn
        qs = [q[-bs:] for q in sinkhorn(outs, self.epsilon, self.iterations)]
      for r in range(self.world_size):
        subloss = 0
        for v in np.delete(np.arange(self.n_crops), crop_id):
          x = outputs[r][bs * v: bs * (v + 1)] / self.temperature
          subloss -= torch.mean(torch.sum(qs[r] * F.log_softmax(x, dim=1), dim=1))
        losses[r] = losses[r] + subloss / (self.n_crops - 1)
    losses = [loss / len(self.crops_for_assign) for loss in losses]
    return sum(losses) / self.world_size


class LARC:
  """apex `LARC` (scaling mode when clip=False) wrapped around a torch optimizer, e.g. SGD momentum 0.9.

  Per tensor with a gradient: if ||p|| != 0 and ||g|| != 0, ratio = trust * ||p|| / (||g|| + wd * ||p||
  + eps), then g <- (g + wd * p) * ratio. The inner optimizer runs with its weight decay set to 0 (it is
  folded into the gradient above) and restored afterwards. Tensors whose grad is None are skipped by
  both (SwAV's frozen prototypes).
  """

  def __init__(self, optimizer, trust_coefficient=0.02, clip=True, eps=1e-8):
    self.optim = optimizer
    self.trust_coefficient = trust_coefficient
    self.clip = clip
    self.eps = eps

  @property
  def param_groups(self):
    return self.optim.param_groups

  def zero_grad(self):
    self.optim.zero_grad()

  @torch.no_grad()
  def step(self):
    saved_wd = []
    for group in self.optim.param_groups:
      wd = group.get("weight_decay", 0)
      saved_wd.append(wd)
      group["weight_decay"] = 0
      for p in group["params"]:
        if p.grad is None:
          continue
        p_norm = torch.norm(p.data)
        g_norm = torch.norm(p.grad.data)
        if p_norm != 0 and g_norm != 0:
          ratio = self.trust_coefficient * p_norm / (g_norm + p_norm * wd + self.eps)
          if self.clip:
            ratio = min(ratio / group["lr"], 1)
          p.grad.data += wd * p.data
          p.grad.data *= ratio
    self.optim.step()
    for group, wd in zip(self.optim.param_groups, saved_wd):
      group["weight_decay"] = wd


def lr_schedule(base_lr, final_lr, epochs, niter_per_ep, warmup_epochs=0, start_warmup=0.0):
  """main_swav.py's per-iteration lr: np.linspace(start_warmup, base_lr) over the warm-up, then a cosine to final_lr."""
  warmup = np.linspace(start_warmup, base_lr, niter_per_ep * warmup_epochs)
  n = niter_per_ep * (epochs - warmup_epochs)
  cosine = np.array([final_lr + 0.5 * (base_lr - final_lr) * (1 + np.cos(np.pi * t / n)) for t in range(n)])
  return np.concatenate((warmup, cosine))


class Trainer:
  """One official SwAV iteration at a time (main_swav.py `main` + `train`), single process, fp32, on already augmented
  crops given as a list of per-crop [B, 3, H, W] tensors.

  `model(groups)` takes a list of resolution groups (crops of equal size concatenated, in order) and returns
  (embedding, scores), e.g. `heads.MultiCropWrapper(resnet.ResNet50(swav=True), heads.SwAVHead(...))`; its
  prototypes are `model.head.prototypes` unless `prototypes` (the Linear) is given. `sinkhorn` replaces
  distributed_sinkhorn (same signature).
  """

  def __init__(self, model, *, nmb_crops, batch_size, epochs, niter_per_ep, crops_for_assign=(0, 1), feat_dim=128,
               base_lr=4.8, final_lr=0.0, warmup_epochs=10, start_warmup=0.0, wd=1e-6, freeze_prototypes_niters=313,
               queue_length=0, epoch_queue_starts=15, temperature=0.1, epsilon=0.05, sinkhorn_iterations=3,
               momentum=0.9, prototypes=None, sinkhorn=None):
    self.model = model.train()
    self.opt = LARC(torch.optim.SGD(model.parameters(), lr=base_lr, momentum=momentum, weight_decay=wd),
                    trust_coefficient=0.001, clip=False)
    self.lr = lr_schedule(base_lr, final_lr, epochs, niter_per_ep, warmup_epochs, start_warmup)
    self.loss = SwAVLossReference(nmb_crops, crops_for_assign, temperature=temperature, epsilon=epsilon,
                                  sinkhorn_iterations=sinkhorn_iterations, sinkhorn=sinkhorn)
    self.prototypes = model.head.prototypes if prototypes is None else prototypes
    self.batch_size, self.niter_per_ep, self.feat_dim = batch_size, niter_per_ep, feat_dim
    self.queue_length, self.epoch_queue_starts = queue_length, epoch_queue_starts
    self.freeze = freeze_prototypes_niters
    self.iteration = 0

  @property
  def queue(self):
    """[n_assign, rows, D] numpy, or None before the queue starts."""
    return None if self.loss.queue is None else self.loss.queue[0].numpy()

  def step(self, crops):
    epoch, it = divmod(self.iteration, self.niter_per_ep)
    if it == 0:  # what `main` does between epochs, then `train` resets use_the_queue
      if self.queue_length > 0 and epoch >= self.epoch_queue_starts and self.loss.queue is None:
        self.loss.start_queue(self.queue_length, self.batch_size, self.feat_dim, self.prototypes.weight.dtype)
      self.loss.new_epoch()
    for group in self.opt.param_groups:
      group["lr"] = self.lr[self.iteration]
    prototypes = self.prototypes
    with torch.no_grad():
      prototypes.weight.copy_(F.normalize(prototypes.weight.data.clone(), dim=1, p=2))
    sizes = [c.shape[-1] for c in crops]
    groups, start = [], 0
    for end in range(1, len(crops) + 1):  # torch.unique_consecutive over the crop resolutions
      if end == len(crops) or sizes[end] != sizes[start]:
        groups.append(torch.cat(crops[start:end]))
        start = end
    embedding, output = self.model(groups)
    loss = self.loss([embedding], [output], prototypes.weight)
    self.opt.zero_grad()
    loss.backward()
    if self.iteration < self.freeze:
      for name, p in self.model.named_parameters():
        if "prototypes" in name:
          p.grad = None
    self.opt.step()
    self.iteration += 1
    return float(loss.detach())
