"""Every recipe loads, builds its model abstractly, and carries the official hyperparameters it claims."""
import glob
import importlib
import os

import jax
import pytest
from flax import nnx

from dino_jax.state import build_model, count_params, split_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
                 if not os.path.basename(p).startswith(("_", "common")))


def _get(name, arg=None):
  return importlib.import_module(f"configs.{name}").get_config(arg)


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_builds_and_documents_itself(name):
  module = importlib.import_module(f"configs.{name}")
  doc = module.__doc__ or ""
  assert "python -m dino_jax.train" in doc and f"configs/{name}.py" in doc, "docstring must give the command"
  c = module.get_config()
  assert c.method in ("dino", "swav")
  model = nnx.eval_shape(lambda: build_model(c, nnx.Rngs(0)))
  assert count_params(split_model(model)[1]) > 0


def test_dino_defaults_are_main_dino_defaults():
  c = _get("dino_vit_small16")
  assert (c.model.arch, c.model.patch_size, c.model.out_dim, c.model.norm_last_layer) == ("vit_small", 16, 65536, True)
  assert (c.teacher_momentum, c.loss.warmup_teacher_temp, c.loss.teacher_temp) == (0.996, 0.04, 0.04)
  assert (c.loss.warmup_teacher_temp_epochs, c.loss.student_temp, c.loss.center_momentum) == (0, 0.1, 0.9)
  o = c.optim
  assert (o.name, o.lr, o.min_lr, o.warmup_epochs, o.weight_decay, o.weight_decay_end) == (
      "adamw", 5e-4, 1e-6, 10, 0.04, 0.4)
  assert (o.clip_grad, o.freeze_last_layer, c.model.drop_path_rate, c.epochs) == (3.0, 1, 0.1, 100)
  cr = c.crops
  assert (cr.global_size, cr.global_number, tuple(cr.global_scale)) == (224, 2, (0.4, 1.0))
  assert (cr.local_size, cr.local_number, tuple(cr.local_scale), cr.interpolation) == (96, 8, (0.05, 0.4), "bicubic")
  assert tuple(c.aug.blur_p_global) == (1.0, 0.1) and c.aug.blur_p_local == 0.5
  assert tuple(c.aug.solarize_p_global) == (0.0, 0.2) and tuple(c.aug.jitter) == (0.4, 0.4, 0.2, 0.1)


def test_boosted_and_resnet_recipes():
  b = _get("dino_vit_small16_boosted")
  assert (b.epochs, b.loss.teacher_temp, b.loss.warmup_teacher_temp_epochs, b.model.norm_last_layer) == (
      300, 0.07, 30, False)
  r = _get("dino_resnet50")
  assert (r.model.arch, r.optim.name, r.optim.lr, r.optim.weight_decay, r.optim.weight_decay_end) == (
      "resnet50", "sgd", 0.03, 1e-4, 1e-4)
  assert tuple(r.crops.global_scale) == (0.14, 1.0) and tuple(r.crops.local_scale) == (0.05, 0.14)
  assert (_get("dino_vit_small8").model.patch_size, _get("dino_vit_base8").model.arch) == (8, "vit_base")


def test_imagenet_argument_sets_the_three_sources():
  c = _get("dino_vit_small16", "/data/imagenet/")
  assert c.data.source == "imagefolder:/data/imagenet/train"
  assert (c.eval.train_source, c.eval.test_source) == ("imagefolder:/data/imagenet/train", "imagefolder:/data/imagenet/val")


def test_vit_small16_backbone_parameter_count_is_official():
  c = _get("dino_vit_small16")
  model = nnx.eval_shape(lambda: build_model(c, nnx.Rngs(0)))
  params = split_model(model)[1]
  assert count_params(params["backbone"]) == 21_665_664
  assert jax.tree.leaves(params["head"])  # the head exists and is separate
