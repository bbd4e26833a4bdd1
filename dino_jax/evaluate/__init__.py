"""Evaluation of frozen features: weighted k-NN (`knn`), feature extraction (`features`), whole-run evaluation (`run`).

  python -m dino_jax.evaluate --workdir=runs/quickstart [--compare_random_init]
"""
