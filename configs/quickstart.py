r"""DINO on the embedded digits dataset, sized for a 2-core CPU (`make quickstart`).

  python -m dino_jax.train --config=configs/quickstart.py --workdir=runs/quickstart

Data: scikit-learn's 1,797 handwritten digits (real 8x8 scans shipped inside the package, no download), upsampled
to 32x32 once; 1,437 train / 360 test images (`digits:train`, `digits:test`). A small ViT (patch 4, 2 blocks, width
64) trains with the official DINO loop scaled down (2 global 16-px crops + 4 local 8-px crops, AdamW with warm-up and
cosine, weight decay 0.04 -> 0.4, teacher EMA cosine 0.99 -> 1, centring, last layer frozen for the first epoch),
then the teacher backbone is evaluated with the official weighted k-NN (T = 0.07) against the same architecture at
random initialisation. What it reaches is in README.md (measured with this command).

What differs from the ImageNet recipe, and why (each measured here with this command plus the override named):
- BatchNorm in the head (`use_bn_in_head`, an official option, used by the ResNet-50 recipe). Without it
  (`--config.model.use_bn_in_head=False`) the teacher goes uniform (entropy = ln K = 5.55 from step ~200 to ~800)
  and only partly recovers: k-NN 43.1% / 41.7% (k = 10 / 20) against 77-86% with it. Our step equals the official
  one (tests/test_dino_step.py), so this is the recipe at this scale, not the implementation.
- Crops of at least half the digit (global 0.5-1, local 0.2-0.5): the ImageNet scales leave little of an 8x8 scan.
- The official photometric chain is kept (colour jitter, grayscale, blur, solarisation). Switching it off
  (`--config.aug.jitter_p=0 --config.aug.gray_p=0 --config.aug.blur_p_global=(0,0) --config.aug.blur_p_local=0
  --config.aug.solarize_p_global=(0,0)`) gives 77.5% / 76.4% instead of 85.6% / 84.7%.
- No teacher-temperature warm-up, lr 5e-4 at batch 64 and teacher momentum 0.99: a run of 1,760 iterations.

"""
from configs import common


def get_config(arg=None):
  c = common.digits_quickstart(common.dino_defaults(), photometry=True)
  c.epochs = 80
  c.model.drop_path_rate = 0.1
  c.model.out_dim = 256
  c.model.head_hidden_dim = 256
  c.model.head_bottleneck_dim = 64
  c.model.use_bn_in_head = True      # without it the run collapses at this scale (see the docstring)
  c.teacher_momentum = 0.99          # small batch, short run (~1,800 iterations)

  c.optim.lr = 2e-3
  c.optim.warmup_epochs = 3
  c.optim.freeze_last_layer = 1
  c.loss.warmup_teacher_temp = 0.04
  c.loss.teacher_temp = 0.04
  c.loss.warmup_teacher_temp_epochs = 0

  if arg:
    raise ValueError(f"configs/quickstart.py: takes no argument, got {arg!r} (the test suite's tiny variant is "
                     "tests/configs/quickstart_test.py)")
  return c


def sweep():
  """python -m dino_jax.sweep --config=configs/quickstart.py: the recipe over 5 seeds (README.md shows the table)."""
  return [{"seed": s} for s in range(5)]
