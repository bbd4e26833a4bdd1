r"""A small search over the DINO quickstart for features that beat the raw pixels (README.md, "Sweeps").

  python -m dino_jax.sweep --config=configs/quickstart_search.py --results=experiments/results/sweep_quickstart_search
  python -m dino_jax.sweep --config=configs/quickstart_search.py:round2 \
      --results=experiments/results/sweep_quickstart_search_round2
  python -m dino_jax.sweep --config=configs/quickstart_search.py:round3 \
      --results=experiments/results/sweep_quickstart_search_round3
  python -m dino_jax.train --config=configs/quickstart_search.py --workdir=runs/x    # its base run alone

The same weighted k-NN (T = 0.07) on the raw pixels of the test digits at the evaluation's 16 x 16 reaches 97.8 % /
97.2 % (k = 10 / 20; `python -m dino_jax.evaluate.pixels --config=configs/quickstart.py`); the quickstart's teacher
85.6 % / 84.7 %. One factor at a time from configs/quickstart.py, seed 0, each within the quickstart's budget of 10
minutes on 2 cores: a wider ViT, milder crops (more of the digit in every view), twice the epochs, a softer
teacher after a warm-up. Round 2 (`:round2`) combines the two factors that helped (width 128, milder crops), then
adds 50 % more epochs; round 3 (`:round3`) doubles them. The tables that the commands write are committed under experiments/results/, with each run's
wall time in runs.csv.
"""
from configs import quickstart


ROUNDS = (None, "round2", "round3")


def get_config(arg=None):
  if arg not in ROUNDS:
    raise ValueError(f"configs/quickstart_search.py: the argument is the search round, one of {ROUNDS[1:]}; got {arg!r}")
  return quickstart.get_config()


WIDE = {"model.overrides.embed_dim": 128, "model.overrides.num_heads": 4}
MILD = {"crops.global_scale": (0.8, 1.0), "crops.local_scale": (0.3, 0.8)}


def sweep(arg=None):
  if arg == "round2":
    return [{**WIDE, **MILD, "seed": 0}, {**WIDE, **MILD, "epochs": 120, "seed": 0}]
  if arg == "round3":   # round 2's trend: more epochs (160 is near the 10-minute budget)
    return [{**WIDE, **MILD, "epochs": 160, "seed": 0}]
  return [
      {"crops.global_scale": (0.8, 1.0), "crops.local_scale": (0.3, 0.8), "seed": 0},       # milder crops
      {"loss.teacher_temp": 0.07, "loss.warmup_teacher_temp_epochs": 10, "seed": 0},       # 0.04 -> 0.07
      {"model.overrides.embed_dim": 128, "model.overrides.num_heads": 4, "seed": 0},       # width 64 -> 128
      {"epochs": 160, "seed": 0},                                                          # 80 -> 160 epochs
  ]
