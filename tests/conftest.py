"""Shared pytest set-up: CPU only, fp32 matmuls at full precision for parity tests, one compilation cache per run."""
import atexit
import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Many tests compile the same tiny train step (every end-to-end run, resume and command-line test of the tiny
# recipes). JAX's persistent compilation cache turns the repeats into a file read, in this process and in the
# processes the tests start (they inherit the variable). A fresh directory per test run, removed at its end, so no
# run depends on an earlier one.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache = tempfile.mkdtemp(prefix="dino_jax_test_jit_cache_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)

import jax  # noqa: E402

# Parity tests compare fp32 against PyTorch: ask XLA for full-precision dots.
jax.config.update("jax_default_matmul_precision", "highest")
