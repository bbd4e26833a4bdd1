r"""SwAV ResNet-50 at batch 256 with a queue, 200 epochs (scripts/swav_200ep_bs256_pretrain.sh; 400 epochs with
--config.epochs=400 is scripts/swav_400ep_bs256_pretrain.sh, otherwise identical).

  python -m dino_jax.train --config=configs/swav_resnet50_bs256.py:/data/imagenet --workdir=runs/swav_rn50_bs256

Official script flags: --nmb_crops 2 6 --size_crops 224 96 --min_scale_crops 0.14 0.05 --max_scale_crops 1. 0.14
--crops_for_assign 0 1 --temperature 0.1 --epsilon 0.05 --sinkhorn_iterations 3 --feat_dim 128 --nmb_prototypes 3000
--queue_length 3840 --epoch_queue_starts 15 --epochs 200 --batch_size 64 (x 4 GPUs) --base_lr 0.6 --final_lr 0.0006
--freeze_prototypes_niters 5005 --wd 0.000001 --warmup_epochs 0 --use_fp16 true --sync_bn pytorch.
The queue holds 3840 embeddings per assigned crop in total, split over the devices (960 each on 4, as the official
per-GPU queue); Sinkhorn-Knopp treats the queued rows as one set, so the device count does not change the result.
A run resumed on a different number of devices cannot restore its queue (its shape is per device).

Official reference (facebookresearch/swav README): 4 V100 GPUs, 52 min 10 s per epoch; ImageNet linear top-1 72.7%
after 200 epochs, 74.3% after 400. Our time on GPUs has not been measured yet.
"""
from configs import common


def get_config(arg=None):
  c = common.swav_defaults()
  c.epochs = 200
  c.batch_size = 256
  c.optim.lr = 0.6
  c.optim.min_lr = 0.0006
  c.optim.warmup_epochs = 0
  c.optim.start_warmup = 0.0
  c.optim.freeze_prototypes_niters = 5005
  c.loss.queue_length = 3840
  c.loss.epoch_queue_starts = 15
  c.checkpoint_every_steps = 5004   # one epoch: 1,281,167 images // 256
  return common.imagenet_paths(c, arg)
