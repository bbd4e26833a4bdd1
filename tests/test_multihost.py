"""Two JAX processes train exactly like one: `jax.distributed` on the CPU (gloo collectives), each process reading its
own shard of every global batch through `make_train_dataset(process_index=p, process_count=2)`.

Process p reads rows [p*b, (p+1)*b) of the global batch, so the global array, and with it the per-row photometric and
drop-path randomness drawn from fold_in(key, step), is the one-process array: the losses agree to fp32 noise. The
two-process run is stopped after 2 steps and relaunched: it resumes from the checkpoint (train state and each process's
grain iterator position), and its steps 3-4 match the uninterrupted one-process run. Only process 0 writes metrics and
eval.json; the k-NN evaluation gathers the features of both processes in source order.

One CPU device per process: gloo (JAX's CPU collectives) creates a communicator for each new set of devices with
a fixed 30 s rendezvous, so with several devices per process the first train step, whose 4-device communicator
comes only after each process has compiled it, fails whenever the two compiles finish more than 30 s apart (as on a
busy machine, or when one process loads the step from the compilation cache). With one device per process the
only communicator is made at start-up, when orbax first synchronises the processes. Every step is blocked on
(config.block_each_step), as the trainer wants for fake CPU devices.

Compiling the train step dominates the run time: XLA's CPU backend runs at -O0 (half the compile time; the
compared runs share the flag) and the runs share a persistent compilation cache, which the relaunched process 0
reads (JAX writes cache entries from process 0 only, and a CPU executable's key names its process).
"""
import json
import os
import socket
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 300

WORKER = r"""
import json, sys
import jax
from tests.configs import quickstart_test
from dino_jax import train

workdir, max_steps, evaluate, result_path = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4]
c = quickstart_test.get_config()
c.max_steps = max_steps
c.block_each_step = True
c.eval.compare_random_init = False
if not evaluate:
  c.eval.test_source = None
out = train.train_and_evaluate(c, workdir)
with open(result_path, "w") as f:
  json.dump({"process_index": jax.process_index(), "process_count": jax.process_count(),
             "device_count": jax.device_count(), "local_device_count": jax.local_device_count(), "out": out}, f)
"""


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(cache_dir, **extra):
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_") and k != "XLA_FLAGS"}
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, XLA_FLAGS="--xla_backend_optimization_level=0",
             JAX_COMPILATION_CACHE_DIR=str(cache_dir), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", **extra)
  return env


def _start(tmp_path, name, workdir, max_steps, evaluate, **extra):
  env = _env(tmp_path / "jax_cache", **extra)
  log = open(tmp_path / f"{name}.log", "w")
  proc = subprocess.Popen([sys.executable, "-c", WORKER, str(workdir), str(max_steps), "1" if evaluate else "0",
                           str(tmp_path / f"{name}.json")], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
  return name, proc, log


def _start_pair(tmp_path, name, workdir, max_steps, evaluate):
  port = _free_port()
  return [_start(tmp_path, f"{name}_p{i}", workdir, max_steps, evaluate, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                 JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i))
          for i in range(2)]


def _wait(tmp_path, launched, others=()):
  """Waits for `launched`; on a failure or a hang kills them and `others` (a lone process would wait for its peer)."""
  failed = []
  try:
    for name, proc, _ in launched:
      if proc.wait(timeout=TIMEOUT_S) != 0:
        failed.append(name)
        break
  except subprocess.TimeoutExpired:
    failed.append(f"timeout after {TIMEOUT_S} s")
  finally:
    for _, proc, log in list(launched) + (list(others) if failed else []):
      if proc.poll() is None:
        proc.kill()
        proc.wait()
      log.close()
  logs = "\n".join(f"--- {n}\n{open(tmp_path / f'{n}.log').read()[-3000:]}" for n, _, _ in launched)
  assert not failed, f"failed: {failed}\n{logs}"
  return [json.load(open(tmp_path / f"{n}.json")) for n, _, _ in launched]


def _metrics(workdir):
  return [json.loads(line) for line in open(workdir / "metrics.jsonl")]


def test_two_processes_train_resume_and_evaluate_like_one(tmp_path):
  one, two = tmp_path / "one", tmp_path / "two"
  # The 1-process reference runs alongside both halves of the 2-process run: 3 processes keep 2 cores busy.
  reference = [_start(tmp_path, "one", one, 4, True)]
  _wait(tmp_path, _start_pair(tmp_path, "two_a", two, 2, False), others=reference)
  assert [m["step"] for m in _metrics(two)] == [1, 2]
  assert sorted(os.listdir(two / "checkpoints" / "2" / "data")) == [
      "commit_success.txt", "process_0-of-2.json", "process_1-of-2.json"]  # each process's iterator position

  pair = _start_pair(tmp_path, "two_b", two, 4, True)
  results = _wait(tmp_path, pair, others=reference)
  (ref,) = _wait(tmp_path, reference)
  assert (ref["process_count"], ref["device_count"]) == (1, 1)
  assert [r["process_index"] for r in results] == [0, 1]
  for r in results:
    assert (r["process_count"], r["device_count"], r["local_device_count"]) == (2, 2, 1)
    assert r["out"]["train"]["step"] == 4

  # Only process 0 appended metrics (once per step) and wrote eval.json; the resumed run continued at step 3.
  ref_m, two_m = _metrics(one), _metrics(two)
  assert [m["step"] for m in ref_m] == [m["step"] for m in two_m] == [1, 2, 3, 4]
  for a, b in zip(ref_m, two_m):
    for key in ("loss", "center_norm", "teacher_entropy", "kl_teacher_student", "grad_norm", "param_norm", "lr"):
      np.testing.assert_allclose(b[key], a[key], rtol=1e-5, err_msg=f"{key} at step {a['step']}")
  # Not vacuous: the steps see different batches, so a restarted data iterator would not match.
  assert len({m["loss"] for m in ref_m}) == 4
  # Process 1 computed the same replicated metrics.
  np.testing.assert_allclose(results[1]["out"]["train"]["loss"], two_m[-1]["loss"], rtol=1e-6)
  assert sorted(os.listdir(two / "checkpoints")) == ["2", "4"]

  # k-NN over features gathered from both processes in source order: the same neighbours, the same accuracy.
  ev_one, ev_two = json.load(open(one / "eval.json")), json.load(open(two / "eval.json"))
  assert ev_two["teacher"] == ev_one["teacher"]
  for key in ("per_image", "of_mean"):
    np.testing.assert_allclose(ev_two["teacher_entropy"][key], ev_one["teacher_entropy"][key], rtol=1e-5)
  assert results[1]["out"]["eval"]["teacher"] == ev_one["teacher"]
