"""Decoding, bad-image handling, tuple batches, determinism, resume and caches of the tf.data pipelines.

Small images (16..40 px, Augment(resize=32, crop=24)) keep the whole module to a few seconds on two cores.
"""
import logging
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from hdml_tf.config import ConfigError
from hdml_tf.data import images as img
from hdml_tf.data import pipeline, readers
from hdml_tf.data.image_set import ImageSet
from hdml_tf.data.images import Augment
from hdml_tf.data.sampler import TupleSampler
from hdml_tf.errors import DataError

SMALL = Augment(resize=32, crop=24, flip=True)
CLASSES, PER_CLASS = 8, 4


def _write(path: Path, image: np.ndarray, kind: str = "jpg") -> None:
    encoded = tf.io.encode_png(image) if kind == "png" else tf.io.encode_jpeg(image, quality=95)
    path.parent.mkdir(parents=True, exist_ok=True)
    tf.io.write_file(str(path), encoded)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """class_0..class_7 (4 images each, JPEG/PNG, 16..40 px) + grayscale, RGBA, CMYK, three bad files, a singleton.

    Returns {"root", "bad": [paths], "gray", "rgba", "cmyk" (None without PIL)}.
    """
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for c in range(CLASSES):
        for k in range(PER_CLASS):
            h, w = rng.integers(16, 41, 2)
            kind = "png" if k % 2 else "jpg"
            _write(root / f"class_{c}" / f"{k}.{kind}", rng.integers(0, 256, (h, w, 3), dtype=np.uint8), kind)
    gray = root / "class_0" / "gray.jpg"
    _write(gray, np.full((20, 30, 1), 90, np.uint8))
    rgba = root / "class_1" / "rgba.png"
    _write(rgba, np.dstack([np.full((18, 18, 3), (10, 200, 30), np.uint8), np.full((18, 18, 1), 128, np.uint8)]),
           "png")
    cmyk = None
    try:
        from PIL import Image
        cmyk = root / "class_2" / "cmyk.jpg"
        Image.new("RGB", (24, 24), (200, 30, 60)).convert("CMYK").save(cmyk, quality=95)
    except ImportError:
        pass
    good = (root / "class_3" / "0.jpg").read_bytes()
    bad = [root / "class_0" / "zz_truncated.jpg", root / "class_1" / "zz_empty.jpg", root / "class_2" / "zz_text.png"]
    bad[0].write_bytes(good[: len(good) // 2])
    bad[1].write_bytes(b"")
    bad[2].write_text("this is not an image")
    _write(root / "class_8" / "single.jpg", rng.integers(0, 256, (20, 20, 3), dtype=np.uint8))
    return {"root": root, "bad": [str(b) for b in bad], "gray": gray, "rgba": rgba, "cmyk": cmyk}


def _folder_set(tree) -> ImageSet:
    """All classes of the tree as one path-based ImageSet (labels = sorted folder order)."""
    splits = readers.read_image_folder(tree["root"], test_fraction=0.5, seed=0)
    paths = list(splits.train.paths) + list(splits.test.paths)
    names = sorted({Path(p).parent.name for p in paths})
    labels = [names.index(Path(p).parent.name) for p in paths]
    return ImageSet(labels=labels, class_names=names, paths=paths, name="tree/all")


def _coded_set(classes=12, per_class=3, size=8, singleton=False) -> ImageSet:
    """In-memory images whose pixels encode (row % 256, row // 256, label): checkable after crop and flip."""
    labels = np.repeat(np.arange(classes), per_class)
    if singleton:
        labels = np.append(labels, classes)
    n = len(labels)
    images = np.zeros((n, size, size, 3), np.uint8)
    images[..., 0] = (np.arange(n) % 256)[:, None, None]
    images[..., 1] = (np.arange(n) // 256)[:, None, None]
    images[..., 2] = labels[:, None, None]
    return ImageSet(labels=labels, class_names=[str(c) for c in range(labels.max() + 1)], images=images,
                    name="coded")


def _rows(images: np.ndarray):
    """Row ids and labels read back from coded images [B, S, S, 3] (every pixel of a row is equal)."""
    assert (images == images[:, :1, :1, :]).all()
    return (images[:, 0, 0, 0] + 256 * images[:, 0, 0, 1]).astype(int), images[:, 0, 0, 2].astype(int)


def _take(ds, n):
    return [(x.numpy(), y.numpy()) for x, y in ds.take(n)]


# -------------------------------------------------------------------------------------------- decoding


def test_decode_turns_gray_rgba_cmyk_into_rgb(tree):
    gray = img.decode_rgb(tf.io.read_file(str(tree["gray"]))).numpy()
    assert gray.shape == (20, 30, 3) and np.abs(gray.astype(int) - 90).max() <= 2
    rgba = img.decode_rgb(tf.io.read_file(str(tree["rgba"]))).numpy()
    np.testing.assert_array_equal(rgba[0, 0], [10, 200, 30])  # alpha dropped
    if tree["cmyk"] is None:
        pytest.skip("PIL absent: no CMYK JPEG written")
    cmyk = img.decode_rgb(tf.io.read_file(str(tree["cmyk"]))).numpy()
    assert cmyk.shape == (24, 24, 3) and np.abs(cmyk[12, 12].astype(int) - [200, 30, 60]).max() <= 6


def test_augment_validation():
    assert Augment() == Augment(256, 227, True)
    with pytest.raises(ConfigError, match="crop=300 must lie in 1..resize=256"):
        Augment(crop=300)
    assert img.center_offset(Augment()) == 15  # official: rows 15..241 of 256


# ------------------------------------------------------------------------------------------ bad images


def test_scan_reports_bad_files_by_name(tree):
    image_set = _folder_set(tree)
    report = img.scan_images(image_set.paths, name="tree", verbose=0, memo=False)
    assert report.total == len(image_set)
    assert sorted(b.path for b in report.bad) == sorted(tree["bad"])
    reasons = {Path(b.path).name: b.reason for b in report.bad}
    assert reasons["zz_empty.jpg"] == "zero bytes"
    assert reasons["zz_text.png"] == "not an image (unknown format)"
    assert reasons["zz_truncated.jpg"].startswith("truncated or corrupt JPEG")
    assert "function_node" not in reasons["zz_truncated.jpg"]  # the decoder's words, not TF's graph internals
    summary = report.summary()
    assert summary.startswith(f"tree: 3 of {len(image_set)} images unreadable and skipped") and "\n" not in summary
    assert "zz_empty.jpg (zero bytes)" in summary
    cleaned, again = img.drop_bad_images(image_set, verbose=0)
    assert len(cleaned) == len(image_set) - 3 and not set(tree["bad"]) & set(cleaned.paths)
    assert cleaned.num_classes == image_set.num_classes


def test_strict_images_names_the_first_bad_file(tree):
    image_set = _folder_set(tree)
    first = min(tree["bad"], key=image_set.paths.index)
    with pytest.raises(DataError) as err:
        pipeline.make_train_dataset(image_set, "npair", 4, SMALL, strict_images=True, verbose=0)
    assert first in str(err.value) and "strict_images=True" in str(err.value) and "\n" not in str(err.value)


# ------------------------------------------------------------------------------------- tuple structure


@pytest.mark.parametrize("loss,batch_size", [("npair", 16), ("triplet", 15), ("contrastive", 16)])
def test_tuple_layout(loss, batch_size):
    image_set = _coded_set()
    ds = pipeline.make_train_dataset(image_set, loss, batch_size, Augment(8, 6, True), seed=1, verbose=0)
    assert ds.element_spec[0].shape.as_list() == [batch_size, 6, 6, 3]
    assert ds.element_spec[0].dtype == tf.float32 and ds.element_spec[1].dtype == tf.int32
    for images, labels in _take(ds, 5):
        rows, coded_labels = _rows(images)
        np.testing.assert_array_equal(coded_labels, labels)                 # images travel with their labels
        np.testing.assert_array_equal(image_set.labels[rows], labels)
        if loss == "npair":
            n = batch_size // 2
            a, p = slice(0, n), slice(n, 2 * n)
            assert len(set(labels[a])) == n                                  # N distinct classes
            np.testing.assert_array_equal(labels[a], labels[p])
            assert (rows[a] != rows[p]).all()
        elif loss == "triplet":
            t = batch_size // 3
            a, p, neg = slice(0, t), slice(t, 2 * t), slice(2 * t, 3 * t)
            assert len(set(labels[a])) == t
            np.testing.assert_array_equal(labels[a], labels[p])
            assert (rows[a] != rows[p]).all()
            assert len(set(labels[a]) | set(labels[neg])) == 2 * t  # 2T distinct classes (official)
        else:
            q = batch_size // 4
            blocks = [slice(i * q, (i + 1) * q) for i in range(4)]
            np.testing.assert_array_equal(labels[blocks[0]], labels[blocks[1]])
            assert (rows[blocks[0]] != rows[blocks[1]]).all()
            assert (labels[blocks[2]] != labels[blocks[3]]).all()


def test_singleton_classes_are_never_anchors(caplog):
    image_set = _coded_set(classes=8, singleton=True)
    with caplog.at_level(logging.WARNING):
        ds = pipeline.make_train_dataset(image_set, "triplet", 12, Augment(8, 8, False), seed=0, verbose=0)
    assert "1 of 9 classes have a single image" in caplog.text
    negatives = []
    for _, labels in _take(ds, 30):
        assert 8 not in labels[:8]
        negatives.extend(labels[8:])
    assert 8 in negatives  # still used as a negative


def test_triplet_sampler_draws_2t_distinct_classes_in_every_batch_of_a_long_stream():
    """As the official TripletLossScheme: T anchor classes and T negative classes, 2T distinct classes per batch;
    a singleton class never anchors but may be a negative. Checked on every one of 600 consecutive batches."""
    classes, t, steps = 11, 5, 600
    labels = np.append(np.repeat(np.arange(classes - 1), [2, 3, 4, 5, 2, 3, 4, 5, 2, 3]), classes - 1)  # + singleton
    sampler = TupleSampler(labels, "triplet", 3 * t, seed=7)
    batches = np.stack([b.numpy() for b in tf.data.Dataset.range(steps).map(sampler.indices)])  # [steps, 3T]
    assert batches.shape == (steps, 3 * t)
    anchor, positive, negative = batches[:, :t], batches[:, t:2 * t], batches[:, 2 * t:]
    a_cls, p_cls, n_cls = labels[anchor], labels[positive], labels[negative]
    for step in range(steps):
        assert len(set(a_cls[step])) == t, step                                   # T distinct anchor classes
        assert len(set(n_cls[step])) == t, step                                   # T distinct negative classes
        assert not set(a_cls[step]) & set(n_cls[step]), step                       # 2T distinct classes in all
    np.testing.assert_array_equal(a_cls, p_cls)
    assert (anchor != positive).all()
    assert classes - 1 not in a_cls and classes - 1 in n_cls                      # the singleton: negative only
    # Anchors uniform over the 10 eligible classes, negatives uniform over the 6 classes left: an eligible class is
    # a negative with probability (1 - 5/10) * 5/6 = 5/12 per batch (250 of 600), the singleton with 5/6 (500).
    # The seed is fixed, so the 15% bound is a fact about this stream, not a flaky statistic.
    counts = np.bincount(n_cls.ravel(), minlength=classes)
    expected = np.array([steps * 5 / 12] * (classes - 1) + [steps * 5 / 6])
    assert (np.abs(counts - expected) < 0.15 * expected).all(), counts
    again = np.stack([b.numpy() for b in tf.data.Dataset.range(steps).map(sampler.indices)])
    np.testing.assert_array_equal(again, batches)                                # a pure function of (seed, step)


def test_triplet_needs_2t_classes_one_line_error():
    with pytest.raises(DataError) as err:
        pipeline.make_train_dataset(_coded_set(classes=9), "triplet", 15, Augment(8, 6), verbose=0)
    message = str(err.value)
    assert "batch_size=15 (triplet) needs 10 distinct classes" in message and "only 9 have images" in message
    assert "use batch_size <= 12" in message and "\n" not in message
    pipeline.make_train_dataset(_coded_set(classes=10), "triplet", 15, Augment(8, 6), verbose=0)  # 10 suffice


@pytest.mark.parametrize("loss,batch_size,match", [
    ("npair", 7, "multiple of 2"), ("triplet", 8, "multiple of 3"), ("contrastive", 6, "multiple of 4"),
    ("softmax", 8, "loss='softmax' is unknown")])
def test_batch_size_must_fit_layout(loss, batch_size, match):
    with pytest.raises(ConfigError, match=match):
        pipeline.make_train_dataset(_coded_set(), loss, batch_size, Augment(8, 6), verbose=0)


def test_too_few_classes_is_one_line_error():
    with pytest.raises(DataError, match=r"batch_size=40 \(npair\) needs 20 distinct classes with >= 2 images, "
                                        r"but only 12 have"):
        pipeline.make_train_dataset(_coded_set(), "npair", 40, Augment(8, 6), verbose=0)


# ------------------------------------------------------------------------------ determinism and resume


def test_same_seed_same_batches_and_resume_at_start_step():
    image_set = _coded_set()
    make = lambda seed, start=0: pipeline.make_train_dataset(  # noqa: E731
        image_set, "npair", 8, Augment(8, 6, True), seed=seed, start_step=start, verbose=0)
    first, again = _take(make(5), 4), _take(make(5), 4)
    for (x1, y1), (x2, y2) in zip(first, again):
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(y1, y2)
    other = _take(make(6), 4)
    assert any(not np.array_equal(a[1], b[1]) for a, b in zip(first, other))
    resumed = _take(make(5, start=2), 2)
    for (x1, y1), (x2, y2) in zip(first[2:], resumed):
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(y1, y2)
    epoch = pipeline.make_train_dataset(image_set, "npair", 8, Augment(8, 6), seed=5, steps_per_epoch=3,
                                        start_step=1, verbose=0)
    assert int(epoch.cardinality()) == 3
    np.testing.assert_array_equal(_take(epoch, 1)[0][0], first[1][0])
    assert pipeline.default_steps_per_epoch(image_set, 8) == 36 // 8


def test_caches_give_the_same_batches_and_disk_cache_is_reused(tree, tmp_path, monkeypatch):
    image_set = _folder_set(tree)
    make = lambda cache: pipeline.make_train_dataset(  # noqa: E731
        image_set, "contrastive", 8, SMALL, seed=3, cache=cache, start_step=4, verbose=0)
    reference = _take(make(None), 2)
    for cache in ("memory", str(tmp_path / "cache")):
        for (x1, y1), (x2, y2) in zip(reference, _take(make(cache), 2)):
            np.testing.assert_array_equal(x1, x2)
            np.testing.assert_array_equal(y1, y2)
    assert reference[0][0].shape == (8, 24, 24, 3) and 0 <= reference[0][0].min() and reference[0][0].max() <= 255
    (cache_dir,) = (tmp_path / "cache").iterdir()
    assert (cache_dir / "manifest.json").is_file()
    assert len(list(cache_dir.glob("*.u8"))) == len(image_set) - 3  # bad files are not cached
    monkeypatch.setattr(img, "decode_files", lambda *a, **k: pytest.fail("a complete cache was decoded again"))
    for (x1, _), (x2, _) in zip(reference, _take(make(str(tmp_path / "cache")), 2)):
        np.testing.assert_array_equal(x1, x2)


def test_no_flip_full_crop_keeps_images_exact():
    image_set = _coded_set(size=8)
    image_set.images[:, :, :4, 0] = 255  # left half marked: a flip would move it
    ds = pipeline.make_train_dataset(image_set, "npair", 8, Augment(8, 8, False), seed=0, verbose=0)
    images, _ = _take(ds, 1)[0]
    assert (images[:, :, :4, 0] == 255).all()


def test_unwritable_cache_is_one_line_error(tree, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(DataError, match=r"cannot create the image cache under .*file"):
        pipeline.make_train_dataset(_folder_set(tree), "npair", 4, SMALL, cache=str(blocker / "sub"), verbose=0)


# -------------------------------------------------------------------------------------------- evaluation


def test_eval_dataset_keeps_order_center_crops_and_drops_bad_files(tree):
    image_set = _folder_set(tree)
    ds = pipeline.make_eval_dataset(image_set, 10, SMALL, verbose=0)
    batches = _take(ds, 100)
    labels = np.concatenate([y for _, y in batches])
    expected = pipeline.eval_labels(image_set)
    np.testing.assert_array_equal(labels, expected)
    n = len(image_set) - 3
    assert len(labels) == n and batches[-1][1].shape[0] == (n % 10 or 10)
    keep = [p for p in image_set.paths if p not in tree["bad"]]
    whole = img.resize_square(img.decode_rgb(tf.io.read_file(keep[0])), 32).numpy()
    np.testing.assert_array_equal(batches[0][0][0], whole[4:28, 4:28].astype(np.float32))


# --------------------------------------------------------------------------------------- real CUB subset


def test_real_cub_subset_batches(cub_subset):
    root = cub_subset
    train, test = splits = readers.read_dataset("cub200", root)
    assert splits.report.partial and (len(train), train.num_classes) == (3428, 58)
    ds = pipeline.make_train_dataset(train, "npair", 16, Augment(), seed=0, check_images=False, verbose=0)
    for images, labels in _take(ds, 2):
        assert images.shape == (16, 227, 227, 3) and images.dtype == np.float32
        assert len(set(labels[:8])) == 8 and (labels[:8] == labels[8:]).all()
        assert images.max() > 100 and images.std() > 10  # real photographs, not blank
    images, labels = _take(pipeline.make_eval_dataset(test, 8, Augment(), check_images=False, verbose=0), 1)[0]
    assert images.shape == (8, 227, 227, 3)
    np.testing.assert_array_equal(labels, test.labels[:8])
