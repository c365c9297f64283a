"""scikit-learn's bundled handwritten digits as a zero-shot split: classes 0-4 train, 5-9 test.

Offline (the 1797 8x8 images ship inside scikit-learn). Real handwriting, but raw pixels already retrieve them
almost perfectly (issue 2, section 3: raw-pixel Recall@1 0.99 on 5-9), so `glyphs` is the default demo and this set
is kept for `--dataset=digits`.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np

from hdml_tf.errors import ConfigError
from hdml_tf.data.image_set import ImageSet

TRAIN_DIGITS = (0, 1, 2, 3, 4)
TEST_DIGITS = (5, 6, 7, 8, 9)


def load_digits(image_size: int = 64, seed: int = 0) -> Tuple[ImageSet, ImageSet]:
    """(train, test) of `sklearn.datasets.load_digits`, digits 0-4 and 5-9.

    The 8x8 images (ink 0..16) are upscaled to image_size with bilinear interpolation over pixel areas (pixel i
    covers [i, i + 1), as `scipy.ndimage.zoom(grid_mode=True)`), and written like the glyphs: dark ink (0) on a
    white background (255), grey repeated to RGB uint8.

    Args:
      image_size: side S of the square images (>= 8).
      seed: accepted for the loaders' common signature; nothing here is random (the split is fixed and the
        images keep scikit-learn's order).

    Returns:
      train, test: `ImageSet`s named "digits/train" and "digits/test" with uint8 images [N, S, S, 3], labels
      0..4 (the digit, minus 5 on the test split), `class_names` the digits as strings and `original_class_ids`
      the digits. Counts follow scikit-learn (901 train and 896 test images of 1797).

    Raises:
      ConfigError: a bad image_size.
    """
    from scipy import ndimage  # pylint: disable=import-outside-toplevel
    from sklearn import datasets  # pylint: disable=import-outside-toplevel

    del seed
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < 8:
        raise ConfigError(f"image_size={image_size!r} must be an integer >= 8")
    bunch = datasets.load_digits()
    ink = ndimage.zoom(bunch.images.astype(np.float64), (1, image_size / 8, image_size / 8), order=1,
                       mode="nearest", grid_mode=True)
    gray = 255 - np.clip(np.rint(ink * (255 / 16)), 0, 255).astype(np.uint8)
    rgb = np.repeat(gray[..., None], 3, axis=-1)
    target = np.asarray(bunch.target)
    return (_split(rgb, target, TRAIN_DIGITS, "digits/train"), _split(rgb, target, TEST_DIGITS, "digits/test"))


def _split(images: np.ndarray, target: np.ndarray, digits, name: str) -> ImageSet:
    keep = np.isin(target, digits)
    return ImageSet(labels=target[keep] - digits[0], class_names=[str(d) for d in digits], images=images[keep],
                    name=name, original_class_ids=list(digits))
