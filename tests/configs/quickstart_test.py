r"""configs/quickstart.py shrunk to a few seconds for the test suite (not a recipe).

  python -m dino_jax.train --config=tests/configs/quickstart_test.py --workdir=/tmp/x

The quickstart's DINO loop on the digits with a one-block ViT of width 32 and a head 64 -> 32 -> 64 without BatchNorm.
"""
from configs import quickstart
from tests.configs import common_test


def get_config(arg=None):
  del arg
  c = common_test.tiny(quickstart.get_config())
  c.model.out_dim = 64
  c.model.head_hidden_dim = 64
  c.model.head_bottleneck_dim = 32
  c.model.use_bn_in_head = False
  return c
