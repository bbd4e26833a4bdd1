r"""DINO ViT-S/8: the ViT-S recipe with 8x8 patches (784 tokens at 224 px, 144 at 96 px).

  python -m dino_jax.train --config=configs/dino_vit_small8.py:/data/imagenet --workdir=runs/dino_vits8

Hyperparameters: main_dino.py defaults with --patch_size 8 on 2 nodes x 8 GPUs (batch 1024), float32 compute as
main_dino.py's help recommends for patches < 16 ("we recommend disabling mixed precision"). Paper Table 2 / README:
78.3% k-NN, 79.7% linear on ImageNet; that released model was trained longer (its args.txt is linked from the official
README and was not reachable from this offline environment: set --config.epochs and the temperature schedule from it
to reproduce that exact run).
"""
from configs import common


def get_config(arg=None):
  c = common.dino_defaults()
  c.model.patch_size = 8
  c.batch_size = 1024
  c.model.dtype = "float32"
  return common.imagenet_paths(c, arg)
