"""Readers of the official layouts (CUB-200-2011, Cars196, SOP), image folders and the registry.

Each test writes a tiny tree in the official layout; readers only look at annotations and file existence, so the
image files here are a few placeholder bytes (decoding is tested in test_pipeline.py).
"""
import logging
import os
from pathlib import Path

import numpy as np
import pytest

from hdml_tf.config import ConfigError
from hdml_tf.data import readers
from hdml_tf.errors import DataError


def _touch(path: Path, data: bytes = b"\xff\xd8\xff placeholder") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def write_cub(root: Path, per_class, missing=()) -> Path:
    """CUB_200_2011/ with images.txt, image_class_labels.txt, classes.txt, train_test_split.txt, images/.

    per_class: {class_id: number of images}; `missing`: (class_id, k) pairs listed but not written.
    """
    cub = root / "CUB_200_2011"
    images, labels, classes, split = [], [], [], []
    image_id = 0
    for cls in sorted(per_class):
        folder = f"{cls:03d}.Bird_{cls}"
        classes.append(f"{cls} {folder}")
        for k in range(per_class[cls]):
            image_id += 1
            rel = f"{folder}/Bird_{cls}_{k:04d}.jpg"
            images.append(f"{image_id} {rel}")
            labels.append(f"{image_id} {cls}")
            split.append(f"{image_id} {k % 2}")
            if (cls, k) not in missing:
                _touch(cub / "images" / rel)
    for name, lines in (("images.txt", images), ("image_class_labels.txt", labels), ("classes.txt", classes),
                        ("train_test_split.txt", split)):
        (cub / name).write_text("\n".join(lines) + "\n")
    return cub


def write_cars(root: Path, per_class, with_names=True) -> Path:
    """cars_annos.mat (struct `annotations` with the real field names, cell `class_names`) and car_ims/."""
    from scipy.io import savemat

    fields = ["relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test"]
    rows = []
    n = 0
    for cls in sorted(per_class):
        for _ in range(per_class[cls]):
            n += 1
            rel = f"car_ims/{n:06d}.jpg"
            _touch(root / rel)
            rows.append((rel, 10, 20, 110, 90, cls, n % 2))
    annotations = np.zeros((1, len(rows)), dtype=[(f, "O") for f in fields])
    for i, row in enumerate(rows):
        for f, value in zip(fields, row):
            annotations[0, i][f] = np.array([[value]]) if f != "relative_im_path" else np.array([value])
    content = {"annotations": annotations}
    if with_names:
        names = np.empty((1, 196), dtype=object)
        for c in range(196):
            names[0, c] = f"Make Model {c + 1}"
        content["class_names"] = names
    savemat(str(root / "cars_annos.mat"), content)
    return root


def write_sop(root: Path, train, test) -> Path:
    """Stanford_Online_Products/Ebay_{train,test}.txt (real header and columns) and <super>_final/*.JPG."""
    sop = root / "Stanford_Online_Products"
    image_id = 0
    for split, per_class in (("train", train), ("test", test)):
        lines = ["image_id class_id super_class_id path"]
        for cls in sorted(per_class):
            sup = 1 + cls % 2
            sup_name = ("bicycle", "cabinet")[sup - 1]
            for k in range(per_class[cls]):
                image_id += 1
                rel = f"{sup_name}_final/{cls * 1000 + k}_{k}.JPG"
                _touch(sop / rel)
                lines.append(f"{image_id} {cls} {sup} {rel}")
        (sop / f"Ebay_{split}.txt").write_text("\n".join(lines) + "\n")
    return sop


# ------------------------------------------------------------------------------------------------ CUB


def test_cub_split_labels_and_partial_report(tmp_path, caplog):
    write_cub(tmp_path, {1: 3, 7: 2, 100: 2, 101: 3, 150: 2}, missing={(7, 1)})
    with caplog.at_level(logging.WARNING):
        splits = readers.read_cub200(tmp_path)
    train, test = splits
    assert train.name == "cub200/train" and test.name == "cub200/test"
    assert train.original_class_ids == [1, 7, 100] and test.original_class_ids == [101, 150]
    assert train.class_names == ["001.Bird_1", "007.Bird_7", "100.Bird_100"]
    np.testing.assert_array_equal(train.labels, [0, 0, 0, 1, 2, 2])  # (7, 1) is listed but absent
    np.testing.assert_array_equal(test.labels, [0, 0, 0, 1, 1])
    assert all(os.path.isfile(p) for p in train.paths + test.paths)
    report = splits.report
    assert report.partial and report.train.missing_files == 1 and report.test.missing_files == 0
    assert report.train.images == 6 and report.train.expected_images == 5864
    assert "partial copy: 6 of 5,864 training images (3 of 100 classes)" in report.summary()
    assert "5 of 5,924 test images (2 of 100 classes)" in report.summary()
    assert "partial copy" in caplog.text
    # data_dir may be CUB_200_2011 itself
    assert len(readers.read_cub200(tmp_path / "CUB_200_2011").train) == 6


def test_cub_strict_counts_and_complete_copy(tmp_path, caplog):
    write_cub(tmp_path / "part", {1: 2, 101: 2})
    with pytest.raises(DataError, match=r"partial copy: 2 of 5,864 .*strict_counts=True"):
        readers.read_cub200(tmp_path / "part", strict_counts=True)
    # The official counts: 5,864 images in classes 1-100, 5,924 in 101-200 (placeholder files).
    per_class = {c: 58 + (c <= 64) for c in range(1, 101)}                     # 64*59 + 36*58 = 5,864
    per_class.update({c: 59 + (c <= 124) for c in range(101, 201)})            # 24*60 + 76*59 = 5,924
    write_cub(tmp_path / "full", per_class)
    with caplog.at_level(logging.WARNING):
        train, test = splits = readers.read_cub200(tmp_path / "full", strict_counts=True)
    assert (len(train), train.num_classes, len(test), test.num_classes) == (5864, 100, 5924, 100)
    assert not splits.report.partial and "complete" in splits.report.summary()
    assert "partial" not in caplog.text


@pytest.mark.parametrize("remove", ["images.txt", "image_class_labels.txt", "classes.txt"])
def test_cub_missing_file_names_file_and_layout(tmp_path, remove):
    cub = write_cub(tmp_path, {1: 2, 101: 2})
    (cub / remove).unlink()
    with pytest.raises(DataError) as err:
        readers.read_cub200(tmp_path)
    message = str(err.value)
    assert remove in message and "expected the layout CUB_200_2011/{images.txt" in message
    assert "\n" not in message


def test_cub_malformed_line_and_unknown_class(tmp_path):
    cub = write_cub(tmp_path, {1: 2, 101: 2})
    (cub / "classes.txt").write_text("1 001.Bird_1\n")
    with pytest.raises(DataError, match=r"classes.txt: class id 101 .* is not listed"):
        readers.read_cub200(tmp_path)
    (cub / "image_class_labels.txt").write_text("1\n")
    with pytest.raises(DataError, match=r"image_class_labels.txt:1: expected 2 fields"):
        readers.read_cub200(tmp_path)


def test_missing_data_dir(tmp_path):
    with pytest.raises(DataError, match=r"is not a directory; expected the layout"):
        readers.read_cub200(tmp_path / "nowhere")


# ----------------------------------------------------------------------------------------------- Cars


def test_cars_split_names_and_report(tmp_path):
    write_cars(tmp_path, {1: 2, 5: 3, 98: 2, 99: 2, 196: 3})
    train, test = splits = readers.read_cars196(tmp_path)
    assert train.original_class_ids == [1, 5, 98] and test.original_class_ids == [99, 196]
    assert train.class_names[1] == "Make Model 5" and test.class_names[-1] == "Make Model 196"
    np.testing.assert_array_equal(train.labels, [0, 0, 1, 1, 1, 2, 2])
    np.testing.assert_array_equal(test.labels, [0, 0, 1, 1, 1])
    assert train.paths[0].endswith("car_ims/000001.jpg")
    assert "partial copy: 7 of 8,054 training images (3 of 98 classes)" in splits.report.summary()
    assert "5 of 8,131 test images (2 of 98 classes)" in splits.report.summary()


def test_cars_without_class_names_and_errors(tmp_path):
    write_cars(tmp_path, {2: 2, 100: 2}, with_names=False)
    train, test = readers.read_cars196(tmp_path)
    assert train.class_names == ["class 002"] and test.class_names == ["class 100"]
    with pytest.raises(DataError, match=r"cars_annos.mat not found; expected the layout cars_annos.mat beside"):
        readers.read_cars196(tmp_path / "car_ims")
    from scipy.io import savemat
    savemat(str(tmp_path / "cars_annos.mat"), {"something": np.zeros(3)})
    with pytest.raises(DataError, match=r"no struct array 'annotations' with fields relative_im_path"):
        readers.read_cars196(tmp_path)
    (tmp_path / "cars_annos.mat").write_bytes(b"not a mat file")
    with pytest.raises(DataError, match=r"cannot be read as a MATLAB file"):
        readers.read_cars196(tmp_path)


# ------------------------------------------------------------------------------------------------ SOP


def test_sop_split_and_report(tmp_path):
    write_sop(tmp_path, train={1: 2, 2: 3, 11318: 2}, test={11319: 2, 22634: 4})
    train, test = splits = readers.read_sop(tmp_path)
    assert train.original_class_ids == [1, 2, 11318] and test.original_class_ids == [11319, 22634]
    assert train.class_names[0] == "cabinet_final/1" and train.class_names[1] == "bicycle_final/2"
    np.testing.assert_array_equal(test.labels, [0, 0, 1, 1, 1, 1])
    assert train.paths[0].endswith(".JPG") and os.path.isfile(train.paths[0])
    assert "7 of 59,551 training images (3 of 11,318 classes)" in splits.report.summary()
    assert "6 of 60,502 test images (2 of 11,316 classes)" in splits.report.summary()
    assert len(readers.read_sop(tmp_path / "Stanford_Online_Products").test) == 6


def test_sop_errors(tmp_path):
    sop = write_sop(tmp_path, train={1: 2}, test={2: 2})
    (sop / "Ebay_test.txt").unlink()
    with pytest.raises(DataError, match=r"Ebay_test.txt not found; expected the layout Stanford_Online_Products"):
        readers.read_sop(tmp_path)
    (sop / "Ebay_test.txt").write_text("id class path\n1 2 bicycle_final/2000_0.JPG\n")
    with pytest.raises(DataError, match=r"expected 'image_id class_id super_class_id path'"):
        readers.read_sop(tmp_path)
    (sop / "Ebay_test.txt").write_text("image_id class_id super_class_id path\n9 1 2 bicycle_final/1000_0.JPG\n")
    with pytest.raises(DataError, match=r"class_id 1 appears in both"):
        readers.read_sop(tmp_path)


# --------------------------------------------------------------------------------------------- folder


def write_folder(root: Path, classes=6, per_class=3) -> Path:
    for c in range(classes):
        for k in range(per_class):
            _touch(root / f"kind_{c}" / f"{k}.png")
    _touch(root / "kind_0" / "notes.txt", b"not an image")
    _touch(root / "kind_0" / ".hidden.jpg")
    (root / "empty_class").mkdir()
    return root


def test_folder_split_rule_is_stated_and_seeded(tmp_path):
    write_folder(tmp_path, classes=6)
    train, test = splits = readers.read_image_folder(tmp_path, test_fraction=0.5, seed=3)
    names = [f"kind_{c}" for c in range(6)]  # sorted class-folder names (empty_class has no images)
    chosen = sorted(np.random.default_rng(3).permutation(6)[:3])
    assert train.class_names == [names[i] for i in chosen]
    assert train.original_class_ids == [int(i) for i in chosen]
    assert sorted(train.class_names + test.class_names) == names
    np.testing.assert_array_equal(np.unique(train.labels), [0, 1, 2])
    assert len(train) == 9 and len(test) == 9  # notes.txt and .hidden.jpg ignored
    assert splits.report.summary().startswith("folder: read: 9 training images (3 classes)")
    again = readers.read_image_folder(tmp_path, test_fraction=0.5, seed=3).train
    assert again.class_names == train.class_names
    other = [readers.read_image_folder(tmp_path, seed=s).train.class_names for s in range(4, 8)]
    assert any(o != train.class_names for o in other)
    assert readers.read_image_folder(tmp_path, test_fraction=0.2).train.num_classes == 5  # 6 - round(1.2)


def test_folder_errors(tmp_path):
    with pytest.raises(ConfigError, match="test_fraction=1.0"):
        readers.read_image_folder(tmp_path, test_fraction=1.0)
    _touch(tmp_path / "only" / "a.jpg")
    with pytest.raises(DataError, match=r"1 class folder\(s\) with images; expected at least 2"):
        readers.read_image_folder(tmp_path)


# ------------------------------------------------------------------------------------------- registry


def test_registry(tmp_path):
    write_folder(tmp_path)
    train, _ = readers.read_dataset("folder", tmp_path, seed=1)
    assert train.num_classes == 3
    with pytest.raises(ConfigError, match=r"dataset='mnist' is unknown; expected one of cars196, cub200"):
        readers.read_dataset("mnist", tmp_path)
    from hdml_tf.data import datasets
    datasets.register(datasets.DatasetSpec("mine", "my folder", (1, 2), reader=readers.read_image_folder))
    try:
        assert readers.read_dataset("mine", tmp_path, seed=1).train.class_names == train.class_names
        assert datasets.get("mine").load(tmp_path, seed=1).train.class_names == train.class_names
    finally:
        datasets.unregister("mine")


# ----------------------------------------------------------------------------------- real CUB subset


def test_real_cub_subset_is_reported_partial(cub_subset):
    root = cub_subset
    train, test = splits = readers.read_dataset("cub200", root)
    assert (len(train), train.num_classes, len(test), test.num_classes) == (3428, 58, 2474, 42)
    assert splits.report.partial
    assert "partial copy: 3,428 of 5,864 training images (58 of 100 classes)" in splits.report.summary()
    assert max(train.original_class_ids) <= 100 < min(test.original_class_ids)
    np.testing.assert_array_equal(np.unique(test.labels), np.arange(42))
