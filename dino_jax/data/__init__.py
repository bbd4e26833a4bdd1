"""Input pipeline: sources -> multi-crop geometry (CPU, grain) -> photometry (accelerator).

Kept free of jax imports: grain worker processes import this package. Import
`dino_jax.data.photometric` explicitly where the train step needs it.
"""
from dino_jax.data.pipeline import make_eval_dataset, make_train_dataset, steps_per_epoch
from dino_jax.data.sources import get_source
