r"""Plant plausible one-line bugs and check that the tests that claim to guard each behaviour catch them.

  python tests/mutation_check.py                 # every mutant; writes experiments/results/mutation_check.{md,json}
  python tests/mutation_check.py --only=M07,M12  # some of them
  python tests/mutation_check.py --list          # the list, nothing run
  python tests/mutation_check.py --only=M07 --update   # rerun some, replacing their rows in the written results

Each mutant replaces one exact piece of code (it must occur exactly once in its file, so a mutant that no longer fits
the code is reported as stale rather than silently skipped) in a temporary copy of the tracked tree, then runs the
test files that guard that behaviour with this interpreter (`pytest -x -q`). "caught" means the tests failed (or ran
past the time limit), "SURVIVED" that they passed with the bug in place. Not part of the default pytest run (the file
name does not start with test_): it takes tens of minutes on 2 cores.

The bugs are chosen as an adversary would plant them: a knob that silently falls back to its default, an off-by-one in
a schedule, a sign or an axis, a step that uses the old value instead of the new one, a cache or a guard that is
bypassed; each one still runs, and most change numbers by less than a percent.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class Mutant:
  id: str
  path: str            # file, relative to the repository root
  old: str             # exact text, occurring once in the file
  new: str
  tests: tuple         # pytest node ids (files or file::test)
  what: str            # the bug, in words


def M(id, path, old, new, tests, what):
  return Mutant(id, path, old, new, tuple(tests.split()), what)


MUTANTS = [
    # ---- losses ----------------------------------------------------------------------------------------------------
    M("L01", "dino_jax/losses/dino.py", "np.where(same_view, 0.0, 1.0 / (num_global * n_crops - num_global))",
      "np.full(same_view.shape, 1.0 / (num_global * n_crops - num_global))",
      "tests/test_dino_loss.py", "DINO loss keeps the same-view pairs"),
    M("L02", "dino_jax/losses/dino.py", "return center * momentum + batch_center * (1.0 - momentum)",
      "return center * (1.0 - momentum) + batch_center * momentum",
      "tests/test_dino_loss.py", "centre EMA with the momentum swapped"),
    M("L03", "dino_jax/losses/dino.py", "float(student_temp))", "0.1)", "tests/test_dino_loss.py tests/test_dino_step.py",
      "student temperature ignored (the default 0.1 used)"),
    M("L10", "dino_jax/losses/dino.py", "p = jnp.exp(student.astype(jnp.float32) / temp - lse[..., None])",
      "p = jnp.exp(student.astype(jnp.float32) - lse[..., None])", "tests/test_fused_loss.py",
      "the loss's hand-written backward forgets the temperature in the softmax"),
    M("L11", "dino_jax/losses/dino.py", "jax.nn.softmax(logits, axis=-1))",
      "jax.nn.softmax(logits.astype(jnp.bfloat16), axis=-1))", "tests/test_dtype_policy.py",
      "the teacher's softmax in bf16 (the dtype policy says float32)"),
    M("L04", "dino_jax/losses/dino.py", "frac = epoch / max(warmup_epochs - 1, 1)", "frac = epoch / warmup_epochs",
      "tests/test_dino_loss.py", "teacher-temperature warm-up off by one epoch"),
    M("L05", "dino_jax/losses/sinkhorn.py", "q = jax.lax.fori_loop(0, num_iters, normalise, q)",
      "q = jax.lax.fori_loop(0, 3, normalise, q)", "tests/test_sinkhorn.py",
      "Sinkhorn ignores its iteration count"),
    M("L06", "dino_jax/losses/sinkhorn.py", "    q = q / jnp.sum(q, axis=0, keepdims=True)\n",
      "    q = q / jnp.sum(q, axis=1, keepdims=True)\n", "tests/test_sinkhorn.py",
      "Sinkhorn normalises the samples where it should normalise the prototypes"),
    M("L07", "dino_jax/losses/swav.py", "q_queue = sinkhorn(joint)[:, -local:]", "q_queue = sinkhorn(joint)[:, :local]",
      "tests/test_swav_loss.py", "SwAV reads the queue's codes instead of the batch's"),
    M("L08", "dino_jax/losses/swav.py", "/ (n_crops - 1)", "/ n_crops", "tests/test_swav_loss.py",
      "SwAV averages over all crops instead of the other crops"),
    M("L09", "dino_jax/losses/swav.py", "scores.reshape(n_crops, batch_size, num_prototypes) / temperature",
      "scores.reshape(n_crops, batch_size, num_prototypes) / 0.1", "tests/test_swav_loss.py tests/test_swav_step.py",
      "SwAV temperature ignored (the default 0.1 used)"),
    # ---- optimisers and schedules ----------------------------------------------------------------------------------
    M("O01", "dino_jax/optim.py", "g * jnp.minimum(1.0, max_norm / (n + 1e-6))", "g * (max_norm / (n + 1e-6))",
      "tests/test_optim.py", "per-tensor clipping also scales small gradients up"),
    M("O02", "dino_jax/optim.py", "lambda p, x: x.ndim > 1 and not", "lambda p, x: x.ndim > 2 and not",
      "tests/test_optim.py", "2-D weights excluded from weight decay"),
    M("O03", "dino_jax/optim.py", "keep(t_new, t), keep(m_new, m)", "t_new, keep(m_new, m)",
      "tests/test_optim.py", "a frozen tensor's Adam step count advances"),
    M("O04", "dino_jax/optim.py", "upd = -step - (lr * wd * p if dec else 0.0)", "upd = -step - (wd * p if dec else 0.0)",
      "tests/test_optim.py", "AdamW decoupled decay not scaled by the lr"),
    M("O05", "dino_jax/optim.py", "ratio = trust * pn / (gn + wd * pn + eps)", "ratio = trust * pn / (gn + eps)",
      "tests/test_optim_larc.py", "LARC's trust ratio without the decay term"),
    M("O06", "dino_jax/optim.py", "step / max(warmup_steps - 1, 1)", "step / max(warmup_steps, 1)",
      "tests/test_optim.py", "lr warm-up off by one step"),
    M("O07", "dino_jax/optim.py", "base_lr = o.lr * config.batch_size / 256.0 if", "base_lr = o.lr if",
      "tests/test_optim.py tests/test_dino_step.py", "lr not scaled with the batch"),
    M("O08", "dino_jax/optim.py", "buf_new = momentum * buf + d_p", "buf_new = 0.9 * buf + d_p",
      "tests/test_optim.py tests/test_optim_larc.py tests/test_dino_step.py",
      "SGD momentum ignored (the default 0.9 used)"),
    M("O09", "dino_jax/optim.py", "wd = lambda s: cosine_schedule(s, base=o.weight_decay, final=o.weight_decay_end,",
      "wd = lambda s: cosine_schedule(s, base=o.weight_decay, final=o.weight_decay,",
      "tests/test_optim.py tests/test_dino_step.py", "weight decay held constant instead of its cosine"),
    # ---- the train steps ---------------------------------------------------------------------------------------------
    M("S01", "dino_jax/methods/dino.py", "teacher = steps.ema(state.teacher, params, momentum)",
      "teacher = steps.ema(state.teacher, state.params, momentum)", "tests/test_dino_step.py",
      "EMA from the student's old parameters"),
    M("S02", "dino_jax/methods/dino.py", "teacher_logits = teacher_model(crops[:1], rng=None, train=True)",
      "teacher_logits = teacher_model(crops[:1], rng=key, train=True)", "tests/test_dino_step.py",
      "teacher gets the student's drop-path"),
    M("S03", "dino_jax/methods/dino.py", "teacher_logits, loss_cfg.center_momentum)",
      "teacher_logits, 0.9)", "tests/test_dino_step.py",
      "centre momentum ignored (the default 0.9 used)"),
    M("S04", "dino_jax/methods/dino.py", "momentum = schedules.values[\"teacher_momentum\"](state.step)",
      "momentum = schedules.values[\"teacher_momentum\"](state.step + 1)", "tests/test_dino_step.py",
      "teacher momentum of the next iteration"),
    M("S05", "dino_jax/methods/swav.py", "  params = normalize_prototypes(state.params)\n", "  params = state.params\n",
      "tests/test_swav_step.py", "SwAV prototypes not normalised before the step"),
    M("S06", "dino_jax/steps.py", "ok = jnp.isfinite(loss) & (state.nonfinite_step < 0)", "ok = state.nonfinite_step < 0",
      "tests/test_dino_step.py tests/test_swav_step.py", "non-finite guard lets a NaN update through"),
    M("S07", "dino_jax/methods/swav.py", "return {\"queue_active\": lambda s: s >= start}",
      "return {\"queue_active\": lambda s: s > start}", "tests/test_swav_step.py",
      "SwAV queue starts one epoch late"),
    M("S08", "dino_jax/methods/dino.py", "teacher_logits = teacher_model(crops[:1], rng=None, train=True)",
      "teacher_logits = teacher_model(crops[:1] + crops[1:2], rng=None, train=True)", "tests/test_dino_step.py",
      "teacher also sees the local crops"),
    # ---- models --------------------------------------------------------------------------------------------------------
    M("N01", "dino_jax/models/vit.py", "_LN_EPS = 1e-6", "_LN_EPS = 1e-5", "tests/test_models_vit.py",
      "LayerNorm epsilon of torch's default instead of DINO's"),
    M("N02", "dino_jax/models/vit.py", "s_h, s_w = (h + 0.1) / g, (w + 0.1) / g", "s_h, s_w = h / g, w / g",
      "tests/test_models_vit.py", "positional-embedding interpolation without the official +0.1"),
    M("N03", "dino_jax/models/vit.py", "  return (x / keep * mask).astype(x.dtype)", "  return (x * mask).astype(x.dtype)",
      "tests/test_models_vit.py tests/test_dino_step.py", "drop-path without the keep-probability rescaling"),
    M("N04", "dino_jax/models/heads.py", "w = v / jnp.sqrt(jnp.sum(v * v, axis=0, keepdims=True))",
      "w = v / jnp.sqrt(jnp.sum(v * v, axis=1, keepdims=True))", "tests/test_models_heads.py",
      "weight norm over the outputs instead of each unit's inputs"),
    M("N05", "dino_jax/models/heads.py", "x = jax.nn.gelu(x, approximate=False)", "x = jax.nn.gelu(x, approximate=True)",
      "tests/test_models_heads.py", "tanh GELU in the DINO head"),
    M("N06", "dino_jax/models/layers.py", "jax.lax.stop_gradient(var) * (n / (n - 1))", "jax.lax.stop_gradient(var)",
      "tests/test_models_resnet.py tests/test_models_heads.py", "BatchNorm running variance biased"),
    M("N07", "dino_jax/models/resnet.py", "self.conv2 = _conv(planes, planes, 3, stride, 1, dtype, rngs)",
      "self.conv2 = _conv(planes, planes, 3, 1, 1, dtype, rngs)", "tests/test_models_resnet.py",
      "ResNet v1 stride placement (downsampling lost in conv2)"),
    M("N08", "dino_jax/models/wrapper.py", "rng=None if rng is None else jax.random.fold_in(rng, i)",
      "rng=rng", "tests/test_models_heads.py",
      "both resolution groups drop the same paths"),
    M("N09", "dino_jax/models/layers.py", "return std * jax.random.truncated_normal(key, -bound / std, bound / std,",
      "return std * jax.random.truncated_normal(key, -2.0, 2.0,", "tests/test_models_vit.py tests/test_models_heads.py",
      "trunc_normal cut at 2 sigma (jax's default) instead of 2 absolute"),
    M("N10", "dino_jax/models/vit.py", "_CUBIC_A = -0.75", "_CUBIC_A = -0.5", "tests/test_models_vit.py",
      "positional embedding resized with the Keys cubic (jax's) instead of PyTorch's"),
    # ---- data ------------------------------------------------------------------------------------------------------------
    M("D01", "dino_jax/data/photometric.py", "normalize(apply(batch[name], params, hue=float(aug.jitter[3]) > 0,",
      "normalize(apply(batch[name], params, hue=False,", "tests/test_data_photometric.py",
      "hue jitter off in the training augmentation"),
    M("D02", "dino_jax/data/photometric.py", "probabilities = {'global': (aug.blur_p_global, aug.solarize_p_global),",
      "probabilities = {'global': (tuple(aug.blur_p_global)[::-1], aug.solarize_p_global),",
      "tests/test_data_photometric.py", "the two global crops' blur probabilities swapped"),
    M("D03", "dino_jax/data/photometric.py", "'gray': u[..., 9] < gray_p,", "'gray': u[..., 9] < 0.2,",
      "tests/test_data_photometric.py", "grayscale probability ignored (the default 0.2 used)"),
    M("D04", "dino_jax/data/photometric.py", "  return (x[..., 0] * 19595 + x[..., 1] * 38470 + x[..., 2] * 7471 + 0x8000) >> 16",
      "  return (x[..., 0] * 19595 + x[..., 1] * 38470 + x[..., 2] * 7471) >> 16", "tests/test_data_photometric.py",
      "grey level truncated instead of rounded"),
    M("D05", "dino_jax/data/multicrop.py", "aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))",
      "aspect = rng.uniform(ratio[0], ratio[1])", "tests/test_data_multicrop.py",
      "aspect ratio uniform instead of log-uniform"),
    M("D06", "dino_jax/data/multicrop.py", "top = int(rng.integers(0, height - h + 1))", "top = int(rng.integers(0, height - h))",
      "tests/test_data_multicrop.py", "crop boxes never touch the bottom border"),
    M("D07", "dino_jax/data/multicrop.py", "flips = rng.random(g.number) < 0.5 if self.flip", "flips = rng.random(g.number) < 0.1 if self.flip",
      "tests/test_data_multicrop.py", "flip probability 0.1"),
    M("D08", "dino_jax/data/pipeline.py", "self._offset = process_index * self._b", "self._offset = process_index",
      "tests/test_data_pipeline.py", "processes read overlapping rows of the global batch"),
    M("D09", "dino_jax/data/pipeline.py", "return self._parent[epoch * self._num_records + offset]",
      "return self._parent[offset]", "tests/test_data_pipeline.py", "every epoch sees the same order"),
    M("D10", "dino_jax/data/photometric.py", "y = y - jnp.asarray(mean, jnp.float32)", "y = y - jnp.asarray(mean, jnp.float32)[::-1]",
      "tests/test_data_photometric.py", "normalisation mean in BGR order"),
    M("D11", "dino_jax/data/multicrop.py", "w, h = width, int(round(width / min(ratio)))",
      "w, h = width, int(round(width / max(ratio)))", "tests/test_data_multicrop.py",
      "crop fallback for tall images clamps to the wrong ratio"),
    # ---- evaluation --------------------------------------------------------------------------------------------------
    M("E01", "dino_jax/evaluate/linear.py", "peak_lr = float(lin.lr) * int(lin.batch_size) / 256.0",
      "peak_lr = float(lin.lr)", "tests/test_linear.py", "linear probe lr not scaled by batch / 256"),
    M("E02", "dino_jax/evaluate/knn.py", "weights = jnp.exp(dist / temperature)", "weights = jnp.exp(dist)",
      "tests/test_knn.py", "k-NN vote weights ignore the temperature"),
    M("E03", "dino_jax/evaluate/knn.py", "train = l2_normalize(train_features) if normalize", "train = jnp.asarray(train_features) if normalize",
      "tests/test_knn.py", "k-NN training features not normalised"),
    M("E04", "dino_jax/evaluate/linear.py", "cls = jnp.stack([cls, pooled], axis=-1).reshape(cls.shape[0], -1)",
      "cls = jnp.concatenate([cls, pooled], axis=-1)", "tests/test_linear.py",
      "ViT-B probe features concatenated instead of interleaved"),
    M("E05", "dino_jax/evaluate/features.py", "return model(normalize_images(images, mean, std, dtype), rng=None, train=False)",
      "return model(normalize_images(images, mean, std, dtype), rng=None, train=True)",
      "tests/test_knn.py", "evaluation features with batch statistics"),
    M("E06", "dino_jax/methods/__init__.py", "return state.teacher, state.teacher_batch_stats", "return state.params, state.teacher_batch_stats",
      "tests/test_train.py::test_two_step_run_writes_metrics_checkpoint_and_evaluates",
      "k-NN evaluates the student, not the teacher"),
    M("E07", "dino_jax/evaluate/attention.py", "return attn[:, :, 0, 1:].reshape", "return attn[:, :, 1:, 0].reshape",
      "tests/test_models_vit.py tests/test_plot_run.py", "attention maps read the patches' attention to [CLS]"),
    # ---- checkpoints, interop, sharding, training loop -----------------------------------------------------------------
    M("C01", "dino_jax/checkpoint.py", 'items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)', "pass",
      "tests/test_train.py", "resume restarts the data stream"),
    M("C02", "dino_jax/checkpoint.py", '_ARCH_KEYS = ("method", "model")', '_ARCH_KEYS = ("method",)',
      "tests/test_train.py", "resume accepts another architecture"),
    M("C03", "dino_jax/checkpoint.py", "      state = _device_copy(state)", "      pass",
      "tests/test_faults.py", "a background save reads buffers the next step was given"),
    M("C04", "dino_jax/checkpoint.py", "self.background = bool(async_save) and jax.process_count() == 1",
      "self.background = False", "tests/test_faults.py", "orbax's save back on the training loop"),
    M("C05", "dino_jax/checkpoint.py", "loaded = checkpoints.newest_readable(read, move=False)",
      "loaded = checkpoints.newest_readable(read, move=True)", "tests/test_faults.py",
      "evaluation moves a checkpoint the run may still be writing"),
    M("F01", "dino_jax/faults.py", "    except Exception as e:\n      self.fail(e)\n      raise",
      "    except Exception as e:\n      raise", "tests/test_faults_procs.py::test_a_killed_peer_ends_the_survivor_with_a_message_in_bounded_time",
      "a peer lost during the evaluation ends in a traceback"),
    M("I01", "dino_jax/interop/torch.py", "return value.transpose(3, 2, 0, 1)          # HWIO -> OIHW",
      "return value.transpose(3, 2, 1, 0)          # HWIO -> OIHW", "tests/test_interop_torch.py tests/test_convert.py",
      "conv kernels exported with height and width swapped"),
    M("I02", "dino_jax/interop/torch.py", 't_prefix = "module." if _has_batchnorm(module) else ""', 't_prefix = "module."',
      "tests/test_interop_torch.py tests/test_convert.py", "DINO teacher exported with the DDP prefix without BatchNorm"),
    M("O10", "dino_jax/optim.py", "decay = jax.tree.map(lambda p: True, params) if decay_all else decay_mask(params)",
      "decay = decay_mask(params)", "tests/test_optim_larc.py tests/test_swav_step.py",
      "SwAV's decay of every parameter (biases and norms too) ignored"),
    M("V01", "dino_jax/convert.py", "  return step // per_epoch\n", "  return step // per_epoch + 1\n",
      "tests/test_convert.py", "exported 'epoch' counts the epoch in progress"),
    M("H01", "dino_jax/methods/swav.py", "{k: NamedSharding(mesh, P(None, sharding.DATA)) for k in method_state}",
      "{k: NamedSharding(mesh, P(None, None)) for k in method_state}", "tests/test_sharding.py",
      "the SwAV queue replicated instead of per device"),
    # ---- the method interface and the config check --------------------------------------------------------------------
    M("R01", "dino_jax/config_check.py", '      positive("optim.lr", o.lr, "5e-4 (DINO ViT at batch 256), 4.8 (SwAV)"),\n', "",
      "tests/test_config_check.py", "a negative lr trains (gradient ascent)"),
    M("R02", "dino_jax/methods/__init__.py", "  module = _REGISTRY.get(name)\n", "  module = _REGISTRY.get(name, dino)\n",
      "tests/test_methods.py tests/test_config_check.py", "an unknown method silently falls back to DINO"),
    M("R03", "dino_jax/methods/__init__.py", "  if state.teacher is not None:\n", "  if False:\n",
      "tests/test_methods.py tests/test_train.py::test_two_step_run_writes_metrics_checkpoint_and_evaluates",
      "a method's teacher is ignored by the evaluations"),
    M("A01", "dino_jax/data/sources.py", "chosen = np.sort(train if split == 'train' else test)",
      "chosen = np.sort(train)", "tests/test_data_sources.py", "the digits test split is the train split"),
    M("A02", "dino_jax/state.py", "teacher=params if has_teacher else None",
      "teacher=jax.tree.map(jnp.zeros_like, params) if has_teacher else None",
      "tests/test_train.py::test_two_step_run_writes_metrics_checkpoint_and_evaluates tests/test_convert.py",
      "the teacher does not start from the student's weights"),
    M("T01", "dino_jax/train.py", "      checkpoints.save(step, state, data_iterator=batches, config=config, force=done)",
      "      checkpoints.save(step, state, data_iterator=batches, config=config, force=False)",
      "tests/test_train.py", "the last step is not saved unless it falls on the interval"),
]


def _copy_tree(dst):
  files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
  for rel in (f.decode() for f in files if f):
    src = os.path.join(ROOT, rel)
    if not os.path.isfile(src):   # deleted in the work tree
      continue
    os.makedirs(os.path.dirname(os.path.join(dst, rel)) or dst, exist_ok=True)
    shutil.copy2(src, os.path.join(dst, rel))


def _plant(tree, m):
  path = os.path.join(tree, m.path)
  text = open(path).read()
  count = text.count(m.old)
  if count != 1:
    return f"stale: the text occurs {count} times in {m.path}"
  with open(path, "w") as f:
    f.write(text.replace(m.old, m.new))
  return None


def run_mutant(m, *, timeout, cache=None):
  with tempfile.TemporaryDirectory(prefix=f"mutant_{m.id}_") as tree:
    _copy_tree(tree)
    stale = _plant(tree, m)
    if stale:
      return {"result": "stale", "detail": stale, "seconds": 0.0}
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONDONTWRITEBYTECODE="1")
    if cache:   # programs a mutant leaves unchanged compile once for the whole check (the key is the program)
      env["JAX_COMPILATION_CACHE_DIR"] = cache
    t0 = time.time()
    try:
      proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "--no-header",
                             "-o", "addopts=", *m.tests], cwd=tree, env=env, capture_output=True, text=True,
                            timeout=timeout)
    except subprocess.TimeoutExpired:
      return {"result": "caught", "detail": f"timeout after {timeout} s", "seconds": time.time() - t0}
    seconds = time.time() - t0
    lines = [l for l in proc.stdout.splitlines() if l.strip()]
    if proc.returncode == 0:
      return {"result": "SURVIVED", "detail": lines[-1] if lines else "", "seconds": seconds}
    failed = next((l for l in lines if l.startswith(("FAILED", "ERROR"))), lines[-1] if lines else proc.stderr[-200:])
    return {"result": "caught", "detail": failed[:200], "seconds": seconds}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--only", default="", help="comma-separated mutant ids")
  ap.add_argument("--list", action="store_true")
  ap.add_argument("--timeout", type=int, default=900)
  ap.add_argument("--update", action="store_true", help="with --only: replace those mutants' rows in the results")
  ap.add_argument("--out", default=os.path.join(ROOT, "experiments", "results", "mutation_check"))
  args = ap.parse_args(argv)
  chosen = [m for m in MUTANTS if not args.only or m.id in args.only.split(",")]
  if args.list:
    for m in chosen:
      print(f"{m.id}  {m.path:<32} {m.what}  [{' '.join(m.tests)}]")
    return 0
  results = []
  cache = tempfile.mkdtemp(prefix="mutation_check_jit_cache_")
  for i, m in enumerate(chosen):
    r = run_mutant(m, timeout=args.timeout, cache=cache)
    results.append({"id": m.id, "path": m.path, "what": m.what, "tests": list(m.tests), **r})
    print(f"[{i + 1}/{len(chosen)}] {m.id} {r['result']:<8} {r['seconds']:6.0f} s  {m.what}  -- {r['detail']}",
          flush=True)
  shutil.rmtree(cache, ignore_errors=True)
  caught = sum(r["result"] == "caught" for r in results)
  summary = f"{caught} of {len(results)} planted bugs caught"
  print(summary)
  if not args.only:
    _write(args.out, results, summary)
  elif args.update:
    with open(args.out + ".json") as f:
      previous = {r["id"]: r for r in json.load(f)["mutants"]}
    for r in results:
      r["rerun"] = time.strftime("%Y-%m-%d %H:%M")
    fresh = {r["id"]: r for r in results}
    merged = [fresh.get(m.id, previous.get(m.id)) for m in MUTANTS if m.id in fresh or m.id in previous]
    caught = sum(r["result"] == "caught" for r in merged)
    summary = f"{caught} of {len(merged)} planted bugs caught"
    print("all results:", summary)
    _write(args.out, merged, summary)
  return 0 if caught == len(results) else 1


def _write(prefix, results, summary):
  os.makedirs(os.path.dirname(prefix), exist_ok=True)
  stamp = time.strftime("%Y-%m-%d")
  with open(prefix + ".json", "w") as f:
    json.dump({"date": stamp, "command": "python tests/mutation_check.py", "summary": summary, "mutants": results}, f,
              indent=1)
  modules = sorted({r["path"] for r in results})
  lines = [f"# Mutation check ({stamp})", "", f"`python tests/mutation_check.py`: **{summary}**, "
           f"covering {len(modules)} modules of dino_jax/.", "",
           "| id | module | planted bug | guarding tests | result | s |", "|---|---|---|---|---|---|"]
  for r in results:
    tests = ", ".join(t.replace("tests/", "") for t in r["tests"])
    mark = " (rerun)" if r.get("rerun") else ""
    lines.append(f"| {r['id']} | `{r['path'].replace('dino_jax/', '')}` | {r['what']} | {tests} | {r['result']}{mark} | "
                 f"{r['seconds']:.0f} |")
  if any(r.get("rerun") for r in results):
    lines += ["", "(rerun): run again with `--only=... --update` after a later change to its module or its tests; the "
              "other rows are from the full run of the date above."]
  with open(prefix + ".md", "w") as f:
    f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
  sys.exit(main())
