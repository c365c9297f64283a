"""J_m against the official code's values (tests/data/official_vectors.npz) and hand-worked cases."""
import numpy as np
import pytest
import tensorflow as tf

from hdml_tf import layouts, losses


def _np_npair(anchors, positives, labels, reg):
    """NumPy transcription of the official npairs_loss, written with an explicit loop over anchors."""
    total = 0.0
    for i in range(len(anchors)):
        logits = anchors[i] @ positives.T
        target = (labels == labels[i]).astype(float)
        target /= target.sum()
        logp = logits - np.log(np.exp(logits - logits.max()).sum()) - logits.max()
        total += -(target * logp).sum()
    l2 = 0.25 * reg * ((anchors ** 2).sum(1).mean() + (positives ** 2).sum(1).mean())
    return total / len(anchors) + l2


def test_npair_matches_official(official):
    z, labels = official["npair/z"], official["npair/labels"]
    got = layouts.NPair(l2_reg=3e-3).metric_loss(tf.constant(z, tf.float32), tf.constant(labels))
    np.testing.assert_allclose(got.numpy(), official["npair/j_m"], rtol=1e-5)
    np.testing.assert_allclose(got.numpy(), _np_npair(z[:4], z[4:], labels[4:], 3e-3), rtol=1e-5)


def test_npair_per_anchor_candidates_match_official_new_npair_loss(official):
    pulled, labels = official["npair/pulled_javg_30"], official["npair/labels"]
    anchors = tf.constant(pulled[:4], tf.float32)
    candidates = tf.reshape(tf.constant(pulled[4:], tf.float32), [4, 4, -1])
    got = losses.npair_loss(anchors, candidates, tf.constant(labels[:4]), tf.constant(labels[4:]), 3e-3)
    np.testing.assert_allclose(got.numpy(), official["npair/j_syn_core"], rtol=1e-5)


def test_npair_hand_worked():
    a = tf.constant([[1.0, 0.0], [0.0, 1.0]])
    got = losses.npair_loss(a, a, tf.constant([0, 1]), tf.constant([0, 1]), l2_reg=0.0)
    np.testing.assert_allclose(got.numpy(), np.log(1 + np.exp(-1.0)), rtol=1e-6)


def test_triplet_matches_official_and_hand_worked(official):
    z = official["triplet/z"]
    got = layouts.get("triplet").metric_loss(tf.constant(z, tf.float32), tf.zeros(15, tf.int32))
    np.testing.assert_allclose(got.numpy(), official["triplet/j_m"], rtol=1e-5)
    hand = losses.triplet_loss(tf.constant([[0.0, 0.0]]), tf.constant([[1.0, 0.0]]), tf.constant([[0.0, 1.0]]))
    assert hand.numpy() == pytest.approx(1.0)
    # Easy triplet (negative far away) contributes nothing: the loss is a sum of hinges.
    easy = losses.triplet_loss(tf.constant([[0.0, 0.0]]), tf.constant([[0.1, 0.0]]), tf.constant([[5.0, 0.0]]))
    assert easy.numpy() == 0.0


def test_contrastive_matches_official(official):
    z = official["contrastive/z"]
    got = layouts.get("contrastive").metric_loss(tf.constant(z, tf.float32), tf.zeros(20, tf.int32))
    np.testing.assert_allclose(got.numpy(), official["contrastive/j_m"], rtol=1e-5)
    p1, p2, n1, n2 = np.split(z, 4)
    ref = np.mean(((p1 - p2) ** 2).sum(1) + np.maximum(0, 1 - ((n1 - n2) ** 2).sum(1))) / 4
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-5)


def test_safe_norm_value_and_zero_gradient():
    x = tf.Variable([[3.0, 4.0], [0.0, 0.0]])
    with tf.GradientTape() as tape:
        n = losses.safe_norm(x)
        total = tf.reduce_sum(n)
    g = tape.gradient(total, x)
    np.testing.assert_allclose(n.numpy(), [5.0, 0.0])
    np.testing.assert_allclose(g.numpy(), [[0.6, 0.8], [0.0, 0.0]], rtol=1e-6)


def test_unknown_loss_is_one_clear_error():
    with pytest.raises(ValueError, match="unknown; expected one of npair, triplet, contrastive"):
        layouts.get("arcface")
