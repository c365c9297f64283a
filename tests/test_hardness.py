"""Hardness-aware augmentation (eq. 8) against the official `Pulling` values and a NumPy transcription."""
import numpy as np
import pytest
import tensorflow as tf

from hdml_tf import hardness, layouts
from hdml_tf.running_mean import WindowedMean


def _np_pull(anchor, positive, negative, j_avg, alpha=90.0):
    """The paper's equation for one (anchor, positive, negative), in float64."""
    d_pos = np.linalg.norm(anchor - positive)
    d_neg = np.linalg.norm(anchor - negative)
    if d_pos >= d_neg:
        return negative
    return anchor + (d_pos + (d_neg - d_pos) * np.exp(-alpha / j_avg)) / d_neg * (negative - anchor)


def _synthesize(loss, z, j_avg, alpha=90.0):
    """The layout's synthetic tuples with the official pull factor e^(−α/J_avg)."""
    return layouts.get(loss).synthesize(tf.convert_to_tensor(z, tf.float32), hardness.pull_factor(j_avg, alpha))


@pytest.mark.parametrize("j_avg", ["1e6", "30", "1"])
def test_npair_pull_matches_official(official, j_avg):
    z = official["npair/z"]
    got, _ = _synthesize("npair", z, float(j_avg))
    np.testing.assert_allclose(got.numpy(), official[f"npair/pulled_javg_{j_avg}"], rtol=1e-5, atol=1e-6)
    anchors, positives = z[:4], z[4:]
    for i in range(4):
        for j in range(4):
            ref = _np_pull(anchors[i], positives[i], positives[j], float(j_avg))
            np.testing.assert_allclose(got.numpy()[4 + 4 * i + j], ref, rtol=1e-5, atol=1e-6)


def test_triplet_pull_matches_official(official):
    z = official["triplet/z"]
    got, _ = _synthesize("triplet", z, 30.0)
    np.testing.assert_allclose(got.numpy(), official["triplet/pulled_javg_30"], rtol=1e-5, atol=1e-6)


def test_special_cases():
    anchor = np.array([[0.0, 0.0]])
    positive = np.array([[1.0, 0.0]])
    far = np.array([[0.0, 4.0]])
    near = np.array([[0.0, 0.5]])
    # d+ >= d-: the negative is already hard and is kept as it is.
    kept, was = hardness.pull(anchor, near, np.array([1.0]), hardness.pull_factor(1.0, 90.0))
    np.testing.assert_array_equal(kept.numpy(), near)
    assert not was.numpy()[0]
    # J_avg = 1e6 (the initial value): e^(-90/1e6) ~ 1, nothing measurable moves.
    same, _ = hardness.pull(anchor, far, np.array([1.0]), hardness.pull_factor(1e6, 90.0))
    np.testing.assert_allclose(same.numpy(), far, atol=1e-3)
    # A tiny J_avg pulls the negative to distance d+ from the anchor, along the same direction.
    hard, was = hardness.pull(anchor, far, np.linalg.norm(anchor - positive, axis=1),
                              hardness.pull_factor(1e-3, 90.0))
    np.testing.assert_allclose(hard.numpy(), [[0.0, 1.0]], atol=1e-6)
    assert was.numpy()[0]


def test_zero_distances_give_finite_gradients():
    z = tf.Variable(tf.zeros([6, 3]))  # N-pair with every point equal: d+ = d- = 0
    with tf.GradientTape() as tape:
        out, _ = _synthesize("npair", z, 5.0)
        total = tf.reduce_sum(out)
    grad = tape.gradient(total, z)
    assert np.isfinite(grad.numpy()).all()
    zt = tf.Variable(np.array([[0, 0], [1, 0], [0, 0]], np.float32))  # triplet with the negative on the anchor
    with tf.GradientTape() as tape:
        out, _ = _synthesize("triplet", zt, 5.0)
        total = tf.reduce_sum(out)
    assert np.isfinite(tape.gradient(total, zt).numpy()).all()


def test_synthetic_labels_npair_layout():
    labels = tf.constant([7, 8, 9, 7, 8, 9])
    np.testing.assert_array_equal(layouts.get("npair").synthetic_labels(labels).numpy(),
                                  [7, 8, 9, 7, 8, 9, 7, 8, 9, 7, 8, 9])


def test_windowed_mean_matches_official_collector(official):
    values, means = official["window/values"], official["window/means"]
    w = WindowedMean(window=64, initial=1e6)
    got = []
    for v in values:
        w.update(tf.constant(v, tf.float32))
        got.append(float(w.value.numpy()))
    np.testing.assert_allclose(got, means, rtol=1e-5)
