"""One console for every entry point: our messages (INFO and up) and the progress bars, nothing else.

orbax, grain and absl log every checkpoint file and every read at INFO through absl's logger, and jax its backend
probing ("Unable to initialize backend 'tpu'"); they are shown only with `--verbosity=1` (or higher), absl's own
flag, which every `python -m dino_jax.*` command accepts.
"""
from __future__ import annotations

import logging

from absl import flags


def quiet_logging():
  """Our `logging` messages at INFO; the libraries' absl INFO lines only when --verbosity >= 1 asks for them."""
  logging.getLogger().setLevel(logging.INFO)
  verbosity = flags.FLAGS["verbosity"].value if "verbosity" in flags.FLAGS and flags.FLAGS.is_parsed() else 0
  for name in ("absl", "jax"):
    logging.getLogger(name).setLevel(logging.DEBUG if verbosity >= 1 else logging.WARNING)
