"""Embedding a data set with a trained model, and evaluating an `ImageSet` end to end.

`embed_dataset` is the evaluation counterpart of `model.predict`: it walks a finite tf.data dataset of
`(images, labels)` batches (the pipeline contract of docs/ARCHITECTURE.md: images float32 [B, S, S, 3] RGB 0..255,
labels int32 [B]), calls the model on each batch and returns NumPy embeddings and labels. The official code did the
same in `lib/evaluation.py::Evaluation` with a tqdm bar and `tf.nn.l2_normalize`.
"""
from __future__ import annotations

import weakref
from typing import Callable, Dict, Iterable, Optional, Sequence, Tuple

import keras
import numpy as np
import tensorflow as tf

from hdml_tf.data.image_set import ImageSet
from hdml_tf.evaluation import metrics


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


def image_set_dataset(image_set: ImageSet, batch_size: int = 64, augment=None) -> tf.data.Dataset:
    """The evaluation dataset of an ImageSet: (float32 [B, S, S, 3] RGB 0..255, int32 [B]) batches, in order.

    Args:
      image_set: the split to embed.
      batch_size: rows per batch (the last may be smaller).
      augment: a `hdml_tf.data.images.Augment` -> the data pipeline's `make_eval_dataset` (resize, center crop;
        unreadable files dropped, so use the labels the dataset yields). None -> in-memory images exactly as they
        are (sets already at the model's input size, e.g. the toy sets), file paths with the official geometry
        `Augment()` (resize 256, center crop 227).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if augment is None and image_set.in_memory:
        ds = tf.data.Dataset.from_tensor_slices((image_set.images, image_set.labels.astype(np.int32)))
        return ds.batch(batch_size).map(lambda x, y: (tf.cast(x, tf.float32), y))
    from hdml_tf.data.images import Augment
    from hdml_tf.data.pipeline import make_eval_dataset

    return make_eval_dataset(image_set, batch_size, augment if augment is not None else Augment(), verbose=0)


def embed_image_set(model, image_set: ImageSet, *, make_dataset: Optional[Callable[[ImageSet], tf.data.Dataset]] = None,
                    batch_size: int = 64, augment=None, progress: bool = True) -> Tuple[np.ndarray, np.ndarray]:
    """`embed_dataset` over an ImageSet: `make_dataset(image_set)` if given, else `image_set_dataset`.

    Returns:
      (embeddings float32 [N, E], labels int64 [N]) in the ImageSet's order (minus unreadable files).
    """
    if make_dataset is not None:
        dataset = make_dataset(image_set)
    else:
        dataset = image_set_dataset(image_set, batch_size, augment)
    return embed_dataset(model, dataset, progress=progress)


def evaluate_image_set(model, image_set: ImageSet, *, recall_ks: Optional[Sequence[int]] = None,
                       make_dataset: Optional[Callable[[ImageSet], tf.data.Dataset]] = None,
                       batch_size: int = 64, augment=None, progress: bool = True, return_embeddings: bool = False,
                       **metric_options) -> Dict[str, float] | Tuple[Dict[str, float], np.ndarray, np.ndarray]:
    """Embeds an ImageSet and computes `metrics.evaluate` on it (what tools/evaluate.py needs).

    Args:
      model: a Keras model or callable returning embeddings [B, E].
      image_set: the test (or validation) split.
      recall_ks: Ks of Recall@K; None = `datasets.recall_ks(image_set.name, len(image_set))`.
      make_dataset: builds the evaluation tf.data dataset of (images, labels) from the ImageSet; None =
        `image_set_dataset(image_set, batch_size, augment)`.
      batch_size, augment: see `image_set_dataset`.
      progress: progress bar while embedding.
      return_embeddings: also return (embeddings, labels) for plots.
      **metric_options: passed to `metrics.evaluate` (clustering, with_map, kmeans, n_clusters, seed, n_init,
        chunk_size).
    Returns:
      The metrics dict, or (metrics, embeddings [N, E], labels [N]) with `return_embeddings`.
    """
    embeddings, labels = embed_image_set(model, image_set, make_dataset=make_dataset, batch_size=batch_size,
                                         augment=augment, progress=progress)
    if recall_ks is None:
        from hdml_tf.data import datasets
        recall_ks = datasets.recall_ks(image_set.name, len(labels))
    results = metrics.evaluate(embeddings, labels, recall_ks, **metric_options)
    return (results, embeddings, labels) if return_embeddings else results
