r"""DINO ViT-B/8: ViT-base with 8x8 patches, float32 compute (main_dino.py's advice for patches < 16).

  python -m dino_jax.train --config=configs/dino_vit_base8.py:/data/imagenet --workdir=runs/dino_vitb8

main_dino.py defaults with --arch vit_base --patch_size 8 on 16 GPUs (batch 1024). Paper Table 2 / README for the
released model: 77.4% k-NN, 80.1% linear on ImageNet (its exact schedule is in the args.txt linked from the official
README; not reachable offline here).
"""
from configs import common


def get_config(arg=None):
  c = common.dino_defaults()
  c.model.arch = "vit_base"
  c.model.patch_size = 8
  c.model.dtype = "float32"
  c.batch_size = 1024
  c.eval.linear.n_last_blocks = 1    # the official ViT-B probe: last block's [CLS] + pooled patch tokens
  c.eval.linear.avgpool = True
  return common.imagenet_paths(c, arg)
