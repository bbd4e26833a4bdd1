"""Shared pytest set-up: CPU only, fp32 matmuls at full precision for parity tests."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

# Parity tests compare fp32 against PyTorch: ask XLA for full-precision dots.
jax.config.update("jax_default_matmul_precision", "highest")
