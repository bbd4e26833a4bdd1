"""Sweeps: a recipe over seeds and settings (grid), run locally, one per GPU or on Slurm (launch), then tabulated
with mean ± std over seeds (collect). `python -m dino_jax.sweep --help`."""
