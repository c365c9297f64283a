"""Readers for the benchmarks as their archives unpack, and for a user's folder of class folders.

Every reader returns `Splits`: it unpacks as `train, test = read_cub200(d)` (two path-based `ImageSet`s with the
zero-shot split: test classes never appear in training; labels remapped to 0..C-1 per split in increasing
original class id; `original_class_ids` and `class_names` kept) and carries `.report`, a `CountReport` comparing
what was found with the official counts. A partial copy (missing classes, listed files absent) is logged as a
warning and named in `report.summary()` ("cub200: partial copy: 3,428 of 5,864 training images ..."); with
`strict_counts=True` it raises DataError. Files listed by the annotation but absent on disk are dropped (and
counted); unreadable files are the pre-scan's job (`hdml_tf.data.images`).

Zero-shot splits (as the official converters, github wzzheng/HDML `datasets/*_converter.py`):
- cub200: classes 1-100 train (5,864 images), 101-200 test (5,924). Split by class id, not by
  train_test_split.txt (that file is the classification split).
- cars196: classes 1-98 train (8,054), 99-196 test (8,131), from cars_annos.mat; its `test` field (the
  classification split) and bounding boxes are ignored, as in the official code (whole images).
- sop: Ebay_train.txt (11,318 classes, 59,551 images) / Ebay_test.txt (11,316 classes, 60,502).
- folder: sorted class-folder names, permuted with numpy.random.default_rng(seed); the first
  C - round(C * test_fraction) classes of the permutation train, the rest test (at least one class each).
"""
from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from hdml_tf.data.image_set import ImageSet
from hdml_tf.errors import ConfigError, DataError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")

CUB_LAYOUT = ("CUB_200_2011/{images.txt, image_class_labels.txt, classes.txt, images/NNN.Class_Name/*.jpg} "
              "(data_dir may be CUB_200_2011 itself or its parent)")
CARS_LAYOUT = "cars_annos.mat beside car_ims/*.jpg (data_dir holds both)"
SOP_LAYOUT = ("Stanford_Online_Products/{Ebay_train.txt, Ebay_test.txt, <class>_final/*.JPG} "
              "(data_dir may be Stanford_Online_Products itself or its parent)")
FOLDER_LAYOUT = "data_dir/<class name>/<image>.{jpg,jpeg,png,bmp,gif}, one sub-folder per class"


@dataclasses.dataclass(frozen=True)
class SplitCount:
    """Images and classes of one split, found vs. official (expected_* None when unknown)."""

    images: int
    classes: int
    expected_images: Optional[int] = None
    expected_classes: Optional[int] = None
    missing_files: int = 0

    @property
    def complete(self) -> bool:
        return (self.expected_images in (None, self.images) and self.expected_classes in (None, self.classes)
                and not self.missing_files)


@dataclasses.dataclass(frozen=True)
class CountReport:
    """What a reader found, compared with the official counts.

    Attributes:
      dataset: "cub200", "cars196", "sop" or "folder".
      data_dir: where it was read.
      train, test: SplitCount of each split.
      missing_examples: up to 5 listed files that are absent on disk.
    """

    dataset: str
    data_dir: str
    train: SplitCount
    test: SplitCount
    missing_examples: Tuple[str, ...] = ()

    @property
    def partial(self) -> bool:
        """True when the copy differs from the official archive (fewer or more images/classes, files absent)."""
        return not (self.train.complete and self.test.complete)

    def summary(self) -> str:
        """One line, e.g. "cub200: partial copy: 3,428 of 5,864 training images (58 of 100 classes), ..."."""
        def part(split: SplitCount, what: str) -> str:
            if split.expected_images is None:
                return f"{split.images:,} {what} images ({split.classes:,} classes)"
            return (f"{split.images:,} of {split.expected_images:,} {what} images "
                    f"({split.classes:,} of {split.expected_classes:,} classes)")

        state = "partial copy" if self.partial else "complete"
        if self.train.expected_images is None:
            state = "read"
        text = f"{self.dataset}: {state}: {part(self.train, 'training')}, {part(self.test, 'test')}"
        missing = self.train.missing_files + self.test.missing_files
        if missing:
            text += f"; {missing:,} listed files absent (e.g. {self.missing_examples[0]})"
        return text + f" in {self.data_dir}"


class Splits(tuple):
    """`(train, test)` ImageSets that also carry `.report` (CountReport); unpacks like a plain pair."""

    def __new__(cls, train: ImageSet, test: ImageSet, report: CountReport):
        self = super().__new__(cls, (train, test))
        self.report = report
        return self

    @property
    def train(self) -> ImageSet:
        return self[0]

    @property
    def test(self) -> ImageSet:
        return self[1]


# ------------------------------------------------------------------------------------------- helpers


def _require(path: Path, layout: str, data_dir) -> Path:
    if not path.exists():
        raise DataError(f"{path} not found; expected the layout {layout} (data_dir={data_dir})")
    return path


def _table(path: Path, columns: int, skip_header: bool = False) -> List[List[str]]:
    """Whitespace-separated rows with at least `columns` fields; DataError names file:line otherwise."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if skip_header and number == 1:
                continue
            fields = line.split()
            if not fields:
                continue
            if len(fields) < columns:
                raise DataError(f"{path}:{number}: expected {columns} fields, got {line.strip()!r}")
            rows.append(fields)
    return rows


def _int(text: str, path: Path, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise DataError(f"{path}: {what} {text!r} is not an integer") from None


def _split(name: str, paths: Sequence[str], class_ids: Sequence[int], names: Dict[int, str]) -> ImageSet:
    """ImageSet with labels = rank of the original class id among this split's ids."""
    ids = np.asarray(class_ids, np.int64)
    present = np.unique(ids)
    return ImageSet(labels=np.searchsorted(present, ids), class_names=[names[int(c)] for c in present],
                    paths=list(paths), name=name, original_class_ids=[int(c) for c in present])


def _finish(dataset: str, data_dir, rows: List[Tuple[str, int]], is_train: Callable[[int], bool],
            names: Dict[int, str], expected: Optional[Tuple[int, int, int, int]], strict: bool) -> Splits:
    """Drops rows whose file is absent, splits by class, checks counts. rows: (absolute path, class id)."""
    exists = [os.path.isfile(p) for p, _ in rows]
    missing = [p for (p, _), ok in zip(rows, exists) if not ok]
    kept = [row for row, ok in zip(rows, exists) if ok]
    counts = []
    sets = []
    for split, want in (("train", True), ("test", False)):
        part = [(p, c) for p, c in kept if is_train(c) == want]
        lost = sum(1 for p, c in rows if is_train(c) == want) - len(part)
        sets.append(_split(f"{dataset}/{split}", [p for p, _ in part], [c for _, c in part], names))
        exp = expected[:2] if (expected and want) else (expected[2:] if expected else (None, None))
        counts.append(SplitCount(len(part), len({c for _, c in part}), exp[0], exp[1], lost))
    report = CountReport(dataset, str(data_dir), counts[0], counts[1], tuple(missing[:5]))
    if report.partial and expected is not None:
        if strict:
            raise DataError(f"{report.summary()}; expected the complete archive (strict_counts=True)")
        log.warning(report.summary())
    else:
        log.info(report.summary())
    for split in sets:
        if len(split) == 0:
            raise DataError(f"{dataset}: no {split.name.split('/')[1]} images found in {data_dir}; expected "
                            f"the official layout with images on disk")
    return Splits(sets[0], sets[1], report)


def _locate(data_dir, inner: str, marker: str, layout: str) -> Path:
    """data_dir itself if it holds `marker`, else data_dir/inner; DataError naming the missing file."""
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise DataError(f"data_dir {root} is not a directory; expected the layout {layout}")
    if (root / marker).exists():
        return root
    return _require(root / inner / marker, layout, data_dir).parent


# ------------------------------------------------------------------------------------------- readers


def read_cub200(data_dir, *, strict_counts: bool = False, seed: int = 0) -> Splits:
    """CUB-200-2011: classes 1-100 train (5,864 images), 101-200 test (5,924).

    Args:
      data_dir: CUB_200_2011/ or the folder that holds it.
      strict_counts: a copy that differs from the official counts raises DataError instead of a warning.
      seed: accepted for the readers' common signature (`hdml_tf.data.datasets`); the official split is fixed.

    Returns:
      Splits (train, test) of path-based ImageSets; class_names like "001.Black_footed_Albatross",
      original_class_ids the 1-based CUB ids.

    Raises:
      DataError: missing annotation file / wrong layout (naming the file), malformed lines, strict count mismatch.
    """
    root = _locate(data_dir, "CUB_200_2011", "images.txt", CUB_LAYOUT)
    for name in ("image_class_labels.txt", "classes.txt", "images"):
        _require(root / name, CUB_LAYOUT, data_dir)
    files = {r[0]: r[1] for r in _table(root / "images.txt", 2)}
    labels = {r[0]: _int(r[1], root / "image_class_labels.txt", "class id")
              for r in _table(root / "image_class_labels.txt", 2)}
    names = {_int(r[0], root / "classes.txt", "class id"): r[1] for r in _table(root / "classes.txt", 2)}
    rows = []
    for image_id, rel in files.items():
        if image_id not in labels:
            raise DataError(f"{root / 'image_class_labels.txt'}: image id {image_id} ({rel}) has no class; "
                            f"expected one line per image of images.txt")
        cls = labels[image_id]
        if cls not in names:
            raise DataError(f"{root / 'classes.txt'}: class id {cls} (of {rel}) is not listed")
        rows.append((str(root / "images" / rel), cls))
    return _finish("cub200", data_dir, rows, lambda c: c <= 100, names, (5864, 100, 5924, 100), strict_counts)


def read_cars196(data_dir, *, strict_counts: bool = False, seed: int = 0) -> Splits:
    """Cars196 (Stanford Cars, cars_annos.mat + car_ims/): classes 1-98 train (8,054), 99-196 test (8,131).

    Reads the struct array `annotations` (fields relative_im_path, bbox_x1, bbox_y1, bbox_x2, bbox_y2, class,
    test) and, if present, the cell array `class_names`. Bounding boxes and the `test` flag are not used.
    `strict_counts` and `seed` as in `read_cub200`.

    Raises:
      DataError: cars_annos.mat missing, unreadable or without the expected fields; strict count mismatch.
    """
    from scipy.io import loadmat  # local: scipy.io is only needed here

    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise DataError(f"data_dir {root} is not a directory; expected the layout {CARS_LAYOUT}")
    mat_path = _require(root / "cars_annos.mat", CARS_LAYOUT, data_dir)
    try:
        mat = loadmat(str(mat_path), squeeze_me=True)
    except Exception as e:  # scipy raises several types for a damaged file
        raise DataError(f"{mat_path} cannot be read as a MATLAB file ({type(e).__name__}); expected the "
                        f"official cars_annos.mat") from None
    annos = mat.get("annotations")
    fields = getattr(getattr(annos, "dtype", None), "names", None) or ()
    if "relative_im_path" not in fields or "class" not in fields:
        raise DataError(f"{mat_path} has no struct array 'annotations' with fields relative_im_path and class "
                        f"(found {', '.join(fields) or 'none'}); expected the official cars_annos.mat")
    annos = np.atleast_1d(annos)
    rel = [str(p) for p in annos["relative_im_path"]]
    cls = [int(np.asarray(c).ravel()[0]) for c in annos["class"]]
    raw_names = mat.get("class_names")
    raw_names = [] if raw_names is None else [str(n) for n in np.atleast_1d(raw_names)]
    names = {c: (raw_names[c - 1] if 0 < c <= len(raw_names) else f"class {c:03d}") for c in set(cls)}
    rows = [(str(root / p), c) for p, c in zip(rel, cls)]
    return _finish("cars196", data_dir, rows, lambda c: c <= 98, names, (8054, 98, 8131, 98), strict_counts)


def read_sop(data_dir, *, strict_counts: bool = False, seed: int = 0) -> Splits:
    """Stanford Online Products: Ebay_train.txt (11,318 classes, 59,551 images) / Ebay_test.txt (11,316, 60,502).

    Each list has the header `image_id class_id super_class_id path` and paths relative to the folder that holds
    it. class_names are "<super-class folder>/<class_id>", e.g. "bicycle_final/1". `strict_counts` and `seed` as in
    `read_cub200`.

    Raises:
      DataError: a list missing (naming it), a malformed line, a class in both lists, strict count mismatch.
    """
    root = _locate(data_dir, "Stanford_Online_Products", "Ebay_train.txt", SOP_LAYOUT)
    rows_by_split = []
    names: Dict[int, str] = {}
    for split in ("train", "test"):
        path = _require(root / f"Ebay_{split}.txt", SOP_LAYOUT, data_dir)
        with open(path, encoding="utf-8") as f:
            header = f.readline().split()
        if header[:4] != ["image_id", "class_id", "super_class_id", "path"]:
            raise DataError(f"{path}: header {' '.join(header)!r}; expected 'image_id class_id super_class_id path'")
        rows = []
        for fields in _table(path, 4, skip_header=True):
            cls = _int(fields[1], path, "class_id")
            names.setdefault(cls, f"{fields[3].split('/')[0]}/{cls}")
            rows.append((str(root / fields[3]), cls))
        rows_by_split.append(rows)
    train_ids = {c for _, c in rows_by_split[0]}
    overlap = train_ids & {c for _, c in rows_by_split[1]}
    if overlap:
        raise DataError(f"{root}: class_id {min(overlap)} appears in both Ebay_train.txt and Ebay_test.txt; "
                        f"expected disjoint classes (zero-shot split)")
    return _finish("sop", data_dir, rows_by_split[0] + rows_by_split[1], lambda c: c in train_ids, names,
                   (59551, 11318, 60502, 11316), strict_counts)


def read_image_folder(data_dir, test_fraction: float = 0.5, seed: int = 0) -> Splits:
    """A folder of class sub-folders (the user's own data), split by class.

    Rule: class folders (non-hidden sub-directories holding at least one image, searched recursively) sorted by
    name; numpy.random.default_rng(seed).permutation over them; the first C - round(C * test_fraction) classes
    train (clamped to 1..C-1), the rest test. Within a split, labels follow sorted folder names;
    original_class_ids are positions in the sorted list of all class folders.

    Raises:
      ConfigError: test_fraction outside (0, 1).
      DataError: data_dir missing, or fewer than two class folders with images.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(f"test_fraction={test_fraction} must lie strictly between 0 and 1")
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise DataError(f"data_dir {root} is not a directory; expected the layout {FOLDER_LAYOUT}")
    classes = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(str(f) for f in folder.rglob("*")
                       if f.suffix.lower() in IMAGE_EXTENSIONS and not f.name.startswith(".") and f.is_file())
        if files:
            classes.append((folder.name, files))
        else:
            log.warning("%s: class folder without images skipped", folder)
    if len(classes) < 2:
        raise DataError(f"{root} has {len(classes)} class folder(s) with images; expected at least 2 in the "
                        f"layout {FOLDER_LAYOUT}")
    c = len(classes)
    n_train = min(max(c - int(round(c * test_fraction)), 1), c - 1)
    permutation = np.random.default_rng(seed).permutation(c)
    train_ids = set(int(i) for i in permutation[:n_train])
    names = {i: name for i, (name, _) in enumerate(classes)}
    rows = [(f, i) for i, (_, files) in enumerate(classes) for f in files]
    return _finish("folder", data_dir, rows, lambda i: i in train_ids, names, None, False)


def read_dataset(name: str, data_dir, **kwargs) -> Splits:
    """The reader of a photo data set registered in `hdml_tf.data.datasets` (cub200, cars196, sop, folder, or one
    you registered there), called as `reader(data_dir, **kwargs)`.

    Raises:
      ConfigError: unknown name (listing the known ones) or an embedded data set (it has no data_dir).
    """
    from hdml_tf.data import datasets
    spec = datasets.find(name)
    if spec is None or spec.reader is None:
        photo = sorted(n for n in datasets.names() if datasets.get(n).reader is not None)
        why = "ships with the package and is not read from a data_dir" if spec else "is unknown"
        raise ConfigError(f"dataset={name!r} {why}; expected one of {', '.join(photo)}")
    return spec.reader(data_dir, **kwargs)
