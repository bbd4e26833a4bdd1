r"""configs/swav_quickstart.py shrunk to a few seconds for the test suite (not a recipe).

  python -m dino_jax.train --config=tests/configs/swav_quickstart_test.py --workdir=/tmp/x

The projection keeps its BatchNorm (its statistics are checkpointed and synced); a queue of 2 batches used from the
first step once full; prototypes frozen for 2 iterations.
"""
from configs import swav_quickstart
from tests.configs import common_test


def get_config(arg=None):
  del arg
  c = common_test.tiny(swav_quickstart.get_config())
  c.model.hidden_mlp = 32
  c.model.feat_dim, c.model.nmb_prototypes = 16, 20
  c.loss.queue_length = 32
  c.loss.epoch_queue_starts = 0
  c.optim.freeze_prototypes_niters = 2
  return c
