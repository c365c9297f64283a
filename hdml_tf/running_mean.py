"""Windowed running mean kept in model variables (official lib/nn_Ops.py `data_collector`).

HDML feeds the previous window's mean of J_m (J_avg, eq. 8) and of J_gen (eq. 15) into the current step. The
official collector starts at 1e6, skips NaN values, and replaces its mean by the mean of every 64 finite values.
Kept as non-trainable variables of a layer, the state is saved with the model's weights and checkpoints, and a
resumed run continues the window exactly.
"""
from __future__ import annotations

import keras
import tensorflow as tf


class WindowedMean(keras.layers.Layer):
    """State: `value` (the mean of the last complete window), `total` and `count` of the open window.

    Call `update(x)` once per step with a float32 scalar; read `value` before updating to get what the
    official code feeds into the step.
    """

    def __init__(self, window: int = 64, initial: float = 1e6, **kwargs):
        super().__init__(trainable=False, **kwargs)
        self.window = int(window)
        self.initial = float(initial)
        self.value = self.add_weight(shape=(), initializer=keras.initializers.Constant(self.initial),
                                     dtype="float32", trainable=False, name="value")
        self.total = self.add_weight(shape=(), initializer="zeros", dtype="float32", trainable=False,
                                     name="total")
        self.count = self.add_weight(shape=(), initializer="zeros", dtype="float32", trainable=False,
                                     name="count")
        self.built = True

    def update(self, x: tf.Tensor) -> None:
        """Adds a finite scalar to the open window; closes the window after `window` values. NaN/Inf are skipped."""
        x = tf.cast(x, tf.float32)
        finite = tf.math.is_finite(x)
        total = self.total + tf.where(finite, x, 0.0)
        count = self.count + tf.cast(finite, tf.float32)
        full = count >= self.window
        self.value.assign(tf.where(full, total / tf.maximum(count, 1.0), self.value))
        self.total.assign(tf.where(full, 0.0, total))
        self.count.assign(tf.where(full, 0.0, count))

    def get_config(self):
        return {**super().get_config(), "window": self.window, "initial": self.initial}
