"""Random access to the resized images of an `ImageSet`, with the caches that pay decoding once.

- cache=None: each sampled file is read, decoded and resized on the fly (parallel map); path-based sets are
  pre-scanned so unreadable files are dropped before training (`images.drop_bad_images`).
- cache="memory": every image is decoded once (parallel, progress bar) into a uint8 [N, R, R, 3] array kept in a
  CPU tf.Variable (N*R*R*3 bytes: CUB train at 256 px = 1.2 GB).
- cache=PATH: a directory; each resized image is stored once as raw bytes (R*R*3) in PATH/<fingerprint>/, reused
  by later runs while the files, their sizes/mtimes and `resize` are unchanged. tf.data's own `Dataset.cache` is
  sequential, but the sampler needs random access by index, hence one file per image read back with
  tf.io.read_file + decode_raw.

In-memory sets (glyphs, digits) are resized once into memory. Every source yields uint8 [R, R, 3] images of the
readable rows; `ImageSource.image_set` is the set without the unreadable ones (labels to score against).
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

from hdml_tf.data import images as img
from hdml_tf.data.image_set import ImageSet
from hdml_tf.data.images import Augment
from hdml_tf.errors import DataError

log = logging.getLogger(__name__)

AUTOTUNE = tf.data.AUTOTUNE
CacheSpec = Union[None, str, os.PathLike]
_RESIZE_CHUNK = 512
_MANIFEST = "manifest.json"


class ImageSource:
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


def image_source(image_set: ImageSet, augment: Augment, cache: CacheSpec, check_images: bool, strict: bool,
            verbose: int) -> ImageSource:
    r = augment.resize
    if image_set.in_memory:
        return _memory_source(image_set, _resize_array(image_set.images, r, verbose), None)
    if cache is None:
        report = None
        if check_images:
            image_set, report = img.drop_bad_images(image_set, strict=strict, verbose=verbose)
        paths = tf.constant(list(image_set.paths), tf.string)
        return ImageSource(image_set, lambda i: img.load_resized(tf.gather(paths, i), r), report)
    if isinstance(cache, str) and cache == "memory":
        n = len(image_set)
        log.info("%s: decoding %d images into memory (%.2f GB)", image_set.name, n, n * r * r * 3 / 1e9)
        buffer = np.zeros((n, r, r, 3), np.uint8)

        def sink(index, images):
            buffer[index] = images

        report = img.decode_files(image_set.paths, r, name=image_set.name, verbose=verbose, sink=sink)
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


def _memory_source(image_set: ImageSet, array: np.ndarray, report) -> ImageSource:
    """Source over a uint8 [M, R, R, 3] array; rows of `image_set` map to array rows via its kept rows."""
    rows = _kept_rows(len(array), report)
    with tf.device("/CPU:0"):  # a variable, not a captured constant: no 2 GB GraphDef limit, no copy per run
        store = tf.Variable(tf.convert_to_tensor(array), trainable=False, name="image_cache")
        rows_t = tf.constant(rows, tf.int64)
    load = lambda i: tf.gather(store, tf.gather(rows_t, i))  # noqa: E731  scalar or [B] index
    return ImageSource(image_set, load, report, load_batch=load)


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


def _disk_source(image_set: ImageSet, root: Path, r: int, strict: bool, verbose: int) -> ImageSource:
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
    img.remember_scan(paths, report)  # the cache's manifest is a full scan: a later pre-scan reuses it
    img.check_report(report, strict)
    rows = _kept_rows(len(paths), report)
    files = tf.constant([str(target / f"{row:08d}.u8") for row in rows], tf.string)

    def load(i):
        raw = tf.io.decode_raw(tf.io.read_file(tf.gather(files, i)), tf.uint8)
        return tf.reshape(raw, [r, r, 3])

    return ImageSource(img.drop_rows(image_set, report), load, report)
