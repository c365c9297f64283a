"""scikit-learn's digits as a zero-shot split: 0-4 train, 5-9 test."""
import numpy as np
import pytest
from sklearn import datasets

from hdml_tf.config import ConfigError
from hdml_tf.data.digits import load_digits


@pytest.fixture(scope="module")
def sklearn_digits():
    return datasets.load_digits()


def test_split_and_counts(sklearn_digits):
    train, test = load_digits(image_size=64)
    counts = np.bincount(sklearn_digits.target, minlength=10)
    assert len(train) + len(test) == len(sklearn_digits.target) == 1797
    np.testing.assert_array_equal(np.bincount(train.labels, minlength=5), counts[:5])
    np.testing.assert_array_equal(np.bincount(test.labels, minlength=5), counts[5:])
    assert train.class_names == ["0", "1", "2", "3", "4"] and test.class_names == ["5", "6", "7", "8", "9"]
    assert train.original_class_ids == [0, 1, 2, 3, 4] and test.original_class_ids == [5, 6, 7, 8, 9]
    assert not set(train.class_names) & set(test.class_names)
    assert (train.name, test.name) == ("digits/train", "digits/test")


def test_images(sklearn_digits):
    train, test = load_digits(image_size=48)
    for part in (train, test):
        assert part.images.dtype == np.uint8 and part.images.shape == (len(part), 48, 48, 3)
        np.testing.assert_array_equal(part.images[..., 0], part.images[..., 1])
    # Test rows keep scikit-learn's order: same ink pattern as the source, upscaled, dark on white.
    first_test = int(np.flatnonzero(sklearn_digits.target >= 5)[0])
    source = sklearn_digits.images[first_test]
    block_means = 255 - test.images[0, ..., 0].astype(float).reshape(8, 6, 8, 6).mean(axis=(1, 3))
    assert np.corrcoef(block_means.ravel(), source.ravel())[0, 1] > 0.95
    assert test.labels[0] == sklearn_digits.target[first_test] - 5


def test_native_size_is_exact(sklearn_digits):
    train, _ = load_digits(image_size=8)
    keep = sklearn_digits.target < 5
    expected = 255 - np.rint(sklearn_digits.images[keep] * 255 / 16).astype(np.uint8)
    np.testing.assert_array_equal(train.images[..., 0], expected)


def test_bad_size():
    with pytest.raises(ConfigError):
        load_digits(image_size=4)
