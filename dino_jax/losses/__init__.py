"""Losses: DINO (centring + sharpening), Sinkhorn-Knopp and SwAV swapped prediction. All computed in float32."""
from dino_jax.losses.dino import dino_loss, entropy, teacher_targets, teacher_temperature, update_center
from dino_jax.losses.sinkhorn import sinkhorn_knopp
from dino_jax.losses.swav import init_queue, queue_rows_per_shard, swav_loss

__all__ = ["dino_loss", "entropy", "init_queue", "queue_rows_per_shard", "sinkhorn_knopp", "swav_loss",
           "teacher_targets", "teacher_temperature", "update_center"]
