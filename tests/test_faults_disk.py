"""A workdir that cannot be written: a read-only one is refused before training, a full one stops the run at the
failing save with one paragraph naming the cause, and the checkpoints written before it stay restorable.

Real file systems: a tmpfs limited to 1.4 MB (two checkpoints of the tiny test run fit, the third does not) and one
mounted read-only. Both need root (mount); as another user the read-only directory is a chmod 555 one and the full
disk is skipped.
"""
import os
import subprocess
import sys

import pytest

from dino_jax import checkpoint as ckpt_lib
from tests.helpers import ROOT

TINY = os.path.join(ROOT, "tests", "configs", "quickstart_test.py")


def _mount(path, *options):
  os.makedirs(path)
  r = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs", str(path)], capture_output=True)
  return r.returncode == 0


@pytest.fixture
def mounts():
  mounted = []

  def mount(path, *options):
    if os.geteuid() != 0 or not _mount(path, *options):
      return False
    mounted.append(path)
    return True

  yield mount
  for path in mounted:
    subprocess.run(["umount", "-l", str(path)], check=False)


def _train(workdir, *overrides):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "dino_jax.train", f"--config={TINY}", f"--workdir={workdir}",
                         "--config.eval.test_source=", *overrides], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=300)


def _our_lines(stderr):
  """stderr without the progress bar and absl's INFO lines."""
  return [l for l in stderr.splitlines() if l.strip() and not l.startswith(("I1", "I0", "train:", "\rtrain:"))
          and "it/s" not in l]


def test_read_only_workdir_is_refused_before_training(tmp_path, mounts):
  ro = tmp_path / "ro"
  if not mounts(ro, "size=1m", "ro"):
    if os.geteuid() == 0:
      # The fault needs a real read-only directory: root ignores chmod, so only a read-only mount makes one. Where
      # root cannot mount (some containers) there is no real mechanism left; on this project's CI machine it mounts.
      pytest.skip("cannot mount a tmpfs here, and chmod does not stop root")
    os.makedirs(ro)
    os.chmod(ro, 0o555)
  r = _train(ro / "run", "--config.max_steps=2")
  assert r.returncode == 1
  assert f"ERROR: the workdir {ro / 'run'} is not writable" in r.stderr, r.stderr[-3000:]
  assert "Read-only file system (EROFS)" in r.stderr or "Permission denied (EACCES)" in r.stderr
  assert "Traceback" not in r.stderr


def test_full_disk_stops_at_the_save_with_one_paragraph_and_keeps_earlier_checkpoints(tmp_path, mounts):
  full = tmp_path / "full"
  if not mounts(full, "size=1400k"):
    # A real full disk needs a size-limited filesystem (tmpfs, mounted by root); a mock would not test orbax's
    # writes. Runs on this project's CI machine (root); skipped only where nothing can be mounted.
    pytest.skip("mounting a size-limited tmpfs needs root")
  r = _train(full / "run", "--config.max_steps=6")
  assert r.returncode == 1
  lines = _our_lines(r.stderr)
  assert len(lines) == 1, "\n".join(lines[-40:])          # one paragraph, no orbax or asyncio tracebacks
  (line,) = lines
  assert line.startswith(f"ERROR: could not write the checkpoint of step 6 in {full / 'run' / 'checkpoints'}: "
                         f"No space left on device (ENOSPC"), line
  assert "rerun the same command to resume" in line
  # The checkpoints before it are whole: each restores (state, data position, config).
  from dino_jax import state as state_lib  # noqa: PLC0415
  checkpoints = ckpt_lib.Checkpoints(str(full / "run" / "checkpoints"))
  try:
    assert checkpoints.manager.all_steps() == [2, 4]
    for step in (2, 4):
      config = ckpt_lib.complete_config(checkpoints.saved_config(step))
      state = checkpoints.restore(state_lib.build_run(config).abstract, step=step)
      assert int(state.step) == step
  finally:
    checkpoints.close()
