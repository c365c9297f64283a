"""Embedding a data set with a trained model.

`embed_dataset` is the evaluation counterpart of `model.predict`: it walks a finite tf.data dataset of
`(images, labels)` batches (the pipeline contract of docs/ARCHITECTURE.md: images float32 [B, S, S, 3] RGB 0..255,
labels int32 [B]), calls the model on each batch and returns NumPy embeddings and labels. The official code did the
same in `lib/evaluation.py::Evaluation` with a tqdm bar and `tf.nn.l2_normalize`.
"""
from __future__ import annotations

import weakref
from typing import Callable, Iterable, Tuple

import keras
import numpy as np
import tensorflow as tf



_CALLS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _batch_call(model) -> Callable:
    """A batched inference function: a traced `model(x, training=False)` for Keras models (cached per model, so
    periodic evaluation does not retrace), else `model` itself."""
    if not isinstance(model, keras.Model):
        return model
    call = _CALLS.get(model)
    if call is None:
        ref = weakref.ref(model)  # the cache must not keep the model alive

        @tf.function(reduce_retracing=True)
        def call(images):
            return ref()(images, training=False)
        _CALLS[model] = call
    return call


def _l2_normalize(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def embed_dataset(model, dataset: Iterable, progress: bool = True) -> Tuple[np.ndarray, np.ndarray]:
    """Embeddings of every image of a finite dataset.

    Args:
      model: a Keras model (called as `model(images, training=False)` inside a tf.function) or any callable
        mapping images [B, ...] to embeddings [B, E].
      dataset: a finite tf.data.Dataset (or any iterable) of `(images, labels)` batches; labels int [B].
      progress: show a `keras.utils.Progbar` (target = the number of batches when tf.data knows it).
    Returns:
      embeddings: float32 [N, E], L2-normalized (defensively; a no-op for HDMLModel, whose output is normalized).
      labels: int64 [N].
    Raises:
      ValueError: an element is not a pair, an infinite dataset, batch sizes of images and labels differ, or the
        model does not return [B, E].
    """
    if isinstance(dataset, tf.data.Dataset) and int(dataset.cardinality()) == int(tf.data.INFINITE_CARDINALITY):
        raise ValueError("embed_dataset needs a finite dataset (do not .repeat() the evaluation data)")
    target = None
    if isinstance(dataset, tf.data.Dataset) and int(dataset.cardinality()) >= 0:
        target = int(dataset.cardinality())
    bar = keras.utils.Progbar(target, unit_name="batch") if progress else None
    call = _batch_call(model)
    embeddings, labels = [], []
    for step, element in enumerate(dataset):
        if not isinstance(element, (tuple, list)) or len(element) != 2:
            size = len(element) if hasattr(element, "__len__") else "?"
            raise ValueError("the evaluation dataset must yield (images, labels) pairs, got "
                             f"{type(element).__name__} of length {size}")
        images, batch_labels = element
        out = np.asarray(call(images), dtype=np.float32)
        batch_labels = np.asarray(batch_labels).reshape(-1)
        if out.ndim != 2:
            raise ValueError(f"the model must return embeddings [B, E], got shape {out.shape}")
        if len(out) != len(batch_labels):
            raise ValueError(f"batch {step}: the model returned {len(out)} embeddings for {len(batch_labels)} labels")
        embeddings.append(out)
        labels.append(batch_labels.astype(np.int64))
        if bar is not None:
            bar.update(step + 1)
    if not embeddings:
        raise ValueError("the evaluation dataset is empty")
    return _l2_normalize(np.concatenate(embeddings)), np.concatenate(labels)
