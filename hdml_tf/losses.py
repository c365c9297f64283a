"""Metric losses J_m over batches laid out as tuples (vectorized, float32).

Each function takes the parts of a batch already split (which rows are anchors, positives, negatives is the
business of `hdml_tf.layouts`) and reproduces the official HDML code (lib/Loss_ops.py) value for value, and is written over whole
tensors (no Python loop over the batch). tensorflow-addons, which used to provide such losses, is end-of-life and
does not work with Keras 3, so they are written here.
"""
from __future__ import annotations

import tensorflow as tf


def safe_norm(x: tf.Tensor, axis: int = -1, eps: float = 1e-12) -> tf.Tensor:
    """Euclidean norm along `axis` whose gradient is finite (zero) at x = 0.

    Plain `sqrt(sum(x²))` has gradient x/‖x‖ = 0/0 = NaN at zero, which happens when a synthetic negative
    coincides with its anchor. Below `eps` (squared) the norm is reported as 0 with zero gradient; above it the
    value equals the plain norm exactly.

    Args:
      x: float tensor [..., E].
    Returns:
      float tensor [...] (the reduced axis removed).
    """
    squared = tf.reduce_sum(tf.square(x), axis=axis)
    ok = squared > eps
    return tf.where(ok, tf.sqrt(tf.where(ok, squared, tf.ones_like(squared))), tf.zeros_like(squared))


def npair_loss(anchors: tf.Tensor, candidates: tf.Tensor, anchor_labels: tf.Tensor,
               candidate_labels: tf.Tensor, l2_reg: float = 3e-3) -> tf.Tensor:
    """Multi-class N-pair loss (Sohn, NIPS 2016) with the official L2 penalty on the embeddings.

    Each anchor i is scored against candidates by the inner product; the softmax target is uniform over the
    candidates of the anchor's class (official `npairs_loss`, and `new_npair_loss(equal_shape=False)` when every
    anchor has its own candidate set, as for HDML's synthetic negatives).

    Args:
      anchors: [N, E].
      candidates: [N, E] shared by all anchors (plain N-pair: the positives), or [N, M, E] per anchor (HDML:
        anchor i against M synthetic points; row j of anchor i is candidate j).
      anchor_labels: int [N].
      candidate_labels: int [N] (shared) or [M] (per-anchor sets reuse one label list, as the official code tiles it).
      l2_reg: λ of the penalty 0.25·λ·(mean‖a‖² + mean‖c‖²).
    Returns:
      float32 scalar: mean softmax cross-entropy + L2 penalty.

    Hand-worked case: two orthogonal unit anchors each equal to its own positive (E=2, labels 0, 1), l2_reg=0:
    logits [[1, 0], [0, 1]] → loss = log(1 + e^-1) ≈ 0.3133.
    """
    anchors = tf.cast(anchors, tf.float32)
    candidates = tf.cast(candidates, tf.float32)
    if candidates.shape.rank == 2:
        logits = tf.matmul(anchors, candidates, transpose_b=True)  # [N, N]
    else:
        logits = tf.einsum("ne,nme->nm", anchors, candidates)  # [N, M]
    same = tf.cast(tf.equal(anchor_labels[:, None], candidate_labels[None, :]), tf.float32)
    targets = same / tf.reduce_sum(same, axis=1, keepdims=True)
    xent = tf.reduce_mean(tf.nn.softmax_cross_entropy_with_logits(labels=targets, logits=logits))
    flat = tf.reshape(candidates, [-1, tf.shape(candidates)[-1]])
    penalty = 0.25 * l2_reg * (tf.reduce_mean(tf.reduce_sum(tf.square(anchors), 1))
                               + tf.reduce_mean(tf.reduce_sum(tf.square(flat), 1)))
    return xent + penalty


def triplet_loss(anchors: tf.Tensor, positives: tf.Tensor, negatives: tf.Tensor,
                 margin: float = 1.0) -> tf.Tensor:
    """Triplet loss on squared Euclidean distances, SUMMED over triplets (official `triplet_loss`).

    Args:
      anchors, positives, negatives: [T, E].
    Returns:
      float32 scalar Σ_t max(‖a−p‖² − ‖a−n‖² + margin, 0).

    Hand-worked case: a=(0,0), p=(1,0), n=(0,1), margin 1 → 1 − 1 + 1 = 1.
    """
    anchors, positives, negatives = (tf.cast(t, tf.float32) for t in (anchors, positives, negatives))
    d_ap = tf.reduce_sum(tf.square(anchors - positives), axis=1)
    d_an = tf.reduce_sum(tf.square(anchors - negatives), axis=1)
    return tf.reduce_sum(tf.maximum(d_ap - d_an + margin, 0.0))


def contrastive_loss(pos_left: tf.Tensor, pos_right: tf.Tensor, neg_left: tf.Tensor, neg_right: tf.Tensor,
                     margin: float = 1.0) -> tf.Tensor:
    """Contrastive loss on squared distances, as the official `contrastive_loss_v2`.

    Args:
      pos_left, pos_right: [P, E], row i of each forms a positive pair.
      neg_left, neg_right: [P, E], row i of each forms a negative pair.
    Returns:
      float32 scalar mean_i(‖p_i−p'_i‖² + max(0, margin − ‖n_i−n'_i‖²)) / 4 (the official code's /4).
    """
    pos_left, pos_right, neg_left, neg_right = (tf.cast(t, tf.float32)
                                                for t in (pos_left, pos_right, neg_left, neg_right))
    pos = tf.reduce_sum(tf.square(pos_left - pos_right), axis=1)
    neg = tf.nn.relu(margin - tf.reduce_sum(tf.square(neg_left - neg_right), axis=1))
    return tf.reduce_mean(pos + neg) / 4.0


def reconstruction_loss(reconstructed: tf.Tensor, features: tf.Tensor, gen_lambda: float = 0.5) -> tf.Tensor:
    """J_recon = (1 − λ)·Σ (ỹ − y)², a SUM over rows and features as in main_npair.py (not a mean).

    Args:
      reconstructed: ỹ [B, D], the generator's output for the original embeddings z.
      features: y [B, D], the backbone features.
    """
    diff = tf.cast(reconstructed, tf.float32) - tf.cast(features, tf.float32)
    return (1.0 - gen_lambda) * tf.reduce_sum(tf.square(diff))


def mean_cross_entropy(labels: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
    """Mean softmax cross-entropy of int labels [M] against logits [M, C] (float32 scalar)."""
    return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=tf.cast(labels, tf.int32), logits=tf.cast(logits, tf.float32)))


def label_preserving_softmax(cross_entropy: tf.Tensor, softmax_factor: float = 1e4,
                             gen_lambda: float = 0.5) -> tf.Tensor:
    """J_soft = softmax_factor·λ·CE (paper eq. 13; the official genSoftmax carries the factor 1e4).

    Args:
      cross_entropy: the classifier's cross-entropy on the synthetic features against their source classes, as the
        batch layout averages it (`Layout.softmax_loss`: for N-pair the anchors' and the pulled points' means added).
    Returns:
      float32 scalar.
    """
    return softmax_factor * gen_lambda * tf.cast(cross_entropy, tf.float32)
