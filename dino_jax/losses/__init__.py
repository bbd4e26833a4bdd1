"""Losses: DINO (centring + sharpening), Sinkhorn-Knopp and SwAV swapped prediction. All computed in float32."""
from dino_jax.losses.dino import dino_loss, entropy, teacher_targets, teacher_temperature, update_center

__all__ = ["dino_loss", "entropy", "teacher_targets", "teacher_temperature", "update_center"]
