"""The layers with weights around the backbone: metric head, generator and softmax classifier.

Official code (main_npair.py): the metric head is `BN1` (batch normalization) then `fc1` (1024 → embedding);
the generator is `generator1` (embedding → 512, ReLU, BatchNorm) then `generator2` (512 → 1024); the classifier
is one dense softmax layer over the backbone feature y. Initializers follow the official ones (Glorot uniform
kernels, zero biases); BatchNormalization keeps Keras' momentum 0.99 / epsilon 1e-3, the defaults of the TF1
`tf.layers.batch_normalization` the official code used.
"""
from __future__ import annotations

import keras


def metric_head(embedding_size: int, feature_dim: int, name: str = "metric_head") -> keras.Sequential:
    """y [B, D] → z [B, E]: BatchNorm then Dense, shared by real and synthetic features (paper Fig. 2)."""
    return keras.Sequential([
        keras.Input((feature_dim,)),
        keras.layers.BatchNormalization(name="BN1"),
        keras.layers.Dense(embedding_size, kernel_initializer="glorot_uniform", name="fc1"),
    ], name=name)


def generator(embedding_size: int, feature_dim: int = 1024, hidden: int = 512,
              name: str = "generator") -> keras.Sequential:
    """z [B, E] → ỹ [B, D]: the hardness-and-label-preserving generator (paper Sec. 3.3)."""
    return keras.Sequential([
        keras.Input((embedding_size,)),
        keras.layers.Dense(hidden, activation="relu", kernel_initializer="glorot_uniform", name="generator1"),
        keras.layers.BatchNormalization(name="generator1BN"),
        keras.layers.Dense(feature_dim, kernel_initializer="glorot_uniform", name="generator2"),
    ], name=name)


def classifier(num_classes: int, feature_dim: int, name: str = "softmax_classifier") -> keras.Sequential:
    """y [B, D] → logits [B, C] over the training classes (J_ce on real features; J_soft on generated ones)."""
    return keras.Sequential([
        keras.Input((feature_dim,)),
        keras.layers.Dense(num_classes, kernel_initializer="glorot_uniform", name="softmax"),
    ], name=name)
