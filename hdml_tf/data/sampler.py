"""Class-balanced tuple sampling: which rows of a data set form training batch k.

The batch's arrangement is its layout's (`hdml_tf.layouts`: N-pair anchors then positives; triplet anchors,
positives and negatives of 2T distinct classes, as the official TripletLossScheme; contrastive positive then negative
pairs). `TupleSampler` provides the class-balanced primitives a layout draws from: classes uniform, then images
uniform within a class.

Sampling is stateless: batch k of the stream is a pure function of (seed, k) -- `tf.random.stateless_*` keyed on
[seed, k] -- so a run resumed at step k continues exactly where it stopped, whatever the cache or the number of
parallel calls (stateless ops are reproducible for a given TensorFlow version, not across versions). Classes with a
single image cannot give a positive and are left out of anchor sampling (logged); they still serve as negatives.
"""
from __future__ import annotations

import logging

import numpy as np
import tensorflow as tf

from hdml_tf import layouts
from hdml_tf.errors import DataError

log = logging.getLogger(__name__)


class TupleSampler(layouts.ClassDraws):
    """Stateless class-balanced index schedule: `indices(step)` is a pure function of (seed, step).

    The batch's arrangement is the layout's (`Layout.sample`); this class provides the class-balanced primitives it
    draws from (`hdml_tf.layouts.ClassDraws`): classes uniform, then images uniform within a class.

    Args:
      labels: int [N], labels of the rows that may be sampled.
      loss: the batch layout: a `hdml_tf.layouts` name ("npair", "triplet", "contrastive") or a Layout.
      batch_size: B, a whole number (>= 2) of the layout's tuples.
      seed: int seed of the schedule.
      name: for messages.

    Raises:
      ConfigError: unknown loss or a batch size that does not fit the layout.
      DataError: too few classes with two or more images for the requested number of tuples, or (triplet) fewer
        than 2T classes in all.
    """

    def __init__(self, labels: np.ndarray, loss, batch_size: int, seed: int, name: str = ""):
        self.layout = layout_for(loss, batch_size)
        labels = np.asarray(labels, np.int64)
        self.loss, self.batch_size, self.seed = self.layout.name, int(batch_size), int(seed)
        self.tuples = self.layout.tuples(batch_size)
        present, counts = np.unique(labels, return_counts=True)
        order = np.argsort(labels, kind="stable")
        offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
        eligible = np.flatnonzero(counts >= 2)
        where = f"{name}: " if name else ""
        singles = int((counts == 1).sum())
        if singles:
            log.warning("%s%d of %d classes have a single image and are left out of anchor sampling",
                        where, singles, len(present))
        need_eligible, need_present = self.layout.min_classes(self.tuples)
        if len(eligible) < need_eligible or len(present) < need_present:
            fits = [n for n in range(self.tuples, 1, -1)
                    if self.layout.min_classes(n)[0] <= len(eligible) and self.layout.min_classes(n)[1] <= len(present)]
            hint = f"use batch_size <= {fits[0] * self.layout.size}" if fits else "this split is too small"
            if len(eligible) < need_eligible:
                raise DataError(f"{where}batch_size={batch_size} ({self.loss}) needs {need_eligible} distinct classes "
                                f"with >= 2 images, but only {len(eligible)} have; {hint}")
            raise DataError(f"{where}batch_size={batch_size} ({self.loss}) needs {need_present} distinct classes, "
                            f"but only {len(present)} have images; {hint}")
        self.num_eligible = len(eligible)
        self._order = tf.constant(order, tf.int64)
        self._offsets = tf.constant(offsets, tf.int64)
        self._counts = tf.constant(counts, tf.int64)
        self._eligible = tf.constant(eligible, tf.int64)
        self._num_present = tf.constant(len(present), tf.int64)

    def step_seed(self, step: tf.Tensor) -> tf.Tensor:
        """int64 [2] seed of batch `step`: [seed, step]."""
        return tf.stack([tf.constant(self.seed, tf.int64), tf.cast(step, tf.int64)])

    def indices(self, step: tf.Tensor) -> tf.Tensor:
        """Rows of batch `step` in the loss's tuple layout: int64 [B] (graph ops only)."""
        return self.layout.sample(self, self.tuples, self.step_seed(step))

    # ------------------------------------------------------------------------------ layouts.ClassDraws
    def distinct_classes(self, n, seed):
        # n distinct anchor classes: the first n of a random permutation of the eligible classes.
        keys = tf.random.stateless_uniform(tf.shape(self._eligible), seed)
        return tf.gather(self._eligible, tf.argsort(keys)[:n])

    def two_rows(self, classes, seed):
        count = tf.gather(self._counts, classes)
        draws = tf.random.stateless_uniform([2, tf.size(classes)], seed, minval=None, maxval=None, dtype=tf.int64)
        a = tf.math.floormod(draws[0], count)
        b = tf.math.floormod(a + 1 + tf.math.floormod(draws[1], count - 1), count)  # any row but a
        base = tf.gather(self._offsets, classes)
        return tf.gather(self._order, base + a), tf.gather(self._order, base + b)

    def one_row(self, classes, seed):
        count = tf.gather(self._counts, classes)
        pick = uniform_int(tf.shape(classes), count, seed)
        return tf.gather(self._order, tf.gather(self._offsets, classes) + pick)

    def other_classes(self, classes, seed):
        shift = 1 + uniform_int(tf.shape(classes), self._num_present - 1, seed)
        return tf.math.floormod(classes + shift, self._num_present)

    def distinct_others(self, taken, seed):
        # Uniform keys, the taken classes' keys raised above every other so they sort last (official
        # TripletLossScheme: the second half of 2T distinct classes).
        keys = tf.random.stateless_uniform(tf.reshape(self._num_present, [1]), seed)  # [C] in [0, 1)
        keys = tf.tensor_scatter_nd_update(keys, taken[:, None], tf.fill(tf.shape(taken), 2.0))
        return tf.cast(tf.argsort(keys)[: tf.size(taken)], tf.int64)

    def any_classes(self, n, seed):
        return uniform_int([n], self._num_present, seed)


def example_labels(loss, batch_size: int, num_classes: int, seed: int = 0, step: int = 0) -> np.ndarray:
    """Labels int32 [B] of a well-formed batch in the layout of `loss`, as the sampler draws batch `step` from
    `num_classes` classes of two images each (for tests and benchmarks that feed random images).

    Raises:
      ConfigError / DataError: as TupleSampler (e.g. fewer classes than the batch's tuples).
    """
    pool = np.repeat(np.arange(num_classes), 2)
    rows = TupleSampler(pool, loss, batch_size, seed).indices(tf.constant(step, tf.int64))
    return pool[rows.numpy()].astype(np.int32)


def layout_for(loss, batch_size: int) -> layouts.Layout:
    """The Layout of `loss` (a name or a Layout); ConfigError (one line) for an unknown loss or a batch size that
    does not fit it."""
    layout = loss if isinstance(loss, layouts.Layout) else layouts.get(loss)
    layout.check_batch_size(batch_size)
    return layout


def uniform_int(shape, upper, seed):
    """Stateless integers in 0..upper-1 (upper broadcast to `shape`), bias <= upper / 2**63."""
    draws = tf.random.stateless_uniform(shape, seed, minval=None, maxval=None, dtype=tf.int64)
    return tf.math.floormod(draws, upper)
