"""Image decoding, bad-image scanning and the official augmentation, as TensorFlow ops.

Decoding: `tf.io.decode_image(..., channels=3, expand_animations=False)` reads JPEG, PNG, GIF and BMP and always
returns RGB: grayscale is replicated to three channels, the alpha channel of RGBA / gray+alpha PNGs is dropped (not
composited), CMYK and YCCK JPEGs are converted to RGB by TensorFlow's JPEG decoder itself (checked against PIL, so no
PIL fallback is needed), 16-bit PNGs are scaled to 8 bits.

Augmentation follows the official code (github wzzheng/HDML, `datasets/*_converter.py` + `data_provider.py`): every
image is squashed to a SQUARE `resize` x `resize` (cv2.resize to 256x256, aspect ratio NOT preserved; bilinear without
anti-aliasing, like cv2.INTER_LINEAR), then training takes a random `crop` x `crop` window (official 227) and flips it
left-right with probability 1/2; evaluation takes the center window (offset ceil((resize - crop) / 2), as the official
`RandomFixedSizeCrop(center_crop=True)`). The resized uint8 image is what the caches store, so cached and uncached
pipelines produce identical pixels.

Bad files (zero bytes, truncated, not an image, missing) are found by `scan_images`, which decodes every file once
with the same decoder the pipeline uses (parallel tf.data map, progress bar), so a file that passes the scan cannot
stop a training later.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

from hdml_tf.errors import ConfigError
from hdml_tf.data.image_set import ImageSet
from hdml_tf.errors import DataError

log = logging.getLogger(__name__)

AUTOTUNE = tf.data.AUTOTUNE
_SCAN_BATCH = 256


@dataclasses.dataclass(frozen=True)
class Augment:
    """Image geometry of a pipeline.

    Attributes:
      resize: side of the square every image is resized to first (official 256; aspect ratio not kept).
      crop: side of the crop fed to the backbone (official 227 for GoogLeNet, 224 for ResNet-50);
        random in training, centered in evaluation. crop <= resize.
      flip: random left-right flip in training (official True; False for glyphs, whose mirror images are
        other classes).

    `Augment()` is the official setting; glyphs use `Augment(resize=64, crop=64, flip=False)`.
    """

    resize: int = 256
    crop: int = 227
    flip: bool = True

    def __post_init__(self):
        if not (isinstance(self.resize, (int, np.integer)) and isinstance(self.crop, (int, np.integer))):
            raise ConfigError(f"Augment resize={self.resize!r} and crop={self.crop!r} must be integers")
        if not 0 < self.crop <= self.resize:
            raise ConfigError(f"Augment crop={self.crop} must lie in 1..resize={self.resize}")


@dataclasses.dataclass(frozen=True)
class BadImage:
    """One unreadable file: `path` and a short `reason` ("zero bytes", "truncated or corrupt JPEG", ...)."""

    path: str
    reason: str


@dataclasses.dataclass(frozen=True)
class ImageScanReport:
    """Result of `scan_images`: which of `total` files cannot be decoded.

    Attributes:
      name: what was scanned, for messages ("cub200/train").
      total: number of files scanned.
      bad: the unreadable files in the order of the input.
      bad_index: their positions in the input, int64 [len(bad)].
    """

    name: str
    total: int
    bad: Tuple[BadImage, ...] = ()
    bad_index: Tuple[int, ...] = ()

    @property
    def num_bad(self) -> int:
        return len(self.bad)

    @property
    def ok(self) -> bool:
        return not self.bad

    def summary(self, max_names: int = 5) -> str:
        """One line: "cub200/train: 2 of 5,902 images unreadable and skipped: a.jpg (zero bytes), ..."."""
        where = f"{self.name}: " if self.name else ""
        if not self.bad:
            return f"{where}all {self.total:,} images readable"
        names = ", ".join(f"{b.path} ({b.reason})" for b in self.bad[:max_names])
        more = f", and {self.num_bad - max_names} more" if self.num_bad > max_names else ""
        return f"{where}{self.num_bad:,} of {self.total:,} images unreadable and skipped: {names}{more}"

    def lines(self) -> List[str]:
        """Every bad file, one "path: reason" line each (for a report file)."""
        return [f"{b.path}: {b.reason}" for b in self.bad]


# ----------------------------------------------------------------------------------------------- TF ops


def decode_rgb(data: tf.Tensor) -> tf.Tensor:
    """Decodes encoded image bytes (JPEG/PNG/GIF/BMP; scalar string) to uint8 RGB [H, W, 3]."""
    image = tf.io.decode_image(data, channels=3, dtype=tf.uint8, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


def resize_square(image: tf.Tensor, size: int) -> tf.Tensor:
    """Squashes uint8 [H, W, 3] (or [B, H, W, 3]) to uint8 [size, size, 3] (official cv2.resize to 256x256).

    Bilinear without anti-aliasing (cv2.INTER_LINEAR), rounded to the nearest integer.
    """
    resized = tf.image.resize(image, [size, size], method="bilinear", antialias=False)
    return tf.cast(tf.clip_by_value(tf.round(resized), 0.0, 255.0), tf.uint8)


def load_resized(path: tf.Tensor, size: int) -> tf.Tensor:
    """Reads, decodes and resizes one file: scalar string path -> uint8 [size, size, 3]."""
    return resize_square(decode_rgb(tf.io.read_file(path)), size)


def crop_flip_batch(images: tf.Tensor, offset_y: tf.Tensor, offset_x: tf.Tensor, flip: tf.Tensor,
                    crop: int) -> tf.Tensor:
    """Per-row crop window and left-right flip of a batch, as two gathers (no loop over rows).

    Args:
      images: uint8 [B, R, R, 3].
      offset_y, offset_x: int [B], window corners in 0..R-crop.
      flip: bool [B], flip row i left-right.
      crop: output side S.

    Returns:
      float32 [B, S, S, 3], RGB, values 0..255.
    """
    steps = tf.range(crop, dtype=tf.int64)
    offset_y = tf.cast(offset_y, tf.int64)[:, None]
    offset_x = tf.cast(offset_x, tf.int64)[:, None]
    rows = offset_y + steps                                                            # [B, S]
    cols = tf.where(flip[:, None], offset_x + (crop - 1) - steps, offset_x + steps)     # [B, S]
    window = tf.gather(images, rows, axis=1, batch_dims=1)                             # [B, S, R, 3]
    window = tf.gather(window, cols, axis=2, batch_dims=1)                             # [B, S, S, 3]
    return tf.cast(window, tf.float32)


def center_crop_batch(images: tf.Tensor, augment: Augment) -> tf.Tensor:
    """uint8 [B, R, R, 3] -> float32 [B, S, S, 3]: the evaluation window at `center_offset(augment)`."""
    o, s = center_offset(augment), augment.crop
    return tf.cast(images[:, o:o + s, o:o + s, :], tf.float32)


def center_offset(augment: Augment) -> int:
    """Offset of the evaluation window: ceil((resize - crop) / 2), as the official center crop."""
    return (augment.resize - augment.crop + 1) // 2


# ------------------------------------------------------------------------------------------ bad images

_MAGIC = ((b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"),
          (b"BM", "BMP"), (b"RIFF", "WebP"))
_SCAN_MEMO: Dict[str, ImageScanReport] = {}


def _fingerprint(paths: Sequence[str]) -> str:
    digest = hashlib.sha1()
    for p in paths:
        digest.update(os.fsencode(p) + b"\0")
    return digest.hexdigest()


def _reason(path: str) -> str:
    """Why `path` cannot be decoded (called only for the few files that failed)."""
    try:
        size = os.path.getsize(path)
    except OSError:
        return "missing file"
    if size == 0:
        return "zero bytes"
    with open(path, "rb") as f:
        head = f.read(16)
    kind = next((k for magic, k in _MAGIC if head.startswith(magic)), None)
    if kind is None:
        return "not an image (unknown format)"
    try:
        decode_rgb(tf.io.read_file(path))
    except tf.errors.OpError as e:  # the decoder's own words, first line only, without TF's graph-node prefix
        words = re.sub(r"\{\{function_node [^}]*\}\}", "", e.message.splitlines()[0]).strip()
        return f"truncated or corrupt {kind} ({words[:80]})"
    return f"decoded on retry ({kind}); flaky storage?"


def _progbar(total: int, verbose: int):
    import keras  # local: keras import is slow and only needed with progress bars
    return keras.utils.Progbar(total, verbose=verbose, unit_name="image")


def decode_files(paths: Sequence[str], size: Optional[int], *, name: str = "", verbose: int = 1,
                 sink=None) -> ImageScanReport:
    """Decodes every file once in a parallel tf.data map and reports those that fail.

    Args:
      paths: N file paths.
      size: resize every image to uint8 [size, size, 3] and hand it to `sink`; None only checks decoding.
      name: for messages.
      verbose: 1 shows a progress bar, 0 is silent.
      sink: called as sink(index int64 [b], images uint8 [b, size, size, 3]) for each chunk of good images,
        in input order (requires `size`).

    Returns:
      ImageScanReport over the N files.
    """
    n = len(paths)
    index = tf.data.Dataset.range(n)
    files = tf.data.Dataset.from_tensor_slices(tf.constant(list(paths) or [""], tf.string)).take(n)

    if size is None:
        def load(i, p):
            return i, tf.shape(decode_rgb(tf.io.read_file(p)))[0]
    else:
        def load(i, p):
            return i, load_resized(p, size)

    ds = (tf.data.Dataset.zip(index, files).map(load, num_parallel_calls=AUTOTUNE, deterministic=True)
          .ignore_errors(log_warning=False).batch(_SCAN_BATCH).prefetch(2))
    seen = np.zeros(n, bool)
    bar = _progbar(n, verbose) if verbose and n else None
    done = 0
    for i, images in ds.as_numpy_iterator():
        seen[i] = True
        if sink is not None:
            sink(i, images)
        done += len(i)
        if bar is not None:
            bar.update(done)
    bad_index = np.flatnonzero(~seen)
    if bar is not None and done < n:  # bad files were dropped from the stream: close the bar
        bar.update(n, finalize=True)
    bad = tuple(BadImage(str(paths[i]), _reason(str(paths[i]))) for i in bad_index)
    report = ImageScanReport(name=name, total=n, bad=bad, bad_index=tuple(int(i) for i in bad_index))
    remember_scan(paths, report)  # a full decode of these paths: a later pre-scan of them reuses it
    return report


def remember_scan(paths: Sequence[str], report: ImageScanReport) -> None:
    """Records a full scan of exactly `paths` (e.g. read back from a disk cache's manifest) for `scan_images`."""
    _SCAN_MEMO[_fingerprint(paths)] = report


def scan_images(paths: Sequence[str], *, name: str = "", strict: bool = False, verbose: int = 1,
                memo: bool = True) -> ImageScanReport:
    """Pre-scan: decodes every file with the pipeline's decoder and names those that fail.

    Parallel (tf.data map over all cores), with a progress bar; a few ms per image. The result is remembered
    for the same list of paths within the process (`memo`), so building a pipeline twice scans once.

    Args:
      paths: N file paths.
      name: for messages ("cub200/train").
      strict: raise DataError naming the first bad file instead of reporting.
      verbose: 1 shows a progress bar.
      memo: reuse an earlier scan of exactly these paths.

    Returns:
      ImageScanReport (bad files in input order).

    Raises:
      DataError: strict and a file is unreadable.
    """
    report = _SCAN_MEMO.get(_fingerprint(paths)) if memo else None
    if report is None:
        report = decode_files(paths, None, name=name, verbose=verbose)
    check_report(report, strict)
    return report


def check_report(report: ImageScanReport, strict: bool) -> None:
    """Raises DataError naming the first bad file when `strict`, else logs the report's summary."""
    if report.ok:
        return
    first = report.bad[0]
    if strict:
        where = f" in {report.name}" if report.name else ""
        raise DataError(f"unreadable image {first.path}{where}: {first.reason}; expected a decodable JPEG/PNG "
                        f"(strict_images=True; {report.num_bad} bad of {report.total:,})")
    log.warning(report.summary())


def drop_rows(image_set: ImageSet, report: ImageScanReport) -> ImageSet:
    """`image_set` without the rows `report` names; classes left empty are dropped and labels renumbered."""
    if report.ok:
        return image_set
    keep = np.setdiff1d(np.arange(len(image_set)), np.asarray(report.bad_index, np.int64))
    kept = image_set.subset(keep)
    if len(np.unique(kept.labels)) < image_set.num_classes:
        lost = image_set.num_classes - len(np.unique(kept.labels))
        log.warning("%s: %d class(es) lost all their images to bad files; labels renumbered",
                    image_set.name, lost)
        kept = kept.remap()
    return kept


def drop_bad_images(image_set: ImageSet, *, strict: bool = False,
                    verbose: int = 1) -> Tuple[ImageSet, ImageScanReport]:
    """Scans a path-based ImageSet and returns it without unreadable files, plus the report.

    An in-memory set is returned unchanged with an empty report. If a class loses every image, the remaining
    classes are renumbered 0..C'-1 (ImageSet.remap).

    Raises:
      DataError: strict and a file is unreadable (naming the first one).
    """
    if image_set.in_memory:
        return image_set, ImageScanReport(name=image_set.name, total=len(image_set))
    report = scan_images(image_set.paths, name=image_set.name, strict=strict, verbose=verbose)
    return drop_rows(image_set, report), report
