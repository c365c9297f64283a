"""Hardness-aware augmentation (paper Sec. 3.2, eq. 8; official lib/HDML.py `Pulling`).

Each negative z⁻ is moved along the segment towards its anchor z:

    ẑ⁻ = z + (d⁺ + (d⁻ − d⁺)·e^(−α/J_avg)) / d⁻ · (z⁻ − z)      if d⁺ < d⁻,   ẑ⁻ = z⁻ otherwise,

with d⁺ = ‖z − z⁺‖ and d⁻ = ‖z − z⁻‖. The pull factor e^(−α/J_avg) → 1 while the running loss J_avg is large
(nothing moves) and → 0 as training converges (the negative lands at distance d⁺ from the anchor, as hard as the
positive). All of it runs in float32 whatever the compute policy.
"""
from __future__ import annotations

import tensorflow as tf

from hdml_tf.losses import safe_norm, split_tuples


def pull_factor(j_avg: tf.Tensor, alpha: float) -> tf.Tensor:
    """e^(−α/J_avg): 1 keeps the negative where it is, 0 moves it to distance d⁺ (float32 scalar)."""
    return tf.exp(-alpha / tf.cast(j_avg, tf.float32))


def pull(anchor: tf.Tensor, negative: tf.Tensor, d_pos: tf.Tensor, j_avg: tf.Tensor, alpha: float):
    """Eq. 8 for aligned rows: anchor[k] pulls negative[k], given the anchor's positive distance d_pos[k].

    Args:
      anchor, negative: [..., E].
      d_pos: [...], d⁺ of each row.
      j_avg: scalar running mean of J_m.
      alpha: α.
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
    scale = (d_pos + (d_neg - d_pos) * pull_factor(j_avg, alpha)) / safe_d_neg
    pulled = anchor + scale[..., None] * direction
    return tf.where(was_pulled[..., None], pulled, negative), was_pulled


def augment(embeddings: tf.Tensor, loss: str, j_avg: tf.Tensor, alpha: float):
    """Synthetic hardness-aware tuples ẑ for a batch laid out as `loss` expects.

    Args:
      embeddings: [B, E] in the tuple layout (see docs/ARCHITECTURE.md).
      loss: "npair", "triplet" or "contrastive".
      j_avg: scalar running mean of J_m.
      alpha: α.
    Returns:
      (z_hat, was_pulled):
      - npair: z_hat [N + N·N, E] = the N anchors, then for anchor i and every class j the positive of class j
        pulled towards anchor i at row N + i·N + j (the official code tiles them the same way; j = i keeps the
        positive itself, since d⁺ = d⁻). was_pulled [N, N].
      - triplet: z_hat [3T, E] = anchors, positives, pulled negatives; was_pulled [T].
      - contrastive: z_hat [4P, E] = positive pairs unchanged, then negative pair i's right side pulled towards
        its left side with d⁺ taken from positive pair i (the official code defines no contrastive pulling;
        this pairing is ours). was_pulled [P].
    """
    embeddings = tf.cast(embeddings, tf.float32)
    if loss == "npair":
        anchors, positives = split_tuples(embeddings, loss)
        d_pos = safe_norm(anchors - positives)  # [N]
        n = tf.shape(anchors)[0]
        anchor_grid = tf.repeat(anchors[:, None, :], n, axis=1)  # [N, N, E]: anchor i on row i
        negative_grid = tf.repeat(positives[None, :, :], n, axis=0)  # [N, N, E]: class j in column j
        d_pos_grid = tf.repeat(d_pos[:, None], n, axis=1)  # [N, N]
        pulled, was_pulled = pull(anchor_grid, negative_grid, d_pos_grid, j_avg, alpha)
        z_hat = tf.concat([anchors, tf.reshape(pulled, [-1, tf.shape(embeddings)[1]])], axis=0)
        return z_hat, was_pulled
    if loss == "triplet":
        anchors, positives, negatives = split_tuples(embeddings, loss)
        pulled, was_pulled = pull(anchors, negatives, safe_norm(anchors - positives), j_avg, alpha)
        return tf.concat([anchors, positives, pulled], axis=0), was_pulled
    if loss == "contrastive":
        pos_left, pos_right, neg_left, neg_right = split_tuples(embeddings, loss)
        pulled, was_pulled = pull(neg_left, neg_right, safe_norm(pos_left - pos_right), j_avg, alpha)
        return tf.concat([pos_left, pos_right, neg_left, pulled], axis=0), was_pulled
    raise ValueError(f"loss={loss!r} has no hardness-aware augmentation; expected npair, triplet or contrastive")


def synthetic_labels(labels: tf.Tensor, loss: str) -> tf.Tensor:
    """Labels of the rows of `augment`'s z_hat: every synthetic point keeps its source's class.

    npair: [N + N·N] = anchor labels, then positive label j at row N + i·N + j; triplet / contrastive: unchanged.
    """
    if loss == "npair":
        anchor_labels, positive_labels = split_tuples(labels, loss)
        n = tf.shape(positive_labels)[0]
        return tf.concat([anchor_labels, tf.tile(positive_labels, [n])], axis=0)
    return labels
