r"""SwAV ResNet-50, 800 epochs, batch 4096: the official best run (scripts/swav_800ep_pretrain.sh).

  python -m dino_jax.train --config=configs/swav_resnet50.py:/data/imagenet --workdir=runs/swav_rn50_800ep

The argument is an ImageNet-style root with train/ and val/ class folders (or set --config.data.source and
--config.eval.{train,test}_source). Official script flags: --nmb_crops 2 6 --size_crops 224 96 --min_scale_crops 0.14
0.05 --max_scale_crops 1. 0.14 --crops_for_assign 0 1 --temperature 0.1 --epsilon 0.05 --sinkhorn_iterations 3
--feat_dim 128 --nmb_prototypes 3000 --queue_length 0 --epochs 800 --batch_size 64 (x 64 GPUs) --base_lr 4.8
--final_lr 0.0048 --freeze_prototypes_niters 313 --wd 0.000001 --warmup_epochs 10 --start_warmup 0.3 --use_fp16 true
--sync_bn apex. Differences kept on purpose: our BatchNorm statistics are global over the whole batch (the script
syncs them over groups of 8 GPUs, i.e. 512 images), and the compute dtype is bfloat16 (the official runs apex O1 fp16);
Sinkhorn-Knopp, the scores and the loss are float32 in both.

Official reference (facebookresearch/swav README): 64 V100 GPUs, 3 min 40 s per epoch (~49 h for 800 epochs),
75.3% ImageNet linear top-1. Our time on GPUs has not been measured yet. The k-NN run at the end uses the trained
network (SwAV has no teacher; state.teacher holds the network, see steps.swav_update).
"""
from configs import common


def get_config(arg=None):
  c = common.swav_defaults()
  c.epochs = 800
  c.batch_size = 4096
  c.optim.lr = 4.8
  c.optim.min_lr = 0.0048
  c.optim.start_warmup = 0.3
  c.optim.warmup_epochs = 10
  c.optim.freeze_prototypes_niters = 313
  c.loss.queue_length = 0
  c.checkpoint_every_steps = 312    # one epoch: 1,281,167 images // 4096
  return common.imagenet_paths(c, arg)
