"""PyTorch reference of the official DINO training semantics (main_dino.py, utils.py), written for our tests.

This is an independent implementation that follows the official behaviour line by line in meaning: the loss with
its pair skipping, the centre EMA after the loss, the epoch-indexed teacher-temperature warm-up, per-iteration
cosine schedules, per-tensor gradient clipping, cancelling the last layer's gradient, two AdamW parameter groups,
the EMA teacher. Only used by tests (torch is a dev dependency).
"""
from __future__ import annotations

import types

import numpy as np
import torch
import torch.nn.functional as F


def cosine_scheduler(base_value, final_value, epochs, niter_per_ep, warmup_epochs=0, start_warmup_value=0.0):
  """Array of per-iteration values: linspace warm-up (end points included), then half a cosine."""
  n_warm = warmup_epochs * niter_per_ep
  warm = np.linspace(start_warmup_value, base_value, n_warm) if n_warm > 0 else np.array([])
  rest = np.arange(epochs * niter_per_ep - n_warm)
  cos = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * rest / len(rest)))
  return np.concatenate([warm, cos])


class DINOLoss(torch.nn.Module):
  def __init__(self, out_dim, ncrops, warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, nepochs,
               student_temp=0.1, center_momentum=0.9):
    super().__init__()
    self.student_temp = student_temp
    self.center_momentum = center_momentum
    self.ncrops = ncrops
    self.register_buffer("center", torch.zeros(1, out_dim))
    self.teacher_temp_schedule = np.concatenate([
        np.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs),
        np.full(nepochs - warmup_teacher_temp_epochs, teacher_temp)])

  def forward(self, student_output, teacher_output, epoch):
    student_chunks = (student_output / self.student_temp).chunk(self.ncrops)
    temp = self.teacher_temp_schedule[epoch]
    targets = F.softmax((teacher_output - self.center) / temp, dim=-1).detach().chunk(2)
    total, terms = 0.0, 0
    for t_idx, q in enumerate(targets):
      for s_idx, s in enumerate(student_chunks):
        if s_idx == t_idx:
          continue
        total = total + torch.sum(-q * F.log_softmax(s, dim=-1), dim=-1).mean()
        terms += 1
    total = total / terms
    self._update_center(teacher_output)
    return total

  @torch.no_grad()
  def _update_center(self, teacher_output):
    batch_center = teacher_output.sum(dim=0, keepdim=True) / len(teacher_output)  # world size 1
    self.center = self.center * self.center_momentum + batch_center * (1 - self.center_momentum)


def clip_gradients(model, clip):
  """Returns the number of tensors whose gradient was scaled down (tests check that clipping is active)."""
  clipped = 0
  for p in model.parameters():
    if p.grad is not None:
      norm = p.grad.data.norm(2)
      coef = clip / (norm + 1e-6)
      if coef < 1:
        p.grad.data.mul_(coef)
        clipped += 1
  return clipped


def cancel_gradients_last_layer(epoch, model, freeze_last_layer):
  if epoch < freeze_last_layer:
    for name, p in model.named_parameters():
      if "last_layer" in name:
        p.grad = None


def params_groups(model):
  decayed, not_decayed = [], []
  for name, p in model.named_parameters():
    if not p.requires_grad:
      continue
    (not_decayed if name.endswith(".bias") or p.ndim == 1 else decayed).append(p)
  return [{"params": decayed}, {"params": not_decayed, "weight_decay": 0.0}]


class LARS(torch.optim.Optimizer):
  """DINO utils.LARS semantics: 1-D tensors skip decay and adaptation."""

  def __init__(self, params, lr=0, weight_decay=0, momentum=0.9, eta=0.001):
    super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta))

  @torch.no_grad()
  def step(self):
    for g in self.param_groups:
      for p in g["params"]:
        if p.grad is None:
          continue
        dp = p.grad
        if p.ndim != 1:
          dp = dp.add(p, alpha=g["weight_decay"])
          pn, un = torch.norm(p), torch.norm(dp)
          q = torch.where(pn > 0, torch.where(un > 0, g["eta"] * pn / un, torch.ones_like(pn)), torch.ones_like(pn))
          dp = dp.mul(q)
        state = self.state[p]
        if "mu" not in state:
          state["mu"] = torch.zeros_like(p)
        state["mu"].mul_(g["momentum"]).add_(dp)
        p.add_(state["mu"], alpha=-g["lr"])


class Trainer:
  """One official DINO iteration at a time, on already augmented crops (list of [B, 3, H, W] tensors)."""

  def __init__(self, student, teacher, *, out_dim, ncrops, epochs, niter_per_ep, batch_size, optimizer="adamw",
               lr=5e-4, min_lr=1e-6, warmup_epochs=10, weight_decay=0.04, weight_decay_end=0.4, clip_grad=3.0,
               freeze_last_layer=1, momentum_teacher=0.996, warmup_teacher_temp=0.04, teacher_temp=0.04,
               warmup_teacher_temp_epochs=0, student_temp=0.1, center_momentum=0.9, momentum=0.9, lr_scaling=True,
               pieces=None):
    """`pieces`: the official code's DINOLoss, params_groups, cosine_scheduler, clip_gradients and
    cancel_gradients_last_layer by those names (experiments/compare_pytorch.py, from a clone); default: this file's."""
    P = pieces if pieces is not None else REFERENCE
    self.student, self.teacher = student, teacher
    self.teacher.load_state_dict(self.student.state_dict())
    for p in self.teacher.parameters():
      p.requires_grad = False
    self.loss = P.DINOLoss(out_dim, ncrops, warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, epochs,
                           student_temp=student_temp, center_momentum=center_momentum)
    groups = P.params_groups(student)
    if optimizer == "adamw":
      self.opt = torch.optim.AdamW(groups)
    elif optimizer == "sgd":
      self.opt = torch.optim.SGD(groups, lr=0, momentum=momentum)
    else:
      self.opt = LARS(groups, momentum=momentum)
    base = lr * batch_size / 256.0 if lr_scaling else lr
    self.lr = P.cosine_scheduler(base, min_lr, epochs, niter_per_ep, warmup_epochs=warmup_epochs)
    self.wd = P.cosine_scheduler(weight_decay, weight_decay_end, epochs, niter_per_ep)
    self.mom = P.cosine_scheduler(momentum_teacher, 1, epochs, niter_per_ep)
    self.niter_per_ep, self.clip, self.freeze, self.P = niter_per_ep, clip_grad, freeze_last_layer, P
    self.it = 0

  def step(self, images):
    it, epoch = self.it, self.it // self.niter_per_ep
    for i, group in enumerate(self.opt.param_groups):
      group["lr"] = self.lr[it]
      if i == 0:
        group["weight_decay"] = self.wd[it]
    teacher_out = self.teacher(images[:2])
    student_out = self.student(images)
    loss = self.loss(student_out, teacher_out, epoch)
    self.opt.zero_grad()
    loss.backward()
    self.clipped = self.P.clip_gradients(self.student, self.clip) if self.clip else 0
    self.P.cancel_gradients_last_layer(epoch, self.student, self.freeze)
    self.opt.step()
    with torch.no_grad():
      m = self.mom[it]
      for ps, pt in zip(self.student.parameters(), self.teacher.parameters()):
        pt.data.mul_(m).add_((1 - m) * ps.detach().data)
    self.it += 1
    return float(loss)


REFERENCE = types.SimpleNamespace(DINOLoss=DINOLoss, params_groups=params_groups, cosine_scheduler=cosine_scheduler,
                                  clip_gradients=clip_gradients, cancel_gradients_last_layer=cancel_gradients_last_layer)
