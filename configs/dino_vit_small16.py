r"""DINO ViT-S/16, 100 epochs: the official main_dino.py defaults (the README's first run).

  python -m dino_jax.train --config=configs/dino_vit_small16.py:/data/imagenet --workdir=runs/dino_vits16

The argument is an ImageNet-style root with train/ and val/ class folders (ImageFolder layout); or set
--config.data.source=... (imagefolder:<dir> or tfds:imagenet2012/train) and --config.eval.{train,test}_source.
Official reference (facebookresearch/dino README): 8 GPUs x 64 images, 1.75 days on V100s -> 69.3% k-NN, 74.0% linear
on ImageNet. Paper Table 2 (longer schedule) ViT-S/16: 74.5 k-NN, 77.0 linear.
"""
from configs import common


def get_config(arg=None):
  c = common.dino_defaults()
  return common.imagenet_paths(c, arg)
