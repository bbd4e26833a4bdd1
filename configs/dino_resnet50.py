r"""DINO ResNet-50, 100 epochs: the README's convnet command.

  python -m dino_jax.train --config=configs/dino_resnet50.py:/data/imagenet --workdir=runs/dino_rn50

Official command (8 GPUs x 64 = batch 512): --arch resnet50 --optimizer sgd --lr 0.03 --weight_decay 1e-4
--weight_decay_end 1e-4 --global_crops_scale 0.14 1 --local_crops_scale 0.05 0.14 (other flags default: out_dim 65536,
teacher temp 0.04, momentum 0.996, clip 3.0, last layer frozen 1 epoch). The teacher's BatchNorm runs in train mode
(batch statistics), as the official teacher never calls eval(); BN statistics are global over all devices (SyncBN).
Paper Table 2 / README for the released ResNet-50: 67.5% k-NN, 75.3% linear on ImageNet.
"""
from configs import common


def get_config(arg=None):
  c = common.dino_defaults()
  c.model.arch = "resnet50"
  c.model.drop_path_rate = 0.0      # main_dino.py passes drop_path_rate to ViTs only
  c.optim.name = "sgd"
  c.optim.lr = 0.03
  c.optim.weight_decay = 1e-4
  c.optim.weight_decay_end = 1e-4
  c.crops.global_scale = (0.14, 1.0)
  c.crops.local_scale = (0.05, 0.14)
  return common.imagenet_paths(c, arg)
