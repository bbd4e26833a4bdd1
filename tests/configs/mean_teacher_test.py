r"""tests/mean_teacher.py (a method defined outside dino_jax/) on the tiny digits quickstart.

  python -m dino_jax.train --config=tests/configs/mean_teacher_test.py --workdir=/tmp/x
"""
from tests import mean_teacher
from tests.configs import quickstart_test


def get_config(arg=None):
  del arg
  c = mean_teacher.add_defaults(quickstart_test.get_config())
  c.eval.compare_random_init = False
  return c
