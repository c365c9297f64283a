"""`ImageSet`: the one structure every data source returns and every pipeline consumes."""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np


@dataclasses.dataclass
class ImageSet:
    """Images of one split with labels remapped to 0..C-1.

    Exactly one of `images` (decoded, in memory) and `paths` (files on disk) is set.

    Attributes:
      labels: int64 [N], class index in 0..C-1 (C = len(class_names)).
      class_names: C human-readable names; class_names[labels[i]] names image i.
      images: uint8 [N, H, W, 3] RGB, or None when the images are files.
      paths: N file paths (JPEG/PNG), or None when the images are in memory.
      name: data set and split, for messages ("cub200/train").
      original_class_ids: C ids of the source data set (e.g. CUB's 1-based class ids), if any.
    """

    labels: np.ndarray
    class_names: Sequence[str]
    images: Optional[np.ndarray] = None
    paths: Optional[Sequence[str]] = None
    name: str = ""
    original_class_ids: Optional[Sequence[int]] = None

    def __post_init__(self):
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if (self.images is None) == (self.paths is None):
            raise ValueError(f"ImageSet {self.name!r}: set exactly one of images and paths")
        n = len(self.images) if self.images is not None else len(self.paths)
        if n != len(self.labels):
            raise ValueError(f"ImageSet {self.name!r}: {n} images but {len(self.labels)} labels")
        if self.images is not None:
            if self.images.dtype != np.uint8 or self.images.ndim != 4 or self.images.shape[-1] != 3:
                raise ValueError(f"ImageSet {self.name!r}: images must be uint8 [N, H, W, 3], got "
                                 f"{self.images.dtype} {self.images.shape}")
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= len(self.class_names)):
            raise ValueError(f"ImageSet {self.name!r}: labels must lie in 0..{len(self.class_names) - 1}")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def in_memory(self) -> bool:
        return self.images is not None

    def subset(self, index: np.ndarray, name: Optional[str] = None) -> "ImageSet":
        """Rows `index`, labels NOT remapped (use `remap` for that)."""
        index = np.asarray(index)
        return ImageSet(
            labels=self.labels[index], class_names=self.class_names,
            images=None if self.images is None else self.images[index],
            paths=None if self.paths is None else [self.paths[i] for i in index],
            name=name or self.name, original_class_ids=self.original_class_ids)

    def remap(self) -> "ImageSet":
        """Drops classes without images and renumbers the rest 0..C'-1 in order."""
        present = np.unique(self.labels)
        new = np.searchsorted(present, self.labels)
        ids = None if self.original_class_ids is None else [self.original_class_ids[i] for i in present]
        return ImageSet(labels=new, class_names=[self.class_names[i] for i in present],
                        images=self.images, paths=self.paths, name=self.name, original_class_ids=ids)
