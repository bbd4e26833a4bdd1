"""Interoperability with the official PyTorch code: see `dino_jax.interop.torch`."""
