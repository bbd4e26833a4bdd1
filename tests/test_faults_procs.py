"""Killed processes: a run killed with SIGKILL at random moments (once while a checkpoint is being written) or
stopped with SIGTERM, restarted each time, ends bit-identical to an uninterrupted run; a two-process run whose peer
is killed ends the survivor with one paragraph and exit code 1 within the documented bound, its last checkpoint
restorable.

Real processes (python -m dino_jax.train, two jax.distributed processes on localhost) sharing a persistent
compilation cache, so that a restart costs the start-up, not a compile. These tests are the slowest of the fault
tests (each a few process starts).
"""
import json
import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from tests.helpers import ROOT, run_metrics, run_state
from tests.test_multihost import _env, _free_port

TINY = os.path.join(ROOT, "tests", "configs", "quickstart_test.py")
HEARTBEAT_S = 6
BOUND_S = HEARTBEAT_S / 2 + 2     # faults.PeerMonitor: heartbeat_timeout_s / 2 + 2 s after a peer stops answering


def _launch(tmp_path, workdir, name, max_steps, extra_env=None, extra_args=()):
  log = open(tmp_path / f"{name}.log", "w")
  env = _env(tmp_path / "jax_cache", **(extra_env or {}))
  args = [sys.executable, "-m", "dino_jax.train", f"--config={TINY}", f"--workdir={workdir}",
          f"--config.max_steps={max_steps}", "--config.eval.test_source=", "--config.checkpoint_every_steps=2",
          "--config.keep_checkpoints=3", *extra_args]
  return subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), log


def _steps_done(workdir):
  try:
    return len(run_metrics(workdir))
  except (FileNotFoundError, json.JSONDecodeError):
    return 0


def _wait_for(predicate, proc, timeout=240, poll=0.002):
  end = time.monotonic() + timeout
  while time.monotonic() < end:
    if predicate():
      return True
    if proc.poll() is not None:
      return False
    time.sleep(poll)
  raise AssertionError("timed out")


def _finish(proc, log, expect=0):
  rc = proc.wait(timeout=300)
  log.close()
  assert rc in (expect if isinstance(expect, tuple) else (expect,)), open(log.name).read()[-3000:]


def _writing(workdir):
  try:
    return any("orbax-checkpoint-tmp" in n for n in os.listdir(workdir / "checkpoints"))
  except FileNotFoundError:
    return False


def test_killed_and_terminated_runs_restart_to_the_same_final_state(tmp_path):
  total = 24     # long enough that a kill 0-0.5 s after a relaunch's first step leaves steps to redo
  straight, chaos = tmp_path / "straight", tmp_path / "chaos"
  reference = _launch(tmp_path, straight, "straight", total)
  _finish(*reference)       # fills the compilation cache the restarts read
  rng = random.Random(0)
  events = []
  # SIGKILL while a checkpoint is being written (the first one caught), then at a random moment, then SIGTERM.
  for n, (sig, when) in enumerate([(signal.SIGKILL, "save"), (signal.SIGKILL, "random"), (signal.SIGTERM, "random")]):
    proc, log = _launch(tmp_path, chaos, f"chaos{n}", total)
    start = _steps_done(chaos)
    if when == "save":
      hit = _wait_for(lambda: _writing(chaos), proc)
    else:
      hit = _wait_for(lambda: _steps_done(chaos) > start, proc)
      time.sleep(rng.uniform(0.0, 0.5))
      hit = hit and proc.poll() is None
    if hit:
      proc.send_signal(sig)
      events.append((sig.name, when, _steps_done(chaos)))
    expect = (-9 if sig == signal.SIGKILL else 0) if hit else 0
    if hit and sig == signal.SIGTERM and events[-1][2] >= total:
      # The run had logged its last step (and saved it, forced) when the signal came: during its shutdown the
      # handler is gone and SIGTERM ends it (-15) with nothing left to lose; either ending is right.
      expect = (0, -signal.SIGTERM)
    _finish(proc, log, expect=expect)
  print("signals (name, moment, metric lines so far):", events)
  assert [e[:2] for e in events] == [("SIGKILL", "save"), ("SIGKILL", "random"), ("SIGTERM", "random")], events
  if _steps_done(chaos) < total or int(run_state(chaos).step) < total:
    _finish(*_launch(tmp_path, chaos, "chaos_last", total))
  a, b = run_state(straight), run_state(chaos)
  assert int(a.step) == int(b.step) == total
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
  assert not any("orbax-checkpoint-tmp" in n for n in os.listdir(chaos / "checkpoints"))   # the torn save was cleaned
  losses = {m["step"]: m["loss"] for m in run_metrics(chaos)}   # redone steps logged again, with the same loss
  assert losses == {m["step"]: m["loss"] for m in run_metrics(straight)}


@pytest.mark.parametrize("phase", ["training", "evaluation"])
def test_a_killed_peer_ends_the_survivor_with_a_message_in_bounded_time(tmp_path, phase):
  """Process 1 killed with SIGKILL while training, or during the end-of-run k-NN (after the last checkpoint)."""
  workdir = tmp_path / "pair"
  port = _free_port()
  steps, evaluation = (200, ("--config.eval.test_source=",)) if phase == "training" else (6, (
      "--config.eval.test_source=digits:test",))
  procs = [_launch(tmp_path, workdir, f"p{i}", steps, {
      "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(i)},
      (f"--config.multihost.heartbeat_timeout_s={HEARTBEAT_S}", "--config.block_each_step=True", *evaluation))
           for i in range(2)]
  try:
    # Both processes past a checkpoint (the last one: in the evaluation), then process 1 dies without a word.
    past = 4 if phase == "training" else steps
    assert _wait_for(lambda: _steps_done(workdir) >= past and os.path.isdir(workdir / "checkpoints" / str(past)) and
                     (phase == "training" or not _writing(workdir)), procs[0][0], poll=0.05)
    procs[1][0].send_signal(signal.SIGKILL)
    killed = time.monotonic()
    rc = procs[0][0].wait(timeout=60)
    took = time.monotonic() - killed
  finally:
    for proc, log in procs:
      if proc.poll() is None:
        proc.kill()
      proc.wait()
      log.close()
  out = open(tmp_path / "p0.log").read()
  assert rc == 1, out[-3000:]
  assert ": background saves" in out        # orbax's barriers through the coordination service: saves off the loop
  print(f"survivor exited {took:.1f} s after its peer was killed (bound {BOUND_S:.0f} s)")
  assert took <= BOUND_S + 3, (took, out[-3000:])     # + 3 s: a loaded 2-core machine
  message = [l for l in out.splitlines() if l.startswith("ERROR: process 0 of 2:")]
  assert len(message) == 1, out[-3000:]
  assert "rerun the same command" in message[0] and "checkpoint, step" in message[0]
  assert "Check failure" not in out and "Fatal Python error" not in out
  # The last checkpoint it names is whole: it restores.
  step = int(message[0].split("checkpoint, step ")[1].split()[0])
  assert int(run_state(workdir).step) == step >= past
  if phase == "evaluation":
    assert not os.path.exists(workdir / "eval.json")


MONITOR_ONLY = r"""
import sys, time
import ml_collections
from dino_jax import faults
c = ml_collections.ConfigDict({"multihost": {"heartbeat_timeout_s": int(sys.argv[1]), "init_timeout_s": 60,
                                             "step_timeout_s": 600}})
faults.initialize_distributed(c)
monitor = faults.PeerMonitor(c, sys.argv[2]).start()
print("started", flush=True)
for step in range(1, 10_000):   # a training loop that keeps making progress
  monitor.progress(step)
  time.sleep(0.05)
"""


def test_a_frozen_peer_is_detected_by_the_heartbeat(tmp_path):
  """A peer that stops answering without closing its sockets (SIGSTOP: a hung node; on GPUs NCCL would wait for
  ever): the survivor's monitor ends it before jax.distributed's own heartbeat abort, naming the silent process."""
  port = _free_port()
  logs = [open(tmp_path / f"m{i}.log", "w") for i in range(2)]
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
  procs = [subprocess.Popen([sys.executable, "-c", MONITOR_ONLY, str(HEARTBEAT_S), str(tmp_path / "ckpt")], cwd=ROOT,
                            env=dict(env, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, JAX_NUM_PROCESSES="2",
                                     JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_PROCESS_ID=str(i)),
                            stdout=logs[i], stderr=subprocess.STDOUT) for i in range(2)]
  try:
    for i in range(2):
      assert _wait_for(lambda: "started" in open(tmp_path / f"m{i}.log").read(), procs[i], timeout=120, poll=0.05)
    time.sleep(2 * 1.0 + 0.5)   # both have seen each other's counters move
    procs[1].send_signal(signal.SIGSTOP)
    frozen = time.monotonic()
    rc = procs[0].wait(timeout=60)
    took = time.monotonic() - frozen
  finally:
    for proc, log in zip(procs, logs):
      if proc.poll() is None:
        proc.send_signal(signal.SIGCONT)
        proc.kill()
      proc.wait()
      log.close()
  out = open(tmp_path / "m0.log").read()
  assert rc == 1, out[-3000:]
  assert "ERROR: process 0 of 2: process 1 stopped answering" in out and "no checkpoint had been written" in out
  assert "Check failure" not in out
  # Lower bound: the monitor times a silent peer from the last beat it saw, up to one 1 s poll before the SIGSTOP
  # (measured once at 2.47 s in a clean-clone CI); the upper bound as documented.
  assert HEARTBEAT_S / 2 - 1.5 <= took <= BOUND_S + 3, (took, out[-2000:])


def test_two_processes_resume_together_when_one_cannot_read_the_newest_checkpoint(tmp_path):
  """Two jax.distributed processes: a run to step 4 (checkpoints 2 and 4), then process 1's part of checkpoint 4
  (its data position) cut short, the same command again: process 0 reads 4 fine, process 1 cannot; their results are
  gathered, so both skip 4 (never resuming from different steps), process 0 moves it aside once, both resume from 2
  and redo steps 3 and 4 with the same losses."""
  workdir = tmp_path / "pair"

  def pair(name, max_steps):
    port = _free_port()
    procs = [_launch(tmp_path, workdir, f"{name}{i}", max_steps, {
        "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(i)},
        ("--config.block_each_step=True",)) for i in range(2)]
    for proc, log in procs:
      _finish(proc, log)
    return [open(tmp_path / f"{name}{i}.log").read() for i in range(2)]

  pair("first", 4)
  first = run_metrics(workdir)
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]
  position = workdir / "checkpoints" / "4" / "data" / "process_1-of-2.json"
  position.write_text(position.read_text()[:10])
  p0, p1 = pair("again", 5)
  assert f"checkpoint {workdir}/checkpoints/4 cannot be read (process 1 could not read it)" in p0, p0[-3000:]
  assert f"checkpoint {workdir}/checkpoints/4 cannot be read (" in p1, p1[-3000:]
  assert "resumed at step 2" in p0, p0[-3000:]
  moved = [n for n in os.listdir(workdir / "checkpoints") if n.startswith("4.corrupt-")]
  assert len(moved) == 1 and os.path.getsize(workdir / "checkpoints" / moved[0] / "data" / "process_1-of-2.json") == 10
  again = run_metrics(workdir)[len(first):]
  assert [m["step"] for m in again] == [3, 4, 5]
  assert [m["loss"] for m in again[:2]] == [m["loss"] for m in first[2:4]]
  assert int(run_state(workdir).step) == 5
