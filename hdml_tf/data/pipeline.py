"""tf.data pipelines: class-balanced tuple batches for training, ordered batches for evaluation.

Both deliver `(images, labels)`: images float32 [B, S, S, 3], RGB, 0..255, NOT normalized (the backbone normalizes),
labels int32 [B] (the ImageSet's 0..C-1 labels). Training batches follow the loss's tuple layout (`hdml_tf.layouts`),
sampled by `hdml_tf.data.sampler` (batch k is a pure function of (seed, k)), read from `hdml_tf.data.sources`
(on the fly or cached), then cropped and flipped as the official data provider does (`hdml_tf.data.images`).
Evaluation batches take every image once, in order, with the center crop.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import tensorflow as tf

from hdml_tf.data import images as img
from hdml_tf.data.image_set import ImageSet
from hdml_tf.data.images import Augment
from hdml_tf.data.sampler import TupleSampler, layout_for, uniform_int
from hdml_tf.data.sources import CacheSpec, image_source
from hdml_tf.errors import ConfigError

AUTOTUNE = tf.data.AUTOTUNE


def default_steps_per_epoch(image_set: ImageSet, batch_size: int) -> int:
    """Epoch length used by the tools: as many batches as show each image once on average, len // B (>= 1)."""
    return max(1, len(image_set) // int(batch_size))


def _options() -> tf.data.Options:
    options = tf.data.Options()
    options.deterministic = True
    return options


def make_train_dataset(image_set: ImageSet, loss: str, batch_size: int, augment: Augment = Augment(),
                       seed: int = 0, cache: CacheSpec = None, steps_per_epoch: Optional[int] = None, *,
                       start_step: int = 0, check_images: bool = True, strict_images: bool = False,
                       verbose: int = 1) -> tf.data.Dataset:
    """Class-balanced tuple batches with the official training augmentation.

    Args:
      image_set: training split (in memory or paths).
      loss: "npair", "triplet" or "contrastive"; fixes the batch layout (module docstring).
      batch_size: B; a multiple of 2 (npair), 3 (triplet) or 4 (contrastive), with >= 2 tuples.
      augment: resize to a square, random crop, random flip (Augment()).
      seed: batch k is a pure function of (seed, k).
      cache: None, "memory" or a directory path (module docstring).
      steps_per_epoch: None gives an endless stream of batches start_step, start_step+1, ... (use
        `model.fit(..., steps_per_epoch=S)`, which keeps one iterator across epochs); an int S gives exactly the
        S batches start_step .. start_step+S-1 (one epoch; re-iterating it repeats the same batches).
      start_step: index of the first batch; a run resumed at global step k passes start_step=k.
      check_images: pre-scan path-based sets without a cache and drop unreadable files (caches always do).
      strict_images: an unreadable file raises DataError instead.
      verbose: 1 shows progress bars for scans and cache filling.

    Returns:
      tf.data.Dataset of (images float32 [B, S, S, 3] RGB 0..255, labels int32 [B]), S = augment.crop.

    Raises:
      ConfigError: batch size / loss / steps do not fit.
      DataError: too few classes, unreadable images with strict_images, unwritable cache directory.
    """
    if start_step < 0 or (steps_per_epoch is not None and steps_per_epoch <= 0):
        raise ConfigError(f"start_step={start_step} must be >= 0 and steps_per_epoch={steps_per_epoch} > 0")
    layout_for(loss, batch_size)
    source = image_source(image_set, augment, cache, check_images, strict_images, verbose)
    sampler = TupleSampler(source.image_set.labels, loss, batch_size, seed, name=source.image_set.name)
    labels = tf.constant(source.image_set.labels, tf.int32)
    span = augment.resize - augment.crop + 1

    def plan(step):
        """Batch `step` -> per row (index, label, offset_y, offset_x, flip), each [B]."""
        index = sampler.indices(step)
        seeds = tf.random.experimental.stateless_split(
            tf.random.experimental.stateless_fold_in(sampler.step_seed(step), 7), 3)
        offset_y = uniform_int([batch_size], span, seeds[0])
        offset_x = uniform_int([batch_size], span, seeds[1])
        flip = tf.equal(uniform_int([batch_size], 2, seeds[2]), 1)
        if not augment.flip:
            flip = tf.zeros_like(flip)
        return index, tf.gather(labels, index), offset_y, offset_x, flip

    def augment_batch(images, labels_, offset_y, offset_x, flip):
        return img.crop_flip_batch(images, offset_y, offset_x, flip, augment.crop), labels_

    steps = (tf.data.Dataset.counter(start_step) if steps_per_epoch is None
             else tf.data.Dataset.range(start_step, start_step + steps_per_epoch))
    ds = (source.batches(steps.map(plan), batch_size, drop_remainder=True)
          .map(augment_batch, num_parallel_calls=AUTOTUNE, deterministic=True))
    if steps_per_epoch is not None:
        ds = ds.apply(tf.data.experimental.assert_cardinality(steps_per_epoch))
    return ds.prefetch(AUTOTUNE).with_options(_options())


def make_eval_dataset(image_set: ImageSet, batch_size: int, augment: Augment = Augment(), *,
                      cache: CacheSpec = None, check_images: bool = True, strict_images: bool = False,
                      verbose: int = 1) -> tf.data.Dataset:
    """Every image once, in order: resize to a square, center crop.

    Unreadable files are dropped (logged) unless strict_images, so the labels this dataset yields are the ones
    to score against; they match image_set.labels when every file is readable.

    Args:
      image_set: evaluation split (in memory or paths).
      batch_size: rows per batch; the last batch may be smaller.
      augment: only resize and crop are used.
      cache, check_images, strict_images, verbose: as in make_train_dataset.

    Returns:
      tf.data.Dataset of (images float32 [b, S, S, 3] RGB 0..255, labels int32 [b]), b <= batch_size.
    """
    if batch_size <= 0:
        raise ConfigError(f"batch_size={batch_size} must be > 0")
    source = image_source(image_set, augment, cache, check_images, strict_images, verbose)
    labels = tf.constant(source.image_set.labels, tf.int32)
    rows = tf.data.Dataset.range(len(source.image_set)).batch(batch_size)
    ds = (source.batches(rows.map(lambda index: (index, tf.gather(labels, index))), batch_size,
                         drop_remainder=False)
          .map(lambda images, labels_: (img.center_crop_batch(images, augment), labels_),
               num_parallel_calls=AUTOTUNE, deterministic=True))
    return ds.prefetch(AUTOTUNE).with_options(_options())


def eval_labels(image_set: ImageSet, *, verbose: int = 0) -> np.ndarray:
    """Labels int64 [N'] that `make_eval_dataset` yields for `image_set` (N' = readable images), in order.

    Uses the pre-scan (remembered within the process), so call it after building the dataset to pay nothing.
    """
    return img.drop_bad_images(image_set, verbose=verbose)[0].labels
