"""Hardness-aware augmentation (paper Sec. 3.2, eq. 8; official lib/HDML.py `Pulling`).

Each negative z⁻ is moved along the segment towards its anchor z:

    ẑ⁻ = z + (d⁺ + (d⁻ − d⁺)·e^(−α/J_avg)) / d⁻ · (z⁻ − z)      if d⁺ < d⁻,   ẑ⁻ = z⁻ otherwise,

with d⁺ = ‖z − z⁺‖ and d⁻ = ‖z − z⁻‖. The pull factor e^(−α/J_avg) → 1 while the running loss J_avg is large
(nothing moves) and → 0 as training converges (the negative lands at distance d⁺ from the anchor, as hard as the
positive). All of it runs in float32 whatever the compute policy.

Which negative is pulled towards which anchor is the batch layout's business (`hdml_tf.layouts`, `synthesize`);
this module is the equation for aligned rows.
"""
from __future__ import annotations

import tensorflow as tf

from hdml_tf.losses import safe_norm


def pull_factor(j_avg: tf.Tensor, alpha: float) -> tf.Tensor:
    """e^(−α/J_avg): 1 keeps the negative where it is, 0 moves it to distance d⁺ (float32 scalar)."""
    return tf.exp(-alpha / tf.cast(j_avg, tf.float32))


def pull(anchor: tf.Tensor, negative: tf.Tensor, d_pos: tf.Tensor, factor: tf.Tensor):
    """Eq. 8 for aligned rows: anchor[k] pulls negative[k], given the anchor's positive distance d_pos[k].

    Args:
      anchor, negative: [..., E].
      d_pos: [...], d⁺ of each row.
      factor: float32 scalar pull factor, `pull_factor(J_avg, α)` in the paper (1: nothing moves, 0: the negative
        lands at distance d⁺).
    Returns:
      (pulled [..., E] float32, was_pulled [...] bool). Rows with d⁺ ≥ d⁻ keep the negative (already hard).
      Gradients are finite everywhere, also where d⁻ = 0.
    """
    anchor = tf.cast(anchor, tf.float32)
    negative = tf.cast(negative, tf.float32)
    d_pos = tf.cast(d_pos, tf.float32)
    direction = negative - anchor
    d_neg = safe_norm(direction)
    was_pulled = d_pos < d_neg
    # Divide only where the pull applies: elsewhere d⁻ may be 0 and its NaN would leak into gradients
    # through tf.where's unselected branch.
    safe_d_neg = tf.where(was_pulled, d_neg, tf.ones_like(d_neg))
    scale = (d_pos + (d_neg - d_pos) * tf.cast(factor, tf.float32)) / safe_d_neg
    pulled = anchor + scale[..., None] * direction
    return tf.where(was_pulled[..., None], pulled, negative), was_pulled
