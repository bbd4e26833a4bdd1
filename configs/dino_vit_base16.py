r"""DINO ViT-B/16: the README's ViT-base command.

  python -m dino_jax.train --config=configs/dino_vit_base16.py:/data/imagenet --workdir=runs/dino_vitb16

Official command (README, "DINO with ViT-base network"): run_with_submitit --nodes 2 --ngpus 8 --use_volta32
--arch vit_base, i.e. main_dino.py defaults with vit_base on 16 GPUs x 64 = batch 1024; norm_last_layer stays True
(the README: removing it is only safe with vit_small). Paper Table 2 / README: 76.1% k-NN, 78.2% linear on ImageNet
for the released model, trained longer than 100 epochs (see its args.txt, linked from the official README).
"""
from configs import common


def get_config(arg=None):
  c = common.dino_defaults()
  c.model.arch = "vit_base"
  c.batch_size = 1024
  c.eval.linear.n_last_blocks = 1    # the official ViT-B probe: last block's [CLS] + pooled patch tokens
  c.eval.linear.avgpool = True
  return common.imagenet_paths(c, arg)
