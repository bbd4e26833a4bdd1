"""A jax.profiler trace of a few training steps: `--config.profile_steps=(a,b)` traces steps a..b (1-based, the
step counter after each update) into <workdir>/plugins/profile/<date>/, which TensorBoard's profile tab and XProf
read (`tensorboard --logdir <workdir>` with `pip install tensorboard-plugin-profile`, or `xprof <workdir>`).

Pick steps after the first (compilation) and a few apart: every traced step is synchronised with the host.
"""
from __future__ import annotations

import logging

import jax


def check(profile_steps):
  """None, or the problem with config.profile_steps (config_check.validate lists it)."""
  steps = tuple(profile_steps or ())
  if steps and (len(steps) != 2 or not all(isinstance(x, int) for x in steps) or not 1 <= steps[0] <= steps[1]):
    return (f"config.profile_steps={steps!r}: give (first, last) steps with 1 <= first <= last, "
            "e.g. --config.profile_steps='(10,15)' (empty: no profile)")
  return None


class StepProfiler:
  """`before(step)` ahead of the update that makes `step`, `after(step, state)` once it is issued."""

  def __init__(self, profile_steps, workdir, *, is_main=True):
    steps = tuple(profile_steps or ())
    if check(steps):
      raise ValueError(check(steps))
    self.first, self.last = steps if steps and is_main else (None, None)
    self.workdir, self.active = workdir, False

  def before(self, step):
    if step == self.first and not self.active:
      jax.profiler.start_trace(self.workdir)
      self.active = True

  def after(self, step, state):
    if self.active and step >= self.last:
      self.stop(state)

  def stop(self, state=None):
    if self.active:
      jax.block_until_ready(state)
      jax.profiler.stop_trace()
      self.active = False
      logging.info("profile of steps %d-%d written under %s/plugins/profile", self.first, self.last, self.workdir)
