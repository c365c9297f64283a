"""tf.data pipelines: class-balanced tuple batches for training, ordered batches for evaluation.

Both deliver `(images, labels)`: images float32 [B, S, S, 3], RGB, 0..255, NOT normalized (the backbone normalizes),
labels int32 [B] (the ImageSet's 0..C-1 labels). Training batches follow the loss's tuple layout
(docs/ARCHITECTURE.md):

- npair: B = 2N. Rows 0..N-1 are anchors of N distinct classes, rows N..2N-1 their positives (same class order,
  a different image of the same class). As the official NPairLossScheme.
- triplet: B = 3T. Rows 0..T-1 anchors of T distinct classes, T..2T-1 positives (same class, other image),
  2T..3T-1 negatives: one image each of T further distinct classes, none of them an anchor class -- 2T distinct
  classes per batch, as the official TripletLossScheme draws them (so C >= 2T is needed).
- contrastive: B = 4P. Rows 0..P-1 with P..2P-1 are positive pairs (P distinct classes); rows 2P..3P-1 with
  3P..4P-1 are negative pairs (left class uniform, right class uniform among the others).

Sampling is class-balanced (classes uniform, then images uniform within a class) and stateless: batch k of the
stream is a pure function of (seed, k) -- indices, crop offsets and flips come from `tf.random.stateless_*` keyed
on [seed, k] -- so `start_step=k` resumes a run exactly where it stopped, whatever the cache or the number of
parallel calls (stateless ops are reproducible for a given TensorFlow version, not across versions). Classes with a single image cannot give a positive and are left out of anchor sampling (logged);
they still serve as negatives.

Caches (decoding paid once):
- cache=None: each sampled file is read, decoded and resized on the fly (parallel map).
- cache="memory": every image is decoded once (parallel, progress bar) into a uint8 [N, R, R, 3] array kept in a
  CPU tf.Variable (N*R*R*3 bytes: CUB train at 256 px = 1.2 GB).
- cache=PATH: a directory; each resized image is stored once as raw bytes (R*R*3) in
  PATH/<fingerprint>/, reused by later runs while the files, their sizes/mtimes and `resize` are unchanged.
  tf.data's own `Dataset.cache` is sequential, but the sampler needs random access by index, hence one file per
  image read back with tf.io.read_file + decode_raw.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Optional, Union

import numpy as np
import tensorflow as tf

from hdml_tf import layouts
from hdml_tf.data import images as img
from hdml_tf.data.image_set import ImageSet
from hdml_tf.data.images import Augment
from hdml_tf.errors import ConfigError, DataError

log = logging.getLogger(__name__)

AUTOTUNE = tf.data.AUTOTUNE
CacheSpec = Union[None, str, os.PathLike]
_RESIZE_CHUNK = 512
_MANIFEST = "manifest.json"


# --------------------------------------------------------------------------------------------- sampler


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
        self.layout = _layout(loss, batch_size)
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
        pick = _uniform_int(tf.shape(classes), count, seed)
        return tf.gather(self._order, tf.gather(self._offsets, classes) + pick)

    def other_classes(self, classes, seed):
        shift = 1 + _uniform_int(tf.shape(classes), self._num_present - 1, seed)
        return tf.math.floormod(classes + shift, self._num_present)

    def distinct_others(self, taken, seed):
        # Uniform keys, the taken classes' keys raised above every other so they sort last (official
        # TripletLossScheme: the second half of 2T distinct classes).
        keys = tf.random.stateless_uniform(tf.reshape(self._num_present, [1]), seed)  # [C] in [0, 1)
        keys = tf.tensor_scatter_nd_update(keys, taken[:, None], tf.fill(tf.shape(taken), 2.0))
        return tf.cast(tf.argsort(keys)[: tf.size(taken)], tf.int64)

    def any_classes(self, n, seed):
        return _uniform_int([n], self._num_present, seed)


def example_labels(loss, batch_size: int, num_classes: int, seed: int = 0, step: int = 0) -> np.ndarray:
    """Labels int32 [B] of a well-formed batch in the layout of `loss`, as the sampler draws batch `step` from
    `num_classes` classes of two images each (for tests and benchmarks that feed random images).

    Raises:
      ConfigError / DataError: as TupleSampler (e.g. fewer classes than the batch's tuples).
    """
    pool = np.repeat(np.arange(num_classes), 2)
    rows = TupleSampler(pool, loss, batch_size, seed).indices(tf.constant(step, tf.int64))
    return pool[rows.numpy()].astype(np.int32)


def _layout(loss, batch_size: int) -> layouts.Layout:
    """The Layout of `loss` (a name or a Layout); ConfigError (one line) for an unknown loss or a batch size that
    does not fit it."""
    layout = loss if isinstance(loss, layouts.Layout) else layouts.get(loss)
    layout.check_batch_size(batch_size)
    return layout


def _uniform_int(shape, upper, seed):
    """Stateless integers in 0..upper-1 (upper broadcast to `shape`), bias <= upper / 2**63."""
    draws = tf.random.stateless_uniform(shape, seed, minval=None, maxval=None, dtype=tf.int64)
    return tf.math.floormod(draws, upper)


# --------------------------------------------------------------------------------------------- sources


class _Source:
    """Random access to resized images of `image_set` (after dropping unreadable files).

    `load(i)`: int64 scalar -> uint8 [R, R, 3] (per element: file decode or raw read).
    `load_batch(index)`: int64 [B] -> uint8 [B, R, R, 3] in one gather, for in-memory stores; None otherwise.
    """

    def __init__(self, image_set: ImageSet, load, report: Optional[img.ImageScanReport], load_batch=None):
        self.image_set, self.load, self.report, self.load_batch = image_set, load, report, load_batch

    def batches(self, index_ds: tf.data.Dataset, batch_size: int, drop_remainder: bool) -> tf.data.Dataset:
        """(index [b], *extra) elements -> (uint8 [b, R, R, 3], *extra), per-element loads in parallel."""
        if self.load_batch is not None:
            return index_ds.map(lambda index, *extra: (self.load_batch(index), *extra),
                                num_parallel_calls=AUTOTUNE, deterministic=True)
        return (index_ds.unbatch()
                .map(lambda index, *extra: (self.load(index), *extra), num_parallel_calls=AUTOTUNE,
                     deterministic=True)
                .batch(batch_size, drop_remainder=drop_remainder))


def _source(image_set: ImageSet, augment: Augment, cache: CacheSpec, check_images: bool, strict: bool,
            verbose: int) -> _Source:
    r = augment.resize
    if image_set.in_memory:
        return _memory_source(image_set, _resize_array(image_set.images, r, verbose), None)
    if cache is None:
        report = None
        if check_images:
            image_set, report = img.drop_bad_images(image_set, strict=strict, verbose=verbose)
        paths = tf.constant(list(image_set.paths), tf.string)
        return _Source(image_set, lambda i: img.load_resized(tf.gather(paths, i), r), report)
    if isinstance(cache, str) and cache == "memory":
        n = len(image_set)
        log.info("%s: decoding %d images into memory (%.2f GB)", image_set.name, n, n * r * r * 3 / 1e9)
        buffer = np.zeros((n, r, r, 3), np.uint8)

        def sink(index, images):
            buffer[index] = images

        report = img.decode_files(image_set.paths, r, name=image_set.name, verbose=verbose, sink=sink)
        img._SCAN_MEMO[img._fingerprint(image_set.paths)] = report
        img.check_report(report, strict)
        return _memory_source(img.drop_rows(image_set, report), buffer, report)
    return _disk_source(image_set, Path(cache), r, strict, verbose)


def _resize_array(images: np.ndarray, size: int, verbose: int) -> np.ndarray:
    """uint8 [N, H, W, 3] -> uint8 [N, size, size, 3] (unchanged if already that size), in chunks."""
    if images.shape[1:3] == (size, size):
        return images
    out = np.empty((len(images), size, size, 3), np.uint8)
    for start in range(0, len(images), _RESIZE_CHUNK):  # chunks of the array, not of a batch
        out[start:start + _RESIZE_CHUNK] = img.resize_square(images[start:start + _RESIZE_CHUNK], size).numpy()
    return out


def _memory_source(image_set: ImageSet, array: np.ndarray, report) -> _Source:
    """Source over a uint8 [M, R, R, 3] array; rows of `image_set` map to array rows via its kept rows."""
    rows = _kept_rows(len(array), report)
    with tf.device("/CPU:0"):  # a variable, not a captured constant: no 2 GB GraphDef limit, no copy per run
        store = tf.Variable(tf.convert_to_tensor(array), trainable=False, name="image_cache")
        rows_t = tf.constant(rows, tf.int64)
    load = lambda i: tf.gather(store, tf.gather(rows_t, i))  # noqa: E731  scalar or [B] index
    return _Source(image_set, load, report, load_batch=load)


def _kept_rows(n: int, report) -> np.ndarray:
    if report is None or report.ok:
        return np.arange(n, dtype=np.int64)
    return np.setdiff1d(np.arange(n), np.asarray(report.bad_index, np.int64))


def _cache_fingerprint(paths, resize: int) -> str:
    digest = hashlib.sha1(f"hdml_tf image cache v1 resize={resize}\n".encode())
    for p in paths:
        try:
            st = os.stat(p)
            stamp = f"{st.st_size} {st.st_mtime_ns}"
        except OSError:
            stamp = "missing"
        digest.update(f"{p}\0{stamp}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()[:20]


def _disk_source(image_set: ImageSet, root: Path, r: int, strict: bool, verbose: int) -> _Source:
    """Decodes each image once into root/<fingerprint>/<row>.u8 (raw uint8 R*R*3); later runs only read."""
    paths = list(image_set.paths)
    target = root / _cache_fingerprint(paths, r)
    manifest = target / _MANIFEST
    if manifest.is_file():
        meta = json.loads(manifest.read_text())
        report = img.ImageScanReport(name=image_set.name, total=meta["count"],
                                     bad=tuple(img.BadImage(p, why) for p, why in meta["bad"]),
                                     bad_index=tuple(meta["bad_index"]))
        log.info("%s: using image cache %s", image_set.name, target)
    else:
        try:
            root.mkdir(parents=True, exist_ok=True)
            partial = Path(f"{target}.partial-{os.getpid()}")
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir()
        except OSError as e:
            raise DataError(f"cannot create the image cache under {root}: {e.strerror}; expected a writable "
                            f"directory (cache=PATH)") from None
        log.info("%s: decoding %d images into the cache %s", image_set.name, len(paths), target)

        def sink(index, images):
            for row, image in zip(index, images):  # writes files; runs outside the tf.data graph
                image.tofile(partial / f"{row:08d}.u8")

        report = img.decode_files(paths, r, name=image_set.name, verbose=verbose, sink=sink)
        (partial / _MANIFEST).write_text(json.dumps({
            "name": image_set.name, "count": len(paths), "resize": r,
            "bad": [[b.path, b.reason] for b in report.bad], "bad_index": list(report.bad_index)}))
        try:
            partial.rename(target)
        except OSError:  # another process finished the same cache first: use theirs
            shutil.rmtree(partial, ignore_errors=True)
    img._SCAN_MEMO[img._fingerprint(paths)] = report
    img.check_report(report, strict)
    rows = _kept_rows(len(paths), report)
    files = tf.constant([str(target / f"{row:08d}.u8") for row in rows], tf.string)

    def load(i):
        raw = tf.io.decode_raw(tf.io.read_file(tf.gather(files, i)), tf.uint8)
        return tf.reshape(raw, [r, r, 3])

    return _Source(img.drop_rows(image_set, report), load, report)


# ------------------------------------------------------------------------------------------- pipelines


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
    _layout(loss, batch_size)
    source = _source(image_set, augment, cache, check_images, strict_images, verbose)
    sampler = TupleSampler(source.image_set.labels, loss, batch_size, seed, name=source.image_set.name)
    labels = tf.constant(source.image_set.labels, tf.int32)
    span = augment.resize - augment.crop + 1

    def plan(step):
        """Batch `step` -> per row (index, label, offset_y, offset_x, flip), each [B]."""
        index = sampler.indices(step)
        seeds = tf.random.experimental.stateless_split(
            tf.random.experimental.stateless_fold_in(sampler.step_seed(step), 7), 3)
        offset_y = _uniform_int([batch_size], span, seeds[0])
        offset_x = _uniform_int([batch_size], span, seeds[1])
        flip = tf.equal(_uniform_int([batch_size], 2, seeds[2]), 1)
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
    source = _source(image_set, augment, cache, check_images, strict_images, verbose)
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
