"""Faults that must not cost a run, reproduced for real: damaged checkpoint files, unreadable images in every
dataset of a run, a non-finite step under loss.on_nonfinite='skip'."""
import dataclasses
import errno
import glob
import logging
import os
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from dino_jax import checkpoint as ckpt_lib
from dino_jax import config_check, train
from dino_jax.checkpoint import load_run
from tests.helpers import recipe, run_metrics, run_state


def _truncate_largest(step_dir):
  """Cuts the largest array file of an orbax checkpoint to 1000 bytes (a disk that lost the end of a write)."""
  files = [f for f in glob.glob(os.path.join(step_dir, "state", "**", "*"), recursive=True) if os.path.isfile(f)]
  target = max(files, key=os.path.getsize)
  assert os.path.getsize(target) > 10_000
  with open(target, "r+b") as f:
    f.truncate(1000)
  return target


def _tree(value):
  w = np.random.default_rng(int(value)).standard_normal((128, 128)).astype(np.float32)   # incompressible
  return {"w": w, "b": np.arange(8, dtype=np.int32) + int(value)}


def test_a_checkpoint_written_before_a_state_field_existed_resumes(tmp_path):
  """A run checkpointed by an earlier version (no skipped_streak / skipped_total in its TrainState) restores with
  those fields at their initial values, every other leaf as saved: not moved aside as unreadable."""
  from dino_jax import state as state_lib  # noqa: PLC0415
  run = state_lib.build_run(recipe("quickstart"))
  state = jax.jit(run.init)()
  state = state.replace(step=jnp.asarray(7, jnp.int32), method_state={"center": jnp.full([64], 0.5, jnp.float32)})
  old = {f.name: getattr(state, f.name) for f in dataclasses.fields(state) if f.name not in state_lib.ADDED_FIELDS}
  checkpoints = ckpt_lib.Checkpoints(str(tmp_path), every_steps=1, async_save=False)
  checkpoints.save(7, old)
  checkpoints.wait()
  restored = checkpoints.restore(run.abstract)
  assert checkpoints.latest_step() == 7 and not glob.glob(str(tmp_path / "*.corrupt-*"))
  checkpoints.close()
  assert int(restored.skipped_streak) == 0 and int(restored.skipped_total) == 0
  for a, b in zip(jax.tree.leaves(old), jax.tree.leaves({k: getattr(restored, k) for k in old})):
    np.testing.assert_array_equal(a, b)


def test_unreadable_checkpoints_are_moved_aside_newest_first(tmp_path, caplog):
  checkpoints = ckpt_lib.Checkpoints(str(tmp_path), every_steps=1, keep=5, async_save=False)
  for step in (1, 2, 3):
    checkpoints.save(step, _tree(step))
  checkpoints.wait()
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _tree(0))
  files_3 = sorted(os.path.relpath(f, tmp_path / "3") for f in glob.glob(str(tmp_path / "3" / "**"), recursive=True))
  _truncate_largest(str(tmp_path / "3"))
  with caplog.at_level(logging.WARNING):
    restored = checkpoints.restore(abstract)
  np.testing.assert_array_equal(restored["w"], _tree(2)["w"])          # the previous one, whole
  assert f"checkpoint {tmp_path}/3 cannot be read" in caplog.text
  (moved,) = glob.glob(str(tmp_path / "3.corrupt-*"))
  assert moved in caplog.text and not os.path.exists(tmp_path / "3")
  assert sorted(os.path.relpath(f, moved) for f in glob.glob(moved + "/**", recursive=True)) == files_3  # kept
  assert checkpoints.latest_step() == 2

  # Nothing readable: one error naming each checkpoint tried and what failed.
  for step in (1, 2):
    _truncate_largest(str(tmp_path / str(step)))
  with pytest.raises(ckpt_lib.RestoreError, match=r"(?s)tried, newest first:.*/2: .*/1: "):
    checkpoints.restore(abstract)
  assert len(glob.glob(str(tmp_path / "*.corrupt-*"))) == 3 and checkpoints.latest_step() is None
  checkpoints.close()


def test_a_background_save_holds_its_step_while_the_state_is_donated_to_the_next(tmp_path, monkeypatch):
  """save() returns before orbax has even started (its save is held here); the caller donates the state to its next
  step at once, as training does; the checkpoint still holds the values of the step saved."""
  checkpoints = ckpt_lib.Checkpoints(str(tmp_path), every_steps=1, keep=5)
  assert checkpoints.background
  release, real = threading.Event(), checkpoints.manager.save
  monkeypatch.setattr(checkpoints.manager, "save", lambda *a, **k: release.wait(60) and real(*a, **k))
  state = jax.tree.map(jnp.asarray, _tree(1))
  bump = jax.jit(lambda t: jax.tree.map(lambda x: x + 1, t), donate_argnums=0)
  assert checkpoints.save(1, state)
  given = state
  state = jax.block_until_ready(bump(state))
  assert given["w"].is_deleted()              # its buffers went to the next step
  assert checkpoints.latest_step() is None    # and nothing was written yet
  release.set()
  checkpoints.wait()
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _tree(0))
  restored = checkpoints.restore(abstract)
  checkpoints.close()
  for key in ("w", "b"):
    np.testing.assert_array_equal(restored[key], _tree(1)[key])
  np.testing.assert_array_equal(state["b"], _tree(1)["b"] + 1)


def test_a_failed_background_save_stops_the_next_save_naming_its_step(tmp_path, monkeypatch):
  checkpoints = ckpt_lib.Checkpoints(str(tmp_path), every_steps=1, keep=5)
  checkpoints.save(1, _tree(1))
  checkpoints.wait()

  def full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "2"))

  monkeypatch.setattr(checkpoints.manager, "save", full)
  assert checkpoints.save(2, _tree(2))          # returns: the write fails on the background thread
  with pytest.raises(ckpt_lib.SaveError, match=r"checkpoint of step 2 in .*No space left on device \(ENOSPC"):
    checkpoints.save(3, _tree(3))
  checkpoints.close()                            # reported once, not again on close
  assert checkpoints.manager.all_steps() == [1]


def _image_folder(root, n_per_class=24, size=32):
  """Two classes of noise images (the classes differ in brightness) plus an empty and a truncated JPEG."""
  rng = np.random.default_rng(0)
  for c in range(2):
    os.makedirs(root / f"class{c}")
    for i in range(n_per_class):
      pixels = rng.integers(0, 128, (size, size, 3)) + 127 * c
      Image.fromarray(pixels.astype(np.uint8)).save(root / f"class{c}" / f"{i:02d}.png")
  (root / "class0" / "empty.jpg").write_bytes(b"")
  jpeg = root / "class1" / "whole.jpg"
  Image.fromarray(rng.integers(0, 255, (size, size, 3)).astype(np.uint8)).save(jpeg, quality=95)
  (root / "class1" / "truncated.jpg").write_bytes(jpeg.read_bytes()[:200])
  jpeg.unlink()
  return {str(root / "class0" / "empty.jpg"), str(root / "class1" / "truncated.jpg")}


def test_bad_images_listed_once_and_a_damaged_checkpoint_resumes_from_the_previous(tmp_path, caplog):
  """A run on a folder with 2 unreadable images (training and the end-of-run k-NN both read it): both skipped, listed
  once in bad_files.txt. Then the newest checkpoint is damaged: the rerun warns, moves it aside, resumes from the
  one before and redoes those steps exactly."""
  bad = _image_folder(tmp_path / "images")
  folder = f"imagefolder:{tmp_path / 'images'}"
  workdir = tmp_path / "run"
  config = recipe("quickstart", max_steps=4, **{"data.source": folder, "eval.train_source": folder,
                                                "eval.test_source": folder, "eval.compare_random_init": False})
  with caplog.at_level(logging.WARNING):
    out = train.train_and_evaluate(config, str(workdir))
  assert "eval" in out and os.path.exists(workdir / "eval.json")          # the k-NN skipped them too
  listed = [line.split("\t")[0] for line in open(workdir / "bad_files.txt")]
  assert sorted(listed) == sorted(bad)                                    # once each, over 4 steps and 2 k-NN passes
  assert "2 unreadable image file(s) were skipped" in caplog.text and str(workdir / "bad_files.txt") in caplog.text
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]        # no step-1 checkpoint
  first = run_metrics(workdir)

  _truncate_largest(str(workdir / "checkpoints" / "4"))
  # Evaluation, conversion and plots (load_run): the latest that reads, the damaged one named and left in place
  # (a reader must not move what the run may still be writing); an explicit step is read or refused, never replaced.
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    _, latest = load_run(str(workdir))
  assert int(latest.step) == 2 and f"checkpoint {workdir}/checkpoints/4 cannot be read" in caplog.text
  assert os.path.isdir(workdir / "checkpoints" / "4") and not glob.glob(str(workdir / "checkpoints" / "4.corrupt-*"))
  with pytest.raises(ckpt_lib.RestoreError, match=f"checkpoint {workdir}/checkpoints/4 cannot be read: "):
    load_run(str(workdir), step=4)
  with pytest.raises(FileNotFoundError, match=r"no checkpoint of step 3 in .*it holds steps \[2, 4\]"):
    load_run(str(workdir), step=3)
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    train.train_and_evaluate(recipe("quickstart", max_steps=5, **{"data.source": folder, "eval.test_source": None}),
                             str(workdir))
  assert f"checkpoint {workdir}/checkpoints/4 cannot be read" in caplog.text
  assert glob.glob(str(workdir / "checkpoints" / "4.corrupt-*"))
  again = run_metrics(workdir)[len(first):]
  assert [m["step"] for m in again] == [3, 4, 5]                          # resumed from step 2
  assert [m["loss"] for m in again[:2]] == [m["loss"] for m in first[2:4]]
  assert int(run_state(workdir).step) == 5
  assert [line.split("\t")[0] for line in open(workdir / "bad_files.txt")] == sorted(bad)


def test_nonfinite_keys_are_checked():
  config = recipe("quickstart", **{"loss.on_nonfinite": "ignore", "loss.max_consecutive_nonfinite": 0})
  with pytest.raises(config_check.ConfigError) as e:
    config_check.validate(config)
  assert "config.loss.on_nonfinite='ignore'" in str(e.value) and "config.loss.max_consecutive_nonfinite=0" in str(
      e.value)


def test_attention_map_images_honour_on_bad_image(tmp_path):
  from dino_jax.data import multicrop, sources  # noqa: PLC0415
  from dino_jax.evaluate import attention  # noqa: PLC0415 (plot_run and the writers' images pick through it)
  bad = _image_folder(tmp_path / "images", n_per_class=2)
  src = sources.get_source(f"imagefolder:{tmp_path / 'images'}")
  index = next(i for i in range(len(src)) if src[i]["path"] in bad)
  crop = multicrop.CenterCrop(16, 16)
  image = attention._readable(src, index, crop, "skip")["image"]           # the next readable one
  np.testing.assert_array_equal(image, crop(src[index + 1])["image"])
  with pytest.raises(multicrop.BadImageError, match="cannot decode image"):
    attention._readable(src, index, crop, "fail")


def test_nonfinite_skip_end_to_end_counts_then_stops(tmp_path):
  """An lr of 1e30 blows the weights up after the first update: every later step is skipped (its update dropped) and
  counted, and the third in a row stops the run with the message naming the policy."""
  config = recipe("quickstart", max_steps=12, **{"loss.on_nonfinite": "skip", "loss.max_consecutive_nonfinite": 3,
                                                  "optim.lr": 1e30, "eval.test_source": None})
  with pytest.raises(train.NonFiniteLoss, match=r"3 consecutive steps had a non-finite loss or update \(the last at "
                                                r"step \d+.*skipped 3 steps in all"):
    train.train_and_evaluate(config, str(tmp_path))
  lines = run_metrics(tmp_path)
  skipped = [m["skipped_steps"] for m in lines]
  assert skipped == sorted(skipped) and skipped[-1] == 3 and skipped[0] <= 1
  for before, m in zip([{"skipped_steps": 0}] + lines, lines):   # a step is counted exactly when its loss is not finite
    assert (m["skipped_steps"] - before["skipped_steps"] == 1) == (not np.isfinite(m["loss"])), lines
  # Steps 3 and 4 were skipped (step 2's update, huge but finite, was kept): the checkpoint of step 4 holds exactly
  # the state of step 2, only the step and the counters moved.
  assert [m["step"] for m in lines if np.isfinite(m["loss"])] == [1, 2]
  (_, at_2), (_, at_4) = load_run(str(tmp_path), step=2), load_run(str(tmp_path), step=4)
  at_2, at_4 = jax.device_get(at_2), jax.device_get(at_4)
  assert (int(at_4.step), int(at_4.skipped_total), int(at_4.skipped_streak)) == (4, 2, 2)
  for a, b in zip(jax.tree.leaves((at_2.params, at_2.teacher, at_2.opt_state, at_2.method_state)),
                  jax.tree.leaves((at_4.params, at_4.teacher, at_4.opt_state, at_4.method_state))):
    np.testing.assert_array_equal(a, b)
